"""Tests of model.py: the GPT forward pass, its loss, initialization, optimizer groups, the KV cache and
sampling, and loading GPT-2 weights from Hugging Face (checked against transformers' own GPT2LMHeadModel)."""

import copy
import math
import os
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from torch.nn import functional as F

import checkpoint
from model import GPT, GPTConfig, KVCache, sample_next

from scripts import REPO_ROOT


pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_config(**overrides):
    args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    args.update(overrides)
    return GPTConfig(**args)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def all_logits(model, idx):
    """Logits at every position: forward computes them all only when it is given targets."""
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits


def attention_by_hand(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """The reference for scaled_dot_product_attention, from the shapes alone: softmax of the scaled q.k
    over the keys up to each query's own position (the query i of T new ones after S - T cached keys is
    at position S - T + i)."""
    T, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    att = att.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), float('-inf'))
    return F.dropout(F.softmax(att, dim=-1), dropout_p) @ v


SDPA = F.scaled_dot_product_attention


def use_attention(monkeypatch, flash):
    """model.py's attention: scaled_dot_product_attention (flash), or else the by-hand reference in its place
    (model.py calls it as F.scaled_dot_product_attention, from this same module F)."""
    monkeypatch.setattr(F, 'scaled_dot_product_attention', SDPA if flash else attention_by_hand)


# ----------------------------------------------------------------------------- forward pass and loss

@pytest.mark.parametrize('bias', [True, False])
def test_flash_attention_matches_plain_attention_and_its_gradients(bias, monkeypatch):
    model = tiny_model(bias=bias)
    model.train()  # dropout is 0, so train mode is deterministic; it exercises the training code path
    idx = torch.randint(0, 50, (3, 16))
    targets = torch.randint(0, 50, (3, 16))

    def logits_loss_grads(flash):
        use_attention(monkeypatch, flash)
        model.zero_grad()
        logits, loss = model(idx, targets)
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_flash, loss_flash, grads_flash = logits_loss_grads(True)
    logits_plain, loss_plain, grads_plain = logits_loss_grads(False)
    torch.testing.assert_close(logits_flash, logits_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_flash, loss_plain, atol=1e-5, rtol=0)
    assert grads_flash.keys() == grads_plain.keys()
    for name in grads_flash:
        torch.testing.assert_close(grads_flash[name], grads_plain[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize('flash', [True, False])
def test_logits_never_depend_on_later_tokens(flash, monkeypatch):
    model = tiny_model()
    model.eval()
    use_attention(monkeypatch, flash)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (2, 16), generator=generator)
    base = all_logits(model, idx)
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1:] = (idx[:, t + 1:] + 1 + torch.randint(0, 48, changed[:, t + 1:].shape,
                                                                  generator=generator)) % 50
        assert (changed[:, t + 1:] != idx[:, t + 1:]).all()
        logits = all_logits(model, changed)
        torch.testing.assert_close(logits[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
        # and the later positions do see the change (else this test could not tell anything apart)
        assert not torch.allclose(logits[:, t + 1:], base[:, t + 1:], atol=1e-4)


def test_loss_is_mean_cross_entropy_over_targets_not_minus_one():
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 16))
    targets = torch.randint(0, 50, (3, 16))
    targets[0, :4] = -1  # ignored positions, like padding
    targets[2, 10] = -1
    logits, loss = model(idx, targets)
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    keep = targets != -1
    picked = log_probs[keep].gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    assert picked.numel() == 3 * 16 - 5
    expected = -picked.sum() / picked.numel()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_forward_without_targets_returns_last_position_logits_only():
    model = tiny_model()
    model.eval()
    idx = torch.randint(0, 50, (3, 11))
    logits, loss = model(idx)
    assert loss is None
    assert logits.shape == (3, 1, 50)
    torch.testing.assert_close(logits, all_logits(model, idx)[:, -1:], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- size and initialization

def non_embedding_params_by_hand(n_layer, n_embd, vocab_size, bias=True):
    """GPT-2's parameter count from its shapes: per block two LayerNorms, the qkv and output projections and
    the 4x MLP; then the (tied) token embeddings and the final LayerNorm. Position embeddings excluded."""
    C = n_embd
    b = 1 if bias else 0
    per_block = (2 * C * (1 + b)                  # ln_1, ln_2
                 + C * 3 * C + 3 * C * b          # attn.c_attn
                 + C * C + C * b                  # attn.c_proj
                 + C * 4 * C + 4 * C * b          # mlp.c_fc
                 + 4 * C * C + C * b)             # mlp.c_proj
    return n_layer * per_block + vocab_size * C + C * (1 + b)


def test_gpt2_124m_has_124439808_parameters():
    with torch.device('meta'):  # shapes only: no memory, no time spent on random init
        model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True))
    total = 124_439_808
    assert sum(p.numel() for p in model.parameters()) == total
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 1024 * 768
    assert non_embedding_params_by_hand(12, 768, 50257) == total - 1024 * 768  # the hand formula itself


