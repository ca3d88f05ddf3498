"""
End-to-end tests of train.py under torchrun on the CPU (gloo): two processes, two "nodes" on localhost,
resuming with another process count, and a configuration that cannot be split over the processes.

The oracle is an ordinary single-process run of train.py: the examples of optimizer step k are a function of
(seed, k) only, whatever the number of processes sharing them, so a DDP run must print the same losses.
torchrun is started as `python -m torch.distributed.run` so the test uses the same interpreter and torch.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from scripts import (REPO_ROOT, TINY, args_of, assert_one_line_error, eval_losses, iter_losses, run_script,
                     script_env, site_env, train)

pytestmark = pytest.mark.slow

TRAIN_PY = os.path.join(REPO_ROOT, 'train.py')
# two micro-batches per step, so two processes take one each; evaluations every 4 iterations; dropout, so that
# a process must draw the same masks for a micro-batch as the single process does
SETTINGS = dict(TINY, gradient_accumulation_steps=2, eval_interval=4, max_iters=16, dropout=0.1)
# the logs print 4 decimals: losses agree to one unit of the last digit (the epsilon absorbs float error in
# subtracting two printed values)
TOL = 1e-4 + 1e-9
TIMEOUT = 240  # seconds; a launch that takes longer is hung (a normal one takes well under a minute)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_torchrun(launcher_args, cwd=REPO_ROOT, env=None, **overrides):
    """Start `torchrun <launcher_args> train.py <SETTINGS + overrides>` in its own process group."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', *launcher_args, TRAIN_PY,
           *args_of(dict(SETTINGS, **overrides))]
    return subprocess.Popen(cmd, cwd=cwd, env=env or script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc, timeout=TIMEOUT):
    """Wait for proc; a launch still running after timeout is killed with all its workers and fails the test."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher and the workers it started
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout}s (hung?):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def check_ok(proc):
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def torchrun(launcher_args, cwd=REPO_ROOT, timeout=TIMEOUT, env=None, **overrides):
    return finish(start_torchrun(launcher_args, cwd=cwd, env=env, **overrides), timeout)


def two_processes(**overrides):
    return check_ok(torchrun(['--standalone', '--nproc_per_node=2'], **overrides))


def single_process(**overrides):
    return train(**dict(SETTINGS, **overrides))


def assert_same_losses(stdout, reference_stdout, iters, steps, tol=TOL):
    """The iteration losses of iters and the evaluation losses of steps in stdout equal the reference's."""
    got, expected = iter_losses(stdout), iter_losses(reference_stdout)
    assert sorted(got) == sorted(iters), stdout[-3000:]
    assert got == pytest.approx({i: expected[i] for i in iters}, abs=tol)
    got, expected = eval_losses(stdout), eval_losses(reference_stdout)
    assert sorted(got) == sorted(steps), stdout[-3000:]
    for step in steps:
        assert got[step] == pytest.approx(expected[step], abs=tol), f"evaluation at step {step}"


def saved_iter(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)['iter_num']


@pytest.fixture(scope='module')
def hellaswag(tmp_path_factory, small_text):
    """A HellaSwag-format file of 9 items whose text uses only the characters the char model knows."""
    lines = [line for line in small_text.splitlines() if len(line) > 10]
    path = tmp_path_factory.mktemp('hellaswag') / 'hellaswag.jsonl'
    with open(path, 'w') as f:
        for i in range(9):
            f.write(json.dumps({'ctx': lines[5 * i], 'endings': lines[5 * i + 1:5 * i + 5], 'label': str(i % 4)}) + '\n')
    return str(path)


def hellaswag_lines(stdout):
    return re.findall(r'^step (\d+): hellaswag acc_norm ([\d.]+), acc ([\d.]+) \(9 items\)$', stdout, re.M)


@pytest.fixture(scope='module')
def reference(dataset, hellaswag, tmp_path_factory):
    """stdout of an uninterrupted single-process run of SETTINGS (16 iterations)."""
    stdout = single_process(dataset=dataset, out_dir=str(tmp_path_factory.mktemp('reference')),
                            hellaswag=hellaswag).stdout
    assert sorted(iter_losses(stdout)) == list(range(16)) and sorted(eval_losses(stdout)) == [0, 4, 8, 12, 16]
    return stdout


