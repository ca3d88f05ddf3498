"""
Tests of LoRA (lora.py and train.py's lora_* settings): adapters made by peft on a frozen base. The oracles are
the base model itself (zero-initialised adapters change nothing, the frozen weights never change), the merge
computed by hand (W + alpha / rank * B @ A), an uninterrupted run (resume), one process (DDP), and what the
readers give on a plain checkpoint of the model merged by hand.
"""

import copy
import json
import os
import re
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

import lora
from checkpoint import load_checkpoint, save_checkpoint
from configurator import LORA_TARGETS, UserError, check_settings
from model import GPT, GPTConfig
from scripts import assert_one_line_error, eval_losses, iter_losses, run_script, train
from test_ddp import assert_same_losses, check_ok, torchrun

RECORD = dict(rank=4, alpha=8.0, dropout=0.0, targets=','.join(LORA_TARGETS))
IDX = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=True))


def by_hand(base_state, adapters, record):
    """The merged weights computed without peft: W + alpha / rank * B @ A for each adapted Linear."""
    merged = {k: v.clone().float() for k, v in base_state.items()}
    for key, a in adapters.items():
        if key.endswith('.lora_A.weight'):
            layer = key.removesuffix('.lora_A.weight')
            merged[f'{layer}.weight'] += record['alpha'] / record['rank'] * adapters[f'{layer}.lora_B.weight'] @ a
    return merged


def adapter_count(n_embd, n_layer, rank):
    """A and B of every target, by hand: rank * (in + out) for c_attn, attn.c_proj, c_fc, mlp.c_proj."""
    return n_layer * rank * ((n_embd + 3 * n_embd) + (n_embd + n_embd) + (n_embd + 4 * n_embd) + (4 * n_embd + n_embd))


# ----------------------------------------------------------------------------- the adapters, in one process

def test_zero_initialised_adapters_compute_exactly_what_the_base_does():
    base = tiny_gpt().eval()
    model = copy.deepcopy(base)
    lora.add_adapters(model, 'base', **RECORD)
    assert any('lora_B' in name for name, _ in model.named_parameters())
    assert torch.equal(model(IDX, IDX)[0], base(IDX, IDX)[0])


def test_merged_weights_equal_the_merge_by_hand_and_give_the_adapted_models_logits():
    model = tiny_gpt().eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_adapters(model, 'base', **RECORD)
    with torch.no_grad():  # trained adapters: B is no longer zero
        for name, p in model.named_parameters():
            if 'lora_' in name:
                p.normal_(0.0, 0.2)
    adapted_logits = model(IDX, IDX)[0]
    adapters = lora.adapter_weights(model)
    hand = by_hand(base_state, adapters, RECORD)
    merged = lora.merged_weights(model)
    assert set(merged) == set(base_state)
    for key in hand:
        torch.testing.assert_close(merged[key], hand[key], rtol=0, atol=1e-6)
    plain = tiny_gpt().eval()
    plain.load_state_dict(merged)
    assert (plain(IDX, IDX)[0] - adapted_logits).abs().max() <= 1e-5
    # peft's merge_and_unload, as the readers of a ckpt.pt do: the adapters loaded into a fresh base
    fresh = tiny_gpt().eval()
    wrapper = lora.adapted(fresh, RECORD)
    lora.load_adapters(fresh, adapters)
    unloaded = wrapper.merge_and_unload()
    assert type(unloaded) is GPT and not any('lora_' in k for k in unloaded.state_dict())
    assert (unloaded(IDX, IDX)[0] - adapted_logits).abs().max() <= 1e-5


def test_a_training_step_changes_the_adapters_only_and_the_optimizer_holds_only_theirs():
    model = tiny_gpt()
    lora.add_adapters(model, 'base', **RECORD)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all('lora_' in n for n in trained) and len(trained) == 2 * len(LORA_TARGETS) * 2
    assert sum(p.numel() for p in trained.values()) == adapter_count(32, 2, RECORD['rank'])
    optimizers = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    adapter_ids = {id(p) for n, p in model.named_parameters() if 'lora_' in n}
    assert {id(p) for opt in optimizers for group in opt.param_groups for p in group['params']} == adapter_ids
    for _ in range(2):  # (B moves first, then A gets a gradient through it)
        model(IDX, IDX)[1].backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert {id(p) for opt in optimizers for p in opt.state} == adapter_ids
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen[name]) if name in frozen else not torch.equal(p, trained[name]), name


