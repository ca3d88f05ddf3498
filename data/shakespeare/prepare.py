"""
Prepare the tiny Shakespeare dataset (or any UTF-8 text) with the GPT-2 BPE tokenizer (tiktoken).
Writes train.bin and val.bin (uint16 token ids) and manifest.json next to this script, or in --out_dir.
Usage: python data/shakespeare/prepare.py [--input=PATH] [--out_dir=DIR] [--val_fraction=0.1]
"""
import os
import sys

script_dir = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(script_dir))  # data/, for the helpers shared with the other prepare scripts
from prepare_utils import (begin_dataset, finish_dataset, gpt2_encoding, load_input_text, report_errors, split_text,
                           text_arguments, write_tokens)


def main():
    args = text_arguments(script_dir, "prepare a text file with the GPT-2 BPE tokenizer")
    data, source = load_input_text(args, script_dir)
    train_data, val_data = split_text(data, args.val_fraction)

    # encode with tiktoken gpt2 bpe; special tokens in the text are treated as plain text
    enc = gpt2_encoding()
    train_ids = enc.encode_ordinary(train_data)
    val_ids = enc.encode_ordinary(val_data)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    files = ('train.bin', 'val.bin')
    begin_dataset(args.out_dir, files)
    write_tokens(os.path.join(args.out_dir, 'train.bin'), train_ids)
    write_tokens(os.path.join(args.out_dir, 'val.bin'), val_ids)
    finish_dataset(args.out_dir, files, enc.n_vocab, source)


if __name__ == '__main__':
    report_errors()  # a mistake is one 'error:' line, Ctrl-C no traceback
    main()

# tiny shakespeare:
# train has 301,966 tokens
# val has 36,059 tokens
