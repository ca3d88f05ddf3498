"""
Prepare the tiny Shakespeare dataset (or any UTF-8 text) for character-level language modeling.
Instead of GPT-2 BPE tokens, every character is its own token.
Writes train.bin and val.bin (uint16 token ids), meta.pkl (the vocabulary) and manifest.json next to this
script, or in --out_dir.
Usage: python data/shakespeare_char/prepare.py [--input=PATH] [--out_dir=DIR] [--val_fraction=0.1]
"""
import os
import sys

import numpy as np

script_dir = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(script_dir))  # data/, for the helpers shared with the other prepare scripts
from prepare_utils import (UserError, begin_dataset, finish_dataset, load_input_text, report_errors, split_text,
                           text_arguments, write_pickle, write_tokens)


def main():
    args = text_arguments(script_dir, "prepare a text file for character-level language modeling")
    data, source = load_input_text(args, script_dir)
    print(f"length of dataset in characters: {len(data):,}")

    # the vocabulary is every character that occurs in the text
    chars = sorted(set(data))
    vocab_size = len(chars)
    print("all the unique characters:", ''.join(chars))
    print(f"vocab size: {vocab_size:,}")
    if vocab_size > 65536:
        raise UserError(f"the input has {vocab_size:,} distinct characters, but token ids are stored as uint16 "
                        "(at most 65,536)")

    # mappings from characters to integers and back
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    def encode(s):
        return np.fromiter(map(stoi.__getitem__, s), dtype=np.uint16, count=len(s))

    train_data, val_data = split_text(data, args.val_fraction)
    train_ids = encode(train_data)
    val_ids = encode(val_data)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    # plain builtins only: train.py reads meta.pkl with an unpickler that refuses any class
    meta = {
        'vocab_size': vocab_size,
        'itos': itos,
        'stoi': stoi,
    }
    files = ('train.bin', 'val.bin', 'meta.pkl')
    begin_dataset(args.out_dir, files)
    write_tokens(os.path.join(args.out_dir, 'train.bin'), train_ids)
    write_tokens(os.path.join(args.out_dir, 'val.bin'), val_ids)
    write_pickle(os.path.join(args.out_dir, 'meta.pkl'), meta)
    finish_dataset(args.out_dir, files, vocab_size, source)


if __name__ == '__main__':
    report_errors()  # a mistake is one 'error:' line, Ctrl-C no traceback
    main()

# tiny shakespeare:
# length of dataset in characters: 1,115,394
# all the unique characters:
#  !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz
# vocab size: 65
# train has 1,003,854 tokens
# val has 111,540 tokens
