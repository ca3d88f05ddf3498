"""
Prepare OpenWebText (or any corpus datasets.load_dataset can read) with the GPT-2 BPE tokenizer.
Writes train.bin and val.bin (uint16 token ids, every document followed by the <|endoftext|> token) and
manifest.json. A folder of .txt files is one document per file. Rows whose text is null are skipped, and
counted in the output.
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
from prepare_utils import (BUILDERS, HUB_SOURCES, ArgumentParser, UserError, begin_dataset, finish_dataset,
                           gpt2_encoding, load_hub, report_errors)

MIN_VAL_TOKENS = 4 * 1024  # a few of GPT-2's block_size, so that a small corpus still gets a usable val split


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
                        help="worker processes for loading and tokenizing")
    parser.add_argument('--out_dir', default=script_dir, help="where to write train.bin and val.bin")
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction={args.val_fraction} must be above 0 and below 1")
    if args.num_proc < 1:
        raise UserError(f"--num_proc={args.num_proc} must be 1 or more")
    args.num_proc = min(args.num_proc, cpu_count)  # more workers than cores only adds overhead
    return args


def load_corpus(args):
    """The train split of --dataset: a local file or folder, or a hub dataset (load_hub)."""
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
            dataset = datasets.load_dataset(BUILDERS[extension], data_files=args.dataset, num_proc=args.num_proc)
        elif local and any(name.endswith('.txt') for _, _, names in os.walk(args.dataset) for name in names):
            dataset = datasets.load_dataset(args.dataset, sample_by='document', num_proc=args.num_proc)
        elif local:
            dataset = datasets.load_dataset(args.dataset, num_proc=args.num_proc)
        else:
            dataset = load_hub(args.dataset, 'dataset', args.revision, args.name, num_proc=args.num_proc)
    except UserError:
        raise
    except Exception as e:  # not found, offline, unsupported format: the library's own first line says which
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # the ways datasets reports local files without a single row
        if isinstance(e, StopIteration) or 'corresponds to no data' in reason or \
                type(e.__cause__).__name__ == 'SchemaInferenceError':
            reason = "it holds no documents"
        raise UserError(f"could not load dataset {args.dataset!r}: {reason}") from None
    if 'train' not in dataset:
        raise UserError(f"dataset {args.dataset!r} has no 'train' split (it has: {', '.join(dataset)})")
    dataset = dataset['train']
    if args.text_column not in dataset.column_names:
        raise UserError(f"dataset {args.dataset!r} has no column {args.text_column!r}; its columns are: "
                        f"{', '.join(dataset.column_names)}")
    if getattr(dataset.features[args.text_column], 'dtype', None) not in ('string', 'large_string'):
        raise UserError(f"column {args.text_column!r} of dataset {args.dataset!r} holds "
                        f"{dataset.features[args.text_column]}, not text")
    return dataset


def tokenize(example, text_column, enc):
    # every document ends with the end-of-text token, so documents stay separated; a row without text is
    # left empty (len 0), to be skipped and counted
    text = example[text_column]
    if not isinstance(text, str):
        return {'ids': [], 'len': 0}
    ids = enc.encode_ordinary(text)  # special tokens in the text are treated as plain text
    ids.append(enc.eot_token)  # 50256 for gpt2
    return {'ids': ids, 'len': len(ids)}


def main():
    args = parse_args()
    import datasets
    enc = gpt2_encoding()  # before the (possibly long) dataset download, so a missing BPE fails fast
    dataset = load_corpus(args)

    # fixed types: a skipped row's empty ids would otherwise give its worker's shard another type
    features = datasets.Features({'ids': datasets.Sequence(datasets.Value('uint16')), 'len': datasets.Value('int64')})
    tokenized = dataset.map(
        tokenize,
        fn_kwargs={'text_column': args.text_column, 'enc': enc},
        remove_columns=dataset.column_names,
        features=features,
        desc="tokenizing the documents",
        num_proc=args.num_proc,
    )
    lengths = np.asarray(tokenized['len'], dtype=np.int64)
    kept = np.flatnonzero(lengths)
    print(f"{len(kept):,} documents, {len(lengths) - len(kept):,} rows skipped (their {args.text_column!r} "
          "is null or not text)")
    if len(kept) < 2:
        raise UserError(f"dataset {args.dataset!r} has {len(kept)} document(s); it needs at least 2 to make a "
                        "train and a val split")
    if len(kept) < len(lengths):
        tokenized, lengths = tokenized.select(kept), lengths[kept]

    # openwebtext only has a 'train' split, so hold out val_fraction of the documents in a seeded shuffle (the
    # same split as datasets' train_test_split), adding documents while the val split is short of MIN_VAL_TOKENS
    order = np.random.default_rng(2357).permutation(len(lengths))
    n_val = math.ceil(args.val_fraction * len(lengths))  # as train_test_split(test_size=val_fraction) counts them
    to_floor = int(np.searchsorted(np.cumsum(lengths[order]), MIN_VAL_TOKENS)) + 1  # documents to MIN_VAL_TOKENS
    n_val = min(max(n_val, min(to_floor, len(lengths) // 2)), len(lengths) - 1)  # never the whole corpus
    splits = {'train': tokenized.select(order[n_val:]), 'val': tokenized.select(order[:n_val])}

    # concatenate all the ids of each split into one file, a few documents at a time so memory stays bounded
    files = ('train.bin', 'val.bin')
    begin_dataset(args.out_dir, files)
    for split, dset in splits.items():
        arr_len = int(np.sum(dset['len'], dtype=np.uint64))
        filename = os.path.join(args.out_dir, f'{split}.bin')
        tmp_filename = filename + '.tmp'  # renamed at the end, so a crash never leaves a half-written {split}.bin
        try:
            arr = np.memmap(tmp_filename, dtype=np.uint16, mode='w+', shape=(arr_len,))  # gpt2 ids fit in uint16
            total_batches = min(1024, len(dset))
            idx = 0
            for batch_idx in tqdm(range(total_batches), desc=f'writing {filename}'):
                batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format('numpy')
                arr_batch = np.concatenate(batch['ids'])
                arr[idx : idx + len(arr_batch)] = arr_batch
                idx += len(arr_batch)
            arr.flush()
            del arr
            os.replace(tmp_filename, filename)
        finally:  # Ctrl-C or a full disk: no half-written file is left behind
            if os.path.exists(tmp_filename):
                os.remove(tmp_filename)
        print(f"{split} has {arr_len:,} tokens ({len(dset):,} documents)")
    # no source: a hub name has no file to check, and walking a corpus of many files slows every train start
    finish_dataset(args.out_dir, files, enc.n_vocab)


# the guard: datasets' worker processes, started by spawn or forkserver (macOS, Windows, Python 3.14 on Linux),
# import this file again, and must not run the preparation themselves
if __name__ == '__main__':
    report_errors()  # a mistake is one 'error:' line, Ctrl-C no traceback
    main()

# openwebtext:
# train has ~9B tokens (9,035,582,198), train.bin is ~17GB
# val has ~4M tokens (4,434,897), val.bin is ~8.5MB
# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
