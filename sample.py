"""
Sample from a trained model, or from GPT-2 weights.
$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
By default it loads out_dir/best.pt (the model with the best validation loss) if there is one, else
out_dir/ckpt.pt (the latest); --checkpoint=ckpt.pt picks the latest explicitly.
"""

from configurator import UserError, configure, report_errors

report_errors()  # first: a mistake is one 'error:' line, Ctrl-C (even while importing) no traceback

import signal
import sys

import torch
from tqdm import tqdm

from checkpoint import load_model
from dataset import Tokenizer
from hardware import autocast_context, best_device, best_dtype, check_device, compile_failure, dtype_default

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a GPT-2 name ('gpt2' ... 'gpt2-xl') or a local Hugging Face directory
out_dir = 'out'  # ignored if init_from is not 'resume'
checkpoint = ''  # file in out_dir to load; '' means best.pt if present, else ckpt.pt
start = "\n"  # the prompt, or FILE:prompt.txt to read it from a file (a BPE model also knows "<|endoftext|>")
num_samples = 10  # number of samples to draw, generated together in one batch
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability; 0 disables
top_p = 1.0  # nucleus sampling: retain the likeliest tokens that add up to top_p probability; 1.0 disables
seed = 1337  # decides the samples drawn
device = best_device()  # 'cpu', 'cuda', 'cuda:0', 'mps'; the default is the best one this machine has
dtype = best_dtype(device)  # float32, bfloat16 or float16; auto is the device's best (README: Precision)
compile = False  # torch.compile the model: faster tokens after a slow start
# -----------------------------------------------------------------------------
user_keys = configure(globals())
dtype = dtype_default(device, dtype, user_keys)
device_type, dtype = check_device(device, dtype)
ctx = autocast_context(device_type, dtype)

# model and its vocabulary
model, meta, loaded = load_model(init_from, out_dir, checkpoint)
print(f"loaded {loaded}; sampling on {device} in {dtype}", file=sys.stderr)
torch.manual_seed(seed)  # after loading, whose random initialisations (of a model, of adapters) vary with its source
torch.cuda.manual_seed(seed)
model.to(device)
tokenizer = Tokenizer(meta)
encode, decode, stop_token = tokenizer.encode, tokenizer.decode, tokenizer.eot

# encode the beginning of the prompt
if start.startswith('FILE:'):
    try:
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not read the prompt file '{start[5:]}': {getattr(e, 'strerror', None) or e}") from None
start_ids = encode(start, 'the prompt')
if not start_ids:
    raise UserError("the prompt is empty; give at least one token with --start=...")
if len(start_ids) > model.config.block_size:
    print(f"note: the prompt has {len(start_ids)} tokens, more than the model's context of "
          f"{model.config.block_size}; only its last {model.config.block_size} tokens are seen", file=sys.stderr)
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...].expand(num_samples, -1)
if compile:
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, dynamic=True)  # generate() calls it once per token
    with ctx:  # the prompt and a token now, greedily: compiled here, a machine that cannot samples without it
        failure = compile_failure(lambda: model.generate(x, 2, temperature=0))
    if failure:
        model.forward = eager_forward
        print(f"warning: torch.compile failed ({failure}); sampling without it. --compile=False skips the attempt",
              file=sys.stderr)


def stream(next_tokens):
    """With one sample, print its text as it grows; decoding the whole so far keeps multi-byte characters intact."""
    global printed
    if next_tokens[0].item() == stop_token:
        return
    generated.append(next_tokens[0].item())
    text = decode(generated)
    if not text.endswith('\ufffd'):  # wait for the rest of a character split over several tokens
        print(text[len(printed):], end='', flush=True)
        printed = text


def cut_at_stop(tokens):
    return tokens[:tokens.index(stop_token)] if stop_token in tokens else tokens


# run generation; Ctrl-C stops it between two tokens, and what was generated until then is printed all the same
printed, generated = '', []  # the streamed sample
steps = []  # each step's new tokens, (num_samples, 1)
stop_requested = False
# with several samples, a progress bar on stderr while the batch is generated; none when stderr is not a terminal
bar = tqdm(total=max_new_tokens, desc='generating', unit='tok', file=sys.stderr, disable=True if num_samples == 1 else None)


def request_stop(signum, frame):
    global stop_requested
    if stop_requested:  # a second Ctrl-C: at once
        raise KeyboardInterrupt
    stop_requested = True


def on_token(next_tokens):
    steps.append(next_tokens)
    if num_samples == 1:
        stream(next_tokens)
    bar.update()
    if stop_requested:
        raise KeyboardInterrupt  # here, between tokens, where everything generated is also printed


if num_samples == 1:
    print(start, end='', flush=True)
signal.signal(signal.SIGINT, request_stop)
try:
    with torch.no_grad(), ctx:
        model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                       stop_token=stop_token, on_token=on_token)
except KeyboardInterrupt:
    stop_requested = True
bar.close()
if num_samples == 1:
    print(decode(generated)[len(printed):])
    print('---------------')
else:
    rows = torch.cat(steps, dim=1).tolist() if steps else [[]] * num_samples
    for tokens in rows:
        print(start + decode(cut_at_stop(tokens)))
        print('---------------')
if stop_requested:
    print(f"interrupted after {len(steps)} of {max_new_tokens} new tokens", file=sys.stderr)
    sys.exit(130)
