"""
Every user mistake the scripts can meet ends in one 'error:' line on stderr that says what to do, a non-zero
exit code and no traceback. The scripts run as real subprocesses; most cases stop right after torch is
imported, so they take a few seconds each.
"""

import os
import pickle
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint
from scripts import REPO_ROOT, TINY, args_of, assert_one_line_error, prepare_char_dataset, run_script, script_env, train


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, small_text):
    return prepare_char_dataset(str(tmp_path_factory.mktemp('dataset')), small_text)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, dataset):
    """out_dir of a 10-iteration TINY run (block_size 32): ckpt.pt and best.pt at iter 10. Copy before changing."""
    out_dir = str(tmp_path_factory.mktemp('trained') / 'out')
    train(dataset, out_dir, max_iters=10)
    return out_dir


def copy_of(path, tmp_path, name):
    target = str(tmp_path / name)
    shutil.copytree(path, target)
    return target


def tiny_args(dataset, out_dir, **overrides):
    settings = dict(TINY, dataset=dataset, out_dir=out_dir)
    settings.update(overrides)
    return args_of(settings)


def vocab_size_of(dataset):
    with open(os.path.join(dataset, 'meta.pkl'), 'rb') as f:
        return pickle.load(f)['vocab_size']


# ----------------------------------------------------------------------------- settings

def test_unknown_config_key_suggests_the_close_one():
    proc = run_script('train.py', '--batchsize=3', check=False)
    error = assert_one_line_error(proc)
    assert "'batchsize'" in error and 'did you mean batch_size' in error


def test_value_of_the_wrong_type_names_the_expected_type():
    proc = run_script('train.py', '--batch_size=abc', check=False)
    error = assert_one_line_error(proc)
    assert "'batch_size'" in error and 'expects int' in error and "'abc'" in error


def test_missing_config_file_says_it_cannot_be_read():
    proc = run_script('train.py', 'config/nope.py', check=False)
    error = assert_one_line_error(proc)
    assert 'config/nope.py' in error and 'No such file' in error


@pytest.mark.parametrize('script', ['train.py', 'bench.py'])
@pytest.mark.parametrize('shape, message', [(dict(n_embd=30, n_head=4), 'n_embd=30 is not divisible by n_head=4'),
                                            (dict(n_embd=-32, n_head=2), 'negative dimension')])
def test_impossible_model_shape_is_one_clear_line(tmp_path, dataset, script, shape, message):
    settings = dict(TINY, dataset=dataset, out_dir=str(tmp_path / 'out'), **shape)
    if script == 'bench.py':
        settings = {k: settings[k] for k in ('device', 'n_layer', 'n_head', 'n_embd', 'block_size', 'dataset')}
    error = assert_one_line_error(run_script(script, *args_of(settings), check=False))
    assert 'describe no model' in error and message in error
    if script == 'train.py':
        assert not os.path.exists(tmp_path / 'out')  # nothing written for a run that cannot start


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device=cuda is no mistake")
@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_cuda_device_without_cuda_says_so(script):
    error = assert_one_line_error(run_script(script, '--device=cuda', check=False))
    assert 'CUDA is not available' in error and '--device=cpu' in error


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS, so --device=mps is no mistake")
def test_mps_device_off_a_mac_says_so():
    error = assert_one_line_error(run_script('train.py', '--device=mps', check=False))
    assert 'Apple' in error and '--device=cpu' in error


@pytest.mark.parametrize('device', ['tpu', 'cuda:x', 'cpu:'])
def test_unknown_device_lists_the_known_ones(device):
    error = assert_one_line_error(run_script('train.py', f'--device={device}', check=False))
    assert f"unknown device '{device}'" in error
    for known in ('cpu', 'cuda', 'mps'):
        assert known in error


def test_unknown_dtype_lists_the_known_ones():
    error = assert_one_line_error(run_script('train.py', '--device=cpu', '--dtype=float8', check=False))
    assert "unknown dtype 'float8'" in error
    for known in ('float32', 'bfloat16', 'float16'):
        assert known in error


@pytest.mark.skipif(not (torch.cuda.is_available() and not torch.cuda.is_bf16_supported()),
                    reason="needs a CUDA GPU without bfloat16 support (e.g. V100, T4); this machine has none")
def test_bfloat16_on_a_gpu_without_it_suggests_float16():
    error = assert_one_line_error(run_script('train.py', '--device=cuda', '--dtype=bfloat16', check=False))
    assert 'bfloat16' in error and '--dtype=float16' in error


# ----------------------------------------------------------------------------- datasets

