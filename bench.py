"""
A short benchmark: training throughput and MFU, or sampling latency with and without the KV cache.
$ python bench.py                                   # train GPT-2 124M on random tokens
$ python bench.py --device=cpu --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --vocab_size=65
$ python bench.py --init_from=resume --out_dir=out-shakespeare-char --dataset=shakespeare_char
$ python bench.py --mode=sample --max_new_tokens=1000 --compare_uncached=False --profile=True
Training reports tokens/s, ms/iter, MFU (against the peak FLOP/s of the device in use) and peak memory.
Sampling reports the prompt's latency, then per-token latency and tokens/s with the cache and without it
(greedy, so both produce the same tokens), and per-token latency along the sequence.
"""

from configurator import UserError, configure, report_errors

report_errors()  # first: a mistake is one 'error:' line, Ctrl-C (even while importing) no traceback

import os
import time

import numpy as np
import torch

from checkpoint import base_model, check_init_from, load_checkpoint, model_from_checkpoint, new_model
from dataset import dataset_dir, load_tokens
from hardware import (autocast_context, best_device, best_dtype, check_device, compile_default, dtype_default,
                      peak_flops as device_peak_flops, peak_memory, sync)

# -----------------------------------------------------------------------------
mode = 'train'  # 'train' or 'sample'
init_from = 'scratch'  # 'scratch' (random weights), 'resume' (out_dir/ckpt.pt), a GPT-2 name or local HF directory
out_dir = 'out'  # the run directory, for init_from=resume
# model shape, for init_from=scratch; GPT-2 124M by default
n_layer = 12  # transformer blocks
n_head = 12  # attention heads per block
n_embd = 768  # width of the residual stream
block_size = 1024  # also crops a loaded model's context
vocab_size = 0  # 0: 50304 (GPT-2's 50257 padded, as train.py) to train, GPT-2's 50257 to sample
bias = False  # biases in Linears and LayerNorms
dropout = 0.0  # dropout probability while training
rope = False  # the faster recipes' options, as in train.py: rotary position embeddings
qk_norm = False  # RMS-normalised queries and keys
# training
optimizer = 'adamw'  # 'adamw', or 'muon' (Muon for the blocks' matrices, AdamW for the rest), as in train.py
batch_size = 12  # sequences per training step
dataset = ''  # '' trains on random tokens; a dataset (as in train.py) reads batches from its train.bin
warmup_steps = 10  # untimed steps first: allocations, compilation, caches
num_steps = 20  # timed steps
# sampling
prompt_tokens = 16  # a random prompt
max_new_tokens = 200  # tokens generated per sample
num_samples = 1  # batch size of generation
compare_uncached = True  # also time generate(use_cache=False); slow for long sequences
# system
device = best_device()  # 'cpu', 'cuda', 'cuda:0', 'mps'; the default is the best one this machine has
dtype = best_dtype(device)  # float32, bfloat16 or float16; auto is the device's best (README: Precision)
compile = device.startswith('cuda')  # torch.compile; unless set, on for CUDA only, as in train.py
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0 looks the GPU up by name, or measures a CPU
profile = False  # also print torch.profiler's table of the top ops
seed = 1337  # decides the random weights and tokens
# -----------------------------------------------------------------------------
user_keys = configure(globals())
dtype, compile = dtype_default(device, dtype, user_keys), compile_default(device, compile, user_keys)
if mode not in ('train', 'sample'):
    raise UserError(f"unknown mode '{mode}'; use train or sample")
device_type, dtype = check_device(device, dtype)
torch.manual_seed(seed)
ctx = autocast_context(device_type, dtype)

# model
check_init_from(init_from, ('scratch', 'resume'))
if init_from == 'scratch':
    vocab_size = vocab_size or (50304 if mode == 'train' else 50257)
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=vocab_size, dropout=dropout, rope=rope, qk_norm=qk_norm)
    model = new_model(model_args, "the settings")
elif init_from == 'resume':
    model = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'ckpt.pt')), dropout=dropout)
else:
    model, _ = base_model(init_from, dropout=dropout)
if block_size < model.config.block_size:
    model.crop_block_size(block_size)
block_size = model.config.block_size
vocab_size = model.config.vocab_size
if mode == 'sample' and prompt_tokens >= block_size:  # the prompt alone would fill the context: nothing cached
    raise UserError(f"prompt_tokens={prompt_tokens} leaves no room in the model's context of {block_size} tokens; "
                    f"use fewer than {block_size}")
model.to(device)
cfg = model.config
print(f"{mode}: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {block_size}, vocab {vocab_size}, "
      f"{model.get_num_params() / 1e6:.2f}M parameters; device {device}, {dtype}, compile {'on' if compile else 'off'}"
      f"{f', {torch.get_num_threads()} threads' if device_type == 'cpu' else ''}")