@pytest.mark.parametrize('bias', [True, False])
def test_get_num_params_matches_count_from_shapes(bias):
    model = tiny_model(bias=bias, n_layer=3, n_embd=48, vocab_size=70)
    assert model.get_num_params() == non_embedding_params_by_hand(3, 48, 70, bias)


def test_init_scales_residual_projections_by_depth():
    n_layer = 4
    model = tiny_model(n_layer=n_layer, n_head=4, n_embd=256, block_size=64, vocab_size=512)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    checked = {'residual': 0, 'other': 0}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach()
        expected = residual_std if name.endswith('c_proj') else 0.02
        checked['residual' if name.endswith('c_proj') else 'other'] += 1
        # 65k+ samples each: the sample std is within ~0.3% of the true one, the mean within ~0.004 std
        assert abs(w.std().item() - expected) < 0.03 * expected, name
        assert abs(w.mean().item()) < 0.02 * expected, name
        if module.bias is not None:
            assert (module.bias == 0).all(), name
    assert checked == {'residual': 2 * n_layer, 'other': 2 * n_layer + 1}  # c_attn, c_fc per block, lm_head
    assert abs(model.transformer.wpe.weight.std().item() - 0.02) < 0.03 * 0.02


# ----------------------------------------------------------------------------- checkpoints, cropping

@pytest.mark.parametrize('compiled_prefix', ['', '_orig_mod.'])
def test_weight_tying_survives_a_checkpoint_round_trip(tmp_path, compiled_prefix):
    model = tiny_model(gelu_approximate='tanh')  # not the default: the round trip must keep it
    state = {compiled_prefix + k: v for k, v in model.state_dict().items()}
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint({'model': state, 'model_args': asdict(model.config), 'iter_num': 7,
                                'best_val_loss': 2.5, 'config': {}}, path)
    loaded_ckpt = checkpoint.load_checkpoint(path)
    assert loaded_ckpt['iter_num'] == 7
    loaded = checkpoint.model_from_checkpoint(loaded_ckpt)
    assert loaded.transformer.wte.weight is loaded.lm_head.weight
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    idx = torch.randint(0, 50, (2, 16))
    model.eval()
    loaded.eval()
    torch.testing.assert_close(all_logits(loaded, idx), all_logits(model, idx), atol=0, rtol=0)
    # still tied when trained further: a change through one name shows through the other
    with torch.no_grad():
        loaded.lm_head.weight[3, 0] = 123.0
    assert loaded.transformer.wte.weight[3, 0].item() == 123.0


def test_model_from_checkpoint_applies_dropout_override(tmp_path):
    model = tiny_model()
    ckpt = {'model': model.state_dict(), 'model_args': asdict(model.config)}
    loaded = checkpoint.model_from_checkpoint(ckpt, dropout=0.25)
    assert loaded.config.dropout == 0.25
    assert loaded.transformer.drop.p == 0.25