@pytest.fixture(scope='module')
def ddp_to_8(dataset, hellaswag, tmp_path_factory):
    """A two-process run to iter 8: (its output, its out_dir). Tests that resume from it copy the out_dir."""
    out_dir = str(tmp_path_factory.mktemp('ddp_to_8'))
    return two_processes(dataset=dataset, out_dir=out_dir, max_iters=8, hellaswag=hellaswag), out_dir


def test_ddp_two_processes_match_single_process(ddp_to_8, reference):
    proc, out_dir = ddp_to_8
    assert_same_losses(proc.stdout, reference, iters=range(8), steps=[0, 4, 8])
    # HellaSwag during training: the items shared out over the two processes, the same accuracy as one process
    shared, alone = hellaswag_lines(proc.stdout), hellaswag_lines(reference)
    assert [step for step, *_ in shared] == ['0', '4', '8'] and shared == alone[:3]
    # the settings are echoed once, by rank 0, not once per process
    echoed = [line for line in proc.stderr.splitlines() if line.startswith('Overriding: ')]
    assert len(echoed) == len(set(echoed)) == len(dict(SETTINGS, dataset=1, out_dir=1, max_iters=1, hellaswag=1))
    # only rank 0 prints and saves: every line once, one 'saving checkpoint' per evaluation after step 0
    for kind, expected in (('iter', list(range(8))), ('step', [0, 4, 8])):
        counts = Counter(int(n) for n in re.findall(rf'^{kind} (\d+): (?:loss|train loss)', proc.stdout, re.M))
        assert sorted(counts) == expected and set(counts.values()) == {1}, f"'{kind} N:' lines: {counts}"
    assert proc.stdout.count('saving checkpoint') == 2, proc.stdout
    # one complete ckpt.pt holding the last step, and no temp file of a second writer left behind
    assert [f for f in os.listdir(out_dir) if 'ckpt' in f] == ['ckpt.pt'], os.listdir(out_dir)
    assert saved_iter(out_dir) == 8


@pytest.mark.parametrize('rendezvous', ['static', 'c10d'])
def test_two_node_launch_on_localhost_matches_single_process(rendezvous, dataset, reference, tmp_path):
    """Two torchrun launchers, one process each, joined over TCP on localhost as two nodes would be."""
    port = free_port()
    if rendezvous == 'static':
        node_args = [['--nnodes=2', '--nproc_per_node=1', f'--node_rank={rank}', '--master_addr=127.0.0.1',
                      f'--master_port={port}'] for rank in (0, 1)]
    else:  # the rendezvous assigns the ranks: either node may get rank 0
        node_args = [['--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d',
                      f'--rdzv_endpoint=127.0.0.1:{port}', f'--rdzv_id=test-ddp-{os.getpid()}-{port}']] * 2
    # each node in its own working directory with a relative out_dir: the directory that gets out/ is rank 0's
    node_dirs = [tmp_path / f'node{i}' for i in (0, 1)]
    for d in node_dirs:
        d.mkdir()
    launches = [start_torchrun(args, cwd=d, dataset=dataset, out_dir='out', max_iters=4)
                for args, d in zip(node_args, node_dirs)]
    try:
        procs = [check_ok(finish(p)) for p in launches]
    finally:  # when one node fails or hangs, do not leave the other waiting for it
        for p in launches:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()

    writers = [i for i, d in enumerate(node_dirs) if (d / 'out').exists()]
    assert len(writers) == 1, f"out/ written by nodes {writers}"
    if rendezvous == 'static':
        assert writers == [0], "the node with --node_rank=0 holds global rank 0"
    master, other = procs[writers[0]], procs[1 - writers[0]]
    assert_same_losses(master.stdout, reference, iters=range(4), steps=[0, 4])
    assert not re.search(r'^(iter|step) \d+:', other.stdout, re.M), other.stdout
    assert saved_iter(node_dirs[writers[0]] / 'out') == 4


