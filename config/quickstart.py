# the character-level shakespeare model sized for the machine at hand: nanoGPT's baby GPT on a CUDA GPU
# (~3 minutes on an A100 by nanoGPT's figure, ~10 on a T4 by an estimate), the fast CPU recipe everywhere else
# (about a minute on a laptop); its own out_dir, so that nanoGPT's commands after it start afresh
# python train.py config/quickstart.py && python sample.py --out_dir=out-quickstart

import os
import torch

_recipe = 'train_shakespeare_char.py' if torch.cuda.is_available() else 'speedrun_shakespeare_char_cpu.py'
exec(open(os.path.join(os.path.dirname(__file__), _recipe)).read())
out_dir = 'out-quickstart'
