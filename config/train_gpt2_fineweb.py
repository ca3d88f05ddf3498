# config for training GPT-2 (124M) on FineWeb-edu's 10B-token sample, as llm.c and build-nanogpt train it:
# ~0.5M tokens per step for 19,073 steps (one epoch of ~10B tokens), 715 warmup steps, cosine from 6e-4 to 6e-5
# prepare the data first (~28GB of parquet streamed, ~20GB of train.bin written):
# $ python data/fineweb/prepare.py --num_proc=16
# then on 1 node of 8 GPUs:
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
#
# published figures to compare with (theirs, not reproduced here):
# - llm.c, GPT-2 124M on 10B tokens of FineWeb (karpathy/llm.c discussion #481, May 2024): val loss about 3.29
#   on FineWeb's val split ("about 3.29", as modded-nanogpt's README quotes it; modded-nanogpt's target is 3.28),
#   HellaSwag 29.9 against OpenAI's GPT-2 124M at 29.4 (GPT-3 124M, 300B tokens: 33.7)
# - build-nanogpt (karpathy/build-nanogpt, the "Let's reproduce GPT-2 (124M)" lecture), these settings on
#   FineWeb-edu 10B: its train_gpt2.py (max_steps 19073, warmup_steps 715, max_lr 6e-4, min_lr 10% of it,
#   2**19 tokens a step); its README publishes no figures: the lecture shows HellaSwag passing GPT-2 124M's 29.4
# val losses on FineWeb-edu are not comparable with llm.c's on FineWeb: another val split, another corpus

wandb_log = True
wandb_project = 'fineweb'
wandb_run_name = 'gpt2-124M-fineweb-edu-10B'

dataset = 'fineweb'

# 16 batch size * 1024 block size * 32 gradaccum = 524,288 tokens per step (2**19), split over the processes
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

# 19,073 steps * 524,288 tokens = 10.0B tokens: one epoch of sample-10BT
max_iters = 19073
lr_decay_iters = 19073
warmup_iters = 715
learning_rate = 6e-4
min_lr = 6e-5

weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# build-nanogpt evaluates every 250 steps on ~1.3M val tokens (80 * 16 * 1024 here) and HellaSwag's 10,042 items
eval_interval = 250
eval_iters = 80
log_interval = 10
hellaswag = 'Rowan/hellaswag'
hellaswag_items = 10042