@pytest.mark.parametrize('first, then', [(2, 1), (1, 2)], ids=['2procs-then-1', '1proc-then-2'])
def test_resume_ddp_run_with_different_process_count_continues_loss_curve(first, then, ddp_to_8, dataset,
                                                                         reference, tmp_path):
    out_dir = str(tmp_path / 'out')
    if first == 2:
        shutil.copytree(ddp_to_8[1], out_dir)
    else:
        single_process(dataset=dataset, out_dir=out_dir, max_iters=8)
    assert saved_iter(out_dir) == 8

    resume = dict(dataset=dataset, out_dir=out_dir, init_from='resume', max_iters=16)
    proc = single_process(**resume) if then == 1 else two_processes(**resume)

    # the resumed run repeats no evaluation (step 8 was evaluated before the save) and continues from iter 8
    assert_same_losses(proc.stdout, reference, iters=range(8, 16), steps=[12, 16])
    assert saved_iter(out_dir) == 16


def ranks_that_exited_with_1(stderr):
    """The ranks torchrun's failure summary lists with exit code 1."""
    return set(re.findall(r'rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: 1 ', stderr))


def test_indivisible_gradient_accumulation_stops_every_rank_with_one_line(dataset, tmp_path):
    out_dir = tmp_path / 'out'
    # torchrun stops the other workers at its first check after a failure; checking every 15 s instead of
    # every 0.1 s gives each rank time to fail by itself (on a loaded machine one may start seconds later)
    proc = torchrun(['--standalone', '--nproc_per_node=2', '--monitor-interval=15'], timeout=120,
                    dataset=dataset, out_dir=str(out_dir), gradient_accumulation_steps=3)

    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, f"expected the error once, from rank 0, for both ranks:\n{proc.stderr}"
    assert ranks_that_exited_with_1(proc.stderr) == {'0', '1'}, proc.stderr
    for line in errors:
        assert 'gradient_accumulation_steps=3' in line, line
        assert re.search(r'\b2\b', line), f"the number of processes is not named: {line}"
        assert re.search(r'\b4\b', line), f"no valid value (such as 4) is suggested: {line}"
    # torchrun prints its own traceback for the failed launch; none comes from train.py itself
    assert 'train.py", line' not in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stdout, proc.stdout
    assert not out_dir.exists(), "nothing should be written before the check"


@pytest.mark.parametrize('mode, stop', [('ddp', 'SIGTERM to one worker'), ('fsdp', 'SIGTERM to one worker'),
                                        ('ddp', 'Ctrl-C in the terminal')])
def test_a_stop_signal_stops_all_ranks_at_the_same_step(dataset, tmp_path, mode, stop):
    """A pre-emption notice reaching one worker, or Ctrl-C reaching the whole launch, stops every worker after
    the same step, with one checkpoint and no traceback from train.py."""
    out_dir = tmp_path / 'out'
    proc = start_torchrun(['--standalone', '--nproc_per_node=2'], dataset=dataset, out_dir=out_dir,
                          max_iters=100_000, eval_interval=100_000, fsdp=mode == 'fsdp')
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith('iter 3:'):
                break
        else:
            result = finish(proc)
            pytest.fail(f"the launch ended before iter 3 (exit {result.returncode}):\n{result.stderr[-3000:]}")
        workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        if stop == 'Ctrl-C in the terminal':
            os.killpg(proc.pid, signal.SIGINT)  # the launcher and its workers: the terminal's process group
        else:
            os.kill(int(workers[-1]), signal.SIGTERM)  # one worker only, as when a single node is pre-empted
        result = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if stop == 'Ctrl-C in the terminal':  # torchrun's own exit code and traceback, as the README says
        assert result.returncode == 1 and 'SignalException' in result.stderr
    else:
        check_ok(result)
    assert 'train.py", line' not in result.stderr, result.stderr[-3000:]
    stopped = re.findall(r'stopped by (.+?) at iter (\d+)', result.stdout)
    assert len(stopped) == 1, result.stdout[-2000:]
    checkpoint = load_checkpoint(str(out_dir / 'ckpt.pt'))
    assert checkpoint['iter_num'] == int(stopped[0][1]) == max(iter_losses(line + result.stdout)) + 1
    model_from_checkpoint(checkpoint)  # complete: every weight, whole


