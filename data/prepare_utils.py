"""
Helpers shared by the data/*/prepare.py scripts: getting the input text (download or --input),
loading the GPT-2 BPE, and writing token files so that a crash never leaves a half-written one
under its final name. Every user-facing failure is one line on stderr starting with 'error:'.
"""
import argparse
import http.client
import os
import pickle
import sys
import tempfile
import urllib.request

import numpy as np
from tqdm import tqdm

TINY_SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)

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
        fail(f"could not download {url} ({e}); download it by hand and save it as {path}")
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

def read_text(path):
    if not os.path.isfile(path):
        fail(f"input file {path} does not exist")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text (bad byte at offset {e.start})")
    if not text:
        fail(f"{path} is empty")
    return text

def load_input_text(script_dir, url=TINY_SHAKESPEARE_URL):
    """The text named by --input=PATH, else input.txt next to the script, downloaded from url if missing."""
    parser = argparse.ArgumentParser(description="prepare train.bin and val.bin from a text file")
    parser.add_argument('--input', help=f"UTF-8 text file to use instead of input.txt (default: downloaded from {url})")
    args = parser.parse_args()
    if args.input is not None:
        return read_text(args.input)
    path = os.path.join(script_dir, 'input.txt')
    if not os.path.exists(path):
        download(url, path)
    return read_text(path)

def split_text(text):
    # first 90% of the characters for training, the rest for validation
    n = len(text)
    train_text, val_text = text[:int(n * 0.9)], text[int(n * 0.9):]
    if not train_text or not val_text:
        fail(f"the input has only {n} character(s); it needs at least 2 to make a train and a val split")
    return train_text, val_text

def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # network errors from requests, blocked downloads, corrupt cache: all one message
        fail(f"tiktoken could not load its gpt2 BPE files ({type(e).__name__}); connect to the internet once, "
             f"or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache of them")

def write_atomic(path, write):
    # write under a temp name and rename, so the final name only ever holds a complete file
    tmp_path = path + '.tmp'
    try:
        with open(tmp_path, 'wb') as f:
            write(f)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

def write_tokens(path, ids):
    write_atomic(path, np.asarray(ids, dtype=np.uint16).tofile)

def write_pickle(path, obj):
    write_atomic(path, lambda f: pickle.dump(obj, f))
