"""
The acceptance run for a GPU machine: one command that checks what this repository claims of a GPU and writes
one JSON report. Meant to take at most 8 minutes on one H100/H200 (an estimate: not yet timed on one).
  1. dtypes: float32 (TF32), bfloat16 and float16, each eager and compiled, train the baby GPT (the model of
     config/train_shakespeare_char.py) 100 iterations; every final val loss is within loss_tolerance of the
     float32 eager run's, and every run says it ran in the dtype and compile mode it was given.
  2. time_to_loss: nanoGPT's config/train_shakespeare_char.py and config/speedrun_shakespeare_char.py as they
     ship, each whole process timed (time_to_loss.py's timed_run) and its final model scored on the whole val
     split (time_to_loss.py's full_val_loss): both reach nanoGPT's val loss of 1.4697, the recipe sooner.
  3. mfu: bench.py's GPT-2 124M training step at bfloat16, compiled, on random tokens: MFU at least min_mfu.
  4. sampling: check 1's float32 model, in full float32, generates the same greedy tokens (and logits)
     compiled and eager with the KV cache, and eager without it.
  5. distributed: with 2+ GPUs, check 1's float32 eager run under DDP and under FSDP (torchrun, NCCL, two
     processes) ends at one GPU's val loss, within ddp_tolerance; skipped on one GPU.
Checks 1, 4 and 5 run side by side (`parallel` processes at a time), so their wall times overlap; the timed
checks 2 and 3 then run alone. The exit code is 1 if any check fails, and the last line names them.
$ python benchmarks/gpu_check.py --input=input.txt    # tiny Shakespeare's input.txt, on a machine offline
$ python benchmarks/gpu_check.py --device=cpu --tiny  # every check at toy size on a CPU, in about a minute
--tiny: a 2-layer model, 20 iterations, gloo for NCCL, one compiled training run and one compiled sampling run
(a compile costs tens of seconds on a CPU), and a target that such a model reaches.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checkpoint import load_model  # noqa: E402
from configurator import UserError, configure, report_errors, settings_of  # noqa: E402
from dataset import Tokenizer, load_tokens  # noqa: E402
from hardware import DTYPES, check_device  # noqa: E402
from time_to_loss import full_val_loss, timed_run  # noqa: E402

# -----------------------------------------------------------------------------
device = 'cuda'  # the machine under test; cuda:N for another GPU, cpu with --tiny
tiny = False  # every check at toy size, to test this script on a CPU (--tiny alone means --tiny=True)
input = ''  # tiny Shakespeare's input.txt, for a machine offline; '' finds or downloads it as prepare.py does
out = 'gpu_check.json'  # the report
iters = 100  # training iterations of each dtype x compile run
eval_iters = 20  # batches of the final val loss estimate by which those runs are compared
dtypes = 'float32,bfloat16,float16'  # each trained eager; float32 eager (TF32 on GPUs) is the reference
compile_dtypes = 'float32,bfloat16,float16'  # each trained compiled too
loss_tolerance = 0.05  # nats a dtype x compile run's final val loss may be from the reference's
target = 1.4697  # the full-val loss both time-to-loss runs must reach: nanoGPT's best val loss for its config
target_tolerance = 0.02  # nats above target that still count as reaching it (run-to-run noise)
require_faster = True  # the recipe must also take less wall time than nanoGPT's config
mfu_steps = 30  # timed bench.py steps, after 10 untimed ones (which compile)
min_mfu = 0.2  # GPT-2 124M at bfloat16, compiled: an MFU below this means something is wrong
prompt_tokens = 16  # val tokens the sampling check starts from
new_tokens = 200  # greedy tokens it generates (within the baby GPT's context of 256)
logit_tolerance = 1e-3  # how far compiled and uncached logits may be from those of eager with the cache
ddp_tolerance = 0.01  # nats between a two-process run's final val loss and one process's
parallel = 6  # processes of checks 1 and 5 at a time
timeout = 900  # seconds one run may take before it counts as hung
# -----------------------------------------------------------------------------
SETTINGS = settings_of(globals())  # recorded in the report
# what --tiny changes, unless set on the command line
TINY = dict(compile_dtypes='bfloat16', target=3.6, require_faster=False, min_mfu=0.0, prompt_tokens=4,
            new_tokens=20, parallel=2, timeout=300)
# train.py at --tiny, over every run's own settings: a 2-layer model, 20 iterations (tests/scripts.py's TINY)
TINY_TRAIN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, max_iters=20, eval_interval=10,
                  eval_iters=4, warmup_iters=2, lr_decay_iters=40, learning_rate=1e-2, min_lr=1e-3)
# bench.py at --tiny: that model for a few steps, uncompiled (a compile fewer: MFU at this size says nothing)
TINY_BENCH = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, batch_size=4, warmup_steps=2,
                  num_steps=5, compile=False)
REFERENCE = 'float32 eager'  # the dtype run every other one is compared with, and sampled from
CHECKS = ('dtypes', 'time_to_loss', 'mfu', 'sampling', 'distributed')  # in the report's order
RUN_LINE = re.compile(r'^run: device \S+ x (\d+) process\(es\), dtype (\w+), compile (on|off)', re.M)
EVAL_LINE = re.compile(r'^step (\d+): train loss \S+, val loss (\S+)$', re.M)


def args_of(settings):
    return [f'--{k}={v}' for k, v in settings.items()]


def launch(script, args, nproc=1):
    """Run a repository script to its end, under torchrun when nproc > 1: (wall seconds, its stdout)."""
    torchrun = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    torchrun = torchrun if nproc > 1 else []
    env = dict(os.environ, PYTHONUNBUFFERED='1', WANDB_MODE='disabled')
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *torchrun, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes it on to its workers, and kills those that do not stop
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # a run stuck inside a step never gets to stop
            proc.kill()
        raise RuntimeError(f"{script} {' '.join(args)} ran past {timeout} s (hung?)") from None
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ['no error output'])[-1]
        raise RuntimeError(f"{script} {' '.join(args)} failed with exit code {proc.returncode}: {last}")
    return time.perf_counter() - t0, stdout


def train_args(config, data, *overrides):
    """train.py's arguments: config file, prepared data, device, overrides, then --tiny's (they win)."""
    tiny_args = args_of(TINY_TRAIN) if tiny else []
    return [config, f'--dataset={data}', f'--device={device}', *overrides, *tiny_args]


def last_val_loss(stdout):
    """(iteration, val loss) of train.py's last 'step N: train loss X, val loss Y' line."""
    evals = EVAL_LINE.findall(stdout)
    if not evals:
        raise RuntimeError("train.py printed no evaluation")
    return int(evals[-1][0]), float(evals[-1][1])