def test_ddp_with_the_faster_recipe_matches_single_process(dataset, tmp_path):
    recipe = dict(dataset=dataset, max_iters=4, optimizer='muon', rope=True, qk_norm=True)
    alone = single_process(out_dir=str(tmp_path / 'one'), **recipe).stdout
    shared = two_processes(out_dir=str(tmp_path / 'two'), **recipe).stdout
    assert_same_losses(shared, alone, iters=range(4), steps=[0, 4])


# a non-finite training loss on rank 1 only, at its third step, which also gets a pre-emption notice then
NAN_ON_RANK_1 = """
import os
import signal
import torch
import torch.nn.functional as F
cross_entropy = F.cross_entropy
steps = [0]
def poisoned(*args, **kwargs):
    loss = cross_entropy(*args, **kwargs)
    if torch.is_grad_enabled() and os.environ.get('RANK') == '1':
        steps[0] += 1
        if steps[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            return loss * float('nan')
    return loss
F.cross_entropy = poisoned
"""


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_without_saving(dataset, tmp_path, mode):
    """The stop is decided from all-reduced values: before, rank 0 saw its own finite loss and saved the poisoned
    weights (DDP) or waited in the save's collective for a rank that had left (FSDP)."""
    out_dir = tmp_path / 'out'
    proc = torchrun(['--standalone', '--nproc_per_node=2', '--monitor-interval=15'], timeout=120,
                    env=site_env(str(tmp_path / 'site'), NAN_ON_RANK_1), dataset=dataset, out_dir=str(out_dir),
                    max_iters=100, eval_interval=1000, log_interval=10, fsdp=mode == 'fsdp')
    assert proc.returncode != 0
    # (once the process group is up, torch prefixes each line of a worker's last words with its rank)
    errors = re.findall(r'^(?:\[rank\d\]: )?(error: .*)$', proc.stderr, re.M)
    assert len(errors) == 1, proc.stderr[-3000:]  # every rank stops on it; rank 0 says it
    assert ranks_that_exited_with_1(proc.stderr) == {'0', '1'}, proc.stderr[-3000:]
    assert 'training loss is nan at iter 3;' in errors[0]
    assert 'train.py", line' not in proc.stderr, proc.stderr[-3000:]
    assert not (out_dir / 'ckpt.pt').exists(), "a checkpoint was written from the poisoned weights"


@pytest.fixture(scope='module')
def one_item_hellaswag(hellaswag, tmp_path_factory):
    """Fewer HellaSwag items than processes: one process has none of its own."""
    path = tmp_path_factory.mktemp('hellaswag_1') / 'hellaswag.jsonl'
    with open(hellaswag) as f:
        path.write_text(f.readline())
    return str(path)


def test_ddp_and_fsdp_in_bfloat16_match_one_process(dataset, one_item_hellaswag, tmp_path):
    """bfloat16 on 2 processes, autocast as on one: DDP to the printed digit; FSDP, whose parameters (and so its
    residual stream) are bfloat16 too, within 0.02, with its losses computed and reported in float32."""
    settings = dict(dataset=dataset, max_iters=4, dtype='bfloat16', hellaswag=one_item_hellaswag)
    alone = single_process(out_dir=str(tmp_path / 'one'), **settings).stdout
    ddp = two_processes(out_dir=str(tmp_path / 'ddp'), **settings).stdout
    fsdp = two_processes(out_dir=str(tmp_path / 'fsdp'), fsdp=True, **settings).stdout
    assert_same_losses(ddp, alone, iters=range(4), steps=[0, 4])
    assert_same_losses(fsdp, alone, iters=range(4), steps=[0, 4], tol=0.02)
    # bfloat16 losses near 4 are multiples of 1/64: float32 ones are not
    assert any((loss * 64) % 1 for loss in iter_losses(fsdp).values()), iter_losses(fsdp)
    scored = r'^step (\d+): hellaswag acc_norm ([\d.]+), acc ([\d.]+) \(1 items\)$'
    assert re.findall(scored, fsdp, re.M) == re.findall(scored, alone, re.M) != []


# ----------------------------------------------------------------------------- FSDP

