# the character-level shakespeare model sized for the machine at hand: nanoGPT's baby GPT on a CUDA GPU
# (a few minutes), its CPU version everywhere else (a few minutes on a laptop)
# python train.py config/quickstart.py && python sample.py --out_dir=out-shakespeare-char

import os
import torch

exec(open(os.path.join(os.path.dirname(__file__), 'train_shakespeare_char.py')).read())
if not torch.cuda.is_available():
    exec(open(os.path.join(os.path.dirname(__file__), 'train_shakespeare_char_cpu.py')).read())
