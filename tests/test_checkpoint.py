"""Tests of checkpoint.py and dataset.py: atomic checkpoint writes, clear one-line refusals of files that are
not checkpoints or prepared datasets, and loading that never runs code hidden in a pickle (ckpt.pt or
meta.pkl)."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
from configurator import UserError
from dataset import load_meta, load_tokens, read_manifest
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
    """call(*args) must raise a UserError with a one-line message and print nothing; returns the message."""
    capsys.readouterr()
    with pytest.raises(UserError) as info:
        call(*args)
    message = str(info.value)
    assert '\n' not in message and message, message
    assert capsys.readouterr() == ('', '')
    return message


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


def test_a_write_error_of_any_type_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    # torch's zip writer reports a failed write as a RuntimeError, not an OSError
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint(a_checkpoint(), path)
    old_bytes = open(path, 'rb').read()

    def zip_writer_fails(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 partial')
        raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore detail')

    monkeypatch.setattr(checkpoint.torch, 'save', zip_writer_fails)
    line = expect_die(capsys, checkpoint.save_checkpoint, a_checkpoint(seed=1), path)
    assert path in line and 'inline_container' in line and 'intact' in line
    assert os.listdir(tmp_path) == ['ckpt.pt'] and open(path, 'rb').read() == old_bytes
    # the same error on a disk with nothing left (as torch reports a full disk) says so
    monkeypatch.setattr(checkpoint, 'free_bytes', lambda directory: 0)
    line = expect_die(capsys, checkpoint.save_checkpoint, a_checkpoint(seed=1), path)
    assert 'the disk is full' in line and 'free some disk space' in line and 'inline_container' not in line


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason="needs Linux's /dev/full, a device that is always full")
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint(a_checkpoint(), path)
    old_bytes = open(path, 'rb').read()
    os.symlink('/dev/full', tmp_path / '.ckpt.pt.tmp')  # the temporary file's writes land on a full device
    line = expect_die(capsys, checkpoint.save_checkpoint, a_checkpoint(seed=1), path)
    assert 'No space left on device' in line and 'free some disk space' in line
    assert os.listdir(tmp_path) == ['ckpt.pt'] and open(path, 'rb').read() == old_bytes


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
    line = expect_die(capsys, load_meta, str(tmp_path))
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
    loaded = load_meta(str(tmp_path))
    assert loaded == meta
    assert ''.join(loaded['itos'][loaded['stoi'][c]] for c in text) == text


def test_load_meta_returns_none_without_meta_pkl(tmp_path):
    assert load_meta(str(tmp_path)) is None


@pytest.mark.parametrize('content', [b'garbage', pickle.dumps([1, 2, 3]), pickle.dumps({'vocab_size': 3})],
                         ids=['not-a-pickle', 'a-list', 'dict-missing-keys'])
def test_load_meta_refuses_invalid_meta(tmp_path, capsys, content):
    (tmp_path / 'meta.pkl').write_bytes(content)
    line = expect_die(capsys, load_meta, str(tmp_path))
    assert 'meta.pkl' in line


# ----------------------------------------------------------------------------- the run directory

def test_out_dir_lock_refuses_a_second_holder_and_names_the_first(tmp_path, capsys):
    out_dir = str(tmp_path / 'out')
    first = checkpoint.lock_out_dir(out_dir)
    try:
        line = expect_die(capsys, checkpoint.lock_out_dir, out_dir)
        assert f'another run (pid {os.getpid()})' in line and out_dir in line and 'another --out_dir' in line
    finally:
        first.close()
    checkpoint.lock_out_dir(out_dir).close()  # free again once the first holder lets go


def test_out_dir_lock_is_released_when_its_process_is_killed(tmp_path, capsys):
    out_dir = str(tmp_path / 'out')
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, checkpoint; lock = checkpoint.lock_out_dir(sys.argv[1]); '
                               'print("locked", flush=True); sys.stdin.read()', out_dir],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        assert f'pid {holder.pid}' in expect_die(capsys, checkpoint.lock_out_dir, out_dir)
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the OS releases the lock
        holder.wait(timeout=30)
    finally:
        holder.kill()
    checkpoint.lock_out_dir(out_dir).close()


def test_out_dir_that_is_a_file_cannot_be_locked(tmp_path, capsys):
    (tmp_path / 'out').write_text('a file')
    line = expect_die(capsys, checkpoint.lock_out_dir, str(tmp_path / 'out'))
    assert 'is a file' in line


# ----------------------------------------------------------------------------- prepared datasets

def write_dataset(directory, train=b'\x01\x00' * 50, val=b'\x02\x00' * 20, manifest=True):
    os.makedirs(directory, exist_ok=True)
    (directory / 'train.bin').write_bytes(train)
    (directory / 'val.bin').write_bytes(val)
    if manifest:  # as data/prepare_utils.finish_dataset writes it
        files = {'train.bin': len(train), 'val.bin': len(val)}
        (directory / 'manifest.json').write_text(json.dumps({'complete': True, 'vocab_size': 7, 'files': files}))


def test_manifest_of_a_complete_dataset_is_returned(tmp_path):
    write_dataset(tmp_path)
    assert read_manifest(str(tmp_path))['vocab_size'] == 7
    assert load_tokens(str(tmp_path), 'val').tolist() == [2] * 20


def test_dataset_without_manifest_is_taken_as_it_is(tmp_path):
    write_dataset(tmp_path, manifest=False)  # prepared by nanoGPT's scripts, say
    assert read_manifest(str(tmp_path)) is None


def test_dataset_whose_prepare_script_stopped_is_refused(tmp_path, capsys):
    write_dataset(tmp_path)
    (tmp_path / 'manifest.json').write_text(json.dumps({'complete': False}))
    line = expect_die(capsys, read_manifest, str(tmp_path))
    assert 'incomplete' in line and 'prepare script again' in line


@pytest.mark.parametrize('change', ['train.bin replaced', 'meta.pkl removed'])
def test_dataset_files_that_changed_since_they_were_prepared_are_refused(tmp_path, capsys, change):
    write_dataset(tmp_path)
    manifest = json.loads((tmp_path / 'manifest.json').read_text())
    (tmp_path / 'meta.pkl').write_bytes(b'x')
    manifest['files']['meta.pkl'] = 1
    (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
    if change == 'train.bin replaced':
        (tmp_path / 'train.bin').write_bytes(b'\x01\x00' * 60)  # as by a newer preparation killed mid-way
        expected = f"{tmp_path / 'train.bin'} has 120 bytes, but the prepare script wrote 100"
    else:
        os.remove(tmp_path / 'meta.pkl')
        expected = f"{tmp_path / 'meta.pkl'} is missing"
    assert expected in expect_die(capsys, read_manifest, str(tmp_path))


@pytest.mark.parametrize('content, what', [(b'', 'is empty'), (b'\x01\x00\x02', 'has an odd number of bytes (3)')],
                         ids=['empty', 'odd size'])
def test_token_file_that_cannot_hold_uint16_ids_is_refused(tmp_path, capsys, content, what):
    write_dataset(tmp_path, val=content, manifest=False)
    line = expect_die(capsys, load_tokens, str(tmp_path), 'val')
    assert f"{tmp_path / 'val.bin'} {what}" in line
