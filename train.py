"""
This training script runs on a single device (GPU, Apple silicon or CPU) or, under torchrun, with
distributed data parallel (DDP), or FSDP with --fsdp=True, on one node or many.

To run on a single device, example:
$ python train.py config/train_shakespeare_char.py

To run with DDP on 8 GPUs on 1 node, example:
$ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

To run with DDP on 4 GPUs across 2 nodes, example:
- Run on the first (master) node with example IP 123.456.123.456:
$ torchrun --nproc_per_node=2 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 train.py
- Run on the worker node:
$ torchrun --nproc_per_node=2 --nnodes=2 --node_rank=1 --master_addr=123.456.123.456 --master_port=1234 train.py
(If your cluster does not have Infiniband interconnect prepend NCCL_IB_DISABLE=1)

The run's whole future is a function of its checkpoint and (seed, iter_num): the batches of step k and the
dropout masks are drawn from generators seeded with them (and the micro-batch's index), so a resumed run repeats
the uninterrupted one exactly, and a step computes the same however many processes share it.
"""

from configurator import LORA_TARGETS, EveryRankError, UserError, configure, report_errors, settings_of

report_errors()  # first: a mistake is one 'error:' line, Ctrl-C (even while importing) no traceback

import atexit
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (CheckpointWriter, apply_saved_settings, base_model, check_model_fits_data,
                        check_room_for_checkpoint, claim_out_dir, commit_claim, init_process_group, load_checkpoint,
                        model_from_checkpoint, new_model, resolve_init_from, restore_training_state)
from dataset import Tokenizer, check_vocabulary, dataset_dir, load_meta, load_splits, read_manifest, script_to_prepare
from eval import hellaswag_accuracy, hellaswag_item, hellaswag_scores, load_items
from lora import add_adapters, freeze_base
from hardware import (DTYPES, autocast_context, best_device, best_dtype, check_device, compile_default,
                      compile_failure, dtype_default, held_memory, peak_flops as device_peak_flops, peak_memory)
