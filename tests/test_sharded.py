"""
Sharded checkpoints (checkpoint_format='sharded'): every process writes its own shards with DCP, into
out_dir/ckpt/. The oracles: an uninterrupted run (bit for bit on the same process count, its losses on another),
the same checkpoint converted to one ckpt.pt (the readers), and the previous checkpoint (kills, failed writes).
"""

import json
import os
import re
import shutil

import pytest
import torch

from checkpoint import load_checkpoint, read_file, sharded_checkpoint, to_full_checkpoint
from model import GPT, GPTConfig
from scripts import assert_one_line_error, iter_losses, run_script, site_env, train
from test_ddp import SETTINGS, assert_same_losses, ranks_that_exited_with_1, torchrun, two_processes

pytestmark = pytest.mark.slow
SHARDED = dict(checkpoint_format='sharded', fsdp=True)


@pytest.fixture(scope='module')
def runs(dataset, tmp_path_factory):
    """Two-process FSDP runs with sharded checkpoints: one to iter 8 uninterrupted, saving in the background
    (async_checkpoint), and one to iter 4, saving synchronously: {name: (stdout, out_dir)}."""
    root = tmp_path_factory.mktemp('sharded')
    to_8 = two_processes(dataset=dataset, out_dir=str(root / 'to_8'), max_iters=8, async_checkpoint=True, **SHARDED)
    to_4 = two_processes(dataset=dataset, out_dir=str(root / 'to_4'), max_iters=4, **SHARDED)
    return {'to_8': (to_8.stdout, str(root / 'to_8')), 'to_4': (to_4.stdout, str(root / 'to_4'))}


