"""
Prepare FineWeb-edu (HuggingFaceFW/fineweb-edu, or a local folder of its parquet shards laid out as on the hub)
with the GPT-2 BPE tokenizer into train.bin and val.bin (uint16 token ids, every document followed by the
<|endoftext|> token) and manifest.json, as data/openwebtext/prepare.py writes them.
The corpus is streamed, one input shard at a time, so datasets' cache never holds a copy of it; the tokens are
appended to train.bin.partial and val.bin.partial, and progress.json records their lengths after every shard.
Stopped at any moment (Ctrl-C, kill -9, a full disk), the same command continues after the last finished shard
and writes the same bytes as a prepare that was never stopped.
The val split is the first documents of the stream, until it holds --val_tokens tokens (build-nanogpt and
llm.c take the first 100M tokens as val too); the rest, up to --max_tokens, is train.
Usage: python data/fineweb/prepare.py [--dataset=HuggingFaceFW/fineweb-edu[@REVISION]] [--name=sample-10BT]
       [--revision=REVISION] [--val_tokens=100000000] [--max_tokens=0] [--num_proc=8] [--out_dir=DIR]
"""
import collections
import glob
import itertools
import json
import multiprocessing
import os
import sys

import numpy as np
from tqdm import tqdm

script_dir = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(script_dir))  # data/, for the helpers shared with the other prepare scripts
from prepare_utils import (HUB_SOURCES, ArgumentParser, UserError, begin_dataset, finish_dataset,  # noqa: E402
                           gpt2_encoding, load_hub, report_errors, write_atomic)

HUB_DATASET, _, DEFAULT_NAME = HUB_SOURCES['fineweb-edu']
# where each config's parquet shards sit in the hub repository (its README's configs), for a local copy of it
CONFIG_DIRS = {'sample-10BT': 'sample/10BT', 'sample-100BT': 'sample/100BT', 'sample-350BT': 'sample/350BT',
               'default': 'data'}
BATCH_DOCS = 1024  # documents per task sent to a worker
FILES = ('train.bin', 'val.bin')
PROGRESS = 'progress.json'