def test_crop_block_size_keeps_logits_and_refuses_longer_input():
    model = tiny_model(block_size=32)
    model.eval()
    idx = torch.randint(0, 50, (2, 16))
    before = all_logits(model, idx)
    model.crop_block_size(16)
    assert model.config.block_size == 16
    assert model.transformer.wpe.weight.shape == (16, 32)
    torch.testing.assert_close(all_logits(model, idx), before, atol=1e-6, rtol=0)
    with pytest.raises((AssertionError, ValueError)):
        model(torch.randint(0, 50, (2, 17)))
    # generation (with its cache sized by block_size) slides the window at the new size
    out = model.generate(idx[:, :4], 20, temperature=0)
    assert out.shape == (2, 24)
    assert torch.equal(out, model.generate(idx[:, :4], 20, temperature=0, use_cache=False))


# ----------------------------------------------------------------------------- optimizer, MFU

def test_configure_optimizers_decays_matrices_only_and_uses_fused_adamw_on_cpu():
    model = tiny_model()
    [optimizer] = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                                             device_type='cpu')
    decay, no_decay = optimizer.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    params = list(model.parameters())  # each tied parameter once
    assert {id(p) for p in decay['params']} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in no_decay['params']} == {id(p) for p in params if p.dim() < 2}
    grouped = [id(p) for group in optimizer.param_groups for p in group['params']]
    assert len(grouped) == len(set(grouped)) == len(params)
    assert optimizer.defaults['fused']

    reference = copy.deepcopy(model)
    ref_params = dict(reference.named_parameters())
    oracle = torch.optim.AdamW(
        [{'params': [ref_params[n] for n, p in model.named_parameters() if p.dim() >= 2], 'weight_decay': 0.1},
         {'params': [ref_params[n] for n, p in model.named_parameters() if p.dim() < 2], 'weight_decay': 0.0}],
        lr=1e-3, betas=(0.9, 0.95), fused=False, foreach=False)
    idx = torch.randint(0, 50, (4, 16))
    targets = torch.randint(0, 50, (4, 16))
    for _ in range(2):  # the second step exercises the running moments
        for m, opt in ((model, optimizer), (reference, oracle)):
            opt.zero_grad()
            m(idx, targets)[1].backward()
            opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(model.lm_head.weight, tiny_model().lm_head.weight)  # a step did happen


def test_estimate_mfu_follows_the_palm_formula():
    cfg = dict(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=100)
    model = tiny_model(**cfg)
    N = non_embedding_params_by_hand(3, 64, 100)
    L, H, Q, T = 3, 4, 64 // 4, 32
    flops_per_token = 6 * N + 12 * L * H * Q * T
    assert model.flops_per_token() == flops_per_token
    tokens_per_iter, dt, peak = 12 * 32, 0.25, 1e12
    expected = flops_per_token * tokens_per_iter / dt / peak
    assert model.estimate_mfu(tokens_per_iter, dt, peak) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- Hugging Face parity

