"""Where a run's numbers go: log.jsonl, loss.png, Weights & Biases (offline here), the start-up summary, and
the Colab notebook that drives the scripts. The scripts run for real, as subprocesses, with a tiny model."""

import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from scripts import (REPO_ROOT, TINY, args_of, eval_losses, install_prepare_script, iter_losses, prepare_char_dataset,
                     run_script, script_env, train)

# the shared run: 10 iterations, then resumed to 20; evaluations every 5, a row per iteration
RUN = dict(TINY, gradient_accumulation_steps=2, max_iters=10, eval_interval=5, log_interval=1)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def wandb_records(path):
    """The records of a .wandb file, parsed as wandb's protobuf Record messages. The file is a LevelDB-style
    log: a 7-byte file header (':W&B', magic, version), then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail too short for a header
    is zero padding."""
    from wandb.proto import wandb_internal_pb2
    block = 32 * 1024
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B', f"{path} is not a wandb transaction log"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left_in_block = block - pos % block
        if left_in_block < 7:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0:  # padding up to the end of the block
            pos += left_in_block
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b''.join(parts))
            parts = []
            yield record


def offline_run(run_dir):
    """(run id, config, {step: {key: value}}) of an offline wandb run directory."""
    (log_path,) = glob.glob(os.path.join(run_dir, 'run-*.wandb'))
    run_id, config, history = None, {}, {}
    for record in wandb_records(log_path):
        kind = record.WhichOneof('record_type')
        if kind == 'run':
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == 'config':
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == 'history':
            values = {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(values)
    return run_id, config, history


def offline_run_dirs(wandb_dir):
    return sorted(glob.glob(os.path.join(wandb_dir, 'wandb', 'offline-run-*')))


def checkpoint_of(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)


def png_bytes(out_dir):
    with open(os.path.join(out_dir, 'loss.png'), 'rb') as f:
        return f.read()


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory, small_text):
    """One run of 10 iterations with wandb offline, resumed to 20 with the same command plus
    --init_from=resume; started from a scratch directory with a relative out_dir. What each part left is
    kept: stdout, loss.png bytes, the iter-10 checkpoint and the wandb run directories."""
    root = tmp_path_factory.mktemp('resumed_run')
    dataset = prepare_char_dataset(str(root), small_text)
    work = root / 'work'
    work.mkdir()
    wandb_dir = root / 'wandb_dir'
    wandb_dir.mkdir()
    env = script_env(WANDB_DIR=wandb_dir, WANDB_DISABLE_GIT='true', WANDB_DISABLE_CODE='true')
    settings = dict(RUN, dataset=dataset, out_dir='out', wandb_log=True, wandb_project='test')
    first = run_script('train.py', *args_of(settings), cwd=work, env=env)
    out_dir = str(work / 'out')
    result = dict(root=root, dataset=dataset, out_dir=out_dir, wandb_dir=str(wandb_dir), first=first.stdout,
                  first_wandb_dirs=offline_run_dirs(wandb_dir), first_png=png_bytes(out_dir),
                  first_log=read_log(out_dir), ckpt10=str(root / 'ckpt10.pt'))
    shutil.copy(os.path.join(out_dir, 'ckpt.pt'), result['ckpt10'])
    second = run_script('train.py', *args_of(settings), '--init_from=resume', '--max_iters=20', cwd=work, env=env)
    result.update(second=second.stdout, second_png=png_bytes(out_dir), wandb_dirs=offline_run_dirs(wandb_dir))
    return result


