"""
Prepared datasets and their vocabulary: where a dataset lives, its manifest, its token files, its meta.pkl and
the tokenizer that reads it. Reads never execute pickled code; every problem with a file is a UserError naming
the file and what to do.
"""

import hashlib
import json
import os
import pickle

import numpy as np

from configurator import UserError
from data.prepare_utils import SHAKESPEARE_DIRS  # the small datasets train.py prepares on the spot

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def first_line(error):
    """The first line of an error's message (its type's name if it has none): for one-line UserErrors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def input_changed(data_dir, source):
    """Whether the input file a manifest records (prepare_utils.load_input_text) changed since: in size or
    sha256, or, for a default input, by the dataset folder now having an input.txt of its own, which its
    prepare.py reads first. A deleted input is no change: the prepared files are what counts."""
    path, own = source['path'], os.path.join(data_dir, 'input.txt')
    if source['default'] and os.path.exists(own) and os.path.realpath(own) != os.path.realpath(path):
        return True
    if not os.path.isfile(path):
        return False
    # a hash, not size and mtime: these inputs are books that prepare.py reads whole, so one more read is cheap
    return os.path.getsize(path) != source['bytes'] or file_sha256(path) != source['sha256']


def script_to_prepare(data_dir):
    """None for a dataset whose train.bin and val.bin exist and whose input file (if its manifest records one)
    is unchanged; else the prepare script that makes them, when it is one of the small datasets that train.py
    prepares on the spot (from the input that script reads by itself); else a UserError saying what to run."""
    missing = [f'{split}.bin' for split in ('train', 'val') if not os.path.exists(os.path.join(data_dir, f'{split}.bin'))]
    prepare_script = os.path.join(data_dir, 'prepare.py')
    if not missing:
        try:
            source = (read_manifest(data_dir) or {}).get('source')
        except UserError:  # train.py reads the manifest again after any preparing, and reports it then
            return None
        if source is None or not input_changed(data_dir, source):
            return None
        if source['default'] and os.path.exists(prepare_script) and os.path.basename(data_dir) in SHAKESPEARE_DIRS:
            return prepare_script
        raise UserError(f"the input {source['path']} changed since dataset {data_dir} was prepared from it; "
                        f"prepare it again: {source['command']}")
    if not os.path.exists(prepare_script):
        raise UserError(f"no {' or '.join(missing)} in {data_dir}; make them with a prepare script, e.g. python "
                        "data/openwebtext/prepare.py --dataset=YOUR_TEXT_FOLDER --out_dir=data/NAME, then "
                        "--dataset=NAME")
    if os.path.basename(data_dir) not in SHAKESPEARE_DIRS:
        raise UserError(f"no {' or '.join(missing)} in {data_dir}; prepare the dataset first: python {prepare_script}")
    return prepare_script


def load_splits(data_dir, dataset, block_size):
    """train.bin and val.bin (see load_tokens), each long enough for one window of block_size + 1 tokens."""
    splits = load_tokens(data_dir, 'train'), load_tokens(data_dir, 'val')
    for split, data in zip(('train', 'val'), splits):
        if len(data) <= block_size:
            raise UserError(f"the {split} split of '{dataset}' has {len(data)} tokens, too few for "
                            f"block_size={block_size}; use a smaller --block_size or more data")
    return splits


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


def check_vocabulary(model_meta, data_meta, dataset):
    """Refuse a dataset whose token ids mean other text to the model: another character set (meta.pkl), or BPE
    pieces where the model reads characters, or the reverse (a meta of None is GPT-2's BPE)."""
    if (model_meta or {}).get('stoi') == (data_meta or {}).get('stoi'):
        return
    reads, holds = (f"a {len(m['stoi'])}-character vocabulary (meta.pkl)" if m else "GPT-2's BPE tokens"
                    for m in (model_meta, data_meta))
    raise UserError(f"the model reads {reads} but dataset '{dataset}' holds {holds}; use a dataset prepared with "
                    "the model's own vocabulary, or train from scratch on it")


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
