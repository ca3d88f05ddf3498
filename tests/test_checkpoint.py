"""Tests of checkpoint.py: atomic checkpoint writes, clear one-line refusals of files that are not
checkpoints, and loading that never runs code hidden in a pickle (ckpt.pt or meta.pkl)."""

import os
import pickle
import random

import pytest
import torch

import checkpoint
from model import GPT, GPTConfig

MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True, vocab_size=20, dropout=0.0)


def a_checkpoint(seed=0, iter_num=100):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODEL_ARGS))
    return {'model': model.state_dict(), 'model_args': dict(MODEL_ARGS), 'iter_num': iter_num,
            'best_val_loss': 1.5, 'config': {'dataset': 'shakespeare_char'}}


def assert_same_checkpoint(loaded, expected):
    assert loaded.keys() == expected.keys()
    assert loaded['model'].keys() == expected['model'].keys()
    for key, tensor in expected['model'].items():
        assert torch.equal(loaded['model'][key], tensor), key
    for key in expected.keys() - {'model'}:
        assert loaded[key] == expected[key], key


def expect_die(capsys, call, *args):
    """call(*args) must stop with a non-zero exit and exactly one 'error:' line on stderr; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        call(*args)
    assert info.value.code not in (0, None)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith('error:')
    return lines[0]


# ----------------------------------------------------------------------------- saving

def test_save_then_load_round_trips(tmp_path):
    state = a_checkpoint()
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint(state, path)
    assert_same_checkpoint(checkpoint.load_checkpoint(path), state)
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_save_to_bare_file_name_writes_in_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint.save_checkpoint(a_checkpoint(), 'ckpt.pt')
    assert_same_checkpoint(checkpoint.load_checkpoint(str(tmp_path / 'ckpt.pt')), a_checkpoint())
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_save_creates_missing_out_dir(tmp_path):
    path = str(tmp_path / 'new' / 'deeper' / 'ckpt.pt')
    checkpoint.save_checkpoint(a_checkpoint(), path)
    assert_same_checkpoint(checkpoint.load_checkpoint(path), a_checkpoint())


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint(a_checkpoint(seed=0, iter_num=100), path)
    newer = a_checkpoint(seed=1, iter_num=200)
    checkpoint.save_checkpoint(newer, path)
    assert_same_checkpoint(checkpoint.load_checkpoint(path), newer)
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_crash_mid_write_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / 'ckpt.pt')
    old = a_checkpoint(seed=0, iter_num=100)
    checkpoint.save_checkpoint(old, path)
    old_bytes = open(path, 'rb').read()

    def disk_full_halfway(obj, f, *args, **kwargs):
        f.write(old_bytes[:len(old_bytes) // 2])  # half a checkpoint reached the disk, then the disk filled up
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(checkpoint.torch, 'save', disk_full_halfway)
    line = expect_die(capsys, checkpoint.save_checkpoint, a_checkpoint(seed=1, iter_num=200), path)
    monkeypatch.undo()
    assert path in line
    assert 'No space left on device' in line
    assert 'previous checkpoint' in line and 'intact' in line
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temp file left behind
    assert open(path, 'rb').read() == old_bytes
    assert_same_checkpoint(checkpoint.load_checkpoint(path), old)


def test_save_under_a_regular_file_stops_with_clear_message(tmp_path, capsys):
    blocker = tmp_path / 'file.txt'
    blocker.write_text('not a directory')
    path = str(blocker / 'ckpt.pt')
    line = expect_die(capsys, checkpoint.save_checkpoint, a_checkpoint(), path)
    assert path in line
    assert 'directory' in line.lower()  # says why: 'Not a directory'
    assert blocker.read_text() == 'not a directory'


# ----------------------------------------------------------------------------- refusing what is not a checkpoint

def test_load_missing_checkpoint_says_so(tmp_path, capsys):
    path = str(tmp_path / 'ckpt.pt')
    line = expect_die(capsys, checkpoint.load_checkpoint, path)
    assert path in line


def test_load_truncated_checkpoint_is_refused(tmp_path, capsys):
    full = tmp_path / 'full.pt'
    checkpoint.save_checkpoint(a_checkpoint(), str(full))
    data = full.read_bytes()
    truncated = tmp_path / 'ckpt.pt'
    truncated.write_bytes(data[:len(data) // 2])
    line = expect_die(capsys, checkpoint.load_checkpoint, str(truncated))
    assert str(truncated) in line


def test_load_random_bytes_is_refused(tmp_path, capsys):
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(random.Random(0).randbytes(4096))
    line = expect_die(capsys, checkpoint.load_checkpoint, str(path))
    assert str(path) in line


@pytest.mark.parametrize('content', [[1, 2, 3], {'iter_num': 5}, {'model': {}}, torch.zeros(3),
                                     {'model': torch.zeros(3), 'model_args': dict(MODEL_ARGS)}],
                         ids=['list', 'dict-without-model', 'dict-without-model-args', 'tensor',
                              'model-not-a-state-dict'])
def test_load_torch_file_that_is_not_a_checkpoint_is_refused(tmp_path, capsys, content):
    path = tmp_path / 'ckpt.pt'
    torch.save(content, path)
    line = expect_die(capsys, checkpoint.load_checkpoint, str(path))
    assert str(path) in line and 'model' in line


def test_load_strips_compiled_model_prefix(tmp_path):
    state = a_checkpoint()
    state['model'] = {'_orig_mod.' + k: v for k, v in state['model'].items()}
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint(state, path)
    loaded = checkpoint.load_checkpoint(path)
    assert_same_checkpoint(loaded, a_checkpoint())
    model = checkpoint.model_from_checkpoint(loaded)
    assert torch.equal(model.lm_head.weight, a_checkpoint()['model']['lm_head.weight'])


def test_model_from_checkpoint_with_mismatched_shapes_is_refused(capsys):
    state = a_checkpoint()
    state['model_args'] = dict(MODEL_ARGS, n_embd=32)
    line = expect_die(capsys, checkpoint.model_from_checkpoint, state)
    assert 'model_args' in line


@pytest.mark.parametrize('bad_args, reason', [
    (dict(n_kv_head=1), "unexpected keyword argument 'n_kv_head'"),  # a key from some other GPT code
    (dict(gelu_approximate='relu'), "unknown gelu_approximate 'relu'"),
    (dict(n_head=3), 'n_embd=16 is not divisible by n_head=3'),
])
def test_model_from_checkpoint_with_unbuildable_model_args_is_refused(capsys, bad_args, reason):
    state = a_checkpoint()
    state['model_args'] = dict(MODEL_ARGS, **bad_args)
    line = expect_die(capsys, checkpoint.model_from_checkpoint, state)
    assert 'describe no model' in line and line.endswith(reason)


def test_model_from_checkpoint_without_gelu_setting_uses_the_exact_gelu():
    # nanoGPT's checkpoints name no GELU: nanoGPT's is the exact one
    model = checkpoint.model_from_checkpoint(a_checkpoint())
    assert 'gelu_approximate' not in a_checkpoint()['model_args']
    assert model.transformer.h[0].mlp.gelu.approximate == 'none'


# ----------------------------------------------------------------------------- pickles that run code

class RunsCode:
    """Unpickling this object calls open(path, 'w'): creating path proves that unpickling ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    # the control for the two tests below: without protection, loading creates the file
    proof = tmp_path / 'pwned-control'
    pickle.loads(pickle.dumps(RunsCode(str(proof)))).close()
    assert proof.exists()