from metrics import MetricsLog, WandbRun, plot_losses
from sharding import shard

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'  # where checkpoints, log.jsonl and loss.png go
eval_interval = 2000  # evaluate (and save a checkpoint) every this many iterations
log_interval = 1  # print the training loss every this many iterations
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # if True, script exits right after the first eval
always_save_checkpoint = True  # if False, ckpt.pt is only rewritten when val improves (best.pt always holds the best)
checkpoint_format = 'full'  # 'full': ckpt.pt, gathered by the master; 'sharded': ckpt/, each process its shards (DCP)
async_checkpoint = False  # sharded only: the shards are written in the background while training goes on
hellaswag = ''  # also score HellaSwag at every evaluation: hub NAME[@REVISION] ('Rowan/hellaswag') or a local file
hellaswag_items = 500  # how many of HellaSwag's items to score, shared out over the processes
init_from = 'scratch'  # 'scratch', 'resume', 'auto' (resume if out_dir has a checkpoint), a GPT-2 name, HF dir or .pt
start_over = False  # True lets a scratch or GPT-2 start delete the checkpoints of an earlier run in out_dir
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'owt'  # the Weights & Biases project
wandb_run_name = 'gpt2'  # and run name
# data
dataset = 'openwebtext'  # a folder under data/, or a path to a folder holding train.bin and val.bin
gradient_accumulation_steps = 5 * 8  # used to simulate larger batch sizes; global, split over the processes
batch_size = 12  # if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 1024  # context length in tokens
# model
n_layer = 12  # transformer blocks
n_head = 12  # attention heads per block
n_embd = 768  # width of the residual stream
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # do we use bias inside LayerNorm and Linear layers?
# the faster recipes' options (README "Faster recipes"); the defaults are GPT-2's architecture, as nanoGPT's
rope = False  # rotary position embeddings instead of learned ones
qk_norm = False  # RMS-normalised queries and keys
lora_rank = 0  # low-rank adapters of this rank on a frozen model (README: LoRA); 0 is off: every weight trains
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' inputs
lora_targets = ','.join(LORA_TARGETS)  # the Linears of each block that get adapters
lora_base_dtype = ''  # the frozen weights' dtype: '' is the run's dtype (16-bit on GPUs), or float32
# adamw optimizer
optimizer = 'adamw'  # 'adamw', or 'muon': Muon for the blocks' matrices at muon_lr, AdamW for the rest
muon_lr = 0.02  # Muon's peak learning rate, on the same schedule as learning_rate (optimizer='muon' only)
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1  # AdamW's decoupled weight decay, on matrices and embeddings only
beta1 = 0.9  # AdamW's momentum
beta2 = 0.95  # AdamW's second-moment decay
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# DDP settings
backend = ''  # '' picks nccl on CUDA and gloo on CPU; or 'nccl', 'gloo'
fsdp = False  # under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2), not DDP
activation_checkpointing = False  # recompute each block's activations in the backward pass: less memory, more time
# system
device = best_device()  # 'cpu', 'cuda', 'cuda:0', 'mps'; the default is the best one this machine has
dtype = best_dtype(device)  # float32, bfloat16 or float16; auto is the device's best (README: Precision)
compile = device.startswith('cuda')  # torch.compile; unless set, on for CUDA only (on CPUs it costs more than it gains)
seed = 1337  # decides the initial weights, every batch and every dropout mask
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0 looks the GPU up by name, or measures a CPU
# -----------------------------------------------------------------------------
config_keys = settings_of(globals())
user_keys = configure(globals())  # overrides from the command line or config files, checked
dtype, compile = dtype_default(device, dtype, user_keys), compile_default(device, compile, user_keys)
init_from = resolve_init_from(init_from, out_dir)  # 'auto' and a torchrun restart: 'resume' if out_dir has ckpt.pt
checkpoint = None
if init_from == 'resume':  # it continues with its saved settings, but for those given now
    checkpoint = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), required=('optimizer', 'iter_num', 'best_val_loss'))
    apply_saved_settings(checkpoint, globals(), config_keys, user_keys)
config = {k: globals()[k] for k in config_keys}  # will be useful for logging and checkpoints
# -----------------------------------------------------------------------------

# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a torchrun launch? (then DDP, or FSDP with fsdp=True)
if fsdp and not ddp:
    raise UserError("fsdp=True shards the model over processes: launch with torchrun, e.g. torchrun --standalone "
                    "--nproc_per_node=8 train.py ...; in one process, drop --fsdp")
if ddp:
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if gradient_accumulation_steps % ddp_world_size != 0:  # checked on every rank before any collective: no hang
        valid = [n for n in range(ddp_world_size, 8 * ddp_world_size + 1, ddp_world_size)]
        raise EveryRankError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by "
                             f"the number of processes ({ddp_world_size}); e.g. use one of {valid}")
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
else:
    ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
master_process = ddp_rank == 0  # this process will do logging, checkpointing etc.
device_type, dtype = check_device(device, dtype)
if fsdp and dtype == 'float16':
    raise UserError("fsdp=True has no gradient scaler for float16 here; use --dtype=bfloat16 (or float32)")
if ddp:
    if device_type == 'cuda':
        torch.cuda.set_device(device)
    init_process_group(backend or ('nccl' if device_type == 'cuda' else 'gloo'))  # (a torchrun restart: its own keys)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # also on errors
    # a CPU-side group for the stop flag, so checking it every step does not wait for the GPU
    control_group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else None
micro_steps = gradient_accumulation_steps // ddp_world_size  # per process
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
# mixed precision: autocast (under FSDP too, on top of its policy: norms, softmax and the loss in float32)
ctx = autocast_context(device_type, dtype)

