"""
End-to-end tests of train.py and sample.py: the real scripts run as subprocesses on the CPU with a tiny
model, on a char dataset made by the real data/shakespeare_char/prepare.py. The oracles are runs that
were never interrupted, the training text itself, and computations done here in the test process.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from dataset import load_meta
from scripts import (REPO_ROOT, TINY, args_of, assert_one_line_error, eval_losses, iter_losses,
                     prepare_char_dataset, run_script, script_env, train)

SEPARATOR = '---------------'


# ----------------------------------------------------------------------------- helpers

def read_checkpoint(path):
    """load_checkpoint, with its one-line error (SystemExit) turned into a test failure."""
    try:
        return load_checkpoint(str(path))
    except SystemExit:
        pytest.fail(f"{path} does not load with checkpoint.load_checkpoint")


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def logged_losses(stdout):
    """{iter: the loss exactly as printed} from the 'iter N: loss X, ...' lines."""
    return {int(n): x for n, x in re.findall(r'^iter (\d+): loss (\S+),', stdout, re.M)}


def samples_of(stdout):
    """The samples sample.py printed (its stdout holds nothing else), split at the separators."""
    assert stdout.endswith('\n' + SEPARATOR + '\n'), stdout
    return stdout[:-len(SEPARATOR) - 2].split('\n' + SEPARATOR + '\n')


def unexpected_stderr(stderr):
    """The lines of stderr besides the echo of the settings ('Overriding: ...') every run prints there."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith('Overriding: ')]


def start_train(dataset, out_dir, log_path, **overrides):
    """train.py with the TINY settings as a background process, its stdout and stderr going to files."""
    settings = dict(TINY, dataset=dataset, out_dir=out_dir)
    settings.update(overrides)
    with open(log_path, 'w') as out, open(str(log_path) + '.err', 'w') as err:
        return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'train.py'), *args_of(settings)],
                                cwd=REPO_ROOT, env=script_env(), stdout=out, stderr=err)


def read(path):
    with open(path) as f:
        return f.read()


