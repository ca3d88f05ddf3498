"""
Memory per process of DDP and FSDP, with and without activation checkpointing: train.py under torchrun on
CPU processes (gloo), a GPT-2 medium-sized model (24 layers, 16 heads, 1024 wide: 354M parameters with the
padded vocabulary), random tokens. Each run stops after its first training step, which is when train.py reports
what its master process holds: the bytes of parameters, gradients and optimizer state (under FSDP its own
shards: the sum of the local tensors), and the process's peak resident memory so far; then the time of its
second and third steps, which costs the sharding and the recomputation add.
$ python benchmarks/memory.py
$ python benchmarks/memory.py --nproc=4 --n_layer=12 --n_head=12 --n_embd=768
With --lora=True it compares finetuning every weight with LoRA (rank 8, every Linear of the blocks) on a base of
random weights saved as a checkpoint, with the frozen base in float32 and in bfloat16, e.g. GPT-2 large-shaped:
$ python benchmarks/memory.py --lora=True --nproc=1 --n_layer=36 --n_head=20 --n_embd=1280
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure, report_errors  # noqa: E402

# -----------------------------------------------------------------------------
nproc = 2  # processes, one thread each
n_layer = 24  # GPT-2 medium
n_head = 16
n_embd = 1024
block_size = 256
batch_size = 1  # micro-batch per process
lora = False  # compare full finetuning with LoRA instead of the DDP/FSDP modes
# -----------------------------------------------------------------------------
MODES = [('DDP', dict(fsdp=False, activation_checkpointing=False)),
         ('DDP + activation checkpointing', dict(fsdp=False, activation_checkpointing=True)),
         ('FSDP', dict(fsdp=True, activation_checkpointing=False)),
         ('FSDP + activation checkpointing', dict(fsdp=True, activation_checkpointing=True))]


def random_tokens(directory):
    """train.bin and val.bin of GPT-2 token ids drawn at random, in directory."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        rng.integers(50257, size=100_000, dtype=np.uint16).tofile(os.path.join(directory, f'{split}.bin'))


def train_command(nproc, args, repo=REPO):
    """train.py (repo's) under torchrun on nproc CPU processes, in float32 and eager, one micro-batch per process
    per step, with args (the shape, the data...)."""
    args = dict(device='cpu', dtype='float32', compile=False, gradient_accumulation_steps=nproc, **args)
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
            os.path.join(repo, 'train.py'), *[f'--{k}={v}' for k, v in args.items()]]


def first_steps(data_dir, out_dir, settings):
    """Run train.py under torchrun for three steps: (its memory report after the first, the mean time of the
    second and third in ms); then stop it, unsaved."""
    args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, batch_size=batch_size,
                max_iters=100, eval_interval=1000, eval_iters=nproc, dataset=data_dir, out_dir=out_dir)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', WANDB_MODE='disabled')
    proc = subprocess.Popen(train_command(nproc, dict(args, **settings)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    memory, times = None, []
    try:
        for line in proc.stdout:
            if line.startswith('memory per process:'):
                memory = line.split(':', 1)[1].strip()
            step = re.match(r'iter ([12]): loss [\d.]+, time ([\d.]+)ms', line)
            if step:
                times.append(float(step.group(2)))
            if len(times) == 2:
                return memory, sum(times) / 2
        raise RuntimeError(f"train.py ended after {len(times)} timed steps (exit code {proc.wait()}): "
                           f"{proc.stderr.read()[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole launch: nothing more is needed of it
        proc.wait()


def lora_modes(work):
    """A base of random weights saved as train.py saves a model, and the runs that finetune it."""
    from dataclasses import asdict
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=True)
    base = os.path.join(work, 'base.pt')
    save_checkpoint({'model': GPT(config).state_dict(), 'model_args': asdict(config)}, base)
    adapters = dict(init_from=base, lora_rank=8, decay_lr=False)
    return [('full finetuning', dict(init_from=base, decay_lr=False)),
            ('LoRA rank 8, float32 base', adapters),
            ('LoRA rank 8, bfloat16 base', dict(adapters, dtype='bfloat16'))]


def main():
    work = tempfile.mkdtemp(prefix='memory-')
    try:
        random_tokens(work)
        modes = lora_modes(work) if lora else MODES
        print(f"{nproc} CPU processes, {n_layer} layers x {n_embd} wide, micro-batch {batch_size} x {block_size} "
              "tokens; what the master process holds after its first step:\n")
        print("| mode | parameters (MiB) | gradients (MiB) | optimizer state (MiB) | sum (MiB) | peak RSS (GiB) "
              "| ms per step |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, settings in modes:
            report, ms = first_steps(work, os.path.join(work, f'out-{len(name)}'), settings)
            mib = [float(x.replace(',', '')) for x in re.findall(r'([\d,.]+) MiB', report)]
            peak = re.search(r'peak ([\d.]+) GiB', report).group(1)
            print(f"| {name} | {mib[0]:,.0f} | {mib[1]:,.0f} | {mib[2]:,.0f} | {sum(mib):,.0f} | {peak} | {ms:,.0f} |",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    report_errors()
    configure(globals())
    main()