def random_hf_configs():
    """Three small GPT-2 shapes, 1 to 3 layers, drawn with a fixed seed (this one gives 4, 3 and 2 heads and
    context lengths of 63, 49 and 31); the second has a small vocabulary."""
    rng = random.Random(5)
    configs = []
    for n_layer, vocab_size in ((1, 50257), (2, 100), (3, 50257)):
        n_head = rng.randint(2, 4)
        configs.append(dict(n_layer=n_layer, n_head=n_head,
                            n_embd=n_head * rng.randint(-(-32 // n_head), 64 // n_head),
                            n_positions=rng.randint(16, 64), vocab_size=vocab_size))
    return configs


def save_random_hf_gpt2(directory, seed, n_layer, n_head, n_embd, n_positions, vocab_size,
                        activation_function='gelu_new'):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function=activation_function, bos_token_id=None, eos_token_id=None,
                        initializer_range=0.1)  # larger than GPT-2's 0.02: varied, non-repeating greedy text
    hf = GPT2LMHeadModel(config)
    hf.eval()
    hf.save_pretrained(str(directory))
    return hf


# GPT-2's tanh GELU, the exact GELU, and transformers' other name for the tanh one
@pytest.mark.parametrize('index, activation', [(0, 'gelu_new'), (1, 'gelu'), (2, 'gelu_pytorch_tanh')])
def test_from_pretrained_matches_transformers_logits_and_greedy_generation(tmp_path, index, activation):
    shape = random_hf_configs()[index]
    assert 32 <= shape['n_embd'] <= 64 and shape['n_embd'] % shape['n_head'] == 0
    hf = save_random_hf_gpt2(tmp_path, index, **shape, activation_function=activation)
    model = GPT.from_pretrained(str(tmp_path))
    model.eval()
    assert model.config.gelu_approximate == ('none' if activation == 'gelu' else 'tanh')
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.block_size,
            model.config.vocab_size) == (shape['n_layer'], shape['n_head'], shape['n_embd'],
                                         shape['n_positions'], shape['vocab_size'])
    T, V = shape['n_positions'], shape['vocab_size']
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(index))
    with torch.no_grad():
        expected = hf(idx).logits
    torch.testing.assert_close(all_logits(model, idx), expected, atol=1e-5, rtol=0)

    prompt = idx[:, :5]
    new_tokens = min(30, T - prompt.size(1))  # transformers cannot go past n_positions
    ours = model.generate(prompt, new_tokens, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    assert theirs.shape == (2, 5 + new_tokens)
    assert torch.equal(ours, theirs)


def test_from_pretrained_applies_dropout_override(tmp_path):
    save_random_hf_gpt2(tmp_path, 0, n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100)
    model = GPT.from_pretrained(str(tmp_path), override_args={'dropout': 0.1})
    assert model.config.dropout == 0.1
    assert model.transformer.drop.p == 0.1
    assert model.transformer.h[0].attn.dropout == 0.1


def test_from_pretrained_rejects_unsupported_activation_in_one_line(tmp_path):
    save_random_hf_gpt2(tmp_path, 0, n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100,
                        activation_function='relu')
    with pytest.raises(ValueError) as info:
        GPT.from_pretrained(str(tmp_path))
    assert "activation_function='relu'" in str(info.value) and '\n' not in str(info.value)


def test_exact_and_tanh_gelu_models_differ():
    """The GELU choice reaches the MLP: the same weights give different logits with the other GELU."""
    exact = tiny_model()
    with torch.no_grad():
        for p in exact.parameters():
            p.mul_(5.0)  # GPT-2's small init keeps GELU inputs near 0, where the two GELUs nearly agree
    tanh = GPT(GPTConfig(**{**vars(exact.config), 'gelu_approximate': 'tanh'}))
    tanh.load_state_dict(exact.state_dict())
    idx = torch.randint(0, exact.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    assert exact.config.gelu_approximate == 'none'  # from scratch: nanoGPT's exact GELU
    assert (all_logits(exact, idx) - all_logits(tanh, idx)).abs().max().item() > 1e-4  # float32 noise: ~1e-6


def test_from_pretrained_rejects_unknown_name_in_one_line():
    with pytest.raises(ValueError) as info:
        GPT.from_pretrained('gpt3')
    message = str(info.value)
    assert '\n' not in message
    assert 'gpt3' in message
    for name in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'):
        assert name in message


def test_from_pretrained_rejects_directory_without_weights(tmp_path):
    with pytest.raises(ValueError) as info:
        GPT.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert '\n' not in message
    assert str(tmp_path) in message and 'no GPT-2 weights' in message


def test_from_pretrained_hub_name_offline_says_weights_could_not_be_downloaded(tmp_path):
    code = ("from model import GPT\n"
            "try:\n"
            "    GPT.from_pretrained('gpt2')\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf-home'))
    env.pop('HF_HUB_CACHE', None)
    env.pop('TRANSFORMERS_CACHE', None)
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith('ValueError:')]
    assert len(lines) == 1, result.stdout + result.stderr
    message = lines[0]
    assert 'could not download' in message and 'gpt2' in message
    assert 'init_from' in message and 'DIR' in message


# ----------------------------------------------------------------------------- KV cache and generation

@pytest.fixture
def gen_model():
    """A small random model with a short context, so that 60 new tokens slide well past block_size. Its
    weights are scaled up from GPT-2's tiny init so that greedy decoding varies instead of repeating."""
    model = tiny_model(seed=3, block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    model.eval()
    return model


def test_cached_greedy_generation_equals_uncached_past_block_size(gen_model):
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    cached = gen_model.generate(prompt, 60, temperature=0, use_cache=True)
    uncached = gen_model.generate(prompt, 60, temperature=0, use_cache=False)
    assert cached.shape == (1, 65)
    assert torch.equal(cached, uncached)
    assert cached[0, 5:].unique().numel() > 3  # the model really varies its output

    top1_cached = gen_model.generate(prompt, 60, temperature=1.0, top_k=1, use_cache=True)
    top1_uncached = gen_model.generate(prompt, 60, temperature=1.0, top_k=1, use_cache=False)
    assert torch.equal(top1_cached, top1_uncached)
    assert torch.equal(top1_cached, cached)  # top_k=1 is greedy


def test_greedy_generation_is_argmax_of_full_forward_each_step(gen_model):
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    out = gen_model.generate(prompt, 40, temperature=0)
    idx = prompt
    for _ in range(40):
        window = idx[:, -gen_model.config.block_size:]
        next_token = all_logits(gen_model, window)[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, next_token), dim=1)
    assert torch.equal(out, idx)


def test_cached_sampling_equals_uncached_sampling_with_same_seed(gen_model):
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(42)
    cached = gen_model.generate(prompt, 60, temperature=1.0, top_k=None, use_cache=True)
    torch.manual_seed(42)
    uncached = gen_model.generate(prompt, 60, temperature=1.0, top_k=None, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.manual_seed(43)
    other_seed = gen_model.generate(prompt, 60, temperature=1.0, top_k=None, use_cache=True)
    assert not torch.equal(cached, other_seed)  # sampling really is random


@pytest.mark.parametrize('flash', [True, False])
def test_incremental_cached_logits_equal_full_forward_logits(gen_model, flash, monkeypatch):
    use_attention(monkeypatch, flash)
    B, T, P = 2, 32, 7
    idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(3))
    full = all_logits(gen_model, idx)
    cache = KVCache(gen_model.config, B)
    with torch.no_grad():
        logits, _ = gen_model(idx[:, :P], kv_cache=cache)
        torch.testing.assert_close(logits[:, -1], full[:, P - 1], atol=1e-5, rtol=0)
        for t in range(P, T):
            logits, _ = gen_model(idx[:, t:t + 1], kv_cache=cache)
            assert cache.length == t + 1
            torch.testing.assert_close(logits[:, -1], full[:, t], atol=1e-5, rtol=0, msg=f'position {t}')


@pytest.mark.parametrize('flash', [True, False])
def test_several_new_tokens_after_cached_ones_see_exactly_their_past(gen_model, flash, monkeypatch):
    # chunks of several tokens into a non-empty cache: each must attend to the cache and to the earlier
    # tokens of its own chunk only (SDPA's is_causal alone would align the mask to the wrong corner)
    use_attention(monkeypatch, flash)
    idx = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(8))
    full = all_logits(gen_model, idx)
    cache = KVCache(gen_model.config, 2)
    chunks = []
    with torch.no_grad():
        for start, end in ((0, 5), (5, 6), (6, 17), (17, 30)):
            chunk = idx[:, start:end]
            logits, _ = gen_model(chunk, targets=torch.zeros_like(chunk), kv_cache=cache)  # logits everywhere
            chunks.append(logits)
            assert cache.length == end
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


def test_cache_holds_keys_and_values_in_the_autocast_dtype(gen_model):
    # under mixed precision keys and values come out of c_attn in bfloat16: a float32 cache would double its
    # memory and convert every layer's whole cache back for attention at every token
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    cache = KVCache(gen_model.config, 2)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        prefill, _ = gen_model(idx[:, :5], kv_cache=cache)
        step, _ = gen_model(idx[:, 5:], kv_cache=cache)
        full, _ = gen_model(idx, targets=torch.zeros_like(idx))
    assert all(kv.dtype == torch.bfloat16 for kv in cache.kv)
    torch.testing.assert_close(step[:, -1].float(), full[:, -1].float(), atol=0.1, rtol=0.02)
    assert not torch.allclose(step[:, -1].float(), prefill[:, -1].float(), atol=0.1, rtol=0.02)


def test_batched_generation_equals_each_row_alone(gen_model):
    prompts = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    batched = gen_model.generate(prompts, 40, temperature=0)
    for row in range(3):
        alone = gen_model.generate(prompts[row:row + 1], 40, temperature=0)
        assert torch.equal(batched[row:row + 1], alone), f'row {row}'
    assert not torch.equal(batched[0], batched[1])


def test_generated_tokens_can_be_trained_on(gen_model):
    out = gen_model.generate(torch.zeros(1, 2, dtype=torch.long), 8, temperature=0)
    _, loss = gen_model(out[:, :-1], out[:, 1:])
    loss.backward()  # fails if generate made inference-mode tensors, which autograd refuses to save
    assert gen_model.lm_head.weight.grad is not None
    gen_model.zero_grad(set_to_none=True)


def test_on_token_sees_every_new_token(gen_model):
    prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(5))
    seen = []
    out = gen_model.generate(prompt, 10, temperature=0, on_token=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.cat(seen, dim=1), out[:, 3:])