@pytest.mark.slow
def test_wandb_offline_run_logs_history_and_resume_reuses_run_id(resumed_run):
    (first_dir,) = resumed_run['first_wandb_dirs']
    run_id, config, history = offline_run(first_dir)
    assert first_dir.endswith('-' + run_id)
    assert checkpoint_of(resumed_run['ckpt10'])['wandb_run_id'] == run_id
    # the settings of the run are its wandb config
    assert config['batch_size'] == RUN['batch_size'] and config['n_layer'] == RUN['n_layer']
    assert config['gradient_accumulation_steps'] == 2 and config['dataset'] == resumed_run['dataset']
    # training loss and learning rate every iteration, the evaluations every eval_interval
    printed = iter_losses(resumed_run['first'])
    assert sorted(step for step, values in history.items() if 'train/loss' in values) == list(range(10))
    assert all('lr' in history[step] for step in range(10))
    assert sorted(step for step, values in history.items() if 'val/loss' in values) == [0, 5, 10]
    for step, loss in printed.items():
        assert f"{history[step]['train/loss']:.4f}" == f"{loss:.4f}"

    # the resumed run continues the same wandb run: same id in the checkpoint and in its offline directory
    assert checkpoint_of(os.path.join(resumed_run['out_dir'], 'ckpt.pt'))['wandb_run_id'] == run_id
    second_dirs = [d for d in resumed_run['wandb_dirs'] if d not in resumed_run['first_wandb_dirs']]
    assert len(second_dirs) == 1 and second_dirs[0].endswith('-' + run_id), resumed_run['wandb_dirs']
    second_id, _, second_history = offline_run(second_dirs[0])
    assert second_id == run_id
    assert sorted(step for step, values in second_history.items() if 'train/loss' in values) == list(range(10, 20))
    assert sorted(step for step, values in second_history.items() if 'val/loss' in values) == [15, 20]


@pytest.mark.slow
def test_wandb_failure_is_a_warning_not_a_crash(tmp_path, small_text):
    """Online mode without an API key (the usual mistake on a fresh machine) makes wandb.init fail fast;
    the address of an unreachable server makes sure that nothing leaves this machine either way."""
    dataset = prepare_char_dataset(str(tmp_path), small_text)
    env = script_env(WANDB_MODE='online', WANDB_DIR=tmp_path, WANDB_CONFIG_DIR=tmp_path / 'wandb_config',
                     NETRC=tmp_path / 'no_netrc', WANDB_BASE_URL='http://127.0.0.1:9', WANDB_INIT_TIMEOUT='10')
    env.pop('WANDB_API_KEY', None)
    out_dir = str(tmp_path / 'out')
    proc = train(dataset, out_dir, env=env, wandb_log=True, wandb_project='test', max_iters=4, eval_interval=4)
    assert proc.returncode == 0
    assert 'wandb could not start' in proc.stderr
    assert sorted(iter_losses(proc.stdout)) == [0, 1, 2, 3]
    assert os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
    assert checkpoint_of(os.path.join(out_dir, 'ckpt.pt'))['wandb_run_id'] is None


@pytest.mark.slow
def test_metrics_log_has_one_row_per_logged_iteration_across_resume(resumed_run):
    first_rows = resumed_run['first_log']
    assert [r['iter'] for r in first_rows if 'loss' in r] == list(range(10))
    rows = read_log(resumed_run['out_dir'])
    steps = [r for r in rows if 'loss' in r]
    evals = [r for r in rows if 'val_loss' in r]
    assert [r['iter'] for r in steps] == list(range(20))  # in order, none missing, none twice
    assert [r['iter'] for r in evals] == [0, 5, 10, 15, 20]
    # MFU is measured from each process's 6th iteration on (the first ones include start-up costs)
    health = {'grad_norm', 'clipped'}
    assert all(set(r) == {'iter', 'loss', 'lr', 'ms', 'mfu'} | health for r in steps if r['iter'] % 10 >= 5)
    assert all(set(r) == {'iter', 'loss', 'lr', 'ms'} | health for r in steps if r['iter'] % 10 < 5)
    # the share of clipped steps since the previous evaluation of the same process (none before step 0)
    assert set(evals[0]) == {'iter', 'train_loss', 'val_loss', 'lr'}
    assert all(set(r) == {'iter', 'train_loss', 'val_loss', 'lr', 'clip_fraction'} for r in evals[1:])
    printed = {**iter_losses(resumed_run['first']), **iter_losses(resumed_run['second'])}
    assert sorted(printed) == list(range(20))
    for r in steps:
        assert f"{r['loss']:.4f}" == f"{printed[r['iter']]:.4f}", r
    printed_evals = {**eval_losses(resumed_run['first']), **eval_losses(resumed_run['second'])}
    for r in evals:
        assert (f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}") == tuple(f"{x:.4f}" for x in printed_evals[r['iter']])
    # the learning rate rises during warmup and decays afterwards
    lrs = [r['lr'] for r in steps]
    assert lrs[0] < lrs[RUN['warmup_iters']] and lrs[-1] < lrs[RUN['warmup_iters']]


