"""
Time to a good model on character-level tiny Shakespeare, on this machine: nanoGPT's CPU command line (the
reference) against a faster recipe (config/speedrun_shakespeare_char_cpu.py), the same prepared
data/shakespeare_char for both, runs alternated. Each run is the whole `python train.py ...` process, start-up
and evaluations included. Each final model is then scored by one evaluator, eval.py's text loss on the whole
val split (every token after the first, in windows of the model's block_size), not by the runs' own estimates.
Then the ablation: the recipe with each of its settings switched back to nanoGPT's, one at a time, with the
iterations and the time it takes to reach the reference's loss (the first evaluation, every
ablation_eval_interval iterations, whose val loss estimate is at or below it) and its final loss.
$ python benchmarks/time_to_loss.py
$ python benchmarks/time_to_loss.py --nanogpt=../nanoGPT --repeats=3
--nanogpt=DIR runs the reference with upstream nanoGPT's own train.py from a clone of karpathy/nanoGPT.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checkpoint import load_model  # noqa: E402
from configurator import UserError, configure, report_errors  # noqa: E402
from dataset import dataset_dir, load_tokens  # noqa: E402
from eval import text_loss  # noqa: E402

# -----------------------------------------------------------------------------
recipe = 'config/speedrun_shakespeare_char_cpu.py'  # the faster recipe, a config file of train.py
nanogpt = ''  # a clone of karpathy/nanoGPT: the reference runs its train.py; '' runs this repository's
repeats = 1  # reference and recipe runs, alternated; medians are reported
ablation = True  # also run the recipe with each of its settings switched back, one at a time
ablation_eval_interval = 50  # iterations between the ablation runs' evaluations, to see when they reach the target
threads = 0  # OMP_NUM_THREADS of the runs; 0 is torch's default (one per core)
# -----------------------------------------------------------------------------
# nanoGPT's README command line for a CPU
REFERENCE = ['config/train_shakespeare_char.py', '--device=cpu', '--compile=False', '--eval_iters=20',
             '--log_interval=1', '--block_size=64', '--batch_size=12', '--n_layer=4', '--n_head=4', '--n_embd=128',
             '--max_iters=2000', '--lr_decay_iters=2000', '--dropout=0.0']
# the recipe's settings and what nanoGPT has instead, for the ablation
SWITCH_BACK = {'rope': 'False', 'qk_norm': 'False', 'optimizer': 'adamw'}


def timed_run(script_dir, args, out_dir):
    """Run train.py; returns (wall seconds, [(seconds since start, iter, estimated val loss) per evaluation])."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', WANDB_MODE='disabled')
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    evals = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(script_dir, 'train.py'), *args, f'--out_dir={out_dir}'],
                            cwd=script_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # stamped as they arrive
        match = re.match(r'step (\d+): train loss [\d.]+, val loss ([\d.]+)', line)
        if match:
            evals.append((time.perf_counter() - t0, int(match.group(1)), float(match.group(2))))
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        raise UserError(f"train.py {' '.join(args)} failed: {stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0, evals


def full_val_loss(out_dir, val):
    model, _, _ = load_model('resume', out_dir, 'ckpt.pt')  # the final model (best.pt is an earlier one)
    total, count = text_loss(model, val, progress=False)
    return total / count


def main():
    val = load_tokens(dataset_dir('shakespeare_char'), 'val')
    reference_dir = os.path.abspath(nanogpt) if nanogpt else REPO
    if nanogpt:  # upstream reads data/shakespeare_char under its own checkout: give it the same prepared files
        data = os.path.join(reference_dir, 'data', 'shakespeare_char')
        for name in ('train.bin', 'val.bin', 'meta.pkl'):
            shutil.copy(os.path.join(dataset_dir('shakespeare_char'), name), data)
    work = tempfile.mkdtemp(prefix='time_to_loss-')
    runs = {'reference': [], 'recipe': []}
    try:
        for repeat in range(repeats):
            order = ('reference', 'recipe') if repeat % 2 == 0 else ('recipe', 'reference')
            for name in order:
                out_dir = os.path.join(work, f'{name}{repeat}')
                script_dir, args = (reference_dir, REFERENCE) if name == 'reference' else (REPO, [recipe])
                wall, _ = timed_run(script_dir, args, out_dir)
                runs[name].append((wall, full_val_loss(out_dir, val)))
                print(f"{name} run {repeat + 1}: {wall:.1f} s, full-val loss {runs[name][-1][1]:.4f}", flush=True)
        wall = {name: float(np.median([w for w, _ in r])) for name, r in runs.items()}
        loss = {name: float(np.median([v for _, v in r])) for name, r in runs.items()}
        print("\n| run | wall time (s) | full-val loss | time vs reference |\n| --- | ---: | ---: | ---: |")
        reference_name = "nanoGPT's CPU command line" + (' (upstream nanoGPT)' if nanogpt else '')
        print(f"| {reference_name} | {wall['reference']:.1f} | {loss['reference']:.4f} | 1.00x |")
        print(f"| `{recipe}` | {wall['recipe']:.1f} | {loss['recipe']:.4f} | {wall['recipe'] / wall['reference']:.2f}x |")
        reached = loss['recipe'] <= loss['reference']
        print(f"\nthe recipe {'reaches' if reached else 'does not reach'} the reference's loss, in "
              f"{wall['recipe'] / wall['reference']:.2f}x its time ({repeats} run(s) each, medians)")
        if ablation:
            ablate(work, val, target=loss['reference'])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ablate(work, val, target):
    frequent = [f'--eval_interval={ablation_eval_interval}', '--eval_iters=10']
    print(f"\nablation: the recipe with one setting switched back to nanoGPT's (val loss estimated every "
          f"{ablation_eval_interval} iterations; target: the reference's full-val loss {target:.4f})")
    print("| recipe with | final full-val loss | wall time (s) | iterations to target | time to target (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for setting, value in [(None, None), *SWITCH_BACK.items()]:
        out_dir = os.path.join(work, f'ablation-{setting}')
        switched = [f'--{setting}={value}'] if setting else []
        wall, evals = timed_run(REPO, [recipe, *frequent, *switched], out_dir)
        hit = next(((t, it) for t, it, v in evals if v <= target), None)
        to_target = (f"{hit[1]} | {hit[0]:.1f}" if hit else "not reached | -")
        label = f"{setting}={value}" if setting else "nothing switched back"
        print(f"| {label} | {full_val_loss(out_dir, val):.4f} | {wall:.1f} | {to_target} |", flush=True)


if __name__ == '__main__':
    report_errors()
    configure(globals())
    main()
