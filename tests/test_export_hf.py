"""Tests of export_hf.py: a checkpoint exported as a Hugging Face directory gives the same logits in
transformers' GPT2LMHeadModel as in our GPT, and works in a transformers text-generation pipeline."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import checkpoint
import export_hf
from configurator import UserError
from model import GPT, GPTConfig

from scripts import REPO_ROOT, tiktoken_cache_dir

GPT2_VOCAB = 50257
PADDED_VOCAB = 50304


pytestmark = pytest.mark.usefixtures('one_thread')


def save_like_train_py(model, path, iter_num=0):
    checkpoint.save_checkpoint({'model': model.state_dict(), 'model_args': asdict(model.config),
                                'iter_num': iter_num, 'best_val_loss': 1.0,
                                'config': {'dataset': 'shakespeare'}}, str(path))


def run_export(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, 'export_hf.py', *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def all_logits(model, idx):
    with torch.no_grad():
        return model(idx, targets=torch.zeros_like(idx))[0]


@pytest.fixture(scope='module')
def bpe_export(tmp_path_factory):
    """A tiny GPT-2 made with transformers, loaded with GPT.from_pretrained, padded to 50304 tokens as
    train.py pads GPT-2's vocabulary, saved as a checkpoint, and exported with export_hf.py."""
    from transformers import GPT2Config, GPT2LMHeadModel
    root = tmp_path_factory.mktemp('bpe')
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=32,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    activation_function='gelu_new', initializer_range=0.1))
    hf.save_pretrained(str(root / 'source'))
    source = GPT.from_pretrained(str(root / 'source'))

    torch.manual_seed(1)
    padded = GPT(GPTConfig(vocab_size=PADDED_VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=True,
                           gelu_approximate=source.config.gelu_approximate))  # 'tanh', as a finetune of GPT-2
    with torch.no_grad():
        for name, tensor in source.state_dict().items():
            if name in ('transformer.wte.weight', 'lm_head.weight'):
                padded.state_dict()[name][:GPT2_VOCAB] = tensor  # rows past 50257 keep their random init
            else:
                padded.state_dict()[name].copy_(tensor)
    padded.eval()
    out_dir, export_dir = root / 'out', root / 'hf-model'
    save_like_train_py(padded, out_dir / 'ckpt.pt')
    cache = tiktoken_cache_dir()
    env_extra = {'TIKTOKEN_CACHE_DIR': cache} if cache else {}
    result = run_export(f'--out_dir={out_dir}', f'--export_dir={export_dir}', env_extra=env_extra)
    return padded, export_dir, result.stdout


def test_bpe_export_trims_padded_vocab_and_matches_logits(bpe_export):
    from transformers import GPT2LMHeadModel
    padded, export_dir, stdout = bpe_export
    assert (export_dir / 'model.safetensors').is_file()
    assert '50304' in stdout and '50257' in stdout  # says it trimmed the vocabulary
    hf = GPT2LMHeadModel.from_pretrained(str(export_dir))
    hf.eval()
    assert hf.config.vocab_size == GPT2_VOCAB
    assert hf.config.n_positions == 32
    assert hf.config.eos_token_id == 50256 and hf.config.bos_token_id == 50256
    assert hf.config.activation_function == 'gelu_new'  # GPT-2's tanh GELU, as the checkpoint says
    idx = torch.randint(0, GPT2_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx).logits
    assert theirs.shape == (2, 32, GPT2_VOCAB)
    torch.testing.assert_close(theirs, all_logits(padded, idx)[..., :GPT2_VOCAB], atol=1e-5, rtol=0)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied


def gpt2_tokenizer_files_from_tiktoken_cache(cache_dir, target_dir):
    """tiktoken caches GPT-2's encoder.json (= vocab.json) and vocab.bpe (= merges.txt) under hashed names:
    tell them apart by content and copy them under the names GPT2TokenizerFast wants."""
    found = {}
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        with open(path, 'rb') as f:
            head = f.read(64)
        if head.startswith(b'{'):
            with open(path, encoding='utf-8') as f:
                if json.load(f).get('<|endoftext|>') == 50256:
                    found['vocab.json'] = path
        elif head.startswith(b'#version'):
            found['merges.txt'] = path
    if found.keys() != {'vocab.json', 'merges.txt'}:
        return False
    for name, path in found.items():
        shutil.copyfile(path, os.path.join(target_dir, name))
    return True


