# the character-level shakespeare model scaled down for a CPU: nanoGPT's CPU command line as a config,
# to apply after train_shakespeare_char.py. About 2 minutes on 2 cores; val loss ~1.88.
# python train.py config/train_shakespeare_char.py config/train_shakespeare_char_cpu.py

eval_iters = 20
log_interval = 1
block_size = 64
batch_size = 12
n_layer = 4
n_head = 4
n_embd = 128
max_iters = 2000
lr_decay_iters = 2000
dropout = 0.0
