# LoRA on a CPU in minutes: adapters on a small GPT trained here (the quick start's out-quickstart/best.pt), on
# the same tiny Shakespeare; with network, GPT-2 small on the BPE dataset is the same command plus
# --init_from=gpt2 --dataset=shakespeare (python data/shakespeare/prepare.py first).
# python train.py config/quickstart.py && python train.py config/finetune_shakespeare_lora_cpu.py
# python sample.py --out_dir=out-shakespeare-lora-cpu --num_samples=1 --max_new_tokens=200

out_dir = 'out-shakespeare-lora-cpu'
dataset = 'shakespeare_char'
init_from = 'out-quickstart/best.pt'
device = 'cpu'
compile = False
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

lora_rank = 8
lora_alpha = 16.0

batch_size = 12
gradient_accumulation_steps = 1
block_size = 64
max_iters = 200

learning_rate = 3e-3
decay_lr = False
weight_decay = 0.0