# data: train.bin and val.bin are uint16 token ids, read through memmaps so they never need to fit in memory
data_dir = dataset_dir(dataset)
prepare_script = script_to_prepare(data_dir)  # (or a UserError: a big dataset is prepared by hand)
if prepare_script and ddp_local_rank == 0:  # small datasets are prepared on the spot, once per node
    print(f"dataset '{dataset}' (or its new input) is not prepared yet; running {prepare_script}", flush=True)
    returncode = subprocess.run([sys.executable, prepare_script]).returncode
    if returncode != 0:
        sys.exit(returncode)  # its own error line says why
if ddp:
    dist.barrier()  # the node's other processes wait for it
manifest = read_manifest(data_dir)  # None for a dataset prepared elsewhere (by nanoGPT, say)
train_data, val_data = load_splits(data_dir, dataset, block_size)
superseded = []  # an earlier run's checkpoints, which --start_over=True deletes once every check has passed
if master_process and not eval_only:
    out_dir_lock, superseded = claim_out_dir(out_dir, resuming=init_from == 'resume', start_over=start_over)
offsets = np.arange(block_size + 1)


def get_batch(split, key):
    """batch_size random windows of the split, drawn from a generator seeded with key."""
    data = train_data if split == 'train' else val_data
    ix = np.random.default_rng(key).integers(len(data) - block_size, size=batch_size)
    tokens = data[ix[:, None] + offsets]  # one gather from the memmap
    if tokens.max() >= model_args['vocab_size']:  # cheap, and an id past the embedding table is no IndexError
        raise UserError(f"{split}.bin of '{dataset}' holds token id {tokens.max()}, beyond the model's vocabulary "
                        f"of {model_args['vocab_size']}: it was prepared with another tokenizer than the model's; "
                        "prepare it again, or train from scratch on it")
    windows = torch.from_numpy(tokens.astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if device_type == 'cuda':
        # pin arrays x,y, which allows us to move them to GPU asynchronously (non_blocking=True)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def train_key(step, micro_step):
    """Micro-batch micro_step (0 .. gradient_accumulation_steps-1, over all processes) of optimizer step."""
    return [seed, 0, step, micro_step]


def dropout_seed(step, micro_step):
    """The seed of a micro-batch's dropout masks: like its examples, a function of (seed, step, micro-batch)
    only, so a resumed run, or a run on another number of processes, draws the same masks."""
    return int(np.random.SeedSequence([seed, 3, step, micro_step]).generate_state(1)[0])


# attempt to derive vocab_size from the dataset
meta = load_meta(data_dir)
meta_vocab_size = meta['vocab_size'] if meta else None
if meta and master_process:
    print(f"found vocab_size = {meta_vocab_size} (inside {os.path.join(data_dir, 'meta.pkl')})")
data_vocab_size = manifest['vocab_size'] if manifest else meta_vocab_size  # the tokenizer's, if recorded

# model init
torch.manual_seed(seed)  # the same initial weights on every process and in every run with this seed
# under FSDP the model is built on the meta device and materialised shard by shard: drawn from scratch, loaded from
# shards, or handed out by rank 0, the only process that loads other weights whole (sharding.py)
sharded_start = 'sharded' in (checkpoint or {})
on_meta = fsdp and (init_from == 'scratch' or sharded_start or not master_process)
iter_num = 0
best_val_loss = float('inf')
if init_from == 'scratch':
    if master_process:
        print("Initializing a new model from scratch")
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=meta_vocab_size or 50304, dropout=dropout,  # 50304: GPT-2's 50257, padded
                      rope=rope, qk_norm=qk_norm)
    with torch.device('meta') if on_meta else nullcontext():
        model = new_model(model_args, "the settings")
    model_meta = meta
