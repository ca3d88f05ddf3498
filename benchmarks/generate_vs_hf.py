"""
Greedy generation speed on a CPU: this repository's GPT with its KV cache, against Hugging Face transformers'
GPT2LMHeadModel.generate (also cached) and against our own generation without the cache, all on the same
GPT-2 124M-shaped random weights (saved by transformers, loaded by GPT.from_pretrained), float32, batch 1.
$ python benchmarks/generate_vs_hf.py
$ python benchmarks/generate_vs_hf.py --threads=1 --repeats=5
The three methods run in turn within each repeat, so a busy machine slows them alike; the medians (and the
best ms/token, the better guess on a busy machine) are reported. The run fails unless all three produce the
same tokens.
"""

import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from model import GPT  # noqa: E402

# -----------------------------------------------------------------------------
n_layer = 12  # GPT2Config()'s defaults: GPT-2 124M
n_head = 12
n_embd = 768
prompt_tokens = 16
max_new_tokens = 200
repeats = 3  # timed runs of each method; medians are reported
threads = 0  # torch.set_num_threads; 0 keeps torch's default (one per core)
seed = 1337
# -----------------------------------------------------------------------------
configure(globals())
if threads:
    torch.set_num_threads(threads)

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
hf_logging.set_verbosity_error()  # no notes about generation settings
hf_logging.disable_progress_bar()  # nor progress bars for saving and loading weights

torch.manual_seed(seed)
hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).eval()  # random weights
with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    ours = GPT.from_pretrained(tmp).eval()
prompt = torch.randint(hf.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))


def ours_cached(n):
    return ours.generate(prompt, n, temperature=0)


def ours_uncached(n):
    return ours.generate(prompt, n, temperature=0, use_cache=False)


def transformers_cached(n):
    with torch.no_grad():
        # min_new_tokens: random weights may well pick the end-of-text token, which must not stop it early
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, use_cache=True, pad_token_id=hf.config.eos_token_id)


methods = {'ours, KV cache': ours_cached, 'transformers, KV cache': transformers_cached,
           'ours, no cache': ours_uncached}
print(f"GPT-2 shape {n_layer} layers, {n_head} heads, {n_embd} wide, float32, batch 1, {prompt_tokens}-token "
      f"prompt, {max_new_tokens} new tokens, greedy; {torch.get_num_threads()} threads, torch {torch.__version__}")
for method in methods.values():
    method(4)  # warm up: first-call allocations and lazy initialization
seconds = {name: [] for name in methods}
outputs = {}
for r in range(repeats):
    for name, method in methods.items():  # interleaved, so other load on the machine hits all three
        t0 = time.perf_counter()
        outputs[name] = method(max_new_tokens)
        seconds[name].append(time.perf_counter() - t0)
    print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {max_new_tokens / s[-1]:.1f} tok/s"
                                                   for n, s in seconds.items()), flush=True)

reference = outputs['transformers, KV cache']
assert reference.shape == (1, prompt_tokens + max_new_tokens)
for name, out in outputs.items():
    if not torch.equal(out, reference):
        first = int((out[0] != reference[0]).nonzero()[0]) if out.shape == reference.shape else None
        sys.exit(f"error: '{name}' generated different tokens from transformers (first difference at {first})")
print(f"all three generated the same {max_new_tokens} tokens\n")

tokens_per_s = {name: max_new_tokens / float(np.median(s)) for name, s in seconds.items()}
print("| method | tokens/s | ms/token | best ms/token | vs transformers | vs no cache |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name, tps in tokens_per_s.items():
    print(f"| {name} | {tps:.1f} | {1000 / tps:.1f} | {min(seconds[name]) / max_new_tokens * 1000:.1f} "
          f"| {tps / tokens_per_s['transformers, KV cache']:.2f}x | {tps / tokens_per_s['ours, no cache']:.2f}x |")
print("\nms/token is the whole generate call (prompt included) over the new tokens")