def test_the_frozen_base_is_held_in_the_16_bit_dtype_and_the_adapters_in_float32():
    model = tiny_gpt()
    lora.add_adapters(model, 'base', **RECORD)
    lora.freeze_base(model, 'bfloat16', 'bfloat16')
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with pytest.raises(UserError, match='lora_base_dtype=bfloat16 needs --dtype=bfloat16'):
        lora.freeze_base(tiny_gpt(), 'bfloat16', 'float32')  # no autocast to compute with 16-bit weights


@pytest.mark.parametrize('settings, message', [
    (dict(init_from='scratch'), 'init_from=scratch names none'),
    (dict(init_from='auto'), 'init_from=auto names none'),
    (dict(fsdp=True), 'fsdp=True is not supported'),
    (dict(optimizer='muon'), 'use optimizer=adamw with LoRA'),
    (dict(lora_targets='attn.c_atn'), 'comma-separated list of attn.c_attn'),
    (dict(lora_alpha=0.0), 'above 0'),
    (dict(lora_base_dtype='int8'), "float32, bfloat16 or float16"),
])
def test_lora_settings_that_cannot_work_are_refused_before_any_work(settings, message):
    namespace = dict(dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets='attn.c_attn,mlp.c_fc',
                          lora_base_dtype='', init_from='gpt2', fsdp=False, optimizer='adamw'), **settings)
    with pytest.raises(UserError, match=re.escape(message)):
        check_settings(namespace)


# ----------------------------------------------------------------------------- runs of train.py on a base trained here

LORA = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, gradient_accumulation_steps=2, max_iters=8,
            eval_interval=4, learning_rate=1e-2, warmup_iters=2, dropout=0.0)


@pytest.fixture(scope='module')
def base(dataset, tmp_path_factory):
    """A char model trained from scratch here: the base the LoRA runs start from (its ckpt.pt)."""
    out_dir = str(tmp_path_factory.mktemp('base'))
    train(dataset, out_dir, max_iters=20)
    return os.path.join(out_dir, 'ckpt.pt')


@pytest.fixture(scope='module')
def lora_run(dataset, base, tmp_path_factory):
    """An uninterrupted LoRA run of 8 iterations on base: (out_dir, stdout)."""
    out_dir = str(tmp_path_factory.mktemp('lora'))
    return out_dir, train(dataset, out_dir, init_from=base, **LORA).stdout


def test_a_lora_run_trains_and_saves_the_adapters_only_and_says_so(lora_run, base):
    out_dir, stdout = lora_run
    trained = adapter_count(32, 2, 4)
    assert re.search(rf'parameters \({trained:,} trained, [\d,]+ frozen\)', stdout), stdout[:2000]
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    assert all('lora_' in k for k in ckpt['model']) and sum(v.numel() for v in ckpt['model'].values()) == trained
    assert len(ckpt['optimizer']['state']) == len(ckpt['model'])
    assert ckpt['lora']['base'] == base and ckpt['lora']['rank'] == 4
    # best.pt: the merged weights, whose frozen ones (all but the adapted Linears) are the base's, bit for bit
    best, base_state = load_checkpoint(os.path.join(out_dir, 'best.pt')), load_checkpoint(base)['model']
    assert set(best['model']) == set(base_state)
    adapted = {k.removesuffix('.lora_A.weight') + '.weight' for k in best['adapters'] if 'lora_A' in k}
    assert all(torch.equal(best['model'][k], v) for k, v in base_state.items() if k not in adapted)
    hand = by_hand(base_state, best['adapters'], best['lora'])
    assert all((best['model'][k] - hand[k]).abs().max() <= 1e-6 for k in adapted)
    assert losses_fell(stdout)


def losses_fell(stdout):
    evals = eval_losses(stdout)
    return evals[max(evals)][1] < evals[0][1]


