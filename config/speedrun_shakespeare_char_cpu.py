# tiny Shakespeare, character-level, on a CPU: the fastest recipe found to nanoGPT's CPU loss (val ~1.89).
# nanoGPT's CPU model (4 layers, 4 heads, 128 wide, context 64, batch 12) and data, trained 325 iterations instead
# of 2000: Muon for the hidden matrices, rotary positions and QK-norm.
# benchmarks/time_to_loss.py measures it against nanoGPT's command line (README "Faster recipes").
# python train.py config/speedrun_shakespeare_char_cpu.py && python sample.py --out_dir=out-speedrun-char-cpu

out_dir = 'out-speedrun-char-cpu'
eval_interval = 325  # evaluate at the start and at the end only
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
rope = True
qk_norm = True

optimizer = 'muon'
muon_lr = 0.02  # the blocks' matrices
learning_rate = 3e-3  # embeddings, head and gains (AdamW)
max_iters = 325
lr_decay_iters = 325
min_lr = 3e-4
warmup_iters = 20
beta2 = 0.99