class ScriptedModel(GPT):
    """A GPT whose forward ignores its input and returns, at call i, logits whose argmax for row r is
    script[r][i]: lets the stop-token logic be tested with known token sequences."""

    def __init__(self, script, vocab_size=10):
        super().__init__(tiny_config(vocab_size=vocab_size, block_size=64))
        self.script = script
        self.calls = 0

    def forward(self, idx, targets=None, kv_cache=None):
        logits = torch.zeros(len(self.script), 1, self.config.vocab_size)
        for row, tokens in enumerate(self.script):
            logits[row, 0, tokens[self.calls]] = 10.0
        self.calls += 1
        if kv_cache is not None:
            kv_cache.length += idx.size(1)
        return logits, None


@pytest.mark.parametrize('use_cache', [True, False])
def test_generation_stops_once_every_row_emitted_stop_token(use_cache):
    stop = 9
    script = [[1, 2, stop, 3, 4, 5, 6, 7, 8, 1],   # stops at step 3, then pads with stop
              [5, 5, 5, 5, stop, 1, 2, 3, 4, 5]]   # stops at step 5
    model = ScriptedModel(script)
    prompt = torch.tensor([[0, 0], [0, 1]])
    out = model.generate(prompt, 10, temperature=0, stop_token=stop, use_cache=use_cache)
    assert out.shape == (2, 2 + 5)
    assert out[0, 2:].tolist() == [1, 2, stop, stop, stop]
    assert out[1, 2:].tolist() == [5, 5, 5, 5, stop]
    assert model.calls == 5