def test_bpe_export_works_in_text_generation_pipeline(bpe_export, tiktoken_cache, tmp_path):
    import tiktoken
    from transformers import GPT2TokenizerFast, pipeline
    padded, export_dir, _ = bpe_export
    if not gpt2_tokenizer_files_from_tiktoken_cache(tiktoken_cache, str(tmp_path)):
        pytest.skip(f"GPT-2's encoder.json and vocab.bpe are not in tiktoken's cache {tiktoken_cache}")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tmp_path))  # reads vocab.json and merges.txt
    enc = tiktoken.get_encoding('gpt2')
    prompt = "Hello, my dog is cute and"
    assert tokenizer(prompt)['input_ids'] == enc.encode(prompt)  # the tokenizer built here is GPT-2's

    generator = pipeline('text-generation', model=str(export_dir), tokenizer=tokenizer, device='cpu')
    text = generator(prompt, max_new_tokens=10, do_sample=False, pad_token_id=50256)[0]['generated_text']

    # oracle: greedy decoding with our padded model, restricted to the real vocabulary, decoded by tiktoken
    idx = torch.tensor([enc.encode(prompt)])
    for _ in range(10):
        next_token = all_logits(padded, idx)[:, -1, :GPT2_VOCAB].argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, next_token), dim=1)
    assert text == prompt + enc.decode(idx[0, -10:].tolist())


def test_bpe_export_includes_tokenizer_when_available_offline(bpe_export, tiktoken_cache):
    import tiktoken
    from transformers import AutoTokenizer
    _, export_dir, stdout = bpe_export
    # bpe_export ran export_hf.py with the same tiktoken cache the tiktoken_cache fixture found
    assert "saved GPT-2's tokenizer" in stdout
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    text = "Tokenizers, tokenizers: \n they split text into  pieces!"
    assert tokenizer(text)['input_ids'] == tiktoken.get_encoding('gpt2').encode(text)


class EmptyTokenizer:
    """What recent transformers return for a tokenizer whose files are not in the local cache."""

    def __len__(self):
        return 1


@pytest.mark.parametrize('hub_cache', ['raises', 'returns-empty'])
def test_tokenizer_is_none_when_nothing_is_available_offline(monkeypatch, hub_cache):
    from transformers import GPT2TokenizerFast

    def offline(*args, **kwargs):
        if hub_cache == 'raises':
            raise OSError('not in the local cache')
        return EmptyTokenizer()

    monkeypatch.setattr(GPT2TokenizerFast, 'from_pretrained', offline)
    monkeypatch.delenv('TIKTOKEN_CACHE_DIR', raising=False)
    monkeypatch.delenv('NANOGPT_DATA_DIR', raising=False)
    assert export_hf.offline_gpt2_tokenizer() is None


def test_char_level_bias_free_export_from_best_checkpoint(tmp_path):
    from transformers import GPT2LMHeadModel
    config = dict(vocab_size=65, block_size=24, n_layer=2, n_head=4, n_embd=32, bias=False)
    torch.manual_seed(2)
    best = GPT(GPTConfig(**config))
    latest = GPT(GPTConfig(**config))
    with torch.no_grad():
        for model in (best, latest):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # LayerNorm gains away from 1, so their export is checked
    best.eval()
    out_dir = tmp_path / 'out-shakespeare-char'
    save_like_train_py(latest, out_dir / 'ckpt.pt', iter_num=20)
    save_like_train_py(best, out_dir / 'best.pt', iter_num=10)
    result = run_export(f'--out_dir={out_dir}')  # default: best.pt, written to <out_dir>/hf
    assert 'tokenizer' in result.stdout  # the note that a char-level model has none
    export_dir = out_dir / 'hf'
    assert not (export_dir / 'tokenizer.json').exists()
    hf = GPT2LMHeadModel.from_pretrained(str(export_dir))
    hf.eval()
    assert hf.config.vocab_size == 65
    assert hf.config.activation_function == 'gelu'  # trained from scratch: the exact GELU
    idx = torch.randint(0, 65, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, all_logits(best, idx), atol=1e-5, rtol=0)
    assert not torch.allclose(theirs, all_logits(latest, idx), atol=1e-3)  # it exported best.pt, not ckpt.pt
    assert (hf.transformer.h[0].attn.c_attn.bias == 0).all()  # bias=False exported as zero biases


