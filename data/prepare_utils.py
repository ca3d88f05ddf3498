"""
Helpers shared by the data/*/prepare.py scripts: their common arguments, getting the input text (download
or --input), the hub source of each hub dataset (HUB_SOURCES, read with load_hub), loading the GPT-2 BPE, and
publishing a dataset's files so that train.py never reads a mix of two preparations. Every user-facing failure
is one line on stderr starting with 'error:'; Ctrl-C stops a script without a traceback and without leaving
temporary files.

Publishing: begin_dataset() marks the folder's manifest.json incomplete before the first file is written;
finish_dataset() records the files' sizes and the tokenizer's vocabulary size in it once all are written,
and the input file they were made from. train.py (dataset.read_manifest) refuses an incomplete dataset, or
files whose sizes changed since; dataset.script_to_prepare prepares a dataset again, or says how to, when its
input file changed since.
"""
import argparse
import hashlib
import http.client
import json
import os
import pickle
import shlex
import sys
import tempfile
import urllib.request

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for configurator
from configurator import UserError, report_errors  # noqa: F401 (report_errors: for the scripts)

TINY_SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_DIRS = ('shakespeare_char', 'shakespeare')  # both read the same downloaded input.txt
DATASET_FILES = ('train.bin', 'val.bin', 'meta.pkl')
# the hub source read for each dataset: (repository, revision, config name); None is main, or the default config.
# datasets>=4 no longer runs loading scripts, and the main branches of the first two still hold one
HUB_SOURCES = {
    # the owner's full parquet conversion, an unmerged pull request; refs/convert/parquet, the hub bot's
    # conversion, holds only the first 5GB of the ~40GB (plain_text/partial-train), and would load as if whole
    'openwebtext': ('Skylion007/openwebtext', 'refs/pr/18', None),
    # the conversion with the script deleted, an unmerged pull request; refs/convert/parquet is also whole
    # here, but has no dataset card, so nothing checks its row counts, and the bot rewrites it at will
    'hellaswag': ('Rowan/hellaswag', 'refs/pr/7', None),
    'lambada': ('EleutherAI/lambada_openai', None, 'default'),  # parquet on main; 'default' is OpenAI's English
    'fineweb-edu': ('HuggingFaceFW/fineweb-edu', None, 'sample-10BT'),  # parquet on main; the 10B-token sample
}
SCRIPTS_ERROR = 'Dataset scripts are no longer supported'  # datasets' RuntimeError for a loading script
BUILDERS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet'}  # datasets' loader of each local file


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a mistake (an unknown flag, a bad number) as the one 'error:' line."""

    def error(self, message):
        raise UserError(f"{message}; see python {self.prog} --help")


def text_arguments(script_dir, description):
    """--input, --out_dir and --val_fraction of the scripts that prepare one text file."""
    parser = ArgumentParser(description=description)
    parser.add_argument('--input', help="UTF-8 text file to prepare instead of tiny Shakespeare's input.txt "
                                        f"(default: downloaded from {TINY_SHAKESPEARE_URL})")
    parser.add_argument('--out_dir', default=script_dir, help="where to write the dataset (default: this folder); "
                                                              "train with --dataset=DIR")
    parser.add_argument('--val_fraction', type=float, default=0.1, help="share of the text, at its end, held out "
                                                                        "as the val split (default 0.1)")
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction={args.val_fraction} must be above 0 and below 1")
    return args


def download(url, path):
    # stream into a temp file beside the target and rename at the end, so a failed
    # download never leaves a truncated input.txt that a later run would trust
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.download-', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp_path, path)
    except (OSError, http.client.HTTPException) as e:
        raise UserError(f"could not download {url} ({e}); download it by hand and save it as {path}") from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def read_text(path):
    if os.path.isdir(path):
        raise UserError(f"input {path} is a directory; pass one text file (a folder of .txt files goes to "
                        "data/openwebtext/prepare.py --dataset=FOLDER)")
    if not os.path.isfile(path):
        raise UserError(f"input file {path} does not exist")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text:
        raise UserError(f"{path} is empty")
    return text, raw


def default_input(script_dir):
    """The input.txt a script reads without --input: its own folder's, else the other Shakespeare folder's,
    else its own folder's once downloaded."""
    data_dir = os.path.dirname(script_dir)
    for name in (os.path.basename(script_dir),) + SHAKESPEARE_DIRS:
        path = os.path.join(data_dir, name, 'input.txt')
        if os.path.exists(path):
            return path
    return os.path.join(script_dir, 'input.txt')


