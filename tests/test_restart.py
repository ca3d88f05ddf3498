"""torchrun's fault tolerance: a worker killed mid-run is restarted by torchrun (--max-restarts) and resumes from
its run's last checkpoint by itself; init_from='auto' lets a re-submitted command continue; neither lets a new run
take over an earlier run's out_dir."""

import os
import signal
import subprocess

import pytest

from scripts import iter_losses, train
from test_ddp import SETTINGS, assert_same_losses, check_ok, finish, saved_iter, start_torchrun, torchrun

pytestmark = pytest.mark.slow
RESTARTABLE = ['--standalone', '--nproc_per_node=2', '--max-restarts=1']


@pytest.fixture(scope='module')
def reference(dataset, tmp_path_factory):
    """An uninterrupted run of SETTINGS' 16 iterations in one process (DDP's losses are the same)."""
    return train(**dict(SETTINGS, dataset=dataset, out_dir=str(tmp_path_factory.mktemp('reference')))).stdout


@pytest.mark.parametrize('victim', [0, 1], ids=['rank0-killed', 'rank1-killed'])
def test_a_killed_worker_is_restarted_and_resumes_the_same_curve(victim, dataset, reference, tmp_path):
    """kill -9 of one worker after a checkpoint: torchrun restarts both, which resume from that checkpoint by
    themselves (the command says init_from=scratch) and repeat the uninterrupted run's losses."""
    proc = start_torchrun(RESTARTABLE, dataset=dataset, out_dir=str(tmp_path / 'out'))
    try:
        for line in proc.stdout:  # ckpt.pt holds iter 4 by now
            if line.startswith('iter 6:'):
                break
        workers = sorted(subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split(),
                         key=int)
        assert len(workers) == 2, workers
        os.kill(int(workers[victim]), signal.SIGKILL)  # one node: the i-th worker started is rank i
        result = check_ok(finish(proc))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 'connectFullMesh' not in result.stderr and 'error:' not in result.stderr, result.stderr[-3000:]
    before, resumed = (line + result.stdout).split('Resuming training from ')  # once: the restart
    start = int(resumed.split(' at iter ', 1)[1].split()[0])
    assert 4 <= start <= max(iter_losses(before)) + 1 and start % 4 == 0, result.stdout[-3000:]
    assert_same_losses(resumed, reference, iters=range(start, 16), steps=range(start + 4, 17, 4))
    assert saved_iter(tmp_path / 'out') == 16


@pytest.mark.parametrize('checkpoint_format', ['sharded'])  # (its folder is found as ckpt.pt is)
def test_init_from_auto_twice_continues_the_first_run(checkpoint_format, dataset, reference, tmp_path):
    out_dir = str(tmp_path / 'out')
    run = dict(SETTINGS, dataset=dataset, out_dir=out_dir, init_from='auto', checkpoint_format=checkpoint_format)
    first = train(**dict(run, max_iters=8))
    assert 'Initializing a new model from scratch' in first.stdout
    second = train(**run)
    assert f'Resuming training from {out_dir} at iter 8' in second.stdout
    assert_same_losses(second.stdout, reference, iters=range(8, 16), steps=[12, 16])


def test_a_restart_never_takes_over_an_earlier_runs_out_dir(dataset, tmp_path):
    out_dir = str(tmp_path / 'out')
    check_ok(torchrun(['--standalone', '--nproc_per_node=2'], dataset=dataset, out_dir=out_dir, max_iters=4))
    before = open(os.path.join(out_dir, 'ckpt.pt'), 'rb').read()
    proc = torchrun(RESTARTABLE, dataset=dataset, out_dir=out_dir)  # a scratch start: refused, and so is its restart
    assert proc.returncode != 0
    assert proc.stderr.count('holds ckpt.pt and best.pt of an earlier run') == 2, proc.stderr[-3000:]
    assert open(os.path.join(out_dir, 'ckpt.pt'), 'rb').read() == before
