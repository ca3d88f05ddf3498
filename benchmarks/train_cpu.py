"""
CPU training speed at the README's CPU config (char-level Shakespeare scaled down: 4 layers, 4 heads, 128 wide,
block 64, batch 12, float32): this repository's training step, as train.py runs it, against nanoGPT's step
on the same model (nanoGPT's: exact GELU), and our step with GPT-2's tanh GELU, which models loaded from
GPT-2's weights use. Also torch.compile's start-up cost and the number of iterations it needs to pay it back.
$ python benchmarks/train_cpu.py
$ python benchmarks/train_cpu.py --threads=1 --repeats=5 --profile=True
Both steps train on the same random tokens (a uint16 memmap in a temp dir, like a prepared train.bin) and
run in alternating blocks of iterations, so a busy machine slows both alike; the median and the best block
are reported (on a busy machine the best is the better guess at a quiet one's figure).
"""

import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# -----------------------------------------------------------------------------
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
vocab_size = 65
bias = False  # train.py's default
learning_rate = 1e-3
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
num_tokens = 1_000_000  # size of the random-token train.bin
warmup_iters = 20  # before every timed block
iters = 100  # timed iterations per block
repeats = 7  # blocks per step kind, alternated
threads = 0  # torch.set_num_threads; 0 keeps torch's default (one per core)
compile_check = True  # also time torch.compile of this repository's step
profile = False  # print torch.profiler's top ops of this repository's step
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())
if threads:
    torch.set_num_threads(threads)
tokens_per_iter = batch_size * block_size


def make_model(gelu_approximate='none'):
    torch.manual_seed(seed)  # the same initial weights for every step kind
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                       vocab_size=vocab_size, dropout=0.0, gelu_approximate=gelu_approximate)
    return GPT(config)


def optim_groups(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]


class OursStep:
    """train.py's step: fused AdamW from configure_optimizers, one gather per batch from a memmap opened once,
    batches and dropout seeded by the step number, the loss read once per iteration (log_interval=1)."""

    def __init__(self, path, compiled=False, gelu_approximate='none'):
        self.raw_model = make_model(gelu_approximate)
        [self.optimizer] = self.raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), 'cpu')
        self.model = torch.compile(self.raw_model) if compiled else self.raw_model
        self.data = np.memmap(path, dtype=np.uint16, mode='r')
        self.offsets = np.arange(block_size + 1)
        self.iter_num = 0

    def get_batch(self, key):
        ix = np.random.default_rng(key).integers(len(self.data) - block_size, size=batch_size)
        windows = torch.from_numpy(self.data[ix[:, None] + self.offsets].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def step(self):
        for group in self.optimizer.param_groups:
            group['lr'] = learning_rate
        torch.manual_seed(seed + 1_000_003 * self.iter_num)
        X, Y = self.get_batch([seed, 0, self.iter_num, 0])
        _, loss = self.model(X, Y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        return loss.detach().item()


class NanoGPTStep:
    """nanoGPT's step on the same model: AdamW without fused (on CPU, PyTorch's per-tensor for-loop kernel),
    get_batch re-opening the memmap and stacking one numpy slice per row, loss.item() every iteration."""

    def __init__(self, path):
        self.model = make_model()
        self.optimizer = torch.optim.AdamW(optim_groups(self.model), lr=learning_rate, betas=(beta1, beta2))
        self.path = path

    def get_batch(self):
        data = np.memmap(self.path, dtype=np.uint16, mode='r')  # nanoGPT re-opens it to avoid a memory leak
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
        return x, y

    def step(self):
        for group in self.optimizer.param_groups:
            group['lr'] = learning_rate
        X, Y = self.get_batch()
        _, loss = self.model(X, Y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def timed_block(runner):
    """Milliseconds per iteration over `iters` iterations, after `warmup_iters` untimed ones."""
    for _ in range(warmup_iters):
        runner.step()
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.step()
    return (time.perf_counter() - t0) / iters * 1000


def report(times):
    """times: {step name: [ms/iter of each block]}; speeds are medians against the first step's median."""
    base = float(np.median(next(iter(times.values()))))
    print("| step | ms/iter (median) | ms/iter (best) | tokens/s (median) | speed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, t in times.items():
        ms = float(np.median(t))
        print(f"| {name} | {ms:.2f} | {min(t):.2f} | {tokens_per_iter / ms * 1000:,.0f} | {base / ms:.2f}x |")


with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'train.bin')
    rng = np.random.default_rng(0)
    rng.integers(vocab_size, size=num_tokens, dtype=np.uint16).tofile(path)
    print(f"{n_layer} layers, {n_head} heads, {n_embd} wide, block {block_size}, batch {batch_size}, "
          f"vocab {vocab_size}: {tokens_per_iter} tokens/iter; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")

    runners = {'nanoGPT': NanoGPTStep(path), 'this repository (train.py)': OursStep(path),
               "this repository, GPT-2's tanh GELU": OursStep(path, gelu_approximate='tanh')}
    times = {name: [] for name in runners}
    for r in range(repeats):
        for name, runner in runners.items():  # alternate, so load from other processes hits both
            times[name].append(timed_block(runner))
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f} ms" for n, t in times.items()), flush=True)
    print()
    report(times)

    if compile_check:
        print("\ntorch.compile of this repository's step (mode default), from a cold start like a first run:")
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = os.path.join(tmp, 'inductor')  # later runs reuse their cache
        compiled = OursStep(path, compiled=True)
        t0 = time.perf_counter()
        compiled.step()  # the first step traces and compiles forward and backward
        first_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        with torch.no_grad():  # train.py's evaluation: a forward without autograd is compiled again
            compiled.raw_model.eval()
            compiled.model(*compiled.get_batch([seed, 1, 0, 0]))
            compiled.raw_model.train()
        eval_ms = (time.perf_counter() - t0) * 1000
        compile_times = {'eager': [], 'compiled': []}
        for _ in range(repeats):
            compile_times['eager'].append(timed_block(runners['this repository (train.py)']))
            compile_times['compiled'].append(timed_block(compiled))
        report(compile_times)
        eager_ms, compiled_ms = (float(np.median(t)) for t in compile_times.values())
        overhead = first_ms - compiled_ms + eval_ms
        print(f"\ncompile overhead {overhead / 1000:.1f} s: first training step {first_ms / 1000:.1f} s, "
              f"first evaluation forward {eval_ms / 1000:.1f} s")
        if compiled_ms < eager_ms:
            print(f"break-even after {overhead / (eager_ms - compiled_ms):,.0f} iterations "
                  f"({eager_ms - compiled_ms:.2f} ms/iter saved)")
        else:
            print("compiled is not faster than eager in steady state: it never pays back")

    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        runner = runners['this repository (train.py)']
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                runner.step()
        print("\ntop ops of this repository's step (50 iterations):")
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=25))
