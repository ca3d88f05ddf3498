"""
Prepare OpenWebText (or any corpus datasets.load_dataset can read) with the GPT-2 BPE tokenizer.
Writes train.bin and val.bin (uint16 token ids, every document followed by the <|endoftext|> token).
Usage: python data/openwebtext/prepare.py [--dataset=NAME_OR_PATH] [--text_column=text] [--num_proc=8] [--out_dir=DIR]
"""
import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

script_dir = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(script_dir))  # data/, for the helpers shared with the other prepare scripts
from prepare_utils import fail, gpt2_encoding

cpu_count = os.cpu_count() or 1
parser = argparse.ArgumentParser(description="tokenize a text dataset into train.bin and val.bin")
parser.add_argument('--dataset', default='openwebtext',
                    help="a Hugging Face dataset name, a local folder of .txt/.json/.jsonl/.parquet files, or one such file")
parser.add_argument('--text_column', default='text', help="the column holding each document's text")
parser.add_argument('--num_proc', type=int, default=max(1, min(8, cpu_count // 2)),
                    help="worker processes for loading and tokenizing")
parser.add_argument('--out_dir', default=script_dir, help="where to write train.bin and val.bin")
args = parser.parse_args()
num_proc = max(1, min(args.num_proc, cpu_count))  # more workers than cores only adds overhead

import datasets  # after argument parsing, so --help is quick
enc = gpt2_encoding()  # before the (possibly long) dataset download, so a missing BPE fails fast

# a single local file is read by the builder for its extension; folders and hub names go straight in
builders = {'.txt': 'text', '.json': 'json', '.jsonl': 'json', '.parquet': 'parquet'}
try:
    if os.path.isfile(args.dataset):
        extension = os.path.splitext(args.dataset)[1].lower()
        if extension not in builders:
            fail(f"cannot read {args.dataset}: expected a {', '.join(builders)} file or a folder of them")
        dataset = datasets.load_dataset(builders[extension], data_files=args.dataset, num_proc=num_proc)
    else:
        dataset = datasets.load_dataset(args.dataset, num_proc=num_proc)
except Exception as e:  # not found, offline, unsupported format: the library's own first line says which
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    # the ways datasets reports local files without a single row
    if isinstance(e, StopIteration) or 'corresponds to no data' in reason or \
            type(e.__cause__).__name__ == 'SchemaInferenceError':
        reason = "it holds no documents"
    fail(f"could not load dataset {args.dataset!r}: {reason}")
if 'train' not in dataset:
    fail(f"dataset {args.dataset!r} has no 'train' split (it has: {', '.join(dataset)})")
dataset = dataset['train']
if args.text_column not in dataset.column_names:
    fail(f"dataset {args.dataset!r} has no column {args.text_column!r}; its columns are: {', '.join(dataset.column_names)}")
if getattr(dataset.features[args.text_column], 'dtype', None) not in ('string', 'large_string'):
    fail(f"column {args.text_column!r} of dataset {args.dataset!r} holds {dataset.features[args.text_column]}, not text")
if len(dataset) < 2:
    fail(f"dataset {args.dataset!r} has {len(dataset)} document(s); it needs at least 2 to make a train and a val split")

# openwebtext only has a 'train' split, so carve out a small val split
split_dataset = dataset.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split_dataset['val'] = split_dataset.pop('test')

# tokenize every document, ending it with the end-of-text token so documents stay separated
def process(example):
    ids = enc.encode_ordinary(example[args.text_column])  # special tokens in the text are treated as plain text
    ids.append(enc.eot_token)  # 50256 for gpt2
    return {'ids': ids, 'len': len(ids)}

tokenized = split_dataset.map(
    process,
    remove_columns=dataset.column_names,
    desc="tokenizing the splits",
    num_proc=num_proc,
)

# concatenate all the ids of each split into one file, a few documents at a time so memory stays bounded
os.makedirs(args.out_dir, exist_ok=True)
for split, dset in tokenized.items():
    arr_len = int(np.sum(dset['len'], dtype=np.uint64))
    filename = os.path.join(args.out_dir, f'{split}.bin')
    tmp_filename = filename + '.tmp'  # renamed at the end, so a crash never leaves a half-written {split}.bin
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
    print(f"{split} has {arr_len:,} tokens")

# openwebtext:
# train has ~9B tokens (9,035,582,198), train.bin is ~17GB
# val has ~4M tokens (4,434,897), val.bin is ~8.5MB
# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
