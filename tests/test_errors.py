"""
Every user mistake and fault the scripts can meet ends in one 'error:' line on stderr that says what to do, a
non-zero exit code and no traceback, and loses nothing: where an out_dir held checkpoints (and a metrics
log), they are byte-identical afterwards. The scripts run as real subprocesses; most cases stop right after
torch is imported, so they take a few seconds each.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from scripts import (REPO_ROOT, TINY, args_of, assert_one_line_error, default_sigint, install_prepare_script,
                     iter_losses, prepare_char_dataset, run_script, script_env, train)


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


def run_files(out_dir):
    """The bytes of what a run keeps in its out_dir: the checkpoints and the metrics log."""
    return {name: open(os.path.join(out_dir, name), 'rb').read()
            for name in ('ckpt.pt', 'best.pt', 'log.jsonl') if os.path.isfile(os.path.join(out_dir, name))}


def assert_refused(proc, out_dir_before, out_dir):
    """One 'error:' line and nothing of the earlier run changed; returns the line."""
    error = assert_one_line_error(proc)
    assert run_files(out_dir) == out_dir_before, "the earlier run's files changed"
    return error


# ----------------------------------------------------------------------------- settings

def test_unknown_config_key_suggests_the_close_one():
    proc = run_script('train.py', '--batchsize=3', check=False)
    error = assert_one_line_error(proc)
    assert "'batchsize'" in error and 'did you mean batch_size' in error


def test_value_of_the_wrong_type_names_the_expected_type():
    proc = run_script('train.py', '--batch_size=abc', check=False)
    error = assert_one_line_error(proc)
    assert "'batch_size'" in error and 'expects int' in error and "'abc'" in error


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / 'latin1.py'
    config.write_bytes('# café\nbatch_size = 4\n'.encode('latin-1'))
    error = assert_one_line_error(run_script('train.py', str(config), check=False))
    assert f"config file '{config}' is not UTF-8 text" in error


@pytest.mark.parametrize('exit_call', ['import sys\nsys.exit(0)', 'exit()', 'quit()'])
def test_a_config_file_that_calls_exit_is_one_line_not_a_silent_end(tmp_path, exit_call):
    config = tmp_path / 'exits.py'
    config.write_text(f"batch_size = 4\n{exit_call}\n")
    error = assert_one_line_error(run_script('train.py', str(config), check=False))
    assert f"config file '{config}' called exit" in error


def test_missing_config_file_says_it_cannot_be_read():
    proc = run_script('train.py', 'config/nope.py', check=False)
    error = assert_one_line_error(proc)
    assert 'config/nope.py' in error and 'No such file' in error


@pytest.mark.parametrize('script, setting', [
    ('train.py', 'gradient_accumulation_steps=0'), ('train.py', 'eval_interval=0'),
    ('train.py', 'learning_rate=-0.001'), ('train.py', 'batch_size=0'), ('train.py', 'beta2=1.0'),
    ('sample.py', 'temperature=-1.0'), ('sample.py', 'top_k=-1'), ('sample.py', 'top_p=0.0'),
    ('bench.py', 'num_steps=0'), ('bench.py', 'warmup_steps=0'), ('sample.py', 'temperature=1e-45'),
    ('train.py', 'seed=18446744073709551616'),
])
def test_out_of_range_setting_stops_before_any_work(tmp_path, dataset, trained, script, setting):
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    if script == 'train.py':
        args = tiny_args(dataset, out_dir, init_from='resume', max_iters=20)
    else:
        args = [f'--out_dir={out_dir}', '--device=cpu']
    error = assert_refused(run_script(script, *args, f'--{setting}', check=False), before, out_dir)
    assert error.startswith(f"error: {setting} is out of range: it must be ")


@pytest.mark.parametrize('key', ['batch_size', 'n_embd'])
def test_a_size_beyond_any_real_run_is_one_line(tmp_path, dataset, key):
    out_dir = str(tmp_path / 'out')
    error = assert_one_line_error(run_script('train.py', *tiny_args(dataset, out_dir), f'--{key}=1e20', check=False))
    assert error == f"error: {key}={10**20} is out of range: it must be from 1 to 2**31 - 1"
    assert not os.path.exists(out_dir)  # nothing written for a run that cannot start


@pytest.mark.parametrize('script, shape, message', [
    ('train.py', dict(n_embd=30, n_head=4), 'n_embd=30 is not divisible by n_head=4'),
    ('bench.py', dict(n_embd=-32, n_head=2), 'n_embd=-32 is out of range'),
])
def test_impossible_model_shape_is_one_clear_line(tmp_path, dataset, script, shape, message):
    settings = dict(TINY, dataset=dataset, out_dir=str(tmp_path / 'out'), **shape)
    if script == 'bench.py':
        settings = {k: settings[k] for k in ('device', 'n_layer', 'n_head', 'n_embd', 'block_size', 'dataset')}
    error = assert_one_line_error(run_script(script, *args_of(settings), check=False))
    assert message in error
    assert not os.path.exists(tmp_path / 'out')  # nothing written for a run that cannot start


def test_warmup_that_ends_where_the_decay_ends_is_a_valid_schedule(tmp_path, dataset):
    settings = dict(warmup_iters=5, lr_decay_iters=5, learning_rate=1e-2, min_lr=1e-3, max_iters=8, eval_interval=8)
    train(dataset, str(tmp_path / 'out'), **settings)
    with open(tmp_path / 'out' / 'log.jsonl') as f:
        lrs = {row['iter']: row['lr'] for row in map(json.loads, f) if 'loss' in row}
    # by hand: linear warmup to learning_rate over 5 iterations, then min_lr (no decay phase is left)
    assert lrs == pytest.approx({i: 1e-2 * (i + 1) / 6 if i < 5 else 1e-3 for i in range(8)}, rel=1e-12)


def test_muon_with_a_learning_rate_of_0_trains_the_matrices_and_leaves_the_rest(tmp_path, dataset):
    """learning_rate=0 (AdamW's groups) is allowed with optimizer=muon, whose muon_lr still trains the blocks'
    matrices: by the schedule's factor on each group's own peak, not by a division by learning_rate."""
    from model import GPT, GPTConfig
    out_dir = tmp_path / 'out'
    train(dataset, str(out_dir), optimizer='muon', learning_rate=0.0, min_lr=0.0, max_iters=2, eval_interval=2)
    checkpoint = load_checkpoint(str(out_dir / 'ckpt.pt'))
    torch.manual_seed(1337)  # train.py's seed: the oracle is the initial model
    initial = GPT(GPTConfig(**checkpoint['model_args'])).state_dict()
    moved = {k for k in initial if not torch.equal(checkpoint['model'][k], initial[k])}
    matrices = {k for k, v in initial.items() if v.dim() == 2 and k.startswith('transformer.h.')}
    assert moved == matrices


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device=cuda is no mistake")
@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_cuda_device_without_cuda_says_so(script):
    error = assert_one_line_error(run_script(script, '--device=cuda', check=False))
    assert 'CUDA is not available' in error and '--device=cpu' in error


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS, so --device=mps is no mistake")
def test_mps_device_off_a_mac_says_so():
    error = assert_one_line_error(run_script('train.py', '--device=mps', check=False))
    assert 'Apple' in error and '--device=cpu' in error


@pytest.mark.parametrize('device', ['tpu', 'cuda:x'])
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


def test_bfloat16_on_a_gpu_without_it_suggests_float16(fake_gpu_env):
    env = fake_gpu_env('Tesla T4', (7, 5))  # bfloat16 only emulated: no bfloat16 tensor cores before 8.0
    error = assert_one_line_error(run_script('train.py', '--device=cuda', '--dtype=bfloat16', env=env, check=False))
    assert 'Tesla T4' in error and 'bfloat16' in error and '--dtype=float16' in error


def test_compile_defaults_to_the_device_chosen_on_the_command_line(tmp_path, dataset, fake_gpu_env):
    env = fake_gpu_env()
    # on a GPU machine the best device, and so the old default compile, are cuda's
    assert re.search(r'^  --device=cuda ', run_script('train.py', '--help', env=env).stdout, re.M)
    settings = {k: v for k, v in TINY.items() if k not in ('compile', 'dtype')}
    proc = run_script('train.py', *args_of(dict(settings, dataset=dataset, out_dir=tmp_path / 'out', max_iters=1,
                                                 peak_flops=1e12)), env=env)
    assert re.search(r'^run: device cpu x 1 process\(es\), dtype float32, compile off,', proc.stdout, re.M)


@pytest.mark.parametrize('gpu, dtype, compile', [(None, 'float32', False),
                                                 (('NVIDIA A100-SXM4-80GB', (8, 0)), 'bfloat16', True),
                                                 (('Tesla T4', (7, 5)), 'float16', True)], ids=['cpu', 'A100', 'T4'])
def test_help_shows_dtype_and_compile_as_they_resolve_on_this_machine(fake_gpu_env, gpu, dtype, compile):
    text = run_script('train.py', '--help', env=fake_gpu_env(*gpu) if gpu else None).stdout
    assert re.search(rf'^  --dtype={dtype} ', text, re.M) and re.search(rf'^  --compile={compile} ', text, re.M), text


# ----------------------------------------------------------------------------- never losing a run

def test_a_new_start_in_an_out_dir_holding_a_run_is_refused_and_keeps_it(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    assert set(before) == {'ckpt.pt', 'best.pt', 'log.jsonl'}
    error = assert_refused(train(dataset, out_dir, check=False), before, out_dir)  # --init_from=resume forgotten
    assert out_dir in error and 'ckpt.pt and best.pt' in error
    assert '--init_from=resume' in error and '--out_dir' in error and '--start_over=True' in error


@pytest.mark.parametrize('mistake', ['a missing dataset', 'a missing HellaSwag file (loaded after the model)'])
def test_start_over_keeps_the_earlier_run_when_another_check_fails(tmp_path, dataset, trained, mistake):
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    settings = dict(dataset=str(tmp_path / 'nothing')) if mistake == 'a missing dataset' else \
        dict(dataset=dataset, hellaswag=str(tmp_path / 'hellaswag.jsonl'))
    assert_refused(train(out_dir=out_dir, check=False, start_over=True, **settings), before, out_dir)


def test_start_over_replaces_the_earlier_run_on_purpose(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    proc = train(dataset, out_dir, max_iters=4, eval_interval=4, start_over=True)
    assert sorted(iter_losses(proc.stdout)) == [0, 1, 2, 3]
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] == 4
    assert load_checkpoint(os.path.join(out_dir, 'best.pt'))['iter_num'] == 4  # not the old run's best
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        assert max(json.loads(line)['iter'] for line in f) == 4  # a fresh log


def test_an_unknown_init_from_stops_before_out_dir_is_made(tmp_path, dataset):
    error = assert_one_line_error(train(dataset, str(tmp_path / 'out'), check=False, init_from='gtp2'))
    assert "unknown init_from 'gtp2'" in error and not (tmp_path / 'out').exists()


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(tmp_path, dataset, trained):
    # not a mistake: the same command run again (after a Colab reset, say) finds the run done and says so
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    proc = train(dataset, out_dir, init_from='resume', max_iters=10)
    assert 'at iter 10 and max_iters=10: nothing is left to train' in proc.stdout and '--max_iters' in proc.stdout
    assert iter_losses(proc.stdout) == {} and run_files(out_dir) == before


def test_a_second_run_on_the_same_out_dir_stops_at_once_naming_the_first(tmp_path, dataset):
    out_dir = str(tmp_path / 'out')
    first = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'train.py'),
                              *tiny_args(dataset, out_dir, max_iters=100_000, eval_interval=100_000)],
                             cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:  # wait until the first run is training
            if line.startswith('iter 2:'):
                break
        second = run_script('train.py', *tiny_args(dataset, out_dir, max_iters=100_000, eval_interval=100_000),
                            check=False)  # the same command again
        error = assert_one_line_error(second)
        assert f'another run (pid {first.pid}) is using out_dir {out_dir}' in error
        first.send_signal(signal.SIGTERM)
        stdout, _ = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0 and 'stopped by SIGTERM' in stdout
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] >= 3  # the first run's, intact


def test_a_stop_during_the_first_evaluation_says_that_nothing_was_saved(tmp_path, dataset):
    out_dir = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'train.py'),
                             *tiny_args(dataset, str(out_dir), eval_iters=3000, peak_flops=1e12)],
                            cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the summary is printed just before the first evaluation, of 6000 batches
            if line.startswith('run: '):
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert 'SIGINT: stopping after this step' in stderr  # heard at once
    assert 'stopped by SIGINT at iter 0; nothing was trained, so nothing was saved' in stdout
    assert 'checkpoint saved' not in stdout and not (out_dir / 'ckpt.pt').exists()


def test_resume_applies_the_optimizer_settings_given_now(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    train(dataset, out_dir, init_from='resume', max_iters=12, beta2=0.9, weight_decay=0.5)
    groups = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['optimizer']['param_groups']
    assert [tuple(g['betas']) for g in groups] == [(0.9, 0.9)] * 2  # beta1 as saved, beta2 as given now
    assert [g['weight_decay'] for g in groups] == [0.5, 0.0]  # matrices decay, gains and biases do not


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


@pytest.mark.parametrize('damage', ['odd size', 'empty'])
def test_token_file_that_holds_no_token_ids_is_one_line(tmp_path, dataset, trained, damage):
    broken = copy_of(dataset, tmp_path, 'broken')
    os.remove(os.path.join(broken, 'manifest.json'))  # as prepared by hand or by nanoGPT: nothing to compare with
    with open(os.path.join(broken, 'train.bin'), 'r+b') as f:
        f.truncate(0 if damage == 'empty' else os.path.getsize(f.name) - 1)
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    error = assert_refused(train(broken, out_dir, check=False, init_from='resume', max_iters=20), before, out_dir)
    assert os.path.join(broken, 'train.bin') in error and ('is empty' if damage == 'empty' else 'odd number') in error


def test_token_ids_beyond_the_vocabulary_stop_before_a_checkpoint_is_written(tmp_path, dataset, trained):
    broken = copy_of(dataset, tmp_path, 'broken')
    os.remove(os.path.join(broken, 'manifest.json'))
    ids = np.fromfile(os.path.join(broken, 'train.bin'), dtype=np.uint16)
    ids[::97] = 200  # an id the 65-character model has no embedding for
    ids.tofile(os.path.join(broken, 'train.bin'))
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    error = assert_refused(train(broken, out_dir, check=False, init_from='resume', max_iters=20), before, out_dir)
    assert "train.bin of" in error and 'token id 200' in error and 'vocabulary of' in error


def test_resuming_a_character_model_on_a_bpe_dataset_is_refused(tmp_path, small_text, trained, tiktoken_cache):
    bpe = tmp_path / 'bpe'
    (tmp_path / 'text.txt').write_text(small_text, encoding='utf-8')
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'data', 'shakespeare', 'prepare.py'),
                    f'--input={tmp_path / "text.txt"}', f'--out_dir={bpe}'], check=True, env=script_env())
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    error = assert_refused(train(str(bpe), out_dir, check=False, init_from='resume', max_iters=20), before, out_dir)
    assert re.search(r'the model reads a \d+-character vocabulary', error) and "holds GPT-2's BPE tokens" in error


def test_gpt2_weights_on_a_character_dataset_are_refused(tmp_path, dataset):
    """GPT-2's token ids are BPE pieces: trained on character ids it would learn nonsense and sample garbage."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = tmp_path / 'hf'
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=100)).save_pretrained(hf)
    error = assert_one_line_error(train(dataset, str(tmp_path / 'out'), check=False, init_from=str(hf)))
    assert "the model reads GPT-2's BPE tokens" in error and re.search(r'holds a \d+-character vocabulary', error)
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_a_dataset_whose_preparation_was_interrupted_is_refused(tmp_path, dataset, trained):
    sys.path.insert(0, os.path.join(REPO_ROOT, 'data'))
    from prepare_utils import begin_dataset
    broken = copy_of(dataset, tmp_path, 'broken')
    begin_dataset(broken, ('train.bin', 'val.bin', 'meta.pkl'))  # what a prepare script killed mid-way leaves
    with open(os.path.join(broken, 'train.bin'), 'ab') as f:
        f.write(b'\x00\x00' * 100)  # its new train.bin was renamed in, the old val.bin and meta.pkl were not
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    error = assert_refused(train(broken, out_dir, check=False, init_from='resume', max_iters=20), before, out_dir)
    assert broken in error and 'incomplete' in error and 'prepare script again' in error


