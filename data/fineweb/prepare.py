"""
Prepare FineWeb-edu (HuggingFaceFW/fineweb-edu, or a local folder of its parquet shards laid out as on the hub)
with the GPT-2 BPE tokenizer into train.bin and val.bin (uint16 token ids, every document followed by the
<|endoftext|> token) and manifest.json, as data/openwebtext/prepare.py writes them.
The corpus is streamed, one input shard at a time (the hub's through datasets' streaming, a local folder's read
with pyarrow), so datasets' cache never holds a copy of it; the tokens are appended to train.bin.partial and
val.bin.partial, and progress.json records their lengths after every shard (data/tokenize_corpus.py). Stopped at
any moment (Ctrl-C, kill -9, a full disk), the same command continues after the last finished shard and writes the
same bytes as a prepare that was never stopped.
The val split is the first documents of the stream, until it holds --val_tokens tokens (build-nanogpt and
llm.c take the first 100M tokens as val too); the rest, up to --max_tokens, is train.
Usage: python data/fineweb/prepare.py [--dataset=HuggingFaceFW/fineweb-edu[@REVISION]] [--name=sample-10BT]
       [--revision=REVISION] [--val_tokens=100000000] [--max_tokens=0] [--num_proc=8] [--out_dir=DIR]
"""
import glob
import os
import sys

import numpy as np

script_dir = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(script_dir))  # data/, for the helpers shared with the other prepare scripts
from prepare_utils import (HUB_SOURCES, ArgumentParser, UserError, begin_dataset, finish_dataset,  # noqa: E402
                           gpt2_encoding, load_hub, report_errors)
from tokenize_corpus import ParquetShards, Progress, StreamShards, start_workers, tokenized  # noqa: E402

HUB_DATASET, _, DEFAULT_NAME = HUB_SOURCES['fineweb-edu']
# where each config's parquet shards sit in the hub repository (its README's configs), for a local copy of it
CONFIG_DIRS = {'sample-10BT': 'sample/10BT', 'sample-100BT': 'sample/100BT', 'sample-350BT': 'sample/350BT',
               'default': 'data'}
FILES = ('train.bin', 'val.bin')


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


def open_corpus(args):
    """The corpus's shards (a local folder's parquet files, or the hub's, streamed), and what identifies it for
    a resume (the same source, config and shards)."""
    if os.path.isdir(args.dataset):
        files = local_shards(args.dataset, args.name)
        source = {'dataset': os.path.abspath(args.dataset), 'shards': [os.path.relpath(f, args.dataset) for f in files]}
        return ParquetShards(files, args.text_column), source
    try:
        stream = load_hub(args.dataset, 'dataset', revision=args.revision, name=args.name, split='train',
                          streaming=True)
    except UserError:
        raise
    except Exception as e:  # not found, offline, no such config: the library's own first line says which
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load dataset {args.dataset!r} (--name={args.name}): {reason}") from None
    columns = list(stream.features or {})
    if stream.features is not None and args.text_column not in columns:
        raise UserError(f"dataset {args.dataset!r} has no column {args.text_column!r}; its columns are: "
                        f"{', '.join(columns)}")
    source = {'dataset': args.dataset, 'revision': args.revision, 'name': args.name, 'shards': stream.num_shards}
    return StreamShards(stream.select_columns([args.text_column]), args.text_column), source


def main(argv=None):
    args = parse_args(argv)
    enc = gpt2_encoding()  # before opening the (possibly remote) corpus, so that a missing BPE fails fast
    pool = start_workers(args.num_proc)
    try:
        corpus, source = open_corpus(args)
        settings = dict(source, text_column=args.text_column, val_tokens=args.val_tokens, max_tokens=args.max_tokens)
        begin_dataset(args.out_dir, FILES)
        progress = Progress(args.out_dir, settings, FILES, counts=dict.fromkeys(
            ('train_tokens', 'val_tokens', 'train_documents', 'val_documents', 'skipped'), 0))
        try:
            counts = progress.counts
            for shard, tokens, lengths, skipped in tokenized(corpus, progress, pool, args.num_proc):
                # each document to val until it holds val_tokens, then to train, until max_tokens
                ends = np.cumsum(lengths)
                n_docs = len(lengths)
                total = counts['train_tokens'] + counts['val_tokens']
                if args.max_tokens:  # the documents it takes to reach max_tokens (the first end at or past it)
                    n_docs = min(n_docs, int(np.searchsorted(ends, args.max_tokens - total)) + 1)
                n_val = 0
                if counts['val_tokens'] < args.val_tokens:
                    n_val = min(n_docs, int(np.searchsorted(ends, args.val_tokens - counts['val_tokens'])) + 1)
                cut, end = (int(ends[n_val - 1]) if n_val else 0), (int(ends[n_docs - 1]) if n_docs else 0)
                progress.append('val.bin', tokens[:cut])
                progress.append('train.bin', tokens[cut:end])
                counts['val_tokens'] += cut
                counts['train_tokens'] += end - cut
                counts['val_documents'] += n_val
                counts['train_documents'] += n_docs - n_val
                counts['skipped'] += skipped
                if args.max_tokens and counts['train_tokens'] + counts['val_tokens'] >= args.max_tokens:
                    progress.commit(shard + 1, finished=True)  # the rest of the corpus is not needed
                    break
        finally:
            progress.close()
    finally:
        pool.shutdown(cancel_futures=True)
    if counts['train_tokens'] == 0:
        raise UserError(f"the corpus has {counts['val_tokens']:,} tokens, all taken by the val split of "
                        f"--val_tokens={args.val_tokens:,}; pass a smaller --val_tokens")
    for name in FILES:
        progress.publish(name)
    progress.remove()  # train.bin and val.bin are whole: nothing left to resume
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
