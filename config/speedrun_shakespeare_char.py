# tiny Shakespeare, character-level, on a GPU: nanoGPT's baby GPT (config/train_shakespeare_char.py: 6 layers, 6
# heads, 384 wide, context 256, batch 64, dropout 0.2) with the recipe of config/speedrun_shakespeare_char_cpu.py
# (Muon, rotary positions, QK-norm) and 2000 iterations instead of 5000. Its target
# is nanoGPT's val loss of 1.4697; it has not been timed on a GPU yet (README "Faster recipes").
# python train.py config/speedrun_shakespeare_char.py && python sample.py --out_dir=out-speedrun-char

import os

exec(open(os.path.join(os.path.dirname(__file__), 'train_shakespeare_char.py')).read())

out_dir = 'out-speedrun-char'

rope = True
qk_norm = True

optimizer = 'muon'
muon_lr = 0.02  # the blocks' matrices
learning_rate = 3e-3  # embeddings, head and gains (AdamW)
max_iters = 2000
lr_decay_iters = 2000
min_lr = 3e-4
warmup_iters = 50