def test_export_of_missing_checkpoint_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(export_hf, 'out_dir', str(tmp_path / 'nothing'))  # what --out_dir=... sets
    with pytest.raises(UserError, match=re.escape(str(tmp_path / 'nothing' / 'ckpt.pt'))):
        export_hf.main()
    assert not (tmp_path / 'nothing').exists()  # nothing written


@pytest.mark.parametrize('where', ['a file', 'under a file'])
def test_export_dir_that_cannot_be_written_fails_before_any_work(tmp_path, monkeypatch, where):
    model = GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=16))
    save_like_train_py(model, tmp_path / 'out' / 'ckpt.pt')
    (tmp_path / 'taken').write_text('a file')
    target = tmp_path / 'taken' if where == 'a file' else tmp_path / 'taken' / 'hf'
    monkeypatch.setattr(export_hf, 'out_dir', str(tmp_path / 'out'))
    monkeypatch.setattr(export_hf, 'export_dir', str(target))
    with pytest.raises(UserError, match=re.escape(str(target))) as info:
        export_hf.main()
    assert '\n' not in str(info.value) and 'another --export_dir' in str(info.value)
    assert (tmp_path / 'taken').read_text() == 'a file'


def test_a_model_trained_with_recipe_settings_that_gpt2_lacks_is_refused(tmp_path, monkeypatch):
    model = GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=16, rope=True, qk_norm=True))
    save_like_train_py(model, tmp_path / 'out' / 'ckpt.pt')
    monkeypatch.setattr(export_hf, 'out_dir', str(tmp_path / 'out'))
    monkeypatch.setattr(export_hf, 'export_dir', str(tmp_path / 'hf'))
    with pytest.raises(UserError, match='was trained with rope=True, qk_norm=True') as info:
        export_hf.main()
    assert 'GPT2LMHeadModel' in str(info.value)
    assert not (tmp_path / 'hf').exists()  # refused before anything was written


def export_tiny_char_model(tmp_path, monkeypatch, n_layer=1):
    """Save a tiny char model as train.py does in tmp_path/out and export it to tmp_path/hf."""
    save_like_train_py(GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=n_layer, n_head=2, n_embd=16)),
                       tmp_path / 'out' / 'ckpt.pt')
    monkeypatch.setattr(export_hf, 'out_dir', str(tmp_path / 'out'))
    monkeypatch.setattr(export_hf, 'export_dir', str(tmp_path / 'hf'))
    export_hf.main()


def test_export_replaces_an_earlier_export_but_no_other_folder(tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel
    export_tiny_char_model(tmp_path, monkeypatch)
    first = (tmp_path / 'hf' / 'model.safetensors').read_bytes()
    # an earlier export is replaced as a whole, leaving nothing of the work beside it
    export_tiny_char_model(tmp_path, monkeypatch, n_layer=2)
    assert GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').config.n_layer == 2
    assert (tmp_path / 'hf' / 'model.safetensors').read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == ['hf', 'out']
    (tmp_path / 'hf' / 'notes.txt').write_text('mine')  # now a folder that holds more than an export
    with pytest.raises(UserError, match='holds other files than an earlier export'):
        export_hf.main()
    assert (tmp_path / 'hf' / 'notes.txt').read_text() == 'mine'


def test_an_export_that_fails_to_write_leaves_the_earlier_one(tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel
    export_tiny_char_model(tmp_path, monkeypatch)
    before = {f: (tmp_path / 'hf' / f).read_bytes() for f in os.listdir(tmp_path / 'hf')}

    def disk_full(self, *args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(GPT2LMHeadModel, 'save_pretrained', disk_full)
    with pytest.raises(UserError, match='No space left on device') as info:
        export_hf.main()
    assert 'is unchanged' in str(info.value)
    assert {f: (tmp_path / 'hf' / f).read_bytes() for f in os.listdir(tmp_path / 'hf')} == before
    assert sorted(os.listdir(tmp_path)) == ['hf', 'out']