def test_load_checkpoint_refuses_pickled_code(tmp_path, capsys):
    proof = tmp_path / 'pwned'
    path = tmp_path / 'ckpt.pt'
    torch.save({'model': RunsCode(str(proof)), 'model_args': dict(MODEL_ARGS)}, path)
    line = expect_die(capsys, checkpoint.load_checkpoint, str(path))
    assert str(path) in line
    assert not proof.exists()


@pytest.mark.parametrize('wrap', [lambda payload: payload,
                                  lambda payload: {'vocab_size': 65, 'stoi': payload, 'itos': {}}],
                         ids=['bare', 'inside-dict'])
def test_load_meta_refuses_pickled_code(tmp_path, capsys, wrap):
    proof = tmp_path / 'pwned'
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump(wrap(RunsCode(str(proof))), f)
    line = expect_die(capsys, checkpoint.load_meta, str(tmp_path))
    assert 'meta.pkl' in line
    assert not proof.exists()


# ----------------------------------------------------------------------------- meta.pkl

def test_load_meta_reads_nanogpt_char_vocabulary(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    chars = sorted(set(text))
    meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)),
            'stoi': {ch: i for i, ch in enumerate(chars)}}
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)  # as nanoGPT's data/shakespeare_char/prepare.py writes it
    loaded = checkpoint.load_meta(str(tmp_path))
    assert loaded == meta
    assert ''.join(loaded['itos'][loaded['stoi'][c]] for c in text) == text


def test_load_meta_returns_none_without_meta_pkl(tmp_path):
    assert checkpoint.load_meta(str(tmp_path)) is None


@pytest.mark.parametrize('content', [b'garbage', pickle.dumps([1, 2, 3]), pickle.dumps({'vocab_size': 3})],
                         ids=['not-a-pickle', 'a-list', 'dict-missing-keys'])
def test_load_meta_refuses_invalid_meta(tmp_path, capsys, content):
    (tmp_path / 'meta.pkl').write_bytes(content)
    line = expect_die(capsys, checkpoint.load_meta, str(tmp_path))
    assert 'meta.pkl' in line