@pytest.mark.parametrize('where', ['empty directory', 'openwebtext'])
def test_dataset_without_bins_names_the_prepare_script_to_run(tmp_path, where):
    if where == 'empty directory':
        dataset = str(tmp_path / 'empty')
        os.makedirs(dataset)
    else:
        dataset = 'openwebtext'  # data/openwebtext holds its prepare.py, but nothing prepared
        if os.path.exists(os.path.join(REPO_ROOT, 'data', 'openwebtext', 'train.bin')):
            pytest.skip("openwebtext is prepared in this checkout")
    error = assert_one_line_error(run_script('train.py', *tiny_args(dataset, str(tmp_path / 'out')), check=False))
    assert 'train.bin' in error
    scripts = re.findall(r'(\S*prepare\.py)', error)
    assert scripts, error
    missing = [script for script in scripts if not os.path.isfile(script)]
    assert not missing, f"the message names prepare scripts that do not exist: {missing}"


def test_dataset_without_val_bin_says_so(tmp_path, dataset):
    broken = copy_of(dataset, tmp_path, 'broken')
    os.remove(os.path.join(broken, 'val.bin'))
    error = assert_one_line_error(run_script('train.py', *tiny_args(broken, str(tmp_path / 'out')), check=False))
    assert 'val.bin' in error


def test_val_split_shorter_than_block_size_suggests_a_smaller_one(tmp_path, small_text):
    dataset = prepare_char_dataset(str(tmp_path), small_text[:300])
    val_tokens = os.path.getsize(os.path.join(dataset, 'val.bin')) // 2  # uint16
    assert val_tokens < TINY['block_size']
    error = assert_one_line_error(run_script('train.py', *tiny_args(dataset, str(tmp_path / 'out'), max_iters=2),
                                             check=False))
    assert f"val split of '{dataset}' has {val_tokens} tokens" in error
    assert f"block_size={TINY['block_size']}" in error and 'smaller --block_size' in error


def test_val_split_of_exactly_block_size_plus_one_tokens_is_enough(tmp_path, small_text):
    # the boundary of the check above: a window needs block_size + 1 tokens (inputs and shifted targets)
    dataset = prepare_char_dataset(str(tmp_path), small_text[:300])
    val_tokens = os.path.getsize(os.path.join(dataset, 'val.bin')) // 2
    common = dict(max_iters=1, eval_interval=1, n_embd=16)
    train(dataset, str(tmp_path / 'fits'), block_size=val_tokens - 1, **common)
    error = assert_one_line_error(train(dataset, str(tmp_path / 'too_long'), check=False, block_size=val_tokens,
                                        **common))
    assert f'has {val_tokens} tokens, too few for block_size={val_tokens}' in error


@pytest.mark.parametrize('content, message', [(b'', 'is empty'),
                                              (b'hello \xff world', 'is not UTF-8 text (bad byte at offset 6)')],
                         ids=['empty', 'not UTF-8'])
def test_prepare_rejects_unusable_input(tmp_path, small_text, content, message):
    dataset = prepare_char_dataset(str(tmp_path), small_text[:1000])  # installs the script, with a good dataset
    bins = {name: os.path.getmtime(os.path.join(dataset, name)) for name in ('train.bin', 'val.bin', 'meta.pkl')}
    bad_input = tmp_path / 'bad.txt'
    bad_input.write_bytes(content)
    proc = subprocess.run([sys.executable, os.path.join(dataset, 'prepare.py'), f'--input={bad_input}'],
                          capture_output=True, text=True, env=script_env(), timeout=120)
    error = assert_one_line_error(proc)
    assert str(bad_input) in error and message in error
    # the dataset prepared before is left as it was
    assert bins == {name: os.path.getmtime(os.path.join(dataset, name)) for name in bins}


# ----------------------------------------------------------------------------- resuming