def log_losses(out_dir):
    """{iter: loss} at full precision, from log.jsonl."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {r['iter']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def full_state(out_dir, tmp_path, name):
    """The sharded ckpt/ of out_dir as one ckpt.pt-style dict (model, optimizer and the rest)."""
    path = str(tmp_path / f'{name}.pt')
    to_full_checkpoint(os.path.join(out_dir, 'ckpt'), path)
    return read_file(path)


def assert_same_tensors(a, b, where=''):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f'{where}[{i}]')


def test_a_sharded_checkpoint_is_each_processs_shards_and_no_full_file(runs):
    for name, (_, out_dir) in runs.items():
        files = set(os.listdir(os.path.join(out_dir, 'ckpt')))
        assert {'.metadata', '__0_0.distcp', '__1_0.distcp', 'train_state.pt'} <= files, files
        assert not os.path.exists(os.path.join(out_dir, 'ckpt.pt')) and os.path.isdir(os.path.join(out_dir, 'best'))
        assert not [f for f in os.listdir(out_dir) if f.endswith(('.tmp', '.old'))]


def test_resumed_on_two_processes_it_continues_bit_for_bit_as_the_uninterrupted_run(runs, dataset, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(runs['to_4'][1], out_dir)
    proc = two_processes(dataset=dataset, out_dir=out_dir, init_from='resume', max_iters=8, **SHARDED)
    expected = log_losses(runs['to_8'][1])
    assert log_losses(out_dir) == expected  # the log continues, with every loss exactly the uninterrupted run's
    assert iter_losses(proc.stdout) == {i: loss for i, loss in iter_losses(runs['to_8'][0]).items() if i >= 4}
    # the final checkpoints, model and optimizer state, are the same bits (and the background save wrote them whole)
    assert_same_tensors(full_state(out_dir, tmp_path, 'resumed'), full_state(runs['to_8'][1], tmp_path, 'to_8'))


@pytest.mark.parametrize('resume_as', ['1 process', '2 DDP processes'])
def test_resumed_on_one_process_or_under_ddp_it_continues_the_same_loss_curve(resume_as, runs, dataset, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(runs['to_4'][1], out_dir)
    resume = dict(dataset=dataset, out_dir=out_dir, init_from='resume', max_iters=8, checkpoint_format='sharded')
    if resume_as == '1 process':
        train(**dict(SETTINGS, **resume))
    else:
        two_processes(**resume)
    got, expected = log_losses(out_dir), log_losses(runs['to_8'][1])
    assert sorted(got) == sorted(expected)
    assert got == pytest.approx(expected, abs=1e-6)


def test_readers_on_a_sharded_out_dir_equal_their_results_on_its_conversion_to_ckpt_pt(runs, dataset, tmp_path):
    from transformers import GPT2LMHeadModel
    sharded = runs['to_8'][1]
    converted = str(tmp_path / 'converted')
    os.makedirs(converted)
    to_full_checkpoint(os.path.join(sharded, 'ckpt'), os.path.join(converted, 'ckpt.pt'))
    assert load_checkpoint(os.path.join(converted, 'ckpt.pt'), required=('optimizer', 'iter_num'))['iter_num'] == 8
    outputs = {}
    for name, out_dir in (('sharded', sharded), ('converted', converted)):
        args = (f'--out_dir={out_dir}', '--checkpoint=ckpt.pt', '--device=cpu')
        sample = run_script('sample.py', *args, '--num_samples=2', '--max_new_tokens=30')
        run_script('eval.py', *args, '--tasks=text', f'--dataset={dataset}', f'--out={tmp_path / name}.json')
        run_script('export_hf.py', *args[:2], f'--export_dir={tmp_path / name}_hf')
        bench = run_script('bench.py', '--init_from=resume', f'--out_dir={out_dir}', '--device=cpu', '--mode=sample',
                           '--max_new_tokens=4', '--warmup_steps=1', '--num_steps=1', '--compare_uncached=False')
        outputs[name] = (sample.stdout, json.loads((tmp_path / f'{name}.json').read_text()),
                         bench.stdout.splitlines()[0])  # (bench.py's model: its size)
    assert outputs['sharded'] == outputs['converted'] and outputs['sharded'][0].strip()
    assert 'parameters' in outputs['sharded'][2], outputs['sharded'][2]
    idx = torch.arange(16)[None]
    with torch.no_grad():
        logits = [GPT2LMHeadModel.from_pretrained(f'{tmp_path / n}_hf')(idx).logits for n in ('sharded', 'converted')]
    assert torch.equal(*logits)


KILL_AT_SECOND_CKPT_SAVE = '''
import os, signal
import torch.distributed.checkpoint as dcp
_save, _rename, saves = dcp.save, os.rename, []
def save(state, checkpoint_id, **kwargs):
    result = _save(state, checkpoint_id=checkpoint_id, **kwargs)
    saves.append(checkpoint_id)
    if {where!r} == 'after the shards' and sum('.ckpt.tmp' in s for s in saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # every shard written, the checkpoint not yet in place
    return result
def rename(src, dst):
    if {where!r} == 'between the renames' and str(src).endswith('.ckpt.tmp') and sum('.ckpt.tmp' in s for s in saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the previous checkpoint set aside, the new one not yet in place
    return _rename(src, dst)
dcp.save, os.rename = save, rename
'''


@pytest.mark.parametrize('where', ['after the shards', 'between the renames'])
def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint_loadable(where, dataset, tmp_path):
    out_dir = str(tmp_path / 'out')
    settings = dict(dataset=dataset, out_dir=out_dir, max_iters=8, eval_interval=4, checkpoint_format='sharded')
    env = site_env(str(tmp_path / 'site'), KILL_AT_SECOND_CKPT_SAVE.format(where=where))
    proc = train(**settings, env=env, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), required=('optimizer',))['iter_num'] == 4
    resumed = train(**dict(settings, init_from='resume'))
    assert sorted(iter_losses(resumed.stdout)) == list(range(4, 8))
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] == 8 and sharded_checkpoint(
        os.path.join(out_dir, 'ckpt.pt')) == os.path.join(out_dir, 'ckpt')
    assert not [f for f in os.listdir(out_dir) if f.endswith(('.tmp', '.old'))]


FAIL_SECOND_BACKGROUND_WRITE = '''
import errno
from torch.distributed.checkpoint import filesystem
_write, writes = filesystem.FileSystemWriter.write_data, []
def write_data(self, plan, planner):
    writes.append(str(self.path))
    if sum('.ckpt.tmp' in w for w in writes) == 2:
        raise OSError(errno.EIO, 'Input/output error')
    return _write(self, plan, planner)
filesystem.FileSystemWriter.write_data = write_data
'''


def test_a_failed_background_write_is_one_line_and_the_previous_checkpoint_stays(dataset, tmp_path):
    out_dir = str(tmp_path / 'out')
    env = site_env(str(tmp_path / 'site'), FAIL_SECOND_BACKGROUND_WRITE)
    proc = train(dataset=dataset, out_dir=out_dir, max_iters=8, eval_interval=4, checkpoint_format='sharded',
                 async_checkpoint=True, env=env, check=False)
    assert 'could not write checkpoint' in assert_one_line_error(proc) and 'Input/output error' in proc.stderr
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), required=('optimizer',))['iter_num'] == 4


@pytest.fixture(scope='module')
def meta_start(dataset, tmp_path_factory):
    """An FSDP start from scratch, one step at learning rate 0, so its ckpt.pt holds the initial weights (rotary
    tables too: computed, not saved, so computed again on the device): its out_dir."""
    out_dir = str(tmp_path_factory.mktemp('meta_start'))
    two_processes(dataset=dataset, out_dir=out_dir, max_iters=1, learning_rate=0.0, min_lr=0.0, fsdp=True, rope=True,
                  bias=True)
    return out_dir


def test_fsdp_built_on_the_meta_device_starts_from_the_same_weights_as_one_process(meta_start):
    """FSDP from scratch builds the model on the meta device, and every process draws GPT()'s initial weights
    one module at a time into its shards: they are those of GPT() under the seed."""
    saved = load_checkpoint(os.path.join(meta_start, 'ckpt.pt'))
    torch.manual_seed(1337)  # train.py's default seed
    expected = GPT(GPTConfig(**saved['model_args'])).state_dict()
    assert saved['model'].keys() == expected.keys()
    assert all(torch.equal(saved['model'][k], expected[k]) for k in expected)


def test_fsdp_from_a_checkpoint_file_takes_rank_0s_weights_and_a_damaged_one_stops_every_process(meta_start, dataset,
                                                                                                    tmp_path):
    """A start from other weights under FSDP (a checkpoint file here; GPT-2's take the same path): rank 0 alone
    loads them and hands out the shards; the others, on the meta device, stop with rank 0's one line if it fails."""
    base = str(tmp_path / 'base.pt')
    shutil.copy(os.path.join(meta_start, 'ckpt.pt'), base)
    out_dir = str(tmp_path / 'out')
    two_processes(dataset=dataset, out_dir=out_dir, init_from=base, max_iters=1, learning_rate=0.0, min_lr=0.0,
                  fsdp=True, rope=True, bias=True)
    expected = load_checkpoint(base)['model']
    saved = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model']
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)

    with open(base, 'r+b') as f:
        f.truncate(os.path.getsize(base) // 2)
    # (torchrun checks its workers every 5 s: time enough for rank 1 to stop by itself on rank 0's error)
    proc = torchrun(['--standalone', '--nproc_per_node=2', '--monitor-interval=5'], timeout=120, dataset=dataset,
                    out_dir=str(tmp_path / 'damaged'), init_from=base, fsdp=True)
    errors = re.findall(r'^(?:\[rank\d\]: )?(error: .*)$', proc.stderr, re.M)  # (torch's rank prefix)
    assert len(errors) == 1 and 'base.pt is not a readable checkpoint' in errors[0], proc.stderr
    assert ranks_that_exited_with_1(proc.stderr) == {'0', '1'}, proc.stderr
    assert 'train.py", line' not in proc.stderr, proc.stderr


def test_a_stop_signal_waits_for_the_background_write_and_the_checkpoint_is_whole(dataset, tmp_path):
    """SIGTERM with async_checkpoint: the stop's save goes to the background thread, and the run waits for it
    before exiting, so ckpt/ holds the stop's iteration, complete, with nothing left half-written beside it."""
    import signal
    from test_train import finish, start_train, wait_for
    out_dir, log = tmp_path / 'out', tmp_path / 'train.log'
    proc = start_train(dataset, str(out_dir), log, max_iters=10_000, eval_interval=1000, checkpoint_format='sharded',
                       async_checkpoint=True)
    wait_for(proc, log, lambda text: re.search(r'^iter 5:', text, re.M))
    proc.send_signal(signal.SIGTERM)
    stdout = finish(proc, log, timeout=60)
    n = int(re.search(r'^stopped by SIGTERM at iter (\d+); checkpoint saved in ', stdout, re.M).group(1))
    assert load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), required=('optimizer',))['iter_num'] == n
    assert sorted(os.listdir(out_dir / 'ckpt')) == ['.metadata', '__0_0.distcp', 'train_state.pt']
    assert not [f for f in os.listdir(out_dir) if f.startswith('.ckpt')]  # no .ckpt.tmp/ or .ckpt.old/ left
