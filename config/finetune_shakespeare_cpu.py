# finetune GPT-2 small (124M) on tiny Shakespeare on a CPU in a few minutes; init_from may also be a local
# directory of Hugging Face GPT-2 weights (e.g. --init_from=path/to/gpt2)
# python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare_cpu.py
# python sample.py --out_dir=out-shakespeare-cpu --num_samples=1 --max_new_tokens=200

out_dir = 'out-shakespeare-cpu'
dataset = 'shakespeare'
init_from = 'gpt2'
eval_interval = 10
eval_iters = 10
log_interval = 1
always_save_checkpoint = False

# 4 x 128 = 512 tokens per iteration: ~5 s per iteration on 2 CPU cores
batch_size = 1
gradient_accumulation_steps = 4
block_size = 128
max_iters = 20

learning_rate = 3e-5
decay_lr = False
