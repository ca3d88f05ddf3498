"""
Prepare OpenWebText (or any corpus datasets can stream) with the GPT-2 BPE tokenizer.
Writes train.bin and val.bin (uint16 token ids, every document followed by the <|endoftext|> token) and
manifest.json. A folder of .txt files is one document per file. Rows whose text is null are skipped, and
counted in the output.
Streamed and resumable, as data/fineweb/prepare.py (data/tokenize_corpus.py): the corpus is read one input file
at a time (local parquet with pyarrow, anything else through datasets' streaming), so datasets' cache holds no
copy of it, and every document's tokens go to tokens.bin.partial in the corpus's order, with progress.json
recording after every file how far it goes; a prepare stopped in any way continues after the last recorded file.
Then the val split is drawn from all the documents (the same seeded shuffle as datasets' train_test_split) and
train.bin and val.bin are written from tokens.bin.partial, so for a while the disk holds the tokens twice.
Usage: python data/openwebtext/prepare.py [--dataset=NAME[@REVISION]_OR_PATH] [--revision=REV] [--name=CONFIG]
       [--text_column=text] [--val_fraction=0.0005] [--num_proc=8] [--out_dir=DIR]
"""
import math
import os
import sys

import numpy as np
from tqdm import tqdm

script_dir = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(script_dir))  # data/, for the helpers shared with the other prepare scripts
from prepare_utils import (BUILDERS, HUB_SOURCES, ArgumentParser, UserError, begin_dataset,  # noqa: E402
                           finish_dataset, gpt2_encoding, load_hub, report_errors, write_atomic)
from tokenize_corpus import ParquetShards, Progress, StreamShards, start_workers, tokenized  # noqa: E402

MIN_VAL_TOKENS = 4 * 1024  # a few of GPT-2's block_size, so that a small corpus still gets a usable val split
FILES = ('train.bin', 'val.bin')
PARTS = ('tokens.bin', 'lengths.bin')  # every document's ids in the corpus's order, and each one's number of ids
WRITE_DOCS = 4096  # documents gathered into train.bin or val.bin per write