def wait_for(proc, log_path, condition, timeout=120):
    """Poll the process's log until condition(text) holds; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = read(log_path)
        if condition(text):
            return text
        if proc.poll() is not None:
            pytest.fail(f"train.py ended (exit {proc.returncode}) before the awaited output:\n{text[-2000:]}"
                        f"\n{read(str(log_path) + '.err')[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for train.py's output:\n{read(log_path)[-2000:]}")


def finish(proc, log_path, timeout=300):
    """Wait for a background train.py and return its stdout; it must succeed."""
    rc = proc.wait(timeout=timeout)
    stdout, stderr = read(log_path), read(str(log_path) + '.err')
    assert rc == 0, f"train.py failed with exit code {rc}:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    return stdout


# ----------------------------------------------------------------------------- tests

def test_train_resume_sample_end_to_end(tmp_path, small_text):
    dataset = prepare_char_dataset(str(tmp_path), small_text)
    out_dir = str(tmp_path / 'out')

    first = train(dataset, out_dir, max_iters=30, eval_interval=10)
    assert unexpected_stderr(first.stderr) == []  # no warnings
    evals = eval_losses(first.stdout)
    assert sorted(evals) == [0, 10, 20, 30]
    assert evals[30][1] < evals[0][1] - 0.5, f"val loss did not fall: {evals}"  # ~3.9 -> ~2.4
    assert sorted(iter_losses(first.stdout)) == list(range(30))
    assert read_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] == 30

    resumed = train(dataset, out_dir, init_from='resume', max_iters=40)
    assert f"Resuming training from {out_dir} at iter 30" in resumed.stdout
    assert sorted(iter_losses(resumed.stdout)) == list(range(30, 40))  # continues at 30, not at 0
    assert sorted(eval_losses(resumed.stdout)) == [40]  # step 30 was evaluated before the checkpoint
    assert read_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] == 40

    sampled = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=2',
                         '--max_new_tokens=50')
    samples = samples_of(sampled.stdout)
    assert len(samples) == 2, sampled.stdout
    for sample in samples:
        assert sample.startswith('\n') and len(sample) == 1 + 50, repr(sample)  # the prompt, then 50 chars
        assert set(sample) <= set(small_text), f"characters never seen in training: {set(sample) - set(small_text)}"
    assert samples[0] != samples[1]  # two independent draws

    # one sample is streamed as it is generated; greedy decoding makes its text predictable here
    streamed = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1',
                          '--max_new_tokens=50', '--temperature=0')
    [sample] = samples_of(streamed.stdout)
    model = model_from_checkpoint(read_checkpoint(os.path.join(out_dir, 'best.pt'))).eval()  # sample.py's default
    itos = load_meta(dataset)['itos']
    stoi = {c: i for i, c in itos.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran (OMP_NUM_THREADS=1): the same summation order, the same argmax
    try:
        with torch.no_grad():
            ids = model.generate(torch.tensor([[stoi['\n']]]), 50, temperature=0)[0, 1:].tolist()
    finally:
        torch.set_num_threads(threads)
    assert sample == '\n' + ''.join(itos[i] for i in ids)


@pytest.mark.parametrize('recipe', [{}, dict(optimizer='muon', rope=True, qk_norm=True)], ids=['nanoGPT', 'recipe'])
def test_resume_reproduces_uninterrupted_losses(tmp_path, dataset, recipe):
    settings = dict(dropout=0.1, eval_interval=12, **recipe)  # dropout: the random state matters
    whole = start_train(dataset, str(tmp_path / 'whole'), tmp_path / 'whole.log', max_iters=24, **settings)
    half = start_train(dataset, str(tmp_path / 'split'), tmp_path / 'half.log', max_iters=12, **settings)
    uninterrupted = finish(whole, tmp_path / 'whole.log')
    finish(half, tmp_path / 'half.log')
    resumed = train(dataset, str(tmp_path / 'split'), init_from='resume', max_iters=24, **settings).stdout

    expected = {k: v for k, v in logged_losses(uninterrupted).items() if k >= 12}
    assert sorted(expected) == list(range(12, 24))
    assert logged_losses(resumed) == expected
    assert 'step 12:' in uninterrupted and 'step 12:' not in resumed  # no repeated evaluation at the resume point
    assert eval_losses(resumed)[24] == eval_losses(uninterrupted)[24]
    assert_same_tensors(read_checkpoint(tmp_path / 'split' / 'ckpt.pt')['model'],
                        read_checkpoint(tmp_path / 'whole' / 'ckpt.pt')['model'])


def checkpoint_temp_files(out_dir):
    """Files being written beside ckpt.pt or best.pt (whatever their temporary names), or left behind."""
    return {name for name in os.listdir(out_dir) if ('ckpt' in name or 'best' in name)
            and name not in ('ckpt.pt', 'best.pt')} if os.path.isdir(out_dir) else set()


@pytest.mark.slow
def test_kill_nine_at_random_moments_never_corrupts_checkpoint(tmp_path, dataset):
    # a checkpoint every 2 iterations, so that kills land while one is being written; peak_flops given so
    # that start-up does not measure the CPU each time
    settings = dict(eval_interval=2, always_save_checkpoint=True, max_iters=40, lr_decay_iters=40, n_embd=128,
                    block_size=64, batch_size=8, peak_flops=1e12)
    out_dir = tmp_path / 'killed'
    ckpt_path = out_dir / 'ckpt.pt'
    # the oracle runs on the other core meanwhile
    reference = start_train(dataset, str(tmp_path / 'reference'), tmp_path / 'reference.log', **settings)

    rng = random.Random(1234)
    last_iter = 0
    kills = []
    for launch in range(7):
        log = tmp_path / f'launch{launch}.log'
        init_from = 'resume' if ckpt_path.exists() else 'scratch'
        old_temp_files = checkpoint_temp_files(out_dir)
        # a kill between the first best.pt and the first ckpt.pt leaves nothing to resume: start over then
        proc = start_train(dataset, str(out_dir), log, init_from=init_from, start_over=init_from == 'scratch',
                           **settings)
        mode = ('mid-write', 'after a save', 'anytime')[launch % 3]
        if mode == 'anytime':  # start-up included
            deadline = time.monotonic() + rng.uniform(0.5, 4.0)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        elif mode == 'after a save':  # at a random phase of the write cycle
            saves = rng.randint(1, 2)
            wait_for(proc, log, lambda text: text.count('saving checkpoint') >= saves)
            deadline = time.monotonic() + rng.uniform(0.0, 0.3)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        else:  # while ckpt.pt's new version is being written, or after the third save if that was missed
            while proc.poll() is None and not {f for f in checkpoint_temp_files(out_dir) - old_temp_files
                                               if 'ckpt' in f}:
                if read(log).count('saving checkpoint') >= 3:
                    mode = 'mid-write missed'
                    break
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.005))  # some bytes into the write
        if proc.poll() is not None:  # finished before the kill: it must have succeeded
            finish(proc, log)
            break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        kills.append(mode)
        if ckpt_path.exists():
            ckpt = read_checkpoint(ckpt_path)
            model_from_checkpoint(ckpt)  # every tensor there, in the right shape
            assert ckpt['iter_num'] % 2 == 0 and last_iter <= ckpt['iter_num'] <= 40, ckpt['iter_num']
            last_iter = ckpt['iter_num']
        if (out_dir / 'best.pt').exists():
            model_from_checkpoint(read_checkpoint(out_dir / 'best.pt'))
    assert len(kills) >= 5, f"the runs finished before they could be killed ({kills}); make them longer"
    assert last_iter > 0, "no kill came after a checkpoint; make the runs longer"

    final = start_train(dataset, str(out_dir), tmp_path / 'final.log', init_from='resume', **settings)
    finish(final, tmp_path / 'final.log')
    finish(reference, tmp_path / 'reference.log')
    killed_ckpt = read_checkpoint(ckpt_path)
    assert killed_ckpt['iter_num'] == 40
    assert_same_tensors(killed_ckpt['model'], read_checkpoint(tmp_path / 'reference' / 'ckpt.pt')['model'])
    # a write cut short leaves its temporary file; a later run should clear it away, not let them pile up
    assert checkpoint_temp_files(out_dir) == set(), f"kills: {kills}"


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_sigterm_saves_checkpoint_and_resume_continues(tmp_path, dataset, signum):
    out_dir = tmp_path / 'out'
    log = tmp_path / 'train.log'
    proc = start_train(dataset, str(out_dir), log, max_iters=10_000, eval_interval=1000)
    wait_for(proc, log, lambda text: re.search(r'^iter 5:', text, re.M))
    assert not (out_dir / 'ckpt.pt').exists()  # so the checkpoint below comes from the signal
    proc.send_signal(signum)
    stdout = finish(proc, log, timeout=60)
    name = signal.Signals(signum).name
    again = '; press Ctrl-C again to quit at once without saving'  # a second signal quits at once
    assert unexpected_stderr(read(str(log) + '.err')) == [f"{name}: stopping after this step and saving a checkpoint{again}"]

    stopped = re.search(rf'^stopped by {name} at iter (\d+); checkpoint saved in (.*)$', stdout, re.M)
    assert stopped, stdout[-1000:]
    n = int(stopped.group(1))
    assert n == max(iter_losses(stdout)) + 1  # the step under way was finished, none was skipped
    assert os.path.join(str(out_dir), 'ckpt.pt') in stopped.group(2) and '--init_from=resume' in stopped.group(2)
    assert read_checkpoint(out_dir / 'ckpt.pt')['iter_num'] == n

    resumed = train(dataset, str(out_dir), init_from='resume', max_iters=n + 5, eval_interval=1000)
    assert sorted(iter_losses(resumed.stdout)) == list(range(n, n + 5))


def test_nan_loss_stops_without_overwriting_checkpoint(tmp_path, dataset):
    out_dir = tmp_path / 'out'
    train(dataset, str(out_dir), max_iters=10)
    before = read_checkpoint(out_dir / 'ckpt.pt')
    assert before['iter_num'] == 10

    # Adam moves every weight by ~learning_rate per step: 1e30 overflows float32 within a step or two
    proc = train(dataset, str(out_dir), check=False, init_from='resume', max_iters=30, eval_interval=5,
                 learning_rate=1e30, min_lr=1e30, decay_lr=False)
    error = assert_one_line_error(proc)
    failed_at = max(iter_losses(proc.stdout), default=9) + 1  # the first iteration that was not logged
    assert f'at iter {failed_at};' in error
    assert failed_at < 30
    for fix in ('learning_rate', 'bfloat16', 'grad_clip'):
        assert fix in error

    after = read_checkpoint(out_dir / 'ckpt.pt')
    assert after['iter_num'] == 10
    assert_same_tensors(after['model'], before['model'])


@pytest.fixture(scope='module')
def run_whose_val_loss_rises(tmp_path_factory, dataset):
    """20 good iterations, then 10 resumed at a learning rate so high that the val loss rises again."""
    out_dir = str(tmp_path_factory.mktemp('rising') / 'out')
    good = train(dataset, out_dir, max_iters=20, eval_interval=5, always_save_checkpoint=True)
    bad = train(dataset, out_dir, init_from='resume', max_iters=30, eval_interval=5, learning_rate=0.1,
                decay_lr=False)
    return out_dir, {**eval_losses(good.stdout), **eval_losses(bad.stdout)}


def test_best_checkpoint_keeps_best_val_loss(run_whose_val_loss_rises):
    out_dir, evals = run_whose_val_loss_rises
    assert sorted(evals) == [0, 5, 10, 15, 20, 25, 30]
    best_step = min(evals, key=lambda step: evals[step][1])
    best_val = evals[best_step][1]
    assert best_step < 30 and evals[30][1] > best_val, f"the val loss never rose: {evals}"

    latest = read_checkpoint(os.path.join(out_dir, 'ckpt.pt'))  # always_save_checkpoint: written at 30
    assert latest['iter_num'] == 30
    assert round(latest['best_val_loss'], 4) == best_val  # the minimum, not the latest
    best = read_checkpoint(os.path.join(out_dir, 'best.pt'))
    assert best['iter_num'] == best_step
    assert round(best['best_val_loss'], 4) == best_val
    assert 'optimizer' not in best


def test_sample_prefers_best_checkpoint(run_whose_val_loss_rises):
    out_dir, evals = run_whose_val_loss_rises
    best_step = min(evals, key=lambda step: evals[step][1])
    common = (f'--out_dir={out_dir}', '--device=cpu', '--num_samples=2', '--max_new_tokens=5')

    default = run_script('sample.py', *common)
    assert unexpected_stderr(default.stderr) == [
        f"loaded {os.path.join(out_dir, 'best.pt')} (iter {best_step}, best val loss {evals[best_step][1]:.4f}); "
        "sampling on cpu in float32"]
    latest = run_script('sample.py', *common, '--checkpoint=ckpt.pt')
    assert unexpected_stderr(latest.stderr) == [
        f"loaded {os.path.join(out_dir, 'ckpt.pt')} (iter 30, best val loss {evals[best_step][1]:.4f}); "
        "sampling on cpu in float32"]


def test_scripts_work_with_stdout_redirected_to_a_file(tmp_path, dataset):
    env = script_env()
    env.pop('PYTHONUNBUFFERED')  # as in `python train.py > log.txt`
    out_dir = str(tmp_path / 'out')
    settings = dict(TINY, dataset=dataset, out_dir=out_dir, max_iters=6, eval_interval=3)
    log = tmp_path / 'train.txt'
    with open(log, 'w') as f:
        proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'train.py'), *args_of(settings)],
                              cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert unexpected_stderr(proc.stderr) == []
    text = read(log)
    assert sorted(iter_losses(text)) == list(range(6))
    assert sorted(eval_losses(text)) == [0, 3, 6]

    samples = tmp_path / 'samples.txt'
    with open(samples, 'w') as f:
        proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'sample.py'), f'--out_dir={out_dir}',
                               '--device=cpu', '--num_samples=1', '--max_new_tokens=20'],
                              cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [sample] = samples_of(read(samples))
    assert len(sample) == 1 + 20