def test_generation_without_stop_token_emitted_runs_full_length():
    model = ScriptedModel([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 6, temperature=0, stop_token=9)
    assert out[:, 1:].tolist() == [[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]]


# ----------------------------------------------------------------------------- sample_next

def test_sample_next_temperature_zero_is_argmax():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(dim=-1, keepdim=True))
    # top_k and top_p do not change greedy decoding
    assert torch.equal(sample_next(logits, temperature=0, top_k=3, top_p=0.5), logits.argmax(-1, keepdim=True))


def test_sample_next_top_k_only_returns_the_k_likeliest_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 30)
    logits[0, [4, 17, 22]] = torch.tensor([3.0, 2.9, 2.8])  # the top 3, close enough to all be drawn
    samples = sample_next(logits.expand(4000, 30).clone(), temperature=1.0, top_k=3)
    assert set(samples.flatten().tolist()) == {4, 17, 22}
    samples = sample_next(logits.expand(4000, 30).clone(), temperature=1.0, top_k=None)
    assert len(set(samples.flatten().tolist())) > 3  # without top_k others appear


@pytest.mark.parametrize('top_p, allowed', [(0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_sample_next_top_p_keeps_smallest_set_reaching_p(top_p, allowed):
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # the same distribution with shuffled token ids: the kept set must follow the probabilities, not the ids
    permutation = torch.tensor([2, 0, 3, 1])  # token permutation[i] has probability probs[i]
    logits = torch.empty(4)
    logits[permutation] = probs.log()
    samples = sample_next(logits.expand(4000, 4).clone(), temperature=1.0, top_p=top_p)
    assert set(samples.flatten().tolist()) == {permutation[i].item() for i in allowed}


def test_sample_next_temperature_sharpens_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.0]]).expand(20000, 2).clone()
    share_of_top = {t: (sample_next(logits, temperature=t) == 0).float().mean().item() for t in (0.5, 1.0, 2.0)}
    for t, share in share_of_top.items():
        expected = 1 / (1 + math.exp(-1 / t))
        assert abs(share - expected) < 0.02, (t, share, expected)