def load_input_text(args, script_dir, url=TINY_SHAKESPEARE_URL):
    """The text named by --input, else tiny Shakespeare (default_input, downloaded from url when no folder has
    it); and its source, for finish_dataset to record: the file's path, size and sha256, whether this script
    run with no arguments prepares it again into the same folder, and the command that does."""
    path = args.input if args.input is not None else default_input(script_dir)
    if args.input is None and not os.path.exists(path):
        download(url, path)
    text, raw = read_text(path)
    same_path = os.path.realpath(path) == os.path.realpath(default_input(script_dir))
    same_out_dir = os.path.realpath(args.out_dir) == os.path.realpath(script_dir)
    path = os.path.abspath(path)  # train.py may run from another folder
    command = shlex.join(['python', os.path.abspath(sys.argv[0]), f'--input={path}',
                          f'--out_dir={os.path.abspath(args.out_dir)}', f'--val_fraction={args.val_fraction}'])
    # the sha256 of the bytes read, not of the file later: an edit while preparing shows as a change
    return text, {'path': path, 'bytes': len(raw), 'sha256': hashlib.sha256(raw).hexdigest(),
                  'default': same_path and same_out_dir, 'command': command}


def split_text(text, val_fraction):
    # the first characters for training, the last val_fraction of them for validation
    n = len(text)
    cut = int(n * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    if not train_text or not val_text:
        raise UserError(f"the input has only {n} character(s); it needs at least 2 to make a train and a val split")
    return train_text, val_text


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # network errors from requests, blocked downloads, corrupt cache: all one message
        raise UserError(f"tiktoken could not load its gpt2 BPE files ({type(e).__name__}); connect to the internet "
                        "once, or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache of them") from None


def hub_source(text):
    """(path, revision) of a hub source written NAME or NAME@REVISION (a branch, tag, commit or refs/pr/N), as
    every setting naming a hub dataset takes it; revision is None when not named."""
    path, at, revision = text.partition('@')
    if at and not (path and revision):
        raise UserError(f"{text!r} is not a hub source: write NAME or NAME@REVISION, e.g. Rowan/hellaswag@refs/pr/7")
    return path, revision or None


def load_hub(text, setting, revision=None, name=None, **kwargs):
    """datasets.load_dataset of the hub source text (hub_source's NAME@REVISION; --revision= gives the revision
    too); a repository of HUB_SOURCES gets its revision and config name unless they are named. A loading script
    is one line naming the option to pass (setting: the option that named text)."""
    import datasets
    path, at_revision = hub_source(text)
    if at_revision and revision and at_revision != revision:
        raise UserError(f"--{setting}={text} and --revision={revision} name two revisions; give one of them")
    revision = at_revision or revision
    for repository, default_revision, default_name in HUB_SOURCES.values():
        if path == repository:
            revision, name = revision or default_revision, name or default_name
    try:
        return datasets.load_dataset(path, name=name, revision=revision, **kwargs)
    except RuntimeError as e:
        if SCRIPTS_ERROR not in str(e):
            raise
        # the whole conversion where this is a dataset of HUB_SOURCES (e.g. 'openwebtext'), else the hub bot's
        known = [f"{r}@{v}" for r, v, _ in HUB_SOURCES.values() if v and r.split('/')[-1] == path.split('/')[-1]]
        example = known[0] if known else f"{path}@refs/convert/parquet (the hub bot's, of at most its first 5GB)"
        raise UserError(f"could not load --{setting}={text}: this hub dataset has a loading script, which "
                        "datasets>=4 no longer runs: name a revision with its parquet conversion, e.g. "
                        f"--{setting}={example}") from None


def write_atomic(path, write):
    # write under a temp name and rename, so the final name only ever holds a complete file
    tmp_path = path + '.tmp'
    try:
        with open(tmp_path, 'wb') as f:
            write(f)
        os.replace(tmp_path, path)
    except OSError as e:  # numpy's tofile raises one without strerror (a full disk, say)
        raise UserError(f"could not write {path} ({e.strerror or e or type(e).__name__}); check the permissions and "
                        f"free space of {os.path.dirname(path) or '.'}") from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_tokens(path, ids):
    write_atomic(path, np.asarray(ids, dtype=np.uint16).tofile)


def write_pickle(path, obj):
    write_atomic(path, lambda f: pickle.dump(obj, f))


def write_manifest(out_dir, manifest):
    write_atomic(os.path.join(out_dir, 'manifest.json'), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def begin_dataset(out_dir, files):
    """Before writing files (names in out_dir): mark the dataset incomplete and remove the files of an earlier
    preparation that this one does not write (a meta.pkl, say), so no mix of the two can be read."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir={out_dir} ({e.strerror})") from None
    write_manifest(out_dir, {'complete': False})
    for name in set(DATASET_FILES) - set(files):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def finish_dataset(out_dir, files, vocab_size, source=None):
    """After all files are written: record their sizes, the tokenizer's vocabulary size and the input file they
    were made from (load_input_text's source; None for a corpus)."""
    sizes = {name: os.path.getsize(os.path.join(out_dir, name)) for name in files}
    manifest = {'complete': True, 'vocab_size': vocab_size, 'files': sizes}
    if source is not None:
        manifest['source'] = source
    write_manifest(out_dir, manifest)