def parse_args(argv=None):
    cpu_count = os.cpu_count() or 1
    parser = ArgumentParser(description="tokenize FineWeb-edu, streamed and resumable, into train.bin and val.bin")
    parser.add_argument('--dataset', default=HUB_DATASET,
                        help=f"a Hugging Face dataset name (default {HUB_DATASET}), or a local folder of its parquet "
                             "shards laid out as on the hub (e.g. FOLDER/sample/10BT/000_00000.parquet)")
    parser.add_argument('--revision', help="the hub revision to read (a branch, tag or commit; default main), "
                                           "also written --dataset=NAME@REVISION")
    parser.add_argument('--name', default=DEFAULT_NAME,
                        help="the dataset's config: sample-10BT (default), sample-100BT, sample-350BT, default (all)")
    parser.add_argument('--text_column', default='text', help="the column holding each document's text")
    parser.add_argument('--val_tokens', type=int, default=100_000_000,
                        help="tokens of the val split, in whole documents from the start of the stream (default 100M)")
    parser.add_argument('--max_tokens', type=int, default=0,
                        help="stop after this many tokens (train and val, whole documents); 0 prepares everything")
    parser.add_argument('--num_proc', type=int, default=max(1, min(8, cpu_count // 2)),
                        help="worker processes for tokenizing")
    parser.add_argument('--out_dir', default=script_dir, help="where to write train.bin and val.bin")
    args = parser.parse_args(argv)
    if args.val_tokens < 1:
        raise UserError(f"--val_tokens={args.val_tokens} must be 1 or more")
    if args.max_tokens < 0:
        raise UserError(f"--max_tokens={args.max_tokens} must be 0 (everything) or more")
    if args.max_tokens and args.max_tokens <= args.val_tokens:
        raise UserError(f"--max_tokens={args.max_tokens} leaves nothing to train on after --val_tokens="
                        f"{args.val_tokens}")
    if args.num_proc < 1:
        raise UserError(f"--num_proc={args.num_proc} must be 1 or more")
    args.num_proc = min(args.num_proc, cpu_count)  # more workers than cores only adds overhead
    return args


def local_shards(folder, name):
    # the config's subfolder when the folder is a copy of the hub repository, else every parquet file in it
    config_dir = os.path.join(folder, CONFIG_DIRS.get(name, os.path.join('data', name)))
    root = config_dir if os.path.isdir(config_dir) else folder
    files = sorted(glob.glob(os.path.join(root, '**', '*.parquet'), recursive=True))
    if not files:
        raise UserError(f"no .parquet files in {root}; --dataset=FOLDER takes a folder of FineWeb-edu's parquet "
                        f"shards (for --name={name}: FOLDER/{CONFIG_DIRS.get(name, 'data/' + name)}/*.parquet)")
    return files


def open_stream(args):
    """The corpus as a streamed datasets.IterableDataset of its text column, and what identifies it for a
    resume (the same source, config and shards)."""
    import datasets  # after argument parsing, so --help is quick
    try:
        if os.path.isdir(args.dataset):
            files = local_shards(args.dataset, args.name)
            stream = datasets.load_dataset('parquet', data_files=files, split='train', streaming=True)
            source = {'dataset': os.path.abspath(args.dataset),
                      'shards': [os.path.relpath(f, args.dataset) for f in files]}
        else:
            stream = load_hub(args.dataset, 'dataset', revision=args.revision, name=args.name, split='train',
                              streaming=True)
            source = {'dataset': args.dataset, 'revision': args.revision, 'name': args.name,
                      'shards': stream.num_shards}
    except UserError:
        raise
    except Exception as e:  # not found, offline, no such config: the library's own first line says which
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load dataset {args.dataset!r} (--name={args.name}): {reason}") from None
    columns = list(stream.features or {})
    if stream.features is not None and args.text_column not in columns:
        raise UserError(f"dataset {args.dataset!r} has no column {args.text_column!r}; its columns are: "
                        f"{', '.join(columns)}")
    return stream.select_columns([args.text_column]), source


# -----------------------------------------------------------------------------
# the workers: each tokenizes a batch of documents into one array, ending every document with the end-of-text token

enc = None


def init_worker():
    global enc
    enc = gpt2_encoding()


def tokenize(texts):
    docs = [enc.encode_ordinary(text) for text in texts]  # special tokens in the text are treated as plain text
    for ids in docs:
        ids.append(enc.eot_token)  # 50256 for gpt2
    lengths = np.array([len(ids) for ids in docs], dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.uint16, count=int(lengths.sum()))
    return flat, lengths


def text_batches(shard, text_column, counts):
    # lists of the shard's texts; rows whose text is null or not a string are skipped and counted
    for batch in shard.iter(batch_size=BATCH_DOCS):
        texts = [text for text in batch[text_column] if isinstance(text, str)]
        counts['skipped'] += len(batch[text_column]) - len(texts)
        if texts:
            yield texts


def tokenized(batches, pool, num_proc):
    """(tokens, lengths) of each batch in order, with at most a few batches in flight (Pool.imap would read
    the whole input ahead of the workers, so memory would grow with the corpus)."""
    if pool is None:
        yield from map(tokenize, batches)
        return
    pending = collections.deque()
    for texts in batches:
        pending.append(pool.apply_async(tokenize, (texts,)))
        if len(pending) >= 2 * num_proc:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# -----------------------------------------------------------------------------

def read_progress(out_dir, settings):
    """The progress record of an interrupted prepare of these settings, or None to start from the beginning."""
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            progress = json.load(f)
    except (OSError, ValueError):
        progress = None
    if progress is None or progress.get('settings') != settings:
        print(f"{path} is from a prepare with other settings (or unreadable); starting from the beginning")
        return None
    return progress


def append(f, tokens):
    f.write(tokens.tobytes())


def prepare_shard(shard, args, files, counts, pool):
    """Tokenize one shard, appending each document to val until it holds val_tokens, then to train; returns
    True once max_tokens is reached."""
    for flat, lengths in tokenized(text_batches(shard, args.text_column, counts), pool, args.num_proc):
        ends = np.cumsum(lengths)
        n_docs = len(lengths)
        total = counts['train_tokens'] + counts['val_tokens']
        if args.max_tokens:  # the documents it takes to reach max_tokens (searchsorted: the first end at or past it)
            n_docs = min(n_docs, int(np.searchsorted(ends, args.max_tokens - total)) + 1)
        n_val = 0
        if counts['val_tokens'] < args.val_tokens:
            n_val = min(n_docs, int(np.searchsorted(ends, args.val_tokens - counts['val_tokens'])) + 1)
        cut, end = (int(ends[n_val - 1]) if n_val else 0), int(ends[n_docs - 1])
        append(files['val'], flat[:cut])
        append(files['train'], flat[cut:end])
        counts['val_tokens'] += cut
        counts['train_tokens'] += end - cut
        counts['val_documents'] += n_val
        counts['train_documents'] += n_docs - n_val
        if args.max_tokens and counts['train_tokens'] + counts['val_tokens'] >= args.max_tokens:
            return True
    return False


def main(argv=None):
    args = parse_args(argv)
    init_worker()  # the BPE before opening the (possibly remote) corpus, so that a missing one fails fast
    stream, source = open_stream(args)
    settings = dict(source, text_column=args.text_column, val_tokens=args.val_tokens, max_tokens=args.max_tokens)
    begin_dataset(args.out_dir, FILES)
    progress = read_progress(args.out_dir, settings)
    paths = {split: os.path.join(args.out_dir, f'{split}.bin.partial') for split in ('train', 'val')}
    if progress is not None and not all(map(os.path.exists, paths.values())):
        # stopped while renaming the finished files: take them back, or start over if they are gone
        for split, path in paths.items():
            if not os.path.exists(path) and os.path.exists(os.path.join(args.out_dir, f'{split}.bin')):
                os.replace(os.path.join(args.out_dir, f'{split}.bin'), path)
        if not all(map(os.path.exists, paths.values())):
            print("the files of the interrupted prepare are gone; starting from the beginning")
            progress = None
    if progress is None:
        progress = {'settings': settings, 'shards_done': 0, 'finished': False, 'counts': dict.fromkeys(
            ('train_tokens', 'val_tokens', 'train_documents', 'val_documents', 'skipped'), 0)}
    counts = progress['counts']
    n_shards, start = stream.num_shards, progress['shards_done']
    if start:
        print(f"resuming after {start} of {n_shards} shards ({counts['train_tokens'] + counts['val_tokens']:,} "
              "tokens already prepared)")
    files = {}
    try:
        for split, path in paths.items():
            # whatever a stopped prepare appended after its last record is cut off here
            files[split] = open(path, 'r+b' if start else 'wb')
            files[split].truncate(2 * counts[f'{split}_tokens'])
            files[split].seek(0, os.SEEK_END)
        pool = multiprocessing.Pool(args.num_proc, initializer=init_worker) if args.num_proc > 1 else None
        try:
            remaining = range(start, start if progress['finished'] else n_shards)  # none once max_tokens is reached
            for i in tqdm(remaining, desc="tokenizing shards", initial=start, total=n_shards):
                progress['finished'] = prepare_shard(stream.shard(num_shards=n_shards, index=i), args, files, counts,
                                                     pool)
                for f in files.values():  # on disk before the record that counts them
                    f.flush()
                    os.fsync(f.fileno())
                progress['shards_done'] = i + 1
                write_atomic(os.path.join(args.out_dir, PROGRESS), lambda f: f.write(json.dumps(progress).encode()))
                if progress['finished']:
                    break
        finally:
            if pool is not None:
                pool.terminate()
    except OSError as e:  # a full disk, say: the next run continues after the last recorded shard
        raise UserError(f"could not write to {args.out_dir} ({e.strerror or e}); free some space and run the same "
                        "command again to continue") from None
    finally:
        for f in files.values():
            f.close()
    if counts['train_tokens'] == 0:
        raise UserError(f"the corpus has {counts['val_tokens']:,} tokens, all taken by the val split of "
                        f"--val_tokens={args.val_tokens:,}; pass a smaller --val_tokens")
    for split, path in paths.items():
        os.replace(path, os.path.join(args.out_dir, f'{split}.bin'))
    os.remove(os.path.join(args.out_dir, PROGRESS))  # train.bin and val.bin are whole: nothing left to resume
    finish_dataset(args.out_dir, FILES, enc.n_vocab)
    for split in ('train', 'val'):
        print(f"{split} has {counts[f'{split}_tokens']:,} tokens ({counts[f'{split}_documents']:,} documents)")
    print(f"skipped {counts['skipped']:,} rows whose text was null or not a string")


if __name__ == '__main__':
    report_errors()  # a mistake is one 'error:' line, Ctrl-C no traceback
    main()

# sample-10BT: about 10B tokens (build-nanogpt writes it as 100 shards of 100M), so train.bin is about 20GB
# and val.bin (the first 100M tokens) 200MB
# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