def test_resume_on_a_dataset_with_a_larger_vocabulary_is_refused(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    model_vocab = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model_args']['vocab_size']
    larger = copy_of(dataset, tmp_path, 'larger')
    with open(os.path.join(larger, 'meta.pkl'), 'rb') as f:
        meta = pickle.load(f)
    meta['vocab_size'] = model_vocab + 11
    with open(os.path.join(larger, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)
    proc = train(larger, out_dir, check=False, init_from='resume', max_iters=20)
    error = assert_one_line_error(proc)
    assert f'{model_vocab + 11} tokens' in error and f"model's {model_vocab}" in error and 'scratch' in error


@pytest.mark.parametrize('override, saved', [('block_size=64', 'block_size=32'), ('n_layer=3', 'n_layer=2')])
def test_resume_with_a_different_model_shape_is_refused(tmp_path, dataset, trained, override, saved):
    out_dir = copy_of(trained, tmp_path, 'out')
    key, value = override.split('=')
    proc = train(dataset, out_dir, check=False, init_from='resume', max_iters=20, **{key: int(value)})
    error = assert_one_line_error(proc)
    assert override in error and f"checkpoint's {saved}" in error and f'drop --{key}' in error
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] == 10  # untouched


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_missing_checkpoint_says_there_is_none(tmp_path, dataset, script):
    empty = tmp_path / 'empty'
    empty.mkdir()
    if script == 'train.py':
        args = tiny_args(dataset, str(empty), init_from='resume')
    else:
        args = [f'--out_dir={empty}', '--device=cpu']
    error = assert_one_line_error(run_script(script, *args, check=False))
    assert f"no checkpoint at {empty / 'ckpt.pt'}" in error and 'train one first' in error


def truncate_to_half(path):
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def random_bytes(path):
    with open(path, 'wb') as f:
        f.write(random.Random(0).randbytes(20_000))


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
@pytest.mark.parametrize('damage', [truncate_to_half, random_bytes], ids=['truncated', 'random bytes'])
def test_damaged_checkpoint_is_one_clear_line(tmp_path, dataset, trained, damage, script):
    out_dir = copy_of(trained, tmp_path, 'out')
    os.remove(os.path.join(out_dir, 'best.pt'))  # so that sample.py's default is ckpt.pt
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    damage(ckpt_path)
    if script == 'train.py':
        args = tiny_args(dataset, out_dir, init_from='resume', max_iters=20)
    else:
        args = [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5']
    error = assert_one_line_error(run_script(script, *args, check=False))
    assert f'{ckpt_path} is not a readable checkpoint' in error


# ----------------------------------------------------------------------------- sampling

def test_missing_prompt_file_is_named(trained):
    proc = run_script('sample.py', f'--out_dir={trained}', '--device=cpu', '--start=FILE:nonexistent.txt',
                      check=False)
    error = assert_one_line_error(proc)
    assert "'nonexistent.txt'" in error and 'No such file' in error


def test_prompt_longer_than_block_size_is_cropped_with_a_note(tmp_path, small_text, trained):
    prompt = small_text[:40]  # characters the model knows; 40 > block_size 32
    prompt_file = tmp_path / 'prompt.txt'
    prompt_file.write_text(prompt, encoding='utf-8')
    proc = run_script('sample.py', f'--out_dir={trained}', '--device=cpu', f'--start=FILE:{prompt_file}',
                      '--num_samples=1', '--max_new_tokens=10')
    notes = [line for line in proc.stderr.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and '40 tokens' in notes[0] and '32' in notes[0], proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith('error')]
    assert proc.stdout.startswith(prompt)
    assert proc.stdout == prompt + proc.stdout[len(prompt):len(prompt) + 10] + '\n---------------\n'


# ----------------------------------------------------------------------------- pickles that run code

class CreatesFile:
    """Unpickling this calls open(path, 'w'): the file appears if the loader runs pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def write_malicious_checkpoint(path, target):
    torch.save({'model': CreatesFile(str(target)), 'model_args': {}}, path)


def write_malicious_meta(path, target, vocab):
    with open(path, 'wb') as f:
        pickle.dump({**vocab, 'payload': CreatesFile(str(target))}, f)


def test_malicious_payloads_are_live(tmp_path):
    # the oracle for the two tests below: loaded the unsafe way, these files do create their target
    write_malicious_checkpoint(tmp_path / 'ckpt.pt', tmp_path / 'by_torch_load')
    torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert (tmp_path / 'by_torch_load').exists()
    write_malicious_meta(tmp_path / 'meta.pkl', tmp_path / 'by_pickle_load', {})
    with open(tmp_path / 'meta.pkl', 'rb') as f:
        pickle.load(f)
    assert (tmp_path / 'by_pickle_load').exists()


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_checkpoint_with_code_in_it_is_refused(tmp_path, dataset, script):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    target = tmp_path / 'pwned'
    write_malicious_checkpoint(out_dir / 'ckpt.pt', target)
    if script == 'train.py':
        args = tiny_args(dataset, str(out_dir), init_from='resume')
    else:
        args = [f'--out_dir={out_dir}', '--device=cpu']
    error = assert_one_line_error(run_script(script, *args, check=False))
    assert f"{out_dir / 'ckpt.pt'} is not a readable checkpoint" in error
    assert not target.exists()


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_meta_pkl_with_code_in_it_is_refused(tmp_path, dataset, trained, script):
    evil = copy_of(dataset, tmp_path, 'evil')
    target = tmp_path / 'pwned'
    with open(os.path.join(dataset, 'meta.pkl'), 'rb') as f:
        vocab = pickle.load(f)
    write_malicious_meta(os.path.join(evil, 'meta.pkl'), target, vocab)
    if script == 'train.py':
        args = tiny_args(evil, str(tmp_path / 'out'))
    else:  # a checkpoint trained on the evil dataset: sample.py reads its meta.pkl for the vocabulary
        out_dir = tmp_path / 'out'
        out_dir.mkdir()
        ckpt = load_checkpoint(os.path.join(trained, 'ckpt.pt'))
        ckpt['config']['dataset'] = evil
        ckpt.pop('meta', None)  # as in nanoGPT's checkpoints, which do not carry the vocabulary themselves
        torch.save(ckpt, out_dir / 'ckpt.pt')
        args = [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5']
    error = assert_one_line_error(run_script(script, *args, check=False))
    assert os.path.join(evil, 'meta.pkl') in error and 'prepare.py' in error
    assert not target.exists()