def ran_as(stdout):
    """(processes, 'dtype, compile on|off') from train.py's 'run:' line: what it really ran."""
    match = RUN_LINE.search(stdout)
    if match is None:
        raise RuntimeError("train.py printed no 'run:' line")
    return int(match.group(1)), f"{match.group(2)}, compile {match.group(3)}"


def dtype_run(future, dtype, compiled):
    """One dtype x compile run's figures; its error if it failed."""
    try:
        seconds, stdout = future.result()
        (_, mode), (step, loss) = ran_as(stdout), last_val_loss(stdout)
    except RuntimeError as e:
        return dict(dtype=dtype, compile=compiled, passed=False, error=str(e))
    asked = f"{dtype}, compile {'on' if compiled else 'off'}"  # a compile that fails falls back to eager
    return dict(dtype=dtype, compile=compiled, ran_as=mode, passed=mode == asked, iters=step, val_loss=loss,
                seconds=round(seconds, 1))


def check_dtypes(runs):
    results = {name: dtype_run(*run) for name, run in runs.items()}
    reference = results[REFERENCE].get('val_loss')
    if reference is None:
        raise RuntimeError(f"the reference run failed: {results[REFERENCE]['error']}")
    for result in results.values():
        if 'val_loss' in result:
            result['difference'] = round(result['val_loss'] - reference, 4)
            result['passed'] = result['passed'] and abs(result['difference']) <= loss_tolerance
    others = ', '.join(f"{name} {r['difference']:+.4f}" if 'difference' in r else f"{name} failed"
                       for name, r in results.items() if name != REFERENCE)
    summary = f"final val loss {reference:.4f} ({REFERENCE}); {others} (tolerance {loss_tolerance})"
    return dict(passed=all(r['passed'] for r in results.values()), reference=REFERENCE,
                tolerance=loss_tolerance, runs=results, summary=summary)


