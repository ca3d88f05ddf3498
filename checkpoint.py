"""
Checkpoints, run directories and prepared datasets, read and written in one place for the scripts.
Writes are atomic (temp file, fsync, rename); reads never execute pickled code; every problem with a file
is a UserError naming the file and what to do.
"""

import errno
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict

import numpy as np
import torch

from configurator import UserError
from model import GPT, GPTConfig, HUB_MODELS

try:
    import fcntl  # POSIX; on Windows out_dir is not locked
except ImportError:
    fcntl = None

FIXED_ON_RESUME = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'rope', 'qk_norm',
                   'optimizer')
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
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


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path, required=()):
    """A checkpoint dict loaded with weights_only=True (tensors and plain values only, no code runs),
    checked for the keys every checkpoint has (and the keys required), with the '_orig_mod.' prefix of compiled
    models removed."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py ...) or point --out_dir at "
                        "the directory that holds ckpt.pt")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it...: all the same to the user
        # (torch's own message suggests weights_only=False, which would run whatever code the file holds)
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt, holding more than tensors and "
                        f"plain values, or not written by train.py; {type(e).__name__})") from None
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


def new_model(model_args, source):
    """GPT(GPTConfig(**model_args)), or one clear line saying why these args from source give no model."""
    try:
        return GPT(GPTConfig(**model_args))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # unknown key, impossible value
        raise UserError(f"{source} {model_args} describe no model this model.py can build: {e}") from None


def fixed_settings(checkpoint):
    """The settings a resumed run cannot change, as the checkpoint has them: its model's shape and architecture
    and its optimizer. A checkpoint that names no architecture or optimizer (nanoGPT's) has GPT-2's and AdamW."""
    saved = {**asdict(GPTConfig()), 'optimizer': 'adamw', **checkpoint.get('config', {}), **checkpoint['model_args']}
    return {k: saved[k] for k in FIXED_ON_RESUME}


def model_from_checkpoint(checkpoint, dropout=None):
    model_args = dict(checkpoint['model_args'])
    if dropout is not None:
        model_args['dropout'] = dropout
    model = new_model(model_args, "the checkpoint's model_args")
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:  # its first line is a heading; the next ones say which weights
        details = '; '.join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"the checkpoint's weights do not fit its model_args: {details}") from None
    return model


def pretrained_model(name_or_path, dropout=None):
    """GPT-2 weights from the hub or a local Hugging Face directory, with one clear line on failure."""
    try:
        return GPT.from_pretrained(name_or_path, None if dropout is None else {'dropout': dropout})
    except ValueError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # damaged weight files: safetensors' and torch's errors of every kind
        raise UserError(f"could not load GPT-2 weights from '{name_or_path}' (damaged or incomplete files?): "
                        f"{type(e).__name__}: {first_line(e)}") from None


def check_vocabulary(model_meta, data_meta, dataset):
    """Refuse a dataset whose token ids mean other text to the model: another character set (meta.pkl), or BPE
    pieces where the model reads characters, or the reverse (a meta of None is GPT-2's BPE)."""
    if (model_meta or {}).get('stoi') == (data_meta or {}).get('stoi'):
        return
    reads, holds = (f"a {len(m['stoi'])}-character vocabulary (meta.pkl)" if m else "GPT-2's BPE tokens"
                    for m in (model_meta, data_meta))
    raise UserError(f"the model reads {reads} but dataset '{dataset}' holds {holds}; use a dataset prepared with "
                    "the model's own vocabulary, or train from scratch on it")


def check_room_for_checkpoint(out_dir, model):
    """Refuse to start when out_dir's disk cannot hold one checkpoint of model: its weights and AdamW's two
    moments, 12 bytes per parameter, written beside the old one."""
    needed = 12 * sum(p.numel() for p in model.parameters())
    if free_bytes(out_dir) < needed:
        raise UserError(f"the disk holding {out_dir} has {free_bytes(out_dir) / 2**20:.0f} MiB free, and a "
                        f"checkpoint of this model needs about {needed / 2**20:.0f} MiB; free some space or choose "
                        "another --out_dir")


def is_pretrained_name(init_from):
    return init_from in HUB_MODELS or os.path.isdir(init_from)


def load_model(init_from, out_dir, checkpoint_name=''):
    """The model to sample from or evaluate, as sample.py and eval.py load it: with init_from='resume' from
    out_dir's best.pt if there is one, else its ckpt.pt (or checkpoint_name), else GPT-2 weights from the hub or
    a local Hugging Face directory. Returns (model in eval mode, its char vocabulary or None, what was loaded)."""
    if init_from == 'resume':
        path = os.path.join(out_dir, checkpoint_name or ('best.pt' if os.path.exists(os.path.join(out_dir, 'best.pt'))
                                                         else 'ckpt.pt'))
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        dataset = ckpt.get('config', {}).get('dataset')
        meta = ckpt.get('meta') or (load_meta(dataset_dir(dataset)) if dataset else None)  # nanoGPT's lack 'meta'
        if meta is None and model.config.vocab_size < 50257:
            raise UserError(f"the checkpoint's model has a {model.config.vocab_size}-token vocabulary but its "
                            f"dataset's meta.pkl ({dataset_dir(dataset) if dataset else 'no dataset recorded'}) is "
                            "missing; prepare the dataset again")
        described = (f"{path} (iter {ckpt.get('iter_num', '?')}, "
                     f"best val loss {float(ckpt.get('best_val_loss', float('nan'))):.4f})")
    elif is_pretrained_name(init_from):
        model, meta, described = pretrained_model(init_from), None, init_from
    else:
        raise UserError(f"unknown init_from '{init_from}': use resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                        "or a local directory holding Hugging Face GPT-2 weights")
    return model.eval(), meta, described


class Tokenizer:
    """A model's vocabulary: its dataset's characters (meta.pkl), or else GPT-2's BPE (tiktoken)."""

    def __init__(self, meta):
        self.meta = meta
        if meta is not None:
            self.eot = None
            return
        import tiktoken
        try:
            self.bpe = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError(f"could not load tiktoken's GPT-2 encoding ({type(e).__name__}); it is downloaded on "
                            "first use, or point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cache") from None
        self.eot = self.bpe.eot_token  # a BPE model marks the end of a document with <|endoftext|>

    def encode(self, text, what='the text'):
        if self.meta is None:
            return self.bpe.encode(text, allowed_special={"<|endoftext|>"})
        unknown = sorted(set(text) - set(self.meta['stoi']))
        if unknown:
            raise UserError(f"{what} contains characters the model has never seen: {''.join(unknown)!r}")
        return [self.meta['stoi'][c] for c in text]

    def decode(self, ids):
        return self.bpe.decode(ids) if self.meta is None else ''.join(self.meta['itos'][i] for i in ids)

    def byte_count(self, ids):
        """How many bytes of UTF-8 text the tokens ids stand for."""
        if self.meta is None:
            return sum(len(self.bpe.decode_single_token_bytes(i)) for i in ids)
        return sum(len(self.meta['itos'][i].encode('utf-8')) for i in ids)


# ----------------------------------------------------------------------------- the run directory

def claim_out_dir(out_dir, resuming, start_over):
    """Lock out_dir for this run (see lock_out_dir) and make sure a new run never replaces an earlier run's
    checkpoints by accident: only a resumed run, or one told to start over, may go on. Returns the lock and the
    paths of the checkpoints that starting over will delete (once every other check has passed)."""
    lock = lock_out_dir(out_dir)
    earlier = [name for name in CHECKPOINT_FILES if os.path.exists(os.path.join(out_dir, name))]
    if resuming or not earlier:
        return lock, []
    if not start_over:
        raise UserError(f"{out_dir} holds {' and '.join(earlier)} of an earlier run; continue it with "
                        "--init_from=resume, use another --out_dir, or delete it and start over with "
                        "--start_over=True")
    return lock, [os.path.join(out_dir, name) for name in earlier]


def lock_out_dir(out_dir):
    """Create out_dir if needed and hold an exclusive lock on out_dir/.lock for the life of this process, so
    that a second run on the same out_dir stops at once. The OS releases the lock when the process dies,
    however it dies. Returns the open lock file, which must be kept."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    path = os.path.join(out_dir, '.lock')
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(path, 'a+')
    except OSError as e:
        raise UserError(f"cannot write in out_dir {out_dir} ({e.strerror}); check its permissions or choose "
                        "another --out_dir") from None
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            pid = lock.read().strip() or '?'
            lock.close()
            raise UserError(f"another run (pid {pid}) is using out_dir {out_dir}; wait for it to finish, stop it, "
                            "or choose another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:  # the lock file may be old: make sure a new file can be created here now
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix='.probe'):
            pass
    except OSError as e:
        raise UserError(f"cannot write in out_dir {out_dir} ({e.strerror}); check its permissions or choose "
                        "another --out_dir") from None
    return lock


# ----------------------------------------------------------------------------- prepared datasets

def dataset_dir(dataset):
    """Where a dataset's train.bin, val.bin and meta.pkl live: data/<dataset> beside the scripts, or the
    dataset setting itself when it is a path (absolute, or containing a slash)."""
    if os.path.isabs(dataset) or os.sep in dataset or '/' in dataset:
        return dataset
    return os.path.join(REPO_DIR, 'data', dataset)


def read_manifest(data_dir):
    """The manifest.json that data/*/prepare.py writes last, after checking that the files it lists are the
    ones it wrote; None for a dataset prepared without one (by nanoGPT, say): nothing to check it against."""
    path = os.path.join(data_dir, 'manifest.json')
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        complete, files = manifest['complete'], dict(manifest.get('files', {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({first_line(e)}); run the dataset's prepare.py again") from None
    if not complete:
        raise UserError(f"the dataset in {data_dir} is incomplete: its prepare script stopped before it finished "
                        "writing (its manifest.json says so); run the prepare script again")
    for name, size in files.items():
        file = os.path.join(data_dir, name)
        actual = os.path.getsize(file) if os.path.exists(file) else None
        if actual != size:
            found = f"has {actual} bytes" if actual is not None else "is missing"
            raise UserError(f"{file} {found}, but the prepare script wrote {size}: the dataset's files come from "
                            "different runs or were changed since; run the prepare script again")
    return manifest


def load_tokens(data_dir, split):
    """The uint16 token ids of data_dir/<split>.bin as a read-only memmap (it never needs to fit in memory)."""
    path = os.path.join(data_dir, f'{split}.bin')
    size = os.path.getsize(path)
    if size == 0 or size % 2:
        what = 'is empty' if size == 0 else f'has an odd number of bytes ({size})'
        raise UserError(f"{path} {what}, so it holds no uint16 token ids; run the dataset's prepare.py again")
    return np.memmap(path, dtype=np.uint16, mode='r')


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: nanoGPT's meta.pkl needs nothing more, and a
    pickle that names any class or function (how pickles run code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl may only hold plain data")


def load_meta(data_dir):
    """The char-level vocabulary (vocab_size, stoi, itos) of a dataset, or None if it has no meta.pkl."""
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(path):
        return None
    try:
        with open(path, 'rb') as f:
            meta = PlainDataUnpickler(f).load()
    except Exception as e:
        raise UserError(f"{path} is not a valid meta.pkl ({e}); re-run the dataset's prepare.py") from None
    if not isinstance(meta, dict) or not {'vocab_size', 'stoi', 'itos'} <= set(meta):
        raise UserError(f"{path} lacks vocab_size, stoi and itos; re-run the dataset's prepare.py")
    return meta