@pytest.mark.slow
def test_logged_gradient_norm_is_the_norm_clip_grad_norm_returns_for_that_step(resumed_run):
    import numpy as np
    import torch
    from checkpoint import load_checkpoint, model_from_checkpoint
    # oracle: the iter-10 checkpoint, the two micro-batches of step 10 (drawn as train.py documents: a generator
    # seeded with [seed, 0, step, micro-batch] picks the windows), the loss averaged over them, clip_grad_norm_
    model = model_from_checkpoint(load_checkpoint(resumed_run['ckpt10']))
    data = np.memmap(os.path.join(resumed_run['dataset'], 'train.bin'), dtype=np.uint16, mode='r')
    block = RUN['block_size']
    for micro in range(2):
        starts = np.random.default_rng([1337, 0, 10, micro]).integers(len(data) - block, size=RUN['batch_size'])
        windows = torch.from_numpy(np.stack([data[s:s + block + 1] for s in starts]).astype(np.int64))
        _, loss = model(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
        (loss / 2).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    [row] = [r for r in read_log(resumed_run['out_dir']) if r['iter'] == 10 and 'loss' in r]
    assert row['grad_norm'] == pytest.approx(expected, rel=1e-5)
    assert row['clipped'] == (expected > 1.0)


@pytest.mark.slow
def test_clip_fraction_counts_the_clipped_steps_between_evaluations(resumed_run, tmp_path):
    rows = read_log(resumed_run['out_dir'])
    steps = {r['iter']: r for r in rows if 'loss' in r}
    assert all(r['clipped'] == (r['grad_norm'] > 1.0) for r in steps.values())
    for start, end in ((0, 5), (5, 10), (10, 15), (15, 20)):  # each process evaluates at its own 0, 5 and 10
        [row] = [r for r in rows if r['iter'] == end and 'val_loss' in r]
        assert row['clip_fraction'] == sum(steps[i]['clipped'] for i in range(start, end)) / 5
    # every step clipped with a tiny grad_clip, and no health logged without clipping
    for grad_clip, expected in ((1e-6, 1.0), (0.0, None)):
        out_dir = str(tmp_path / f'clip{grad_clip}')
        train(resumed_run['dataset'], out_dir, grad_clip=grad_clip, max_iters=4, eval_interval=2)
        rows = read_log(out_dir)
        assert [r.get('clip_fraction') for r in rows if 'val_loss' in r] == [None, expected, expected]
        assert [r.get('clipped') for r in rows if 'loss' in r] == ([True] * 4 if grad_clip else [None] * 4)


@pytest.mark.slow
def test_metrics_log_drops_rows_beyond_the_checkpoint_when_resuming_after_a_crash(resumed_run, tmp_path):
    """A run that crashed at iter 20 after saving at iter 10 has logged iterations 10..19 that its resume
    will do again: resuming from the iter-10 checkpoint must leave each of them in the log once."""
    out_dir = str(tmp_path / 'out')
    shutil.copytree(resumed_run['out_dir'], out_dir)
    shutil.copy(resumed_run['ckpt10'], os.path.join(out_dir, 'ckpt.pt'))
    assert [r['iter'] for r in read_log(out_dir) if 'loss' in r] == list(range(20))  # rows up to 19 before
    settings = dict(RUN, init_from='resume', max_iters=20, wandb_log=False)  # the settings of the crashed run
    proc = train(resumed_run['dataset'], out_dir, **settings)
    assert sorted(iter_losses(proc.stdout)) == list(range(10, 20))
    rows = read_log(out_dir)
    assert [r['iter'] for r in rows if 'loss' in r] == list(range(20))
    assert [r['iter'] for r in rows if 'val_loss' in r] == [0, 5, 10, 15, 20]
    printed = {**iter_losses(resumed_run['first']), **iter_losses(proc.stdout)}
    for r in rows:
        if 'loss' in r:
            assert f"{r['loss']:.4f}" == f"{printed[r['iter']]:.4f}", r


def test_metrics_log_resume_skips_the_torn_last_line_of_a_killed_run(tmp_path):
    from metrics import MetricsLog
    path = str(tmp_path / 'log.jsonl')
    rows = [dict(iter=0, train_loss=3.0, val_loss=3.1, lr=0.1)] + [dict(iter=i, loss=3.0 - i / 10, lr=0.1) for i in range(6)]
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
        f.write('{"iter": 6, "lo')  # the process was killed in the middle of this write
    log = MetricsLog(path, resume_from=4)
    log.log(iter=4, loss=2.5, lr=0.1)
    assert read_log(tmp_path) == rows[:5] + [dict(iter=4, loss=2.5, lr=0.1)]


@pytest.mark.slow
def test_loss_png_is_written_and_refreshed(resumed_run):
    import matplotlib.image
    first = resumed_run['first_png']
    assert first.startswith(b'\x89PNG\r\n\x1a\n')
    image = matplotlib.image.imread(os.path.join(resumed_run['out_dir'], 'loss.png'))
    height, width = image.shape[:2]
    assert 200 <= height <= 2000 and 200 <= width <= 3000, image.shape
    assert image[..., :3].std() > 0.01  # something is drawn on it
    assert resumed_run['second_png'].startswith(b'\x89PNG\r\n\x1a\n')
    assert resumed_run['second_png'] != first  # redrawn with the resumed run's iterations
    assert not glob.glob(os.path.join(resumed_run['out_dir'], '*.tmp*'))  # no temp file left behind


@pytest.mark.slow
def test_missing_dataset_is_prepared_automatically(tmp_path, small_text):
    data_dir = tmp_path / 'data' / 'shakespeare_char'
    install_prepare_script(str(tmp_path), 'shakespeare_char')
    (data_dir / 'input.txt').write_text(small_text, encoding='utf-8')  # present, so nothing is downloaded
    assert not (data_dir / 'train.bin').exists()
    settings = dict(max_iters=2, eval_interval=2, eval_iters=2)
    first = train(str(data_dir), str(tmp_path / 'out1'), **settings)
    assert 'is not prepared yet; running' in first.stdout and 'prepare.py' in first.stdout
    assert sorted(iter_losses(first.stdout)) == [0, 1]  # training started and finished
    assert (data_dir / 'train.bin').exists() and (data_dir / 'val.bin').exists() and (data_dir / 'meta.pkl').exists()
    assert f"found vocab_size = {len(set(small_text))}" in first.stdout
    train_bin = (data_dir / 'train.bin').read_bytes()
    second = train(str(data_dir), str(tmp_path / 'out2'), **settings)
    assert 'not prepared yet' not in second.stdout
    assert sorted(iter_losses(second.stdout)) == [0, 1]
    assert (data_dir / 'train.bin').read_bytes() == train_bin


@pytest.mark.slow
def test_run_summary_says_device_dtype_compile_params_tokens_and_out_dir(resumed_run, small_text):
    from model import GPT, GPTConfig
    (line,) = [line for line in resumed_run['first'].splitlines() if line.startswith('run:')]
    model = GPT(GPTConfig(n_layer=RUN['n_layer'], n_head=RUN['n_head'], n_embd=RUN['n_embd'],
                          block_size=RUN['block_size'], bias=RUN['bias'], vocab_size=len(set(small_text)),
                          dropout=0.0))
    params = f"{model.get_num_params() / 1e6:.2f}M parameters"
    tokens = RUN['gradient_accumulation_steps'] * RUN['batch_size'] * RUN['block_size']
    assert 'device cpu' in line
    assert 'dtype float32' in line
    assert 'compile off' in line
    assert params in line, (params, line)
    assert f"{tokens:,} tokens per iteration" in line, line
    # out_dir was given relative to the working directory; the summary names it absolutely
    assert f"checkpoints in {os.path.abspath(resumed_run['out_dir'])}; " in line, line
    # and says what MFU is measured against, and where that peak comes from
    assert re.search(r'; mfu against [\d.]+ TFLOP/s \(measured with float32 matmuls at start-up\)$', line), line
    assert not re.search(r'mfu -', resumed_run['first']), "an MFU printed before it was measured"


# -----------------------------------------------------------------------------
# the Colab notebook

NOTEBOOK = os.path.join(REPO_ROOT, 'notebooks', 'colab.ipynb')

NOTEBOOK_RUNNER = """
import json, sys
from IPython.core.interactiveshell import InteractiveShell
notebook, config, out_dir = sys.argv[1:]
shell = InteractiveShell.instance()

def pip(line):  # records the install instead of running it: all is installed here, and there is no network
    args = line.split()
    with open(args[args.index('-r') + 1]) as f:
        requirements = [r.strip() for r in f if r.strip() and not r.lstrip().startswith('#')]
    print('pip ' + json.dumps({'line': line, 'requirements': requirements}), flush=True)
shell.register_magic_function(pip, 'line', 'pip')

for cell in json.load(open(notebook))['cells']:
    source = ''.join(cell['source'])
    if cell['cell_type'] != 'code' or 'drive.mount(' in source:
        continue
    shell.user_ns['_exit_code'] = 0
    result = shell.run_cell(source)
    if not result.success or shell.user_ns['_exit_code'] != 0:
        sys.exit(f"cell failed: {source}")
    print(f"ran cell: {source.splitlines()[0]}", flush=True)
    if 'CONFIG =' in source:  # the tiny settings of the tests instead of the notebook's, in a temp dir
        print(f"notebook chose {shell.user_ns['CONFIG']}", flush=True)
        shell.user_ns.update(CONFIG=config, OUT_DIR=out_dir)
"""

# one cell on its own, with REPO set as the cells before it set it
CELL_RUNNER = """
import sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.user_ns['REPO'] = sys.argv[1]
result = shell.run_cell(sys.stdin.read())
sys.exit(0 if result.success else f"cell failed: {result.error_in_exec}")
"""


def notebook_cell(containing):
    """The source of the notebook's one code cell that contains the string `containing`."""
    with open(NOTEBOOK) as f:
        cells = [''.join(cell['source']) for cell in json.load(f)['cells'] if cell['cell_type'] == 'code']
    (source,) = [source for source in cells if containing in source]
    return source


def run_cell(source, cwd, env=None):
    return subprocess.run([sys.executable, '-c', CELL_RUNNER, REPO_ROOT], input=source, cwd=cwd,
                          env=env or script_env(), capture_output=True, text=True, timeout=120)


def requirement_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_with_the_repository_present(tmp_path, small_text):
    pytest.importorskip('IPython')
    dataset = prepare_char_dataset(str(tmp_path), small_text)
    config = tmp_path / 'tiny_config.py'
    config.write_text(''.join(f"{k} = {v!r}\n" for k, v in dict(TINY, dataset=dataset, max_iters=6, eval_interval=3).items()))
    out_dir = tmp_path / 'drive' / 'out-shakespeare-char'
    proc = subprocess.run([sys.executable, '-c', NOTEBOOK_RUNNER, NOTEBOOK, str(config), str(out_dir)], cwd=REPO_ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = re.findall(r'^ran cell: (.*)$', proc.stdout, re.M)
    assert len(ran) == 7 and ran[3].startswith('!python train.py') and ran[4].endswith('--init_from=resume')
    # the install: the running requirements only, and the torch that is already there is left alone
    (pip,) = [json.loads(line[len('pip '):]) for line in proc.stdout.splitlines() if line.startswith('pip {')]
    running = requirement_lines(os.path.join(REPO_ROOT, 'requirements.txt'))
    without_torch = [r for r in running if not re.match(r'torch(?![\w.-])', r)]
    assert len(without_torch) == len(running) - 1  # requirements.txt names torch, once
    assert pip['requirements'] == without_torch and 'requirements-dev' not in pip['line']
    assert 'kept the installed torch ' in proc.stdout
    (chosen,) = re.findall(r'^notebook chose (.*)$', proc.stdout, re.M)
    assert os.path.isfile(os.path.join(REPO_ROOT, chosen))
    assert sorted(iter_losses(proc.stdout)) == list(range(6))  # trained, and the resume found nothing left to do
    assert '---------------' in proc.stdout  # sampled
    assert '<IPython.core.display.Image object>' in proc.stdout  # the loss curves were read and shown
    assert {'ckpt.pt', 'best.pt', 'log.jsonl', 'loss.png'} <= set(os.listdir(out_dir))


def test_colab_notebook_clones_repo_url_when_it_finds_no_copy(tmp_path):
    pytest.importorskip('IPython')
    # a one-commit repository to clone: its file:// URL clones offline, as the user's https URL would online
    origin = tmp_path / 'origin'
    origin.mkdir()
    (origin / 'train.py').write_text('')
    git = ['git', '-c', 'user.name=test', '-c', 'user.email=test@example.com', '-C', str(origin)]
    for args in (['init', '-q'], ['add', 'train.py'], ['commit', '-q', '-m', 'the code']):
        subprocess.run(git + args, check=True, capture_output=True)
    content = tmp_path / 'content'  # the working directory, as /content on Colab: no code in it or above it
    content.mkdir()
    clone_dir = content / 'nanogpt'
    source = notebook_cell("REPO_URL = ''").replace("CLONE_DIR = '/content/nanogpt'", f"CLONE_DIR = {str(clone_dir)!r}")
    assert str(clone_dir) in source
    unset = run_cell(source, content)  # REPO_URL as shipped: empty
    assert unset.returncode != 0 and 'set REPO_URL at the top of this cell' in unset.stdout + unset.stderr
    assert not clone_dir.exists()
    source = source.replace("REPO_URL = ''", f"REPO_URL = {origin.as_uri()!r}")
    for _ in range(2):  # cloned, then found as the earlier clone
        proc = run_cell(source, content)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"code in {clone_dir}, checkpoints in {clone_dir / 'out-shakespeare-char'}" in proc.stdout
        assert (clone_dir / 'train.py').is_file()


def test_colab_notebook_names_the_gpu_and_its_dtype_before_training(fake_gpu_env):
    pytest.importorskip('IPython')
    source = notebook_cell('hardware.best_device()')
    on_t4 = run_cell(source, REPO_ROOT, env=fake_gpu_env('Tesla T4', (7, 5)))
    assert on_t4.returncode == 0, on_t4.stdout[-3000:] + on_t4.stderr[-3000:]
    assert 'GPU: Tesla T4, training in float16 with config/speedrun_shakespeare_char.py' in on_t4.stdout
    on_cpu = run_cell(source, REPO_ROOT, env=script_env(CUDA_VISIBLE_DEVICES=''))
    assert on_cpu.returncode == 0, on_cpu.stdout[-3000:] + on_cpu.stderr[-3000:]
    assert 'no GPU visible: on Colab this is a CPU runtime (Runtime → Change runtime type → T4 GPU' in on_cpu.stdout
    assert 'training will use the CPU recipe config/speedrun_shakespeare_char_cpu.py' in on_cpu.stdout
    for config in ('config/speedrun_shakespeare_char.py', 'config/speedrun_shakespeare_char_cpu.py'):
        assert os.path.isfile(os.path.join(REPO_ROOT, config))
