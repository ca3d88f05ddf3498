# finetune GPT-2 XL (1.5B) on tiny Shakespeare with LoRA on one 16 GB GPU (a Colab T4), where full finetuning
# needs ~25 GB of training state before activations (README: LoRA has the calculation):
# python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare_lora.py
# python sample.py --out_dir=out-shakespeare-lora
import time

out_dir = 'out-shakespeare-lora'
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'lora-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2; the adapters fit any of them, or a local directory / checkpoint file

# adapters of rank 8 on every Linear of the 48 blocks: 9.8M trained weights (0.6%), 157 MB of weights,
# gradients and AdamW state; the frozen base in the run's dtype (float16 on a T4, bfloat16 on an A100): 3.1 GB
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05

# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter, ~9 iters per epoch of Shakespeare.
# Activations at batch 1 x 1024 tokens: ~2.7 GB for 48 blocks (16-bit, memory-efficient attention) plus ~0.6 GB
# for the 50257-wide logits and their gradient: ~6.5 GB in all, so no activation checkpointing is needed.
# batch_size = 2 needs ~10 GB; more wants activation_checkpointing = True (the logits then dominate).
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# adapters start at zero and learn faster than whole weights: a higher constant learning rate than full finetuning
learning_rate = 2e-4
decay_lr = False
weight_decay = 0.0
always_save_checkpoint = False  # best.pt (merged) is written when val improves; ckpt.pt holds the adapters
