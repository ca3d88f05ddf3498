"""
Prepare the tiny Shakespeare dataset with the GPT-2 BPE tokenizer (tiktoken).
Writes train.bin and val.bin (uint16 token ids) next to this script.
Usage: python data/shakespeare/prepare.py [--input=PATH]
"""
import os
import sys

script_dir = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(script_dir))  # data/, for the helpers shared with the other prepare scripts
from prepare_utils import gpt2_encoding, load_input_text, split_text, write_tokens

data = load_input_text(script_dir)
train_data, val_data = split_text(data)

# encode with tiktoken gpt2 bpe; special tokens in the text are treated as plain text
enc = gpt2_encoding()
train_ids = enc.encode_ordinary(train_data)
val_ids = enc.encode_ordinary(val_data)
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

write_tokens(os.path.join(script_dir, 'train.bin'), train_ids)
write_tokens(os.path.join(script_dir, 'val.bin'), val_ids)

# tiny shakespeare:
# train has 301,966 tokens
# val has 36,059 tokens