def test_a_resumed_lora_run_equals_the_uninterrupted_one_bit_for_bit(dataset, base, lora_run, tmp_path):
    out_dir = str(tmp_path / 'out')
    train(dataset, out_dir, init_from=base, **dict(LORA, max_iters=4))
    resumed = train(dataset, out_dir, init_from='resume', **LORA).stdout
    assert iter_losses(resumed) == {i: loss for i, loss in iter_losses(lora_run[1]).items() if i >= 4}
    got, expected = (load_checkpoint(os.path.join(d, 'ckpt.pt')) for d in (out_dir, lora_run[0]))
    assert got['iter_num'] == expected['iter_num'] == 8
    assert got['model'].keys() == expected['model'].keys()
    assert all(torch.equal(got['model'][k], expected['model'][k]) for k in expected['model'])
    moments = [(a, b) for key in expected['optimizer']['state'] for a, b in
               zip(got['optimizer']['state'][key].values(), expected['optimizer']['state'][key].values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)


def test_lora_under_ddp_on_two_processes_equals_one_process(dataset, base, lora_run, tmp_path):
    proc = check_ok(torchrun(['--standalone', '--nproc_per_node=2'], dataset=dataset, out_dir=str(tmp_path / 'ddp'),
                             init_from=base, **LORA))
    assert_same_losses(proc.stdout, lora_run[1], iters=range(8), steps=[0, 4, 8])  # to the printed digit


def test_lora_with_activation_checkpointing_and_compile_follows_the_eager_run(dataset, base, lora_run, tmp_path):
    proc = train(dataset, str(tmp_path / 'out'), init_from=base, activation_checkpointing=True, compile=True,
                 **dict(LORA, max_iters=4))
    assert 'warning' not in proc.stderr, proc.stderr  # it compiled: no fallback to eager
    expected = {i: loss for i, loss in iter_losses(lora_run[1]).items() if i < 4}
    assert iter_losses(proc.stdout) == pytest.approx(expected, abs=2e-3)


@pytest.fixture(scope='module')
def merged_by_hand(lora_run, base, tmp_path_factory):
    """An out_dir holding the LoRA run's final model merged by hand, as a plain checkpoint."""
    ckpt = load_checkpoint(os.path.join(lora_run[0], 'ckpt.pt'))
    out_dir = str(tmp_path_factory.mktemp('merged'))
    state = {k: v for k, v in ckpt.items() if k not in ('lora', 'optimizer')}
    state['model'] = by_hand(load_checkpoint(base)['model'], ckpt['model'], ckpt['lora'])
    save_checkpoint(state, os.path.join(out_dir, 'ckpt.pt'))
    return out_dir


def test_sample_eval_and_bench_on_a_lora_out_dir_equal_their_results_on_the_merged_model(lora_run, merged_by_hand,
                                                                                   dataset, tmp_path):
    results = {}
    for name, out_dir in (('lora', lora_run[0]), ('merged', merged_by_hand)):
        sample = run_script('sample.py', f'--out_dir={out_dir}', '--checkpoint=ckpt.pt', '--device=cpu',
                            '--num_samples=2', '--max_new_tokens=40', '--temperature=0.8')
        out = tmp_path / f'{name}.json'
        run_script('eval.py', f'--out_dir={out_dir}', '--checkpoint=ckpt.pt', '--device=cpu', '--tasks=text',
                   f'--dataset={dataset}', f'--out={out}')
        bench = run_script('bench.py', '--init_from=resume', f'--out_dir={out_dir}', '--device=cpu', '--mode=sample',
                           '--max_new_tokens=4', '--warmup_steps=1', '--num_steps=1', '--compare_uncached=False')
        results[name] = sample.stdout, json.loads(out.read_text()), bench.stdout.splitlines()[0]
    assert results['lora'][0] == results['merged'][0] and results['lora'][0].strip()
    assert results['lora'][2] == results['merged'][2] and 'parameters' in results['lora'][2]  # bench.py's model
    lora_eval, merged_eval = (json.dumps(r[1]['text'] if 'text' in r[1] else r[1]) for r in results.values())
    numbers = [[float(x) for x in re.findall(r'-?\d+\.\d+', text)] for text in (lora_eval, merged_eval)]
    assert numbers[0] and numbers[0] == pytest.approx(numbers[1], rel=1e-5)


def test_export_of_a_lora_run_is_the_merged_model_and_its_adapter_loads_with_peft(lora_run, merged_by_hand, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    for name, out_dir in (('lora', lora_run[0]), ('merged', merged_by_hand)):
        extra = [f'--adapter_dir={tmp_path / "adapter"}'] if name == 'lora' else []
        run_script('export_hf.py', f'--out_dir={out_dir}', '--checkpoint=ckpt.pt', f'--export_dir={tmp_path / name}',
                   *extra)
    models = [GPT2LMHeadModel.from_pretrained(str(tmp_path / n)).eval() for n in ('lora', 'merged')]
    idx = torch.randint(0, models[0].config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lora_hf, merged_hf = (model(idx).logits for model in models)
        peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(tmp_path / 'adapter' / 'base')),
                                               str(tmp_path / 'adapter')).eval()
        peft_logits = peft_model(idx).logits
    assert (lora_hf - merged_hf).abs().max() <= 1e-5
    assert (peft_logits - merged_hf).abs().max() <= 1e-5


def test_a_lora_checkpoint_whose_base_is_changed_or_missing_stops_with_one_line(dataset, base, tmp_path):
    base_copy = str(tmp_path / 'base.pt')
    shutil.copy(base, base_copy)
    out_dir = str(tmp_path / 'out')
    train(dataset, out_dir, init_from=base_copy, **dict(LORA, max_iters=2, eval_interval=2))
    changed = load_checkpoint(base_copy)
    changed['model']['transformer.ln_f.weight'] += 1e-3
    save_checkpoint(changed, base_copy)
    sample_ckpt = ('sample.py', f'--out_dir={out_dir}', '--checkpoint=ckpt.pt', '--device=cpu', '--max_new_tokens=4')
    assert 'has changed since this LoRA run' in assert_one_line_error(run_script(*sample_ckpt, check=False))
    resumed = train(dataset, out_dir, init_from='resume', check=False, **dict(LORA, max_iters=4))
    assert 'has changed since this LoRA run' in assert_one_line_error(resumed)
    os.remove(base_copy)
    assert 'is missing' in assert_one_line_error(run_script(*sample_ckpt, check=False))
    # best.pt holds the merged weights: it needs no base
    run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--max_new_tokens=4')


# ----------------------------------------------------------------------------- a Hugging Face GPT-2 as the base

@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
    """A small random GPT-2 as save_pretrained writes it, and a dataset of its BPE ids (a repeated random text)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    root = tmp_path_factory.mktemp('hf_base')
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0)).save_pretrained(str(root / 'gpt2'))
    tokens = np.tile(np.random.default_rng(0).integers(0, 50257, 300), 40).astype(np.uint16)
    os.makedirs(root / 'data')
    tokens.tofile(root / 'data' / 'train.bin')
    tokens[:3000].tofile(root / 'data' / 'val.bin')
    return str(root / 'gpt2'), str(root / 'data')


def held(stdout):
    """The MiB of parameters and of gradients train.py's memory line reports."""
    found = re.search(r'memory per process: parameters ([\d.,]+) MiB, gradients ([\d.,]+) MiB', stdout)
    return tuple(float(x.replace(',', '')) for x in found.groups())


def test_lora_on_a_hugging_face_gpt2_starts_from_its_loss_and_holds_it_in_16_bits(hf_base, tmp_path):
    gpt2_dir, data = hf_base
    settings = dict(init_from=gpt2_dir, max_iters=2, eval_interval=2, gradient_accumulation_steps=1)
    base_only = train(data, str(tmp_path / 'base'), eval_only=True, **settings).stdout
    runs = {dtype: train(data, str(tmp_path / dtype), dtype=dtype, lora_rank=4, **settings).stdout
            for dtype in ('float32', 'bfloat16')}
    assert eval_losses(runs['float32'])[0] == eval_losses(base_only)[0]  # zero-initialised adapters: the base's loss
    assert eval_losses(runs['bfloat16'])[0] == pytest.approx(eval_losses(base_only)[0], abs=0.05)
    (params32, grads32), (params16, grads16) = held(runs['float32']), held(runs['bfloat16'])
    assert 0.45 <= params16 / params32 <= 0.55  # the frozen base in bfloat16, the adapters in float32
    assert grads16 == grads32 and grads32 < 0.02 * params32  # gradients of the adapters only
