"""Helpers for the end-to-end tests: run the real scripts as subprocesses and read the lines a user reads."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a model small enough that a few dozen iterations take seconds on a CPU
TINY = dict(device='cpu', compile=False, dtype='float32', n_layer=2, n_head=2, n_embd=32, block_size=32,
            batch_size=4, gradient_accumulation_steps=1, max_iters=20, eval_interval=10, eval_iters=4,
            log_interval=1, warmup_iters=2, lr_decay_iters=40, learning_rate=1e-2, min_lr=1e-3, dropout=0.0,
            bias=False, wandb_log=False, always_save_checkpoint=True)


def tiktoken_cache_dir():
    """A folder holding tiktoken's cache of the GPT-2 BPE files (TIKTOKEN_CACHE_DIR, else $NANOGPT_DATA_DIR/tiktoken),
    or None when there is none."""
    data_dir = os.environ.get('NANOGPT_DATA_DIR')
    for cache_dir in (os.environ.get('TIKTOKEN_CACHE_DIR'), data_dir and os.path.join(data_dir, 'tiktoken')):
        if cache_dir and os.path.isdir(cache_dir):
            return cache_dir
    return None


def script_env(**extra):
    """The environment for a script: unbuffered output, one thread per process (tests run side by side)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', WANDB_MODE='offline',
               WANDB_SILENT='true')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def args_of(settings):
    return [f'--{k}={v}' for k, v in settings.items()]


def run_script(script, *args, cwd=None, env=None, timeout=300, check=True):
    """Run a repository script (e.g. 'train.py') with args; returns the CompletedProcess."""
    cmd = [sys.executable, os.path.join(REPO_ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=env or script_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed with exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train(dataset, out_dir, check=True, env=None, **overrides):
    """train.py with the TINY settings, overridden by keyword arguments."""
    settings = dict(TINY, dataset=dataset, out_dir=out_dir)
    settings.update(overrides)
    return run_script('train.py', *args_of(settings), check=check, env=env)


def iter_losses(stdout):
    """{iter: loss} from the 'iter N: loss X, ...' lines."""
    return {int(n): float(x) for n, x in re.findall(r'^iter (\d+): loss ([-\d.naninf]+),', stdout, re.M)}


def eval_losses(stdout):
    """{step: (train loss, val loss)} from the 'step N: train loss X, val loss Y' lines."""
    return {int(n): (float(a), float(b))
            for n, a, b in re.findall(r'^step (\d+): train loss ([\d.]+), val loss ([\d.]+)', stdout, re.M)}


def install_prepare_script(root, name):
    """A copy of data/<name>/prepare.py under root, laid out as in the repository with the modules it imports,
    so that it writes (and downloads) there by default; returns its path."""
    for path in (os.path.join('data', name, 'prepare.py'), os.path.join('data', 'prepare_utils.py'),
                 os.path.join('data', 'tokenize_corpus.py'), 'configurator.py'):
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        shutil.copy(os.path.join(REPO_ROOT, path), os.path.join(root, path))
    return os.path.join(root, 'data', name, 'prepare.py')


def prepare_char_dataset(root, text):
    """Run the real data/shakespeare_char/prepare.py on text, writing into root/data/shakespeare_char; returns
    that dataset dir."""
    data_dir = os.path.join(root, 'data', 'shakespeare_char')
    input_path = os.path.join(root, 'input_text.txt')
    with open(input_path, 'w', encoding='utf-8') as f:
        f.write(text)
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'data', 'shakespeare_char', 'prepare.py'),
                    f'--input={input_path}', f'--out_dir={data_dir}'], check=True, capture_output=True, env=script_env())
    return data_dir


def assert_one_line_error(proc):
    """A user mistake: non-zero exit, no traceback, and stderr ends with the one 'error:' line it has
    (before it stderr may only echo the settings, as every run does)."""
    assert proc.returncode != 0, f"expected a failure, got exit 0:\n{proc.stdout[-2000:]}"
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    return errors[0]


def default_sigint():
    """preexec_fn for a script that must meet Ctrl-C as in a terminal: a shell that ran the tests in the
    background leaves SIGINT ignored, and Python then raises no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def site_env(directory, code, **extra):
    """script_env plus a sitecustomize.py holding code in directory, which Python runs before the script starts:
    how a test injects a fault (an overflow, a failing compiler) into a real script run."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'sitecustomize.py'), 'w') as f:
        f.write(code)
    return script_env(PYTHONPATH=directory, **extra)


# a fault for site_env: the script holds still at the point HOLD_AT names, after creating the file HELD_MARKER, so
# that kill_when_held kills it exactly there: 'fsyncN' after its Nth os.fsync, or a file name before os.replace
# puts a file of that name in place. HOLD_THEN=ctrl-c: there it sends itself and its workers a Ctrl-C (SIGINT to
# its process group, as a terminal does)
HOLD = """
import os, signal, time
def _hold():
    open(os.environ['HELD_MARKER'], 'w').close()
    if os.environ.get('HOLD_THEN') == 'ctrl-c':
        os.killpg(os.getpgrp(), signal.SIGINT)
    time.sleep(120)
_fsync, _replace, _fsyncs = os.fsync, os.replace, [0]
def fsync(fd):
    _fsync(fd)
    _fsyncs[0] += 1
    if os.environ['HOLD_AT'] == f'fsync{_fsyncs[0]}':
        _hold()
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == os.environ['HOLD_AT']:
        _hold()
    _replace(src, dst, *args, **kwargs)
os.fsync, os.replace = fsync, replace
"""


def kill_when_held(command, env, marker, timeout=60):
    """Run command (a list) in a process group of its own until it creates marker (HOLD), then kill -9 the group,
    the script and its workers, as kill -9 of a prepare would."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(marker), proc.communicate()[1].decode()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
