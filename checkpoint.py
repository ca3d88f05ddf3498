"""
Checkpoints and dataset metadata, read and written in one place for train.py, sample.py, bench.py and
export_hf.py. Writes are atomic (temp file, fsync, rename); reads never execute pickled code.
"""

import errno
import os
import pickle

import torch

from configurator import die
from model import GPT, GPTConfig, HUB_MODELS

MODEL_SHAPE_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size')
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def dataset_dir(dataset):
    """Where a dataset's train.bin, val.bin and meta.pkl live: data/<dataset> beside the scripts, or the
    dataset setting itself when it is a path (absolute, or containing a slash)."""
    if os.path.isabs(dataset) or os.sep in dataset or '/' in dataset:
        return dataset
    return os.path.join(REPO_DIR, 'data', dataset)


def save_checkpoint(state, path):
    """Write state to path so that path always holds either the old or the new complete file:
    write a temp file beside it, flush it to disk, then rename it over path (atomic on POSIX and Windows)."""
    directory = os.path.dirname(path) or '.'
    if os.path.exists(directory) and not os.path.isdir(directory):
        die(f"could not write checkpoint {path}: {directory} is a file, not a directory; choose another --out_dir")
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
    except OSError as e:
        fix = 'free some disk space' if e.errno == errno.ENOSPC else 'check the permissions of --out_dir'
        die(f"could not write checkpoint {path}: {e.strerror or e}; the previous checkpoint, if any, is intact. "
            f"To go on, {fix} or choose another --out_dir, then resume")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """A checkpoint dict loaded with weights_only=True (tensors and plain values only, no code runs),
    checked for the keys every checkpoint has, with the '_orig_mod.' prefix of compiled models removed."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train one first (python train.py ...) or point --out_dir at the "
            "directory that holds ckpt.pt")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it...: all the same to the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        die(f"{path} is not a readable checkpoint (truncated, corrupt, or not written by train.py): {first_line}")
    if (not isinstance(checkpoint, dict) or not {'model', 'model_args'} <= set(checkpoint)
            or not isinstance(checkpoint['model'], dict)):
        die(f"{path} is not a checkpoint written by train.py or nanoGPT (it lacks 'model' and 'model_args')")
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
        die(f"{source} {model_args} describe no model this model.py can build: {e}")


def model_from_checkpoint(checkpoint, dropout=None):
    model_args = dict(checkpoint['model_args'])
    if dropout is not None:
        model_args['dropout'] = dropout
    model = new_model(model_args, "the checkpoint's model_args")
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:
        die(f"the checkpoint's weights do not fit its model_args: {str(e).splitlines()[0]}")
    return model


def pretrained_model(name_or_path, dropout=None):
    """GPT-2 weights from the hub or a local Hugging Face directory, with one clear line on failure."""
    try:
        return GPT.from_pretrained(name_or_path, None if dropout is None else {'dropout': dropout})
    except ValueError as e:
        die(str(e))


def is_pretrained_name(init_from):
    return init_from in HUB_MODELS or os.path.isdir(init_from)


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
        die(f"{path} is not a valid meta.pkl ({e}); re-run the dataset's prepare.py")
    if not isinstance(meta, dict) or not {'vocab_size', 'stoi', 'itos'} <= set(meta):
        die(f"{path} lacks vocab_size, stoi and itos; re-run the dataset's prepare.py")
    return meta