def check_time_to_loss(data, work, val):
    runs = {}
    for name, config in (('reference', 'config/train_shakespeare_char.py'),
                         ('recipe', 'config/speedrun_shakespeare_char.py')):
        out_dir = os.path.join(work, f'time_to_loss-{name}')
        wall, evals = timed_run(REPO, train_args(config, data), out_dir)
        hit = next(((t, it) for t, it, v in evals if v <= target), None)  # the first estimate at or below it
        loss = full_val_loss(out_dir, val)
        runs[name] = dict(config=config, seconds=round(wall, 1), iters=evals[-1][1], val_loss=evals[-1][2],
                          full_val_loss=round(loss, 4), reached=loss <= target + target_tolerance,
                          iters_to_target=hit and hit[1], seconds_to_target=hit and round(hit[0], 1))
    reference, recipe = runs['reference'], runs['recipe']
    ratio = recipe['seconds'] / reference['seconds']
    passed = reference['reached'] and recipe['reached'] and (ratio < 1 or not require_faster)
    summary = (f"full-val loss: nanoGPT's config {reference['full_val_loss']:.4f} in "
               f"{reference['seconds']:.1f} s, the recipe {recipe['full_val_loss']:.4f} in "
               f"{recipe['seconds']:.1f} s ({ratio:.2f}x); target {target} + {target_tolerance}")
    return dict(passed=passed, target=target, tolerance=target_tolerance, time_vs_reference=round(ratio, 2),
                runs=runs, summary=summary)


def check_mfu():
    settings = dict(device=device, dtype='bfloat16', compile=True, warmup_steps=10, num_steps=mfu_steps)
    settings.update(TINY_BENCH if tiny else {})
    _, stdout = launch('bench.py', args_of(settings))
    ran_dtype, ran_compile = re.search(r'; device \S+, (\w+), compile (on|off)', stdout).groups()
    throughput = r'^([\d,]+) tokens/s, ([\d.]+) ms/iter, MFU ([\d.]+)% of ([\d.]+) TFLOP/s \((.*)\)'
    tokens_per_s, ms, mfu, peak, source = re.search(throughput, stdout, re.M).groups()
    mfu = float(mfu) / 100
    mode = f"{ran_dtype}, compile {ran_compile}"
    asked = f"bfloat16, compile {'on' if settings['compile'] else 'off'}"
    summary = (f"MFU {mfu:.1%} of {peak} TFLOP/s ({source}), {tokens_per_s} tokens/s ({mode}); "
               f"at least {min_mfu:.0%} expected")
    return dict(passed=mode == asked and min_mfu <= mfu <= 1, mfu=mfu, min_mfu=min_mfu, ran_as=mode,
                tokens_per_s=float(tokens_per_s.replace(',', '')), ms_per_iter=float(ms),
                peak_tflops=float(peak), peak_source=source, summary=summary)


def recording(forward, logits):
    """forward, also keeping the last position's logits of each call (one call per generated token)."""
    def call(*args, **kwargs):
        out = forward(*args, **kwargs)
        logits.append(out[0][:, -1].float())
        return out
    return call