# ----------------------------------------------------------------------------- the faster recipes' options

RECIPE = dict(rope=True, qk_norm=True)


def test_rotary_attention_scores_depend_only_on_relative_position():
    from model import apply_rotary, rotary_tables
    cos, sin = rotary_tables(64, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):  # query at position i, key at position j
        return (apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum()

    for i, j in ((5, 2), (9, 9), (3, 7)):
        for shift in (1, 20, 50):
            torch.testing.assert_close(score(i + shift, j + shift), score(i, j), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)  # the distance itself does matter
    torch.testing.assert_close(apply_rotary(q, cos[:1], sin[:1]), q)  # position 0 is no rotation


def test_a_rotary_model_has_no_position_table_and_its_logits_stay_causal():
    model = tiny_model(rope=True).eval()
    assert 'wpe' not in model.transformer
    idx = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(all_logits(model, idx)[:, :8], all_logits(model, changed)[:, :8])


@pytest.mark.parametrize('setting', [*RECIPE, 'all'])
def test_cached_generation_equals_uncached_past_block_size_with_each_recipe_setting(setting):
    options = RECIPE if setting == 'all' else {setting: RECIPE[setting]}
    model = tiny_model(seed=5, block_size=24, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **options)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)  # as gen_model: so that greedy decoding varies
    model.eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, 50, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 50, temperature=0, use_cache=False))
    torch.manual_seed(9)
    sampled = model.generate(prompt, 50, temperature=1.0, use_cache=True)
    torch.manual_seed(9)
    assert torch.equal(sampled, model.generate(prompt, 50, temperature=1.0, use_cache=False))
    assert len(set(sampled[0, 5:].tolist())) > 10  # many different tokens: the comparison is not trivial


