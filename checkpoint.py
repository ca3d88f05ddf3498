"""
Checkpoints, the models loaded from them and run directories, read and written in one place for the scripts.
Writes are atomic (temp file, fsync, rename); reads never execute pickled code; every problem with a file
is a UserError naming the file and what to do.
"""

import datetime
import errno
import functools
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict

import filelock
import torch

import lora
from configurator import EveryRankError, UserError, check_settings
from dataset import dataset_dir, first_line, load_meta
from model import GPT, GPTConfig, HUB_MODELS

# DCP in one process (a reader, or a run without torchrun) says so at every call: that is meant here
warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')
FIXED_ON_RESUME = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'rope', 'qk_norm',
                   'optimizer', 'lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets')
# the settings that belong to the machine a run is on, not to the run: a resumed run always takes today's
MACHINE_SETTINGS = {'out_dir', 'init_from', 'start_over', 'device', 'dtype', 'compile', 'backend', 'fsdp',
                    'activation_checkpointing', 'peak_flops', 'lora_base_dtype', 'async_checkpoint'}
CHECKPOINT_FILES = ('ckpt.pt', 'best.pt')


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(state, path):
    """Write state to path so that path always holds either the old or the new complete file:
    write a temp file beside it, flush it to disk, then rename it over path (atomic on POSIX and Windows)."""
    directory = os.path.dirname(path) or '.'
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"could not write checkpoint {path}: {directory} is a file, not a directory; "
                        "choose another --out_dir")
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")  # one name: a kill leaves no litter
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if hasattr(os, 'O_DIRECTORY'):  # make the rename itself durable
            dir_fd = os.open(directory, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except Exception as e:  # OSError, or torch's RuntimeError from its zip writer: all the same to the user
        # torch's zip writer does not say ENOSPC; the space left (the partial temp file still there) does
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or free_bytes(directory) < 2**20
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        else:
            reason = 'the disk is full' if full else first_line(e)
        fix = 'free some disk space' if full else 'check that --out_dir is writable'
        then = 'resume' if os.path.exists(os.path.join(directory, 'ckpt.pt')) else 'run again'
        raise UserError(f"could not write checkpoint {path}: {reason}; the previous checkpoint, if any, is "
                        f"intact. To go on, {fix} or choose another --out_dir, then {then}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def free_bytes(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return float('inf')  # unknown: assume room


def load_checkpoint(path, required=()):
    """A checkpoint dict loaded with weights_only=True (tensors and plain values only, no code runs),
    checked for the keys every checkpoint has (and the keys required), with the '_orig_mod.' prefix of compiled
    models removed. path may also stand for its sharded form (out_dir/ckpt/ for out_dir/ckpt.pt), which is read
    if it is the newer."""
    sharded = sharded_checkpoint(path)
    if sharded and not (os.path.isfile(path) and os.path.getmtime(path) > os.path.getmtime(sharded)):
        return load_sharded(sharded, required)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py ...) or point --out_dir at "
                        "the directory that holds ckpt.pt")
    checkpoint = read_file(path)
    if (not isinstance(checkpoint, dict) or not {'model', 'model_args'} <= set(checkpoint)
            or not isinstance(checkpoint['model'], dict)):
        raise UserError(f"{path} is not a checkpoint written by train.py or nanoGPT (it lacks 'model' and "
                        "'model_args')")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, so training cannot resume from it (best.pt holds "
                        "the weights only); resume from the ckpt.pt that train.py wrote")
    # torch.compile wraps the model and prefixes its keys, and nanoGPT on old torch saved a causal mask
    # buffer as attn.bias: neither is a weight of ours
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()
                           if not k.endswith('.attn.bias')}
    return checkpoint