elif init_from == 'resume':
    if master_process:
        print(f"Resuming training from {out_dir} at iter {checkpoint['iter_num']}")
    with torch.device('meta') if on_meta else nullcontext():  # (a sharded checkpoint's weights come later)
        model = model_from_checkpoint(checkpoint, dropout=dropout, merge=False)  # a LoRA run's: with its adapters
    iter_num = checkpoint['iter_num']
    best_val_loss = float(checkpoint['best_val_loss'])
    model_meta = checkpoint.get('meta', meta)  # nanoGPT's checkpoints record no vocabulary: take the dataset's
    if iter_num >= max_iters and not eval_only:  # e.g. the same command run again after the run finished
        if master_process:
            print(f"the checkpoint in {out_dir} is at iter {iter_num} and max_iters={max_iters}: nothing is left "
                  f"to train; pass a larger --max_iters to train on")
        sys.exit(0)
else:
    if master_process:
        print(f"Initializing from {'the checkpoint' if os.path.isfile(init_from) else 'GPT-2 weights:'} {init_from}")
    model, model_meta = base_model(init_from, dropout=dropout, from_rank0=fsdp)  # (meta None: GPT-2's BPE)
check_vocabulary(model_meta, meta, dataset)
if block_size < model.config.block_size:
    model.crop_block_size(block_size)  # e.g. GPT-2's 1024 cropped to a shorter context for finetuning
check_model_fits_data(model, block_size, data_vocab_size, dataset)
lora = checkpoint.get('lora') if checkpoint else None  # what identifies a LoRA run's base, and its settings
if lora_rank and not lora:  # (a resumed run's model has its adapters already)
    lora = add_adapters(model, init_from, lora_rank, lora_alpha, lora_dropout, lora_targets)
if lora:
    freeze_base(model, lora_base_dtype or dtype, dtype)
model_args = asdict(model.config)  # all of GPTConfig: sample.py and resume rebuild the same model
if master_process and not eval_only:
    check_room_for_checkpoint(out_dir, model)
if not fsdp:
    model.to(device)
model.activation_checkpointing = activation_checkpointing
if fsdp:  # (README: Models bigger than one GPU)
    shard(model, DTYPES[dtype], device, 'init' if init_from == 'scratch' else None if sharded_start else 'rank0')
if hellaswag:  # loaded and encoded now, so that a missing file or an unknown character fails before training
    tokenizer = Tokenizer(meta)
    hellaswag_set = load_items(hellaswag, 'validation', ('ctx', 'endings', 'label'), 'hellaswag', hellaswag_items)
    for item in hellaswag_set:
        hellaswag_item(tokenizer, item, block_size)

# initialize a GradScaler. If enabled=False scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                        muon_lr=muon_lr if optimizer == 'muon' else 0.0)
if init_from == 'resume':
    restore_training_state(checkpoint, model, optimizers, scaler, fsdp)
param_groups = [group for opt in optimizers for group in opt.param_groups]  # (loading a state replaces them)
resumed_at = iter_num if init_from == 'resume' else None  # its evaluation happened before the checkpoint
saved_at = resumed_at  # the iteration that ckpt.pt holds


def warm_up(model):
    """A training and an evaluation forward pass: a compiled model compiles now (a backward would alter FSDP's)."""
    X, Y = get_batch('val', [seed, 4])
    with ctx:
        model(X, Y)
        with torch.no_grad():
            model.eval()(X, Y)
    model.train()


raw_model = model  # to read and save state from, neither compiled nor wrapped by DDP
writer = CheckpointWriter(raw_model, optimizers, scaler, lora, checkpoint_format == 'sharded', async_checkpoint,
                          master_process, fsdp)
if compile:
    if master_process:
        print("compiling the model... (takes a ~minute)")
    compiled = torch.compile(model)
    failure = compile_failure(lambda: warm_up(compiled))
    failed = torch.tensor([failure is not None], dtype=torch.int32)  # every process falls back if one does
    if ddp:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=control_group)
    if failed.item() and master_process:
        print(f"warning: torch.compile failed ({failure or 'on another process'}); training without it. "
              "--compile=False skips the attempt", file=sys.stderr)
    model, compile = (model, False) if failed.item() else (compiled, True)