def test_resume_on_a_dataset_with_a_larger_vocabulary_is_refused(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    model_vocab = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model_args']['vocab_size']
    larger = copy_of(dataset, tmp_path, 'larger')
    os.remove(os.path.join(larger, 'manifest.json'))
    with open(os.path.join(larger, 'meta.pkl'), 'rb') as f:
        meta = pickle.load(f)
    meta['vocab_size'] = model_vocab + 11
    with open(os.path.join(larger, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)
    proc = train(larger, out_dir, check=False, init_from='resume', max_iters=20)
    error = assert_one_line_error(proc)
    assert f'{model_vocab + 11} tokens' in error and f"model's {model_vocab}" in error and 'scratch' in error


def test_a_hugging_face_model_that_is_not_gpt2_is_refused(tmp_path, dataset):
    from transformers import BertConfig, BertModel
    bert = tmp_path / 'bert'
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    for script, args in (('train.py', tiny_args(dataset, str(tmp_path / 'out'), init_from=str(bert))),
                         ('sample.py', [f'--init_from={bert}', '--device=cpu'])):
        error = assert_one_line_error(run_script(script, *args, check=False))
        assert f"'{bert}' holds a bert model" in error and 'GPT-2' in error
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


# ----------------------------------------------------------------------------- resuming

@pytest.mark.parametrize('override, saved', [('block_size=64', 'block_size=32'), ('n_layer=3', 'n_layer=2')])
def test_resume_with_a_different_model_shape_is_refused(tmp_path, dataset, trained, override, saved):
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    key, value = override.split('=')
    proc = train(dataset, out_dir, check=False, init_from='resume', max_iters=20, **{key: int(value)})
    error = assert_refused(proc, before, out_dir)
    assert override in error and f"checkpoint's {saved}" in error and f'drop --{key}' in error


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


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_damaged_checkpoint_is_one_clear_line(tmp_path, dataset, trained, script):
    out_dir = copy_of(trained, tmp_path, 'out')
    os.remove(os.path.join(out_dir, 'best.pt'))  # so that sample.py's default is ckpt.pt
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    with open(ckpt_path, 'r+b') as f:
        f.truncate(os.path.getsize(ckpt_path) // 2)
    if script == 'train.py':
        args = tiny_args(dataset, out_dir, init_from='resume', max_iters=20)
    else:
        args = [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5']
    error = assert_one_line_error(run_script(script, *args, check=False))
    assert f'{ckpt_path} is not a readable checkpoint' in error
    assert 'weights_only' not in error  # torch's advice to load it anyway would run any code in the file


@pytest.mark.parametrize('missing', ['optimizer', 'iter_num'])
def test_a_checkpoint_without_what_resuming_needs_is_refused(tmp_path, dataset, trained, missing):
    out_dir = copy_of(trained, tmp_path, 'out')
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    checkpoint = torch.load(ckpt_path, weights_only=True)
    del checkpoint[missing]
    torch.save(checkpoint, ckpt_path)
    before = run_files(out_dir)
    error = assert_refused(train(dataset, out_dir, check=False, init_from='resume', max_iters=20), before, out_dir)
    assert f'{ckpt_path} lacks {missing}' in error and 'cannot resume' in error


def test_checkpoint_weights_of_the_wrong_shape_name_the_weight(tmp_path, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    checkpoint = torch.load(ckpt_path, weights_only=True)
    checkpoint['model']['lm_head.weight'] = checkpoint['model']['lm_head.weight'][:, :-1]
    torch.save(checkpoint, ckpt_path)
    os.remove(os.path.join(out_dir, 'best.pt'))
    error = assert_one_line_error(run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', check=False))
    assert "weights do not fit its model_args" in error and 'lm_head.weight' in error


@pytest.mark.parametrize('damage, script', [('truncated model.safetensors', 'train.py'),
                                            ('random pytorch_model.bin', 'sample.py')])
def test_a_hugging_face_directory_with_damaged_weights_is_one_line(tmp_path, dataset, damage, script):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = tmp_path / 'hf'
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)).save_pretrained(hf)
    if damage == 'truncated model.safetensors':
        with open(hf / 'model.safetensors', 'r+b') as f:
            f.truncate(100)
    else:
        os.remove(hf / 'model.safetensors')
        (hf / 'pytorch_model.bin').write_bytes(os.urandom(5000))
    args = tiny_args(dataset, str(tmp_path / 'out'), init_from=str(hf)) if script == 'train.py' else \
        [f'--init_from={hf}', '--device=cpu']
    error = assert_one_line_error(run_script(script, *args, check=False))
    assert f"could not load GPT-2 weights from '{hf}'" in error


# ----------------------------------------------------------------------------- disks and permissions

@pytest.mark.skipif(not os.path.exists('/dev/full'), reason="needs Linux's /dev/full, a device that is always full")
def test_a_full_disk_while_saving_stops_the_run_and_keeps_its_checkpoints(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    for name in ('ckpt.pt', 'best.pt'):  # every checkpoint write lands on a device that is always full
        os.symlink('/dev/full', os.path.join(out_dir, f'.{name}.tmp'))
    proc = train(dataset, out_dir, check=False, init_from='resume', max_iters=20, always_save_checkpoint=True)
    error = assert_one_line_error(proc)
    assert 'could not write checkpoint' in error and 'No space left on device' in error
    assert 'free some disk space' in error and 'intact' in error
    assert {k: v for k, v in run_files(out_dir).items() if k != 'log.jsonl'} == \
        {k: v for k, v in before.items() if k != 'log.jsonl'}


def test_a_disk_too_full_for_a_checkpoint_stops_before_training(tmp_path, dataset, trained):
    # a stand-in for a full disk: shutil.disk_usage reports 1 KiB free
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'sitecustomize.py').write_text("import shutil, collections\n"
                                           "shutil.disk_usage = lambda path: collections.namedtuple("
                                           "'usage', 'total used free')(2**30, 2**30 - 1024, 1024)\n")
    out_dir = copy_of(trained, tmp_path, 'out')
    before = run_files(out_dir)
    proc = train(dataset, out_dir, check=False, env=script_env(PYTHONPATH=full), init_from='resume', max_iters=20)
    error = assert_refused(proc, before, out_dir)
    assert f'the disk holding {out_dir} has 0 MiB free' in error and 'free some space' in error
    assert iter_losses(proc.stdout) == {}


@pytest.mark.skipif(shutil.which('chattr') is None, reason="needs chattr")
def test_an_out_dir_where_no_file_can_be_made_stops_before_training(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    with open(os.path.join(out_dir, '.lock'), 'w'):
        pass
    if subprocess.run(['chattr', '+i', out_dir], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory immutable here (needs root and a file system that supports it)")
    try:
        before = run_files(out_dir)
        proc = train(dataset, out_dir, check=False, init_from='resume', max_iters=20)
        error = assert_refused(proc, before, out_dir)
        assert f'cannot write in out_dir {out_dir}' in error and iter_losses(proc.stdout) == {}
    finally:
        subprocess.run(['chattr', '-i', out_dir])


def test_an_out_dir_that_cannot_be_created_stops_before_any_work(tmp_path, dataset):
    (tmp_path / 'file').write_text('a file, not a directory')
    out_dir = str(tmp_path / 'file' / 'out')
    proc = train(dataset, out_dir, check=False)
    error = assert_one_line_error(proc)
    assert f'cannot write in out_dir {out_dir}' in error and 'Not a directory' in error
    assert iter_losses(proc.stdout) == {}


def test_a_metrics_log_that_cannot_be_written_stops_before_training(tmp_path, dataset, trained):
    out_dir = copy_of(trained, tmp_path, 'out')
    os.remove(os.path.join(out_dir, 'log.jsonl'))
    os.mkdir(os.path.join(out_dir, 'log.jsonl'))  # in the way of the file, even for root
    before = run_files(out_dir)
    proc = train(dataset, out_dir, check=False, init_from='resume', max_iters=20)
    error = assert_refused(proc, before, out_dir)
    assert f"metrics log {os.path.join(out_dir, 'log.jsonl')}" in error
    assert iter_losses(proc.stdout) == {}


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


def start_sampling(trained, num_samples):
    return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'sample.py'), f'--out_dir={trained}',
                             '--device=cpu', f'--num_samples={num_samples}', '--max_new_tokens=1000000',
                             '--start=KING:'], cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_ctrl_c_while_streaming_a_sample_keeps_its_text_and_exits_130(trained):
    proc = start_sampling(trained, num_samples=1)
    try:
        streamed = proc.stdout.read(200)  # the sample is under way
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr
    stopped = re.search(r'interrupted after (\d+) of 1000000 new tokens', stderr)
    assert stopped, stderr
    text = (streamed + rest).split('\n---------------\n')
    assert text[1:] == [''] and text[0].startswith('KING:') and len(text[0]) == len('KING:') + int(stopped.group(1))


def test_ctrl_c_while_sampling_a_batch_prints_every_sample_so_far_and_exits_130(trained):
    proc = start_sampling(trained, num_samples=3)
    try:
        for line in proc.stderr:  # the checkpoint is loaded; generation follows
            if line.startswith('loaded '):
                break
        deadline = time.monotonic() + 1.0  # let some tokens be generated (nothing is printed until the end)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr
    n = int(re.search(r'interrupted after (\d+) of 1000000 new tokens', stderr).group(1))
    samples = stdout.split('\n---------------\n')
    assert samples[-1] == '' and len(samples) == 4
    assert all(s.startswith('KING:') and len(s) == len('KING:') + n for s in samples[:3]), (n, samples)


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'eval.py', 'export_hf.py', 'bench.py'])
def test_ctrl_c_while_a_script_imports_torch_shows_no_traceback(script):
    # -X importtime reports each module as its import ends: a torch submodule means torch is being imported
    proc = subprocess.Popen([sys.executable, '-X', 'importtime', os.path.join(REPO_ROOT, script)], cwd=REPO_ROOT,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    stderr = []
    try:
        for line in proc.stderr:
            stderr.append(line)
            if line.rstrip().endswith(' torch._utils'):
                proc.send_signal(signal.SIGINT)
                break
        stderr.append(proc.communicate(timeout=60)[1])
    finally:
        proc.kill()
    assert proc.returncode in (-signal.SIGINT, 130), ''.join(stderr)[-2000:]
    assert 'Traceback' not in ''.join(stderr), ''.join(stderr)[-2000:]


def test_ctrl_c_in_a_prepare_script_leaves_no_traceback_and_no_temporary_file(tmp_path, small_text):
    script = install_prepare_script(str(tmp_path), 'shakespeare_char')
    big = tmp_path / 'big.txt'
    big.write_text(small_text * 400, encoding='utf-8')  # ~24 MB: seconds of encoding
    out_dir = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, script, f'--input={big}', f'--out_dir={out_dir}'], env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        for line in proc.stdout:
            if line.startswith('vocab size'):  # read and counted; now encoding
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT and stderr == '', stderr  # killed by SIGINT, as Python reports it
    leftovers = [name for name in os.listdir(out_dir) if name.endswith('.tmp')] if out_dir.exists() else []
    assert leftovers == []
    manifest = out_dir / 'manifest.json'
    assert not manifest.exists() or not json.loads(manifest.read_text())['complete']


# ----------------------------------------------------------------------------- pickles that run code

class CreatesFile:
    """Unpickling this calls open(path, 'w'): the file appears if the loader runs pickled code (the control
    that it does is in test_checkpoint.py)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_sample_refuses_a_checkpoint_with_code_in_it(tmp_path):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    target = tmp_path / 'pwned'
    torch.save({'model': CreatesFile(str(target)), 'model_args': {}}, out_dir / 'ckpt.pt')
    error = assert_one_line_error(run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', check=False))
    assert f"{out_dir / 'ckpt.pt'} is not a readable checkpoint" in error
    assert not target.exists()


def test_train_refuses_a_meta_pkl_with_code_in_it(tmp_path, dataset):
    evil = copy_of(dataset, tmp_path, 'evil')
    os.remove(os.path.join(evil, 'manifest.json'))
    target = tmp_path / 'pwned'
    with open(os.path.join(dataset, 'meta.pkl'), 'rb') as f:
        vocab = pickle.load(f)
    with open(os.path.join(evil, 'meta.pkl'), 'wb') as f:
        pickle.dump({**vocab, 'payload': CreatesFile(str(target))}, f)
    error = assert_one_line_error(run_script('train.py', *tiny_args(evil, str(tmp_path / 'out')), check=False))
    assert os.path.join(evil, 'meta.pkl') in error and 'prepare.py' in error
    assert not target.exists()