def read_file(path):
    """torch.load(path) with weights_only=True: tensors and plain values, no code runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it...: all the same to the user
        # (torch's own message suggests weights_only=False, which would run whatever code the file holds)
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt, holding more than tensors and "
                        f"plain values, or not written by train.py; {type(e).__name__})") from None


def new_model(model_args, source):
    """GPT(GPTConfig(**model_args)), or one clear line saying why these args from source give no model."""
    try:
        return GPT(GPTConfig(**model_args))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # unknown key, impossible value
        raise UserError(f"{source} {model_args} describe no model this model.py can build: {e}") from None


def fixed_settings(checkpoint):
    """The settings a resumed run cannot change, as the checkpoint has them: its model's shape and architecture
    and its optimizer. A checkpoint that names no architecture or optimizer (nanoGPT's) has GPT-2's and AdamW."""
    saved = {**asdict(GPTConfig()), 'optimizer': 'adamw', 'lora_rank': 0, **checkpoint.get('config', {}),
             **checkpoint['model_args']}
    return {k: saved[k] for k in FIXED_ON_RESUME if k in saved}


def apply_saved_settings(checkpoint, namespace, keys, user_keys):
    """A resumed run continues with its checkpoint's settings: into namespace (a script's globals) go the saved
    values of keys, except those given now (a larger max_iters, say) and the machine's. The result must fit the
    rules, and a setting given now may not contradict the model or optimizer saved."""
    for k, v in checkpoint.get('config', {}).items():
        if k in keys and k not in user_keys and k not in MACHINE_SETTINGS and type(v) is type(namespace[k]):
            namespace[k] = v
    check_settings(namespace)  # e.g. a min_lr given now above the saved learning_rate
    for k, saved in fixed_settings(checkpoint).items():
        if k in user_keys and namespace[k] != saved:
            raise UserError(f"{k}={namespace[k]} contradicts the checkpoint's {k}={saved}; a resumed run keeps "
                            f"its model and optimizer, so drop --{k}")


def restore_training_state(checkpoint, model, optimizers, scaler, fsdp):
    """Load a resumed run's optimizer (and float16 loss scaler) state into this run's, whose settings (weight_decay,
    betas...) stay this run's. The checkpoint holds the full state (FSDP shards it) of any of our runs; or nanoGPT's,
    keyed by index, not by name."""
    import torch.distributed.checkpoint as dcp  # (imported where used: with DTensor it costs every script 1 s)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_optimizer_state_dict,
                                                         set_state_dict)
    groups = [group for opt in optimizers for group in opt.param_groups]
    settings_now = [{k: v for k, v in group.items() if k != 'params'} for group in groups]
    if checkpoint.get('sharded'):  # each process reads what its shards need; DCP reshards for any process count
        model_state, optimizer_state = get_state_dict(model, optimizers)
        dcp.load({'model': model_state, 'optimizer': optimizer_state}, checkpoint_id=checkpoint['sharded'],
                 no_dist=not torch.distributed.is_initialized())
        set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict=optimizer_state)
    elif fsdp and any(isinstance(k, int) for k in checkpoint['optimizer']['state']):
        raise UserError("this checkpoint's optimizer state is keyed by index (nanoGPT's format), which FSDP cannot "
                        "shard; resume it once without --fsdp (one process or DDP), then under FSDP")
    else:
        set_optimizer_state_dict(model, optimizers, checkpoint['optimizer'],
                                 options=StateDictOptions(full_state_dict=fsdp))
    for group, settings in zip([group for opt in optimizers for group in opt.param_groups], settings_now):  # loaded
        group.update(settings)
    if checkpoint.get('scaler'):  # float32 and bfloat16 runs save none: a float16 resume starts a new scale
        scaler.load_state_dict(checkpoint['scaler'])


def check_model_fits_data(model, block_size, data_vocab_size, dataset):
    """A context no longer than the model's, and a vocabulary the model's embedding holds."""
    if block_size > model.config.block_size:
        raise UserError(f"block_size={block_size} is larger than the model's {model.config.block_size}")
    if data_vocab_size and data_vocab_size > model.config.vocab_size:
        raise UserError(f"dataset '{dataset}' has {data_vocab_size} tokens in its vocabulary, more than the model's "
                        f"{model.config.vocab_size}; train from scratch on it instead")


def model_from_checkpoint(checkpoint, dropout=None, merge=True):
    """The checkpoint's model; of a LoRA run's ckpt.pt, its base with the adapters: merged into the plain GPT
    (what readers want) or, with merge=False, kept apart (to train on). A sharded checkpoint read to resume gives
    the model without its weights, which restore_training_state loads into its shards."""
    if checkpoint.get('lora') and 'adapters' not in checkpoint:  # ckpt.pt: the adapters alone (best.pt is merged)
        return lora_model(checkpoint, dropout, merge)
    model_args = dict(checkpoint['model_args'])
    if dropout is not None:
        model_args['dropout'] = dropout
    model = new_model(model_args, "the checkpoint's model_args")
    if 'model' not in checkpoint:
        return model
    try:
        with warnings.catch_warnings():  # on the meta device (FSDP, rank 0 hands its weights out): checked only
            warnings.filterwarnings('ignore', message='.*copying from a non-meta parameter')
            model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:  # its first line is a heading; the next ones say which weights
        details = '; '.join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"the checkpoint's weights do not fit its model_args: {details}") from None
    return model


def lora_model(checkpoint, dropout, merge):
    """A LoRA checkpoint's model: its base with the checkpoint's adapters."""
    model = lora_base(checkpoint, dropout)
    adapted = lora.adapted(model, checkpoint['lora'])
    try:
        lora.load_adapters(model, checkpoint['model'])
    except (ValueError, RuntimeError) as e:
        raise UserError(f"the checkpoint's adapters do not fit its base {checkpoint['lora']['base']}: "
                        f"{first_line(e)}") from None
    return adapted.merge_and_unload() if merge else model


def lora_base(checkpoint, dropout=None):
    """The base model of a LoRA checkpoint, loaded again from where the run found it and checked to be the same
    weights (the adapters fit no other)."""
    base = checkpoint['lora']['base']
    if not (base in HUB_MODELS or os.path.exists(base)):
        raise UserError(f"the base model of this LoRA checkpoint, {base}, is missing (the checkpoint holds only the "
                        "adapters); put it back where it was, or use the run's best.pt, which holds merged weights")
    model, _ = base_model(base, dropout)
    if checkpoint['model_args']['block_size'] < model.config.block_size:
        model.crop_block_size(checkpoint['model_args']['block_size'])
    if lora.fingerprint(model) != checkpoint['lora']['fingerprint']:
        raise UserError(f"the base model {base} has changed since this LoRA run started from it (its weights "
                        "differ), and the adapters fit only that base; restore it, or use the run's best.pt")
    return model


def base_model(init_from, dropout=None, from_rank0=False):
    """The weights a run starts from, and their character vocabulary (None: GPT-2's BPE): a GPT-2 name, a
    Hugging Face directory, or a checkpoint file of ours (e.g. another run's best.pt). from_rank0 (FSDP): only
    rank 0 loads them; the other processes get the same model on the meta device, for rank 0 to hand out."""
    if from_rank0:
        loaded, shape, failure = None, [None], None
        # on gloo, with an hour to wait: rank 0 may be downloading GPT-2's weights (NCCL would give up in 10 min)
        group = torch.distributed.new_group(backend='gloo', timeout=datetime.timedelta(hours=1))
        if torch.distributed.get_rank() == 0:
            try:
                loaded = base_model(init_from, dropout)
                shape = [(asdict(loaded[0].config), loaded[1])]
            except Exception as e:  # every process stops with it; rank 0 says it (and keeps a bug's traceback)
                failure = e
                shape = [EveryRankError(str(e) if isinstance(e, UserError) else f"rank 0 could not load {init_from}")]
        torch.distributed.broadcast_object_list(shape, src=0, group=group)
        torch.distributed.destroy_process_group(group)
        if isinstance(shape[0], UserError):
            raise shape[0] if failure is None or isinstance(failure, UserError) else failure
        if loaded:
            return loaded
        with torch.device('meta'):
            return new_model(shape[0][0], init_from), shape[0][1]
    if os.path.isfile(init_from):
        ckpt = load_checkpoint(init_from)
        return model_from_checkpoint(ckpt, dropout), checkpoint_meta(ckpt)
    return pretrained_model(init_from, dropout), None


def checkpoint_meta(ckpt):
    """A checkpoint's character vocabulary; nanoGPT's record none, and its dataset's meta.pkl has it."""
    dataset = ckpt.get('config', {}).get('dataset')
    meta = ckpt.get('meta') or (load_meta(dataset_dir(dataset)) if dataset else None)
    if meta is None and ckpt['model_args'].get('vocab_size', 50304) < 50257:
        raise UserError(f"the checkpoint's model has a {ckpt['model_args']['vocab_size']}-token vocabulary but its "
                        f"dataset's meta.pkl ({dataset_dir(dataset) if dataset else 'no dataset recorded'}) is "
                        "missing; prepare the dataset again")
    return meta


def pretrained_model(name_or_path, dropout=None):
    """GPT-2 weights from the hub or a local Hugging Face directory, with one clear line on failure."""
    try:
        return GPT.from_pretrained(name_or_path, None if dropout is None else {'dropout': dropout})
    except ValueError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # damaged weight files: safetensors' and torch's errors of every kind
        raise UserError(f"could not load GPT-2 weights from '{name_or_path}' (damaged or incomplete files?): "
                        f"{type(e).__name__}: {first_line(e)}") from None


def check_room_for_checkpoint(out_dir, model):
    """Refuse to start when out_dir's disk cannot hold one checkpoint of model: its weights and AdamW's two
    moments, 12 bytes per parameter, written beside the old one (a LoRA run: its adapters' and a merged best.pt)."""
    needed = sum((12 if p.requires_grad else 4) * p.numel() for p in model.parameters())
    if free_bytes(out_dir) < needed:
        raise UserError(f"the disk holding {out_dir} has {free_bytes(out_dir) / 2**20:.0f} MiB free, and a "
                        f"checkpoint of this model needs about {needed / 2**20:.0f} MiB; free some space or choose "
                        "another --out_dir")


def is_pretrained_name(init_from):
    return init_from in HUB_MODELS or os.path.exists(init_from)


def check_init_from(init_from, starts):
    """init_from must be one of a script's starts ('scratch', 'resume'), a GPT-2 name, a Hugging Face directory or
    a checkpoint file."""
    if init_from not in starts and not is_pretrained_name(init_from):
        raise UserError(f"unknown init_from '{init_from}': use {', '.join(starts)}, gpt2, gpt2-medium, gpt2-large, "
                        "gpt2-xl, a local directory holding Hugging Face GPT-2 weights or a checkpoint file (.pt)")


def load_model(init_from, out_dir, checkpoint_name=''):
    """The model to sample from or evaluate, as sample.py and eval.py load it: with init_from='resume' from
    out_dir's best.pt if there is one, else its ckpt.pt (or checkpoint_name), else GPT-2 weights from the hub or
    a local Hugging Face directory, or a checkpoint file. Returns (model in eval mode, its char vocabulary or None,
    what was loaded)."""
    check_init_from(init_from, ('resume',))
    if init_from == 'resume':
        path = os.path.join(out_dir, checkpoint_name or newest_name(out_dir))
        ckpt = load_checkpoint(path)
        model, meta = model_from_checkpoint(ckpt), checkpoint_meta(ckpt)
        described = (f"{ckpt.get('sharded', path)} (iter {ckpt.get('iter_num', '?')}, "
                     f"best val loss {float(ckpt.get('best_val_loss', float('nan'))):.4f})")
    else:
        (model, meta), described = base_model(init_from), init_from
    return model.eval(), meta, described


def newest_name(out_dir):
    """best.pt if out_dir has one (a file or its sharded folder), else ckpt.pt: what readers load by default."""
    best = os.path.join(out_dir, 'best.pt')
    return 'best.pt' if os.path.isfile(best) or sharded_checkpoint(best) else 'ckpt.pt'


# ----------------------------------------------------------------------------- writing a run's checkpoints

TRAIN_STATE = 'train_state.pt'  # in a sharded checkpoint, beside DCP's shards and .metadata: all but the tensors


def sharded_dir(path):
    """The folder of path's sharded form: out_dir/ckpt/ for out_dir/ckpt.pt."""
    return path.removesuffix('.pt')


def beside(path, suffix):
    return os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.{suffix}')


def sharded_checkpoint(path):
    """The complete sharded checkpoint standing for path, or None: its folder, or else the previous one, which a
    save killed between its two renames leaves aside. Complete: DCP wrote .metadata, last, and ours is there."""
    for directory in (sharded_dir(path), beside(sharded_dir(path), 'old')):
        if all(os.path.isfile(os.path.join(directory, name)) for name in ('.metadata', TRAIN_STATE)):
            return directory
    return None


def load_sharded(directory, required):
    """A sharded checkpoint as load_checkpoint gives it: everything but the optimizer state, which stays in the
    shards for restore_training_state (as do the weights when required has 'optimizer': a resume)."""
    checkpoint = read_file(os.path.join(directory, TRAIN_STATE))
    checkpoint['sharded'] = directory
    missing = [key for key in required if key not in checkpoint and key != 'optimizer']
    if missing or ('optimizer' in required and not checkpoint.get('has_optimizer')):
        raise UserError(f"{directory} lacks {', '.join(missing) or 'the optimizer state'}, so training cannot resume "
                        "from it (best/ holds the weights only); resume from the ckpt/ that train.py wrote")
    if 'optimizer' not in required:  # a reader: the whole model, in this one process
        import torch.distributed.checkpoint as dcp
        state = new_model(checkpoint['model_args'], f"{directory}'s model_args").state_dict()
        dcp.load({'model': state}, checkpoint_id=directory, no_dist=True)  # (this process alone reads it all)
        checkpoint['model'] = state
    return checkpoint


def to_full_checkpoint(directory, path):
    """Write the sharded checkpoint in directory as one ckpt.pt-style file at path (torch's dcp_to_torch_save for the
    shards), e.g. python -c "import checkpoint; checkpoint.to_full_checkpoint('out/ckpt', 'out/ckpt.pt')" """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    if sharded_checkpoint(directory + '.pt') != directory:
        raise UserError(f"{directory} is not a complete sharded checkpoint (.metadata and {TRAIN_STATE})")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        dcp_to_torch_save(directory, os.path.join(tmp, 'shards.pt'))
        tensors = torch.load(os.path.join(tmp, 'shards.pt'), map_location='cpu', weights_only=True)
    state = read_file(os.path.join(directory, TRAIN_STATE))
    state.pop('has_optimizer', None)
    save_checkpoint({**state, **tensors}, path)


class CheckpointWriter:
    """How a run writes its checkpoints: 'full', one file gathered into the master's memory, or 'sharded', a
    folder into which every process writes its own shards with DCP (torch.distributed.checkpoint), optionally in
    the background while training goes on. Either is written beside its place, then renamed into it: a kill or a
    full disk mid-save leaves the previous checkpoint whole. Every process calls save()."""

    def __init__(self, model, optimizers, scaler, lora, sharded, background, master, fsdp):
        self.model, self.optimizers, self.scaler, self.lora = model, optimizers, scaler, lora
        self.sharded, self.background, self.master, self.fsdp = sharded, background, master, fsdp
        # the background writes' collectives get a group of their own: training's go on meanwhile
        self.group = torch.distributed.new_group(backend='gloo') if background and torch.distributed.is_initialized() \
            else None
        self.pending = None  # a background save: (its future, its folder, the folder it becomes, the full path)

    def save(self, path, state, with_optimizer=True):
        """Write path (out_dir/ckpt.pt or best.pt) from state (all but the tensors) and the model's and
        optimizers' (with_optimizer) state."""
        if self.sharded:
            return self.save_sharded(path, state, with_optimizer)
        if not (self.fsdp or self.master):
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = lora.adapter_weights(self.model) if self.lora else get_model_state_dict(self.model, options=full)
        state = dict(state, model=weights)
        if self.lora:  # ckpt.pt holds the adapters alone; best.pt the merged weights too, a plain GPT to every reader
            state.update(lora=self.lora, **({} if with_optimizer else {'adapters': weights,
                                                                      'model': lora.merged_weights(self.model)}))
        if with_optimizer:
            state.update(optimizer=get_optimizer_state_dict(self.model, self.optimizers, options=full),
                         scaler=self.scaler.state_dict())
        if self.master:
            save_checkpoint(state, path)
            shutil.rmtree(sharded_dir(path), ignore_errors=True)  # an earlier save of this run in the other format

    def save_sharded(self, path, state, with_optimizer):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        self.wait()  # one save in flight at a time
        tensors = {'model': get_model_state_dict(self.model)}
        if with_optimizer:
            tensors['optimizer'] = get_optimizer_state_dict(self.model, self.optimizers)
            state = dict(state, scaler=self.scaler.state_dict(), has_optimizer=True)
        final = sharded_dir(path)
        folder = beside(final, 'tmp')
        alone = not torch.distributed.is_initialized()  # one process: DCP without collectives
        if self.master:  # (before any process writes: DCP's first step is a collective)
            shutil.rmtree(folder, ignore_errors=True)
            save_checkpoint(state, os.path.join(folder, TRAIN_STATE))
        try:
            if self.background:  # the shards are copied to host memory now, and written by a thread
                future = dcp.async_save(tensors, checkpoint_id=folder, process_group=self.group, no_dist=alone)
                self.pending = (future, folder, final, path)
                return
            dcp.save(tensors, checkpoint_id=folder, no_dist=alone)
        except (Exception, CheckpointException) as e:
            raise write_error(final, e) from None
        self.publish(folder, final, path)

    def wait(self):
        """Finish the save in flight, if any, and put it in place."""
        if self.pending is None:
            return
        from torch.distributed.checkpoint.api import CheckpointException
        future, folder, final, path = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            raise write_error(final, e) from None
        self.publish(folder, final, path)

    def publish(self, folder, final, path):
        if not self.master:
            return
        old = beside(final, 'old')
        if os.path.isdir(old) and not os.path.exists(final):  # the previous checkpoint, aside since a kill
            os.rename(old, final)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(folder, final)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isfile(path):
            os.remove(path)  # an earlier save of this run in the other format


def write_error(final, e):
    """The one line for a sharded save that failed on some process (DCP gathers what each one met)."""
    if hasattr(e, 'failures'):  # a CheckpointException: {rank: (its exception, its traceback)}
        e = next(iter(e.failures.values()), (e,))[0]
    full = free_bytes(os.path.dirname(final) or '.') < 2**20 or getattr(e, 'errno', None) == errno.ENOSPC
    reason = 'the disk is full' if full else getattr(e, 'strerror', None) or first_line(e)
    return EveryRankError(f"could not write checkpoint {final}: {reason}; the previous checkpoint, if any, is intact. "
                          f"To go on, {'free some disk space' if full else 'check that --out_dir is writable'} or "
                          "choose another --out_dir, then resume")


# ----------------------------------------------------------------------------- the run directory

def claim_out_dir(out_dir, resuming, start_over):
    """Lock out_dir for this run (see lock_out_dir) and make sure a new run never replaces an earlier run's
    checkpoints by accident: only a resumed run, or one told to start over, may go on. Returns the lock and the
    paths of the checkpoints that starting over will delete (once every other check has passed)."""
    lock = lock_out_dir(out_dir)
    earlier = [path for name in CHECKPOINT_FILES for path in (os.path.join(out_dir, name),
                                                              sharded_dir(os.path.join(out_dir, name)))
               if os.path.exists(path)]  # ckpt.pt and best.pt, or their sharded folders ckpt/ and best/
    if resuming or not earlier or claimed_in_this_launch(out_dir):  # (a restart before ckpt.pt: best.pt is ours)
        return lock, []
    if not start_over:
        raise UserError(f"{out_dir} holds {' and '.join(map(os.path.basename, earlier))} of an earlier run; "
                        "continue it with --init_from=resume, use another --out_dir, or delete it and start over with "
                        "--start_over=True")
    return lock, earlier


class OutDirLock(filelock.FileLock):
    """An exclusive OS file lock (flock on POSIX, LockFileEx on Windows); close() lets it go."""

    def close(self):
        self.release()


def lock_out_dir(out_dir):
    """Create out_dir if needed and hold an exclusive lock on out_dir/.lock for the life of this process, so
    that a second run on the same out_dir stops at once, naming this one's pid (from out_dir/.lock.pid). The OS
    releases the lock when the process dies, however it dies. Returns the lock, which must be kept."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    lock = OutDirLock(os.path.join(out_dir, '.lock'), timeout=0)
    pid_path = os.path.join(out_dir, '.lock.pid')  # not in .lock itself: Windows cannot read a locked file
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock.acquire()
        with open(pid_path, 'w') as f:
            f.write(f"{os.getpid()}\n")
        # the lock files may be old: make sure a new file can be created here now
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix='.probe'):
            pass
    except filelock.Timeout:  # before OSError, of which it is a kind
        raise UserError(f"another run (pid {holder_pid(pid_path)}) is using out_dir {out_dir}; wait for it to "
                        "finish, stop it, or choose another --out_dir") from None
    except OSError as e:
        raise UserError(f"cannot write in out_dir {out_dir} ({e.strerror}); check its permissions or choose "
                        "another --out_dir") from None
    return lock


def holder_pid(pid_path):
    try:
        with open(pid_path) as f:
            return f.read().strip() or '?'
    except OSError:  # the holder has not written it yet
        return '?'


# ----------------------------------------------------------------------------- restarts under torchrun

@functools.cache
def launch_store():
    """The store of this torchrun launch, which its agent keeps across restarts (--max-restarts), or None (no torchrun,
    or one with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, whose store lives in rank 0 and ends with it)."""
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return None
    from torch.distributed import TCPStore
    from torch.distributed.constants import default_pg_timeout
    return TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                    timeout=default_pg_timeout)


def claimed_in_this_launch(out_dir):
    """True in a worker that torchrun restarted after an earlier attempt of the same launch started training in out_dir
    (see commit_claim): out_dir's checkpoints are that run's own. A new launch, or a restart after a refused start, has
    no such claim."""
    store = launch_store()
    return store is not None and store.check([f'nanogpt/claimed/{out_dir}'])


def resolve_init_from(init_from, out_dir):
    """init_from as the run starts: 'auto' is 'resume' when out_dir holds ckpt.pt, else 'scratch' (for job scripts
    that re-submit one command); and a worker restarted by torchrun resumes its own run from out_dir's ckpt.pt,
    whatever init_from says."""
    check_init_from(init_from, ('scratch', 'resume', 'auto'))
    path = os.path.join(out_dir, 'ckpt.pt')
    has_checkpoint = os.path.isfile(path) or sharded_checkpoint(path) is not None
    if init_from == 'auto':
        return 'resume' if has_checkpoint else 'scratch'
    return 'resume' if has_checkpoint and claimed_in_this_launch(out_dir) else init_from


def commit_claim(out_dir, superseded):
    """Every check has passed: delete the earlier run's checkpoints (--start_over=True), then note in the launch's
    store that this run trains in out_dir, so that the workers torchrun restarts resume from its ckpt.pt."""
    for path in superseded:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if launch_store() is not None:
        launch_store().set(f'nanogpt/claimed/{out_dir}', str(os.getpid()))


def init_process_group(backend):
    """dist.init_process_group as torchrun's env:// does it, but on this attempt's keys only: the launch's store keeps
    the keys of earlier attempts, and a restarted worker that read a dead one's address failed with 'Gloo
    connectFullMesh failed ... Connection refused' (NCCL alike; pytorch/pytorch#135712)."""
    import torch.distributed as dist
    if launch_store() is None:
        return dist.init_process_group(backend=backend)
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", launch_store())
    dist.init_process_group(backend=backend, store=store, rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']))