def check_sampling(out_dir, val):
    model, meta, _ = load_model('resume', out_dir, 'ckpt.pt')  # the float32 eager run's final model
    model.to(device)
    # full float32 from here on: compiled and eager kernels then agree to ~1e-6, far below the gaps between a
    # trained model's top logits, so that a token that differs is a bug, not rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prompt = torch.from_numpy(val[:prompt_tokens].astype(np.int64))[None].to(device)
    forward, generated, logits = model.forward, {}, {'eager': [], 'uncached': [], 'compiled': []}
    with torch.no_grad():
        for name in logits:
            if name == 'compiled':
                forward = torch.compile(forward, dynamic=True)  # as sample.py compiles it
            model.forward = recording(forward, logits[name])
            generated[name] = model.generate(prompt, new_tokens, temperature=0, use_cache=name != 'uncached')
    tokens = {name: ids[0, prompt_tokens:].tolist() for name, ids in generated.items()}
    same = tokens['compiled'] == tokens['eager'] == tokens['uncached']
    first_difference = next((i for i, ids in enumerate(zip(*tokens.values())) if len(set(ids)) > 1), None)
    # the logits too: a weakly trained model's greedy tokens may repeat one character whatever its cache holds
    difference = max((torch.stack(logits[name]) - torch.stack(logits['eager'])).abs().max().item()
                     for name in ('uncached', 'compiled'))
    verdict = "the same compiled, eager and uncached" if same else f"differ from token {first_difference}"
    summary = (f"{new_tokens} greedy tokens {verdict}; logits within {difference:.1e} "
               f"(tolerance {logit_tolerance})")
    return dict(passed=same and difference <= logit_tolerance, tokens=tokens,
                first_difference=first_difference, max_logit_difference=difference,
                logit_tolerance=logit_tolerance,
                text=Tokenizer(meta).decode(tokens['compiled']), summary=summary)


def check_distributed(reference, launches):
    if not launches:
        gpus = torch.cuda.device_count()
        return dict(passed=True, skipped=True, summary=f"skipped: {gpus} GPU here, DDP and FSDP need 2")
    one = last_val_loss(reference.result()[1])[1]
    runs = {}
    for mode, future in launches.items():
        seconds, stdout = future.result()
        (processes, _), (_, loss) = ran_as(stdout), last_val_loss(stdout)
        passed = processes == 2 and abs(loss - one) <= ddp_tolerance
        runs[mode] = dict(processes=processes, val_loss=loss, difference=round(loss - one, 4), passed=passed,
                          seconds=round(seconds, 1))
    backend = 'nccl' if device.startswith('cuda') else 'gloo'
    shown = ', '.join(f"{mode} {run['val_loss']:.4f}" for mode, run in runs.items())
    summary = (f"final val loss: one process {one:.4f}, {shown} (2 processes, {backend}; "
               f"tolerance {ddp_tolerance})")
    return dict(passed=all(run['passed'] for run in runs.values()), backend=backend, one_process=one,
                tolerance=ddp_tolerance, runs=runs, summary=summary)


def checked(check, *args, started=None):
    """A check's result and wall time; a check that raises fails, with its error, and the others go on."""
    started = started or time.perf_counter()
    try:
        result = check(*args)
    except Exception as e:  # a failure to report, not to stop at
        result = dict(passed=False, error=f"{type(e).__name__}: {e}", summary=f"error: {e}")
    result['seconds'] = round(time.perf_counter() - started, 1)
    return result


def prepare(work):
    """tiny Shakespeare, character-level, prepared by its own prepare.py into work/shakespeare_char."""
    data = os.path.join(work, 'shakespeare_char')
    try:
        launch('data/shakespeare_char/prepare.py',
               [f'--out_dir={data}', *([f'--input={os.path.abspath(input)}'] if input else [])])
    except RuntimeError as e:
        hint = '' if input else "; offline, pass --input=PATH of tiny Shakespeare's input.txt"
        raise UserError(f"{e}{hint}") from None
    return data