train_model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None) if ddp and not fsdp else model


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches per split; the batches are shared out over the processes."""
    out = {}
    model.eval()
    for split_index, split in enumerate(('train', 'val')):
        totals = torch.zeros(2, device=device)  # loss sum, batch count
        # every process runs as many batches (FSDP's forward is a collective); those past eval_iters do not count
        batches = range(ddp_rank, math.ceil(eval_iters / ddp_world_size) * ddp_world_size, ddp_world_size)
        # a progress bar where it helps: on the master's terminal (none when output goes to a file)
        for k in tqdm(batches, desc=f'eval {split}', leave=False, disable=None if master_process else True):
            X, Y = get_batch(split, [seed, 1 + split_index, k])
            with ctx:
                _, loss = model(X, Y)
            counts = float(k < eval_iters)
            totals += torch.stack((loss.float() * counts, torch.tensor(counts, device=device)))
        if ddp:
            dist.all_reduce(totals)
        out[split] = (totals[0] / totals[1]).item()
    model.train()
    return out


@torch.no_grad()
def estimate_hellaswag():
    """acc and acc_norm on the HellaSwag items, shared out over the processes (scored uncompiled: the
    sequences have every length)."""
    raw_model.eval()
    items = hellaswag_set[ddp_rank::ddp_world_size]
    # under FSDP every process runs as many forward passes (they are collectives), even one with no item
    padding = hellaswag_set[:1] * (math.ceil(len(hellaswag_set) / ddp_world_size) - len(items)) if fsdp else []
    scores = hellaswag_scores(raw_model, tokenizer, items + padding, ctx, progress=master_process)[:len(items)]
    raw_model.train()
    mine = hellaswag_accuracy(scores) if scores else {'acc': 0.0, 'acc_norm': 0.0, 'n': 0}
    totals = torch.tensor([mine['acc'] * mine['n'], mine['acc_norm'] * mine['n'], mine['n']], device=device)
    if ddp:
        dist.all_reduce(totals)
    return {'acc': (totals[0] / totals[2]).item(), 'acc_norm': (totals[1] / totals[2]).item()}


def lr_factor(it):
    """Every group's peak learning rate times this: linear warmup, then cosine decay down to
    min_lr / learning_rate at lr_decay_iters."""
    floor = min_lr / learning_rate if learning_rate else 0.0
    if not decay_lr:
        return 1.0
    if it < warmup_iters:
        return (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return floor
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return floor + coeff * (1.0 - floor)


def save(name, with_optimizer=True):
    """Write out_dir/name (README: Resuming and checkpoints); every process calls this."""
    # the vocabulary travels with the model, so sampling needs no dataset folder (e.g. after a Colab reset)
    state = {'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config,
             'wandb_run_id': wandb_run.run_id, 'meta': meta}
    writer.save(os.path.join(out_dir, name), state, with_optimizer)


# stop cleanly on Ctrl-C (SIGINT) or a cluster's pre-emption notice (SIGTERM): finish the step, save, exit
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    # a second Ctrl-C means now (not under torchrun, which passes each signal on: workers see it twice)
    if stop_signal is not None and not ddp:
        sys.exit(128 + signum)  # the last complete checkpoint stays intact
    stop_signal = signal.Signals(signum).name
    if master_process:  # said at once, even during a long evaluation; os.write, as the handler may interrupt a print
        again = '' if ddp else '; press Ctrl-C again to quit at once without saving'
        os.write(2, f"\n{stop_signal}: stopping after this step and saving a checkpoint{again}\n".encode())


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def should_stop():
    """True when any process got a stop signal; under DDP all processes agree on the same step."""
    if not ddp:
        return stop_signal is not None
    flag = torch.tensor([stop_signal is not None], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group)
    return bool(flag.item())


def mean_loss(loss_sum):
    """The step's mean loss over all micro-batches and processes; a CPU-GPU sync point."""
    total = loss_sum.clone()
    if ddp:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item()


def nonfinite_loss_error(value, where):
    return (f"the {where} is {value} at iter {iter_num}; training stopped and the last checkpoint was kept. "
            "Usual fixes: a lower learning_rate, dtype=bfloat16 instead of float16, or grad_clip=1.0")