def test_a_recipe_model_round_trips_through_a_checkpoint_and_old_checkpoints_load_as_gpt2(tmp_path):
    model = tiny_model(**RECIPE)
    checkpoint.save_checkpoint({'model': model.state_dict(), 'model_args': asdict(model.config)}, str(tmp_path / 'c.pt'))
    loaded = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(tmp_path / 'c.pt'))).eval()
    assert all(getattr(loaded.config, k) == v for k, v in RECIPE.items())
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(loaded, idx), all_logits(model.eval(), idx), atol=0, rtol=0)
    # model_args that name none of the recipe's settings (nanoGPT's, ours from before them) are GPT-2's
    old_args = {k: v for k, v in asdict(tiny_config()).items() if k not in RECIPE}
    old = checkpoint.model_from_checkpoint({'model': tiny_model().state_dict(), 'model_args': old_args})
    assert not any(getattr(old.config, k) for k in RECIPE) and 'wpe' in old.transformer


def test_muon_takes_the_hidden_matrices_and_adamw_everything_else_each_at_its_rate():
    model = tiny_model(**RECIPE, bias=True)
    adamw, muon = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95),
                                             device_type='cpu', muon_lr=0.02)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {name: [names[id(p)] for p in group['params']]
              for name, group in zip(('decay', 'no decay', 'muon'), adamw.param_groups + muon.param_groups)}
    hidden = [n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith('transformer.h.')]
    assert sorted(groups['muon']) == sorted(hidden) and len(hidden) == 4 * 2  # c_attn, c_proj, c_fc, c_proj
    assert groups['decay'] == ['transformer.wte.weight']  # the token embedding, tied to the lm_head
    assert all(n.endswith(('.bias', 'ln_1.weight', 'ln_2.weight', 'ln_f.weight')) for n in groups['no decay'])
    everything = [n for g in groups.values() for n in g]
    assert sorted(everything) == sorted(names.values())  # every parameter in exactly one group
    assert [g['lr'] for g in adamw.param_groups] == [3e-3, 3e-3] and muon.param_groups[0]['lr'] == 0.02
    assert [g['initial_lr'] for g in adamw.param_groups + muon.param_groups] == [3e-3, 3e-3, 0.02]

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    model(idx, idx)[1].backward()
    for opt in (adamw, muon):
        opt.step()
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unmoved == []


def newton_schulz(g, steps=5, coefficients=(3.4445, -4.7750, 2.0315)):
    """Muon's orthogonalisation, by hand in float32: Keller Jordan's quintic Newton-Schulz iteration."""
    a, b, c = coefficients
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


def test_muon_update_of_a_matrix_is_its_orthogonalised_gradient():
    # the first step's momentum is the gradient itself, so the step is -lr * sqrt(max(1, rows / cols)) *
    # NS(gradient) (Keller's scaling); torch runs NS in bfloat16, hence the tolerance
    model = tiny_model(**RECIPE)
    _, muon = model.configure_optimizers(weight_decay=0.0, learning_rate=1e-3, betas=(0.9, 0.95), device_type='cpu',
                                         muon_lr=0.05)
    weight = model.transformer.h[0].mlp.c_fc.weight  # 128 x 32
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    model(idx, idx)[1].backward()
    before, grad = weight.detach().clone(), weight.grad.clone()
    muon.step()
    step = (before - weight.detach()) / (0.05 * math.sqrt(128 / 32))
    torch.testing.assert_close(step, newton_schulz(grad), atol=0.03, rtol=0.05)
    assert not torch.allclose(step, grad / grad.norm(), atol=0.03)  # orthogonalised, not just normalised


# ----------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize('options', [{}, RECIPE], ids=['gpt2', 'recipe'])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(options):
    # dropout on: the recomputed forward must draw the same masks as the first one
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        model = tiny_model(seed=1, dropout=0.1, **options).train()
        model.activation_checkpointing = recompute
        torch.manual_seed(7)
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_recomputed, grads_recomputed) = results
    torch.testing.assert_close(loss_recomputed, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_recomputed[name], grad, atol=1e-6, rtol=0, msg=name)
