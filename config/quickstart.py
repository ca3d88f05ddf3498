# the character-level shakespeare model sized for the machine at hand: nanoGPT's baby GPT on a CUDA GPU
# (a few minutes), the fast CPU recipe everywhere else (about a minute on a laptop)
# python train.py config/quickstart.py && python sample.py --out_dir=out-shakespeare-char

import os
import torch

_recipe = 'train_shakespeare_char.py' if torch.cuda.is_available() else 'speedrun_shakespeare_char_cpu.py'
exec(open(os.path.join(os.path.dirname(__file__), _recipe)).read())