peak, peak_source = (peak_flops, "--peak_flops") if peak_flops else device_peak_flops(device, dtype)
if master_process:
    n_params, trained = raw_model.get_num_params(), sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    split = f" ({trained:,} trained, {n_params - trained:,} frozen)" if lora else ''
    print(f"run: device {device} x {ddp_world_size} process(es), dtype {dtype}, compile {'on' if compile else 'off'}, "
          f"{n_params / 1e6:.2f}M parameters{split}, "
          f"{tokens_per_iter:,} tokens per iteration, checkpoints in {os.path.abspath(out_dir)}; "
          f"mfu against {peak / 1e12:.3g} TFLOP/s ({peak_source})")
metrics = MetricsLog(os.path.join(out_dir, 'log.jsonl'), resume_from=resumed_at,
                     enabled=master_process and not eval_only)
wandb_run = WandbRun(wandb_log and master_process, wandb_project, wandb_run_name, config,
                     checkpoint.get('wandb_run_id') if checkpoint else None)
checkpoint = None  # free up memory
if master_process and not eval_only:  # every check passed: the earlier run's checkpoints make way (--start_over=True)
    commit_claim(out_dir, superseded)  # and a worker that torchrun restarts resumes this run's ckpt.pt

# training loop
X, Y = get_batch('train', train_key(iter_num, ddp_rank * micro_steps))  # fetch the very first batch
t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = None  # model FLOPs utilization, measured once the loop has settled
clipped_steps, steps_since_eval = torch.zeros((), device=device), 0  # how often grad_clip acted since the last eval
while True:
    # determine and set the learning rate for this iteration
    factor = lr_factor(iter_num)
    lr = learning_rate * factor
    for group in param_groups:  # every group's own peak (Muon's is muon_lr) on the same schedule
        group['lr'] = group['initial_lr'] * factor

    # evaluate the loss on train/val sets and write checkpoints
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at or eval_only:
        losses = estimate_loss()
        if not all(math.isfinite(v) for v in losses.values()):
            raise EveryRankError(nonfinite_loss_error(losses, 'evaluation loss'))
        scores = estimate_hellaswag() if hellaswag else {}
        clip_fraction = clipped_steps.item() / steps_since_eval if steps_since_eval and grad_clip else None
        clipped_steps.zero_()
        steps_since_eval = 0
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if scores:
                print(f"step {iter_num}: hellaswag acc_norm {scores['acc_norm']:.4f}, acc {scores['acc']:.4f} "
                      f"({len(hellaswag_set)} items)")
            metrics.log(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], lr=lr,
                        clip_fraction=clip_fraction, hellaswag_acc_norm=scores.get('acc_norm'),
                        hellaswag_acc=scores.get('acc'))
            wandb_run.log(iter_num, {'val/loss': losses['val'], 'train/eval_loss': losses['train'],
                                     'train/clip_fraction': clip_fraction, 'hellaswag/acc_norm': scores.get('acc_norm'),
                                     'hellaswag/acc': scores.get('acc')})
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        if iter_num > 0 and not eval_only:  # the same decisions on every process: losses are all-reduced
            if improved:
                save('best.pt', with_optimizer=False)
            if improved or always_save_checkpoint:
                if master_process:
                    print(f"saving checkpoint to {out_dir}")
                save('ckpt.pt')
                saved_at = iter_num
            if master_process:
                plot_losses(metrics.path, os.path.join(out_dir, 'loss.png'))
    if eval_only:
        break
    if iter_num >= max_iters or should_stop():
        if local_iter_num > 0 and not math.isfinite(lossf := mean_loss(loss_sum)):  # all processes agree
            raise EveryRankError(nonfinite_loss_error(lossf, 'training loss'))
        if local_iter_num > 0 and saved_at != iter_num:
            save('ckpt.pt')
            saved_at = iter_num
            if master_process:
                plot_losses(metrics.path, os.path.join(out_dir, 'loss.png'))
        writer.wait()  # a checkpoint still being written in the background
        if master_process and iter_num < max_iters:
            where = os.path.join(out_dir, 'ckpt' if checkpoint_format == 'sharded' else 'ckpt.pt')
            saved = (f"checkpoint saved in {where}. Resume with the same command plus "
                     "--init_from=resume") if saved_at == iter_num else "nothing was trained, so nothing was saved"
            print(f"stopped by {stop_signal or 'another process'} at iter {iter_num}; {saved}")
        break

    loss_sum = torch.zeros((), device=device)
    # forward backward update, with optional gradient accumulation to simulate larger batch size
    for micro_step in range(micro_steps):
        last_micro_step = micro_step == micro_steps - 1
        if fsdp:  # reduce-scatter the gradients after the last micro step only, holding them unsharded until then
            raw_model.set_requires_gradient_sync(last_micro_step)
        elif ddp:  # only sync gradients at the last micro step, instead of after every one
            train_model.require_backward_grad_sync = last_micro_step
        torch.manual_seed(dropout_seed(iter_num, ddp_rank * micro_steps + micro_step))
        with ctx:
            _, loss = train_model(X, Y)
            loss = loss / micro_steps  # scale the loss to account for gradient accumulation
        # immediately async prefetch next batch while model is doing the forward pass on the GPU
        next_step, next_micro_step = (iter_num + 1, 0) if last_micro_step else (iter_num, micro_step + 1)
        X, Y = get_batch('train', train_key(next_step, ddp_rank * micro_steps + next_micro_step))
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip != 0.0 or scaler.is_enabled():
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)  # the norm before
        grad_norm = grad_norm.full_tensor() if fsdp else grad_norm  # FSDP: a DTensor, from the shards
    # float16 gradients that overflowed: every optimizer skips the step, and the scaler lowers its scale
    skipped = scaler.is_enabled() and not torch.isfinite(grad_norm).item()
    if not skipped:
        for opt in optimizers:
            scaler.step(opt)
        clipped_steps += grad_clip != 0.0 and grad_norm > grad_clip
        steps_since_eval += 1
    scaler.update()
    if local_iter_num == 0 and master_process:  # what training holds, once all of it exists
        print(f"memory per process: {held_memory(raw_model, optimizers)}, peak {peak_memory(device)}")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)  # flush the gradients as soon as we can, no need for this memory anymore

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0:
        lossf = mean_loss(loss_sum)
        if not math.isfinite(lossf):
            raise EveryRankError(nonfinite_loss_error(lossf, 'training loss'))
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(tokens_per_iter / ddp_world_size, dt, peak)
            running_mfu = mfu if running_mfu is None else 0.9 * running_mfu + 0.1 * mfu
        if master_process:
            mfu_percent = None if running_mfu is None else running_mfu * 100
            mfu_shown = '' if mfu_percent is None else f", mfu {mfu_percent:.2f}%"
            overflow = f", float16 overflow: step skipped, loss scale now {scaler.get_scale():g}" if skipped else ''
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms{mfu_shown}{overflow}")
            norm = None if grad_norm is None or skipped else grad_norm.item()  # training health, beside the log line
            clipped = None if norm is None or grad_clip == 0.0 else norm > grad_clip
            metrics.log(iter=iter_num, loss=lossf, lr=lr, ms=dt * 1000, mfu=mfu_percent, grad_norm=norm,
                        clipped=clipped, skipped=skipped or None)
            wandb_run.log(iter_num, {'train/loss': lossf, 'lr': lr, 'mfu': mfu_percent, 'train/grad_norm': norm})
    iter_num += 1
    local_iter_num += 1

wandb_run.finish()
if ddp:
    # end together (the master may still be writing), then leave without the interpreter's teardown: destroying
    # gloo's process group there has aborted a finished worker (std::terminate) after everything was saved
    dist.barrier(group=control_group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