@pytest.fixture(scope='module')
def fsdp_to_8(dataset, hellaswag, tmp_path_factory):
    """A two-process FSDP run (with activation checkpointing) to iter 8: (its output, its out_dir)."""
    out_dir = str(tmp_path_factory.mktemp('fsdp_to_8'))
    return two_processes(dataset=dataset, out_dir=out_dir, max_iters=8, fsdp=True, activation_checkpointing=True,
                         hellaswag=hellaswag), out_dir


def test_fsdp_two_processes_match_single_process(fsdp_to_8, reference):
    proc, out_dir = fsdp_to_8
    assert_same_losses(proc.stdout, reference, iters=range(8), steps=[0, 4, 8])
    assert hellaswag_lines(proc.stdout) == hellaswag_lines(reference)[:3]  # 9 items: 5 and 4 (+1 unscored)
    assert proc.stdout.count('saving checkpoint') == 2 and proc.stdout.count('memory per process:') == 1
    # one checkpoint of the whole model and optimizer, as a single process writes it
    checkpoint = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    model = model_from_checkpoint(checkpoint)
    names = {n for n, _ in model.named_parameters()}
    assert set(checkpoint['optimizer']['state']) == names  # every parameter's state, whole, by name
    for name, p in model.named_parameters():
        assert checkpoint['optimizer']['state'][name]['exp_avg'].shape == p.shape


@pytest.mark.parametrize('resume_as', ['1 process', '2 FSDP processes'])
def test_fsdp_checkpoint_resumes_in_either_mode_on_the_same_curve(resume_as, fsdp_to_8, dataset, reference, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(fsdp_to_8[1], out_dir)
    resume = dict(dataset=dataset, out_dir=out_dir, init_from='resume', max_iters=16)
    proc = single_process(**resume) if resume_as == '1 process' else two_processes(**resume, fsdp=True)
    assert_same_losses(proc.stdout, reference, iters=range(8, 16), steps=[12, 16])


def test_ddp_checkpoint_resumes_under_fsdp_on_the_same_curve(ddp_to_8, dataset, reference, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(ddp_to_8[1], out_dir)
    proc = two_processes(dataset=dataset, out_dir=out_dir, init_from='resume', max_iters=16, fsdp=True)
    assert_same_losses(proc.stdout, reference, iters=range(8, 16), steps=[12, 16])


def test_fsdp_checkpoint_samples_and_exports(fsdp_to_8, tmp_path):
    from transformers import GPT2LMHeadModel
    out_dir = fsdp_to_8[1]
    sample = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=20')
    assert len(sample.stdout.split('\n---------------\n')[0]) == 1 + 20
    run_script('export_hf.py', f'--out_dir={out_dir}', f'--export_dir={tmp_path / "hf"}')  # checks logits itself
    assert GPT2LMHeadModel.from_pretrained(str(tmp_path / 'hf')).config.n_layer == SETTINGS['n_layer']


def test_fsdp_with_torch_compile_matches_eager_single_process(dataset, tmp_path):
    """torch.compile of the sharded model trains as eager code does (dropout 0: compiled dropout draws its masks
    from another generator; 1e-3: compiled kernels sum in another order)."""
    settings = dict(dataset=dataset, max_iters=8, dropout=0.0)
    eager = single_process(out_dir=str(tmp_path / 'eager'), **settings).stdout
    compiled = two_processes(out_dir=str(tmp_path / 'compiled'), fsdp=True, compile=True, **settings).stdout
    assert 'compile on' in compiled and 'compile off' in eager
    assert_same_losses(compiled, eager, iters=range(8), steps=[0, 4, 8], tol=1e-3)


@pytest.mark.parametrize('settings, message', [
    (dict(fsdp=True), 'launch with torchrun'),
    (dict(fsdp=True, optimizer='muon'), 'optimizer=muon orthogonalises whole matrices'),
])
def test_fsdp_that_cannot_work_stops_with_one_line(dataset, tmp_path, settings, message):
    proc = train(**dict(SETTINGS, dataset=dataset, out_dir=str(tmp_path / 'out'), check=False, **settings))
    assert message in assert_one_line_error(proc)
    assert not (tmp_path / 'out').exists()
