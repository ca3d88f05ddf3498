"""
What saving a checkpoint costs each process, full vs sharded vs sharded in the background, and what starting
FSDP costs: train.py under torchrun on CPU processes (gloo), a GPT-2 medium-sized model by default, random tokens.
A sitecustomize.py, put before train.py's imports, reports for every process:
- its peak resident memory at start-up (once the model is built, sharded and its optimizers made), and
- for each save: how long the training loop was blocked by it and the peak resident memory during it (Linux's
  VmHWM, reset just before the save by writing 5 to /proc/self/clear_refs).
--baseline=PATH also starts the same FSDP run from a checkout of an earlier train.py (e.g. one without the
meta-device start) for the start-up figure; --saves=0 measures start-up only (a model too big to save whole here).
Start-up is also given above each process's resident memory when model.py is imported (torch is loaded by then).
$ python benchmarks/checkpoints.py
$ python benchmarks/checkpoints.py --baseline=../nanogpt-before --saves=0 --n_layer=36 --n_head=20 --n_embd=1280
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure, report_errors  # noqa: E402
from memory import random_tokens, train_command  # noqa: E402  (the sibling benchmark's launch)

# -----------------------------------------------------------------------------
nproc = 2  # processes, one thread each
n_layer = 24  # GPT-2 medium
n_head = 16
n_embd = 1024
block_size = 64
batch_size = 1  # micro-batch per process
saves = 2  # checkpoints written (one every 2 iterations); 0: start-up only
baseline = ''  # a checkout of an earlier train.py, for the start-up comparison
# -----------------------------------------------------------------------------
MODES = [('full', dict(checkpoint_format='full')),
         ('sharded', dict(checkpoint_format='sharded')),
         ('sharded, async', dict(checkpoint_format='sharded', async_checkpoint=True))]

PROBE = '''
import os, sys, time
def _say(line):  # one write: the processes share stderr
    os.write(2, (line + '\\n').encode())
def _hwm():
    with open('/proc/self/status') as f:
        return int(re.search(r'VmHWM:\\s+(\\d+)', f.read()).group(1)) / 2**20
import re, builtins
_import = builtins.__import__
def _patch(module):
    if getattr(module, '_probed', False):
        return
    module._probed = True
    if hasattr(module, 'GPT'):  # model.py: the optimizers are made once the model is built and sharded
        _say(f"probe rank {os.environ.get('RANK', '0')} imported {_hwm():.3f}")
        configure = module.GPT.configure_optimizers
        def configure_optimizers(self, *args, **kwargs):
            result = configure(self, *args, **kwargs)
            _say(f"probe rank {os.environ.get('RANK', '0')} startup {_hwm():.3f}")
            return result
        module.GPT.configure_optimizers = configure_optimizers
    if hasattr(module, 'CheckpointWriter'):
        save = module.CheckpointWriter.save
        def probed_save(self, *args, **kwargs):
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            t0 = time.perf_counter()
            result = save(self, *args, **kwargs)
            _say(f"probe rank {os.environ.get('RANK', '0')} save {time.perf_counter() - t0:.4f} {_hwm():.3f}")
            return result
        module.CheckpointWriter.save = probed_save
def __import__(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    if name in ('checkpoint', 'model'):
        _patch(module)
    return module
builtins.__import__ = __import__
'''


def launch(repo, data_dir, out_dir, site, settings):
    """train.py of repo under torchrun with the probe: {rank: {'startup': GiB, 'saves': [(s, GiB)]}}."""
    args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, batch_size=batch_size,
                max_iters=2 * saves, eval_interval=2, eval_iters=1, dataset=data_dir, out_dir=out_dir, fsdp=True,
                eval_only=saves == 0)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', WANDB_MODE='disabled', PYTHONPATH=site)
    proc = subprocess.run(train_command(nproc, dict(args, **settings), repo), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}): {proc.stderr[-3000:]}")
    ranks = {}
    for rank, kind, rest in re.findall(r'^probe rank (\d+) (imported|startup|save) (.*)$', proc.stderr, re.M):
        entry = ranks.setdefault(int(rank), {'startup': None, 'saves': []})
        if kind in ('imported', 'startup'):
            entry[kind] = float(rest)
        else:
            entry['saves'].append(tuple(map(float, rest.split())))
    return ranks


def main():
    work = tempfile.mkdtemp(prefix='checkpoints-')
    try:
        site = os.path.join(work, 'site')
        os.makedirs(site)
        with open(os.path.join(site, 'sitecustomize.py'), 'w') as f:
            f.write(PROBE)
        random_tokens(work)
        print(f"FSDP on {nproc} CPU processes, {n_layer} layers x {n_embd} wide, {saves} saves of ckpt (best too, "
              "at the first); per process: peak RSS at start-up, and per save the time the loop was blocked "
              "and the peak RSS during it (medians over the saves)\n")
        print("| checkpoints | rank | start-up peak RSS (GiB) | of which above the imports | save: loop blocked (s) "
              "| save: peak RSS (GiB) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        runs = [(name, REPO, settings) for name, settings in MODES[:1 if saves == 0 else None]]
        if baseline:
            runs.append(('full, from the baseline train.py', baseline, dict(checkpoint_format='full')))
        for name, repo, settings in runs:
            settings = {k: v for k, v in settings.items() if repo == REPO or k != 'checkpoint_format'}
            ranks = launch(repo, work, os.path.join(work, f'out-{len(name)}'), site, settings)
            for rank in sorted(ranks):
                saved = ranks[rank]['saves']
                blocked = f"{statistics.median(s for s, _ in saved):.2f}" if saved else '-'
                peak = f"{statistics.median(p for _, p in saved):.2f}" if saved else '-'
                startup = ranks[rank]['startup']
                print(f"| {name} | {rank} | {startup:.2f} | {startup - ranks[rank]['imported']:.2f} | {blocked} "
                      f"| {peak} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    report_errors()
    configure(globals())
    main()