def parse_args():
    repository, revision, _ = HUB_SOURCES['openwebtext']
    cpu_count = os.cpu_count() or 1
    parser = ArgumentParser(description="tokenize a text dataset into train.bin and val.bin")
    parser.add_argument('--dataset', default=repository,
                        help=f"a Hugging Face dataset, NAME or NAME@REVISION (default: {repository}, at {revision}, "
                             "its parquet conversion), a local folder of .txt (one document per file), "
                             ".json/.jsonl or .parquet files, or one .json/.jsonl/.parquet file")
    parser.add_argument('--revision', help="the hub revision of --dataset: a branch, tag, commit or refs/pr/N "
                                           "(the same as --dataset=NAME@REVISION)")
    parser.add_argument('--name', help="the config name of a hub --dataset (default: its default config)")
    parser.add_argument('--text_column', default='text', help="the column holding each document's text")
    parser.add_argument('--val_fraction', type=float, default=0.0005,
                        help=f"share of the documents held out as the val split (default 0.0005); documents are "
                             f"added until it holds at least {MIN_VAL_TOKENS:,} tokens, up to half of them")
    parser.add_argument('--num_proc', type=int, default=max(1, min(8, cpu_count // 2)),
                        help="worker processes for tokenizing")
    parser.add_argument('--out_dir', default=script_dir, help="where to write train.bin and val.bin")
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction={args.val_fraction} must be above 0 and below 1")
    if args.num_proc < 1:
        raise UserError(f"--num_proc={args.num_proc} must be 1 or more")
    args.num_proc = min(args.num_proc, cpu_count)  # more workers than cores only adds overhead
    return args


def open_corpus(args):
    """The train split of --dataset as shards (a local file or folder, or a hub dataset through load_hub,
    streamed), and what identifies it for a resume."""
    import datasets  # after argument parsing, so --help is quick
    local = os.path.exists(args.dataset)
    if local and (args.revision or args.name):
        raise UserError(f"--revision and --name choose a hub dataset's files; {args.dataset} is a local path")
    try:
        if os.path.isfile(args.dataset):
            # a single local file is read by the builder for its extension; folders and hub names go straight in
            extension = os.path.splitext(args.dataset)[1].lower()
            if extension == '.txt':
                raise UserError(f"{args.dataset} is a single text file, which would be a single document; put "
                                "your .txt files in a folder (one document each), or prepare one book with "
                                f"python data/shakespeare/prepare.py --input={args.dataset} --out_dir=data/NAME")
            if extension not in BUILDERS:
                raise UserError(f"cannot read {args.dataset}: expected a {', '.join(BUILDERS)} file or a folder "
                                "of them")
            builder = datasets.load_dataset_builder(BUILDERS[extension], data_files=args.dataset)
        elif local and any(name.endswith('.txt') for _, _, names in os.walk(args.dataset) for name in names):
            builder = datasets.load_dataset_builder(args.dataset, sample_by='document')
        elif local:
            builder = datasets.load_dataset_builder(args.dataset)
        else:
            stream = load_hub(args.dataset, 'dataset', args.revision, args.name, split='train', streaming=True)
            source = {'dataset': args.dataset, 'revision': args.revision, 'name': args.name,
                      'shards': stream.num_shards}
            return checked_stream(stream, args), source
        if 'train' not in builder.config.data_files:
            raise UserError(f"dataset {args.dataset!r} has no 'train' split (it has: "
                            f"{', '.join(builder.config.data_files)})")
        files = list(builder.config.data_files['train'])
        source = {'dataset': os.path.abspath(args.dataset), 'files': [os.path.relpath(f, args.dataset) for f in files]}
        if builder.name == 'parquet':  # read with pyarrow, a batch of documents at a time
            shards = ParquetShards(files, args.text_column)
            if shards.rows == 0:
                raise UserError(f"could not load dataset {args.dataset!r}: it holds no documents")
            return shards, source
        return checked_stream(builder.as_streaming_dataset(split='train'), args), source
    except UserError:
        raise
    except Exception as e:  # not found, offline, unsupported format: the library's own first line says which
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # the ways datasets reports local files without a single row
        if isinstance(e, StopIteration) or 'corresponds to no data' in reason or \
                type(e.__cause__).__name__ == 'SchemaInferenceError':
            reason = "it holds no documents"
        raise UserError(f"could not load dataset {args.dataset!r}: {reason}") from None


def checked_stream(stream, args):
    # a corpus without rows, or without a text column, stops here, before anything is written
    first = next(iter(stream.take(1)), None)
    if first is None:
        raise UserError(f"could not load dataset {args.dataset!r}: it holds no documents")
    columns = list(stream.features or first)  # a json file's features are only known once it is read
    if args.text_column not in columns:
        raise UserError(f"dataset {args.dataset!r} has no column {args.text_column!r}; its columns are: "
                        f"{', '.join(columns)}")
    feature = stream.features[args.text_column] if stream.features else None
    if feature is not None and getattr(feature, 'dtype', None) not in ('string', 'large_string'):
        raise UserError(f"column {args.text_column!r} of dataset {args.dataset!r} holds {feature}, not text")
    return StreamShards(stream.select_columns([args.text_column]), args.text_column)


def write_documents(tokens_path, path, starts, lengths, docs):
    """The documents docs (indices; document i is the lengths[i] ids from starts[i] of tokens_path), one after
    another into path, WRITE_DOCS at a time so that memory stays bounded; reads, not a memmap, so that the pages
    read are not counted in this process's memory."""
    def write(out):
        with open(tokens_path, 'rb') as f:
            for i in tqdm(range(0, len(docs), WRITE_DOCS), desc=f"writing {path}"):
                chunk = docs[i:i + WRITE_DOCS]
                buffer = memoryview(bytearray(2 * int(lengths[chunk].sum())))
                pos = 0
                for start, n in zip(starts[chunk].tolist(), lengths[chunk].tolist()):
                    f.seek(2 * start)
                    f.readinto(buffer[pos:pos + 2 * n])
                    pos += 2 * n
                out.write(buffer)
    write_atomic(path, write)


def main():
    args = parse_args()
    enc = gpt2_encoding()  # before the (possibly remote) corpus, so that a missing BPE fails fast
    pool = start_workers(args.num_proc)
    try:
        corpus, source = open_corpus(args)
        begin_dataset(args.out_dir, FILES)
        progress = Progress(args.out_dir, dict(source, text_column=args.text_column), PARTS,
                            counts={'documents': 0, 'skipped': 0})
        try:
            for _, tokens, lengths, skipped in tokenized(corpus, progress, pool, args.num_proc):
                progress.append('tokens.bin', tokens)
                progress.append('lengths.bin', lengths)
                progress.counts['documents'] += len(lengths)
                progress.counts['skipped'] += skipped
        finally:
            progress.close()
    finally:
        pool.shutdown(cancel_futures=True)
    n_docs, skipped = progress.counts['documents'], progress.counts['skipped']
    print(f"{n_docs:,} documents, {skipped:,} rows skipped (their {args.text_column!r} is null or not text)")
    if n_docs < 2:
        raise UserError(f"dataset {args.dataset!r} has {n_docs} document(s); it needs at least 2 to make a "
                        "train and a val split")
    lengths = np.fromfile(progress.paths['lengths.bin'], dtype=np.int64, count=n_docs)
    starts = np.cumsum(lengths) - lengths

    # openwebtext only has a 'train' split, so hold out val_fraction of the documents in a seeded shuffle (the
    # same split as datasets' train_test_split), adding documents while the val split is short of MIN_VAL_TOKENS
    order = np.random.default_rng(2357).permutation(n_docs)
    n_val = math.ceil(args.val_fraction * n_docs)  # as train_test_split(test_size=val_fraction) counts them
    to_floor = int(np.searchsorted(np.cumsum(lengths[order]), MIN_VAL_TOKENS)) + 1  # documents to MIN_VAL_TOKENS
    n_val = min(max(n_val, min(to_floor, n_docs // 2)), n_docs - 1)  # never the whole corpus
    for split, docs in (('train', order[n_val:]), ('val', order[:n_val])):
        write_documents(progress.paths['tokens.bin'], os.path.join(args.out_dir, f'{split}.bin'), starts, lengths,
                        docs)
        print(f"{split} has {int(lengths[docs].sum()):,} tokens ({len(docs):,} documents)")
    progress.remove()  # train.bin and val.bin are whole: nothing left to resume
    # no source: a hub name has no file to check, and walking a corpus of many files slows every train start
    finish_dataset(args.out_dir, FILES, enc.n_vocab)


# the guard: the worker processes, started by spawn or forkserver (macOS, Windows, Python 3.14 on Linux), import
# this file again, and must not run the preparation themselves
if __name__ == '__main__':
    report_errors()  # a mistake is one 'error:' line, Ctrl-C no traceback
    main()

# openwebtext:
# train has ~9B tokens (9,035,582,198), train.bin is ~17GB
# val has ~4M tokens (4,434,897), val.bin is ~8.5MB
# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