def main():
    device_type, _ = check_device(device, 'float32')
    eager, compiled = dtypes.split(','), compile_dtypes.split(',') if compile_dtypes else []
    if 'float32' not in eager or any(d not in DTYPES for d in eager + compiled):
        raise UserError(f"dtypes and compile_dtypes take {', '.join(DTYPES)}, and dtypes needs float32 (the "
                        f"reference); got dtypes={dtypes}, compile_dtypes={compile_dtypes}")
    out_folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_folder):  # found now, not after every check has run
        raise UserError(f"--out={out}: there is no folder {out_folder} to write the report in")
    if device_type == 'cpu':
        os.environ.setdefault('OMP_NUM_THREADS', '1')  # small runs side by side: one thread each is fastest
    two_processes = device_type == 'cpu' or torch.cuda.device_count() >= 2  # CPU processes stand in for GPUs
    # the reference first (check 4 samples from its model), then the compiled runs, the longest
    plan = [('float32', False), *[(d, True) for d in compiled]]
    plan += [(d, False) for d in eager if d != 'float32']
    # the config's model and its 16,384 tokens per iteration as two micro-batches, so that DDP's two processes
    # take one each; no dropout, whose masks compiled code draws differently
    dtype_run_args = ['--dropout=0.0', '--batch_size=32', '--gradient_accumulation_steps=2',
                      f'--max_iters={iters}', f'--eval_interval={iters}', f'--eval_iters={eval_iters}']
    work = tempfile.mkdtemp(prefix='gpu_check-')
    results = {}
    try:
        data = prepare(work)
        val = load_tokens(data, 'val')
        started = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            def start(name, *overrides, nproc=1):
                out_dir = os.path.join(work, name.replace(' ', '-'))
                args = train_args('config/train_shakespeare_char.py', data, *dtype_run_args, *overrides,
                                  f'--out_dir={out_dir}')
                return pool.submit(launch, 'train.py', args, nproc), out_dir

            runs, out_dirs = {}, {}
            for dtype, with_compile in plan:
                name = f"{dtype} {'compiled' if with_compile else 'eager'}"
                future, out_dirs[name] = start(name, f'--dtype={dtype}', f'--compile={with_compile}')
                runs[name] = (future, dtype, with_compile)
            launches = {mode: start(mode, '--dtype=float32', '--compile=False', f'--fsdp={fsdp}', nproc=2)[0]
                        for mode, fsdp in (('DDP', False), ('FSDP', True))} if two_processes else {}
            wait([runs[REFERENCE][0]])
            results['sampling'] = checked(check_sampling, out_dirs[REFERENCE], val)
            results['dtypes'] = checked(check_dtypes, runs, started=started)
            results['distributed'] = checked(check_distributed, runs[REFERENCE][0], launches, started=started)
        results['time_to_loss'] = checked(check_time_to_loss, data, work, val)  # timed: alone on the machine
        results['mfu'] = checked(check_mfu)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name(device) if device_type == 'cuda' else platform.processor() or 'cpu'
    failed = [check for check in CHECKS if not results[check]['passed']]
    report = dict(passed=not failed, device=device, device_name=name, gpus=torch.cuda.device_count(),
                  torch=torch.__version__, settings={k: globals()[k] for k in SETTINGS},
                  checks={check: results[check] for check in CHECKS})
    with open(out, 'w') as f:
        json.dump(report, f, indent=1)
    print(f"\n{name}, torch {torch.__version__}{', --tiny' if tiny else ''}\n")
    print("| check | result | figures | wall time (s) |\n| --- | --- | --- | ---: |")
    for number, check in enumerate(CHECKS, 1):
        result = results[check]
        verdict = 'skipped' if result.get('skipped') else 'pass' if result['passed'] else '**FAIL**'
        print(f"| {number}. {check} | {verdict} | {result['summary']} | {result['seconds']:.1f} |")
    verdict = 'failed: ' + ', '.join(failed) if failed else 'every check passed'
    print(f"\n{verdict}; report in {os.path.abspath(out)}")
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    report_errors()
    user_keys = configure(globals(), ['--tiny=True' if arg == '--tiny' else arg for arg in sys.argv[1:]])
    if tiny:
        globals().update({k: v for k, v in TINY.items() if k not in user_keys})
    main()