def profiled(fn, steps):
    """Print torch.profiler's table of the ops that took the most time over `steps` calls of fn."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    sort_by = 'self_cuda_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20))


def train():
    if dataset:
        path = os.path.join(dataset_dir(dataset), 'train.bin')
        if not os.path.exists(path):
            raise UserError(f"no train.bin at {path}; prepare the dataset first")
        data = load_tokens(dataset_dir(dataset), 'train')
        if len(data) <= block_size:
            raise UserError(f"{path} has {len(data)} tokens, too few for block_size={block_size}")
        offsets = np.arange(block_size + 1)
        rng = np.random.default_rng(seed)

        def get_batch():
            ix = rng.integers(len(data) - block_size, size=batch_size)
            tokens = data[ix[:, None] + offsets]
            if tokens.max() >= vocab_size:  # as in train.py: an id past the embedding table is no IndexError
                raise UserError(f"{path} holds token id {tokens.max()}, beyond the model's vocabulary of "
                                f"{vocab_size}: it was prepared with another tokenizer")
            windows = torch.from_numpy(tokens.astype(np.int64)).to(device)
            return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    else:
        # one fixed batch of random tokens, as nanoGPT's bench.py: the model does the same work on any tokens
        windows = torch.randint(vocab_size, (batch_size, block_size + 1), device=device)
        batch = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

        def get_batch():
            return batch

    optimizers = model.configure_optimizers(weight_decay=1e-1, learning_rate=1e-4, betas=(0.9, 0.95),
                                            device_type=device_type, muon_lr=0.02 if optimizer == 'muon' else 0.0)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    train_model = torch.compile(model) if compile else model
    model.train()
    X, Y = get_batch()

    def step():
        nonlocal X, Y
        with ctx:
            _, loss = train_model(X, Y)
        X, Y = get_batch()
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup_steps):
        loss = step()
    sync(device)
    print(f"{warmup_steps} warm-up steps: {time.perf_counter() - t0:.1f} s, loss {loss.item():.4f}")
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(num_steps):
        loss = step()
    sync(device)
    dt = (time.perf_counter() - t0) / num_steps
    tokens_per_iter = batch_size * block_size
    peak, peak_source = (peak_flops, "--peak_flops") if peak_flops else device_peak_flops(device, dtype)
    mfu = model.estimate_mfu(tokens_per_iter, dt, peak)
    print(f"{num_steps} steps of {tokens_per_iter:,} tokens: loss {loss.item():.4f}")
    print(f"{tokens_per_iter / dt:,.0f} tokens/s, {dt * 1000:.2f} ms/iter, "
          f"MFU {mfu * 100:.2f}% of {peak / 1e12:.2f} TFLOP/s ({peak_source}), peak memory {peak_memory(device)}")
    if profile:
        profiled(step, min(num_steps, 10))


def timed_generate(prompt, use_cache):
    """Generate greedily; return the tokens and the time (s) at which each new token was ready, from the start."""
    times = []

    def on_token(_):
        sync(device)
        times.append(time.perf_counter() - t0)

    sync(device)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens, temperature=0, use_cache=use_cache, on_token=on_token)
    return out, np.array(times)


def sample():
    model.eval()
    if compile:
        model.forward = torch.compile(model.forward, dynamic=True)  # as sample.py: generate calls it per token
    prompt = torch.randint(vocab_size, (num_samples, prompt_tokens), device=device)
    model.generate(prompt, 2, temperature=0)  # warm up
    model.generate(prompt, 2, temperature=0, use_cache=False)
    runs = {'KV cache': timed_generate(prompt, use_cache=True)}
    if compare_uncached:
        runs['no cache'] = timed_generate(prompt, use_cache=False)
        if not torch.equal(runs['KV cache'][0], runs['no cache'][0]):
            print("warning: greedy tokens differ with and without the cache (reduced precision?)")

    n = max_new_tokens * num_samples
    print(f"\n{num_samples} x {max_new_tokens} new tokens after a {prompt_tokens}-token prompt, greedy; "
          f"per-token times are for the whole batch")
    print("| | prompt + 1st token (ms) | ms/token after | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, (_, times) in runs.items():
        per_token = np.diff(times).mean() * 1000 if len(times) > 1 else float('nan')
        print(f"| {name} | {times[0] * 1000:.1f} | {per_token:.2f} | {n / times[-1]:.1f} |")

    # latency along the sequence: near flat with the cache (until the sequence outgrows block_size), linear
    # without; medians, so that a stall caused by another process on a shared machine does not move a row
    edges = np.unique(np.linspace(1, max_new_tokens, min(max_new_tokens, 7)).astype(int))
    print(f"\nmedian ms/token by position in the sequence (block_size {block_size}):")
    print("| new tokens | positions | " + " | ".join(runs) + " |")
    print("| --- | --- |" + " ---: |" * len(runs))
    for lo, hi in zip(edges[:-1], edges[1:]):
        cells = [f"{np.median(np.diff(times[lo - 1:hi])) * 1000:.2f}" for _, times in runs.values()]
        print(f"| {lo + 1}-{hi} | {prompt_tokens + lo + 1}-{prompt_tokens + hi} | " + " | ".join(cells) + " |")
    print(f"peak memory {peak_memory(device)}")
    if profile:
        print("\nprofile of one generate call with the cache:")
        profiled(lambda: model.generate(prompt, max_new_tokens, temperature=0), 1)


if mode == 'train':
    train()
else:
    with ctx:
        sample()
