"""
Low-rank adapters (LoRA, https://arxiv.org/abs/2106.09685) on a frozen GPT, made by peft: each target Linear
keeps its weight W, frozen, and learns W + (alpha / rank) * B @ A, with A (rank x in) and B (out x rank, zero at
first, so training starts from the base's exact outputs). Only A and B are trained and saved in ckpt.pt, with what
identifies the base; best.pt holds the merged weights, a plain GPT that every reader loads as any other.
peft is imported only by the runs that use it.
"""

import hashlib
import os

import torch

from configurator import UserError

ADAPTER = 'default'  # peft's name for a model's one adapter


def lora_config(record, fan_in_fan_out=False):
    """peft's LoraConfig for a record (rank, alpha, dropout, targets); fan_in_fan_out for Hugging Face's GPT-2,
    whose Conv1D weights are stored transposed."""
    from peft import LoraConfig
    return LoraConfig(r=record['rank'], lora_alpha=record['alpha'], lora_dropout=record['dropout'],
                      target_modules=record['targets'].split(','), fan_in_fan_out=fan_in_fan_out, bias='none')


def fingerprint(model):
    """sha256 of the model's weights, names, shapes and dtypes: a base that changed in any way gets another."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def add_adapters(model, base, rank, alpha, dropout, targets):
    """Give model (a GPT with its base weights) adapters on the targets and freeze everything else, in place.
    Returns the run's LoRA record, which its checkpoints keep: the settings and the base (its name or path, and
    the fingerprint of its weights)."""
    base = os.path.abspath(base) if os.path.exists(base) else base  # a path, or a hub name
    record = dict(base=base, fingerprint=fingerprint(model), rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    adapted(model, record)
    return record


def adapted(model, record):
    """peft's LoraModel around model, which it changes in place: the targets get adapters, the rest is frozen."""
    from peft.tuners.lora import LoraModel
    return LoraModel(model, lora_config(record), ADAPTER)


def freeze_base(model, dtype, run_dtype):
    """Hold the frozen weights in dtype (16-bit halves their memory); the adapters stay float32 for training."""
    if dtype not in ('float32', run_dtype):  # autocast computes in run_dtype: a 16-bit weight needs it
        raise UserError(f"lora_base_dtype={dtype} needs --dtype={dtype} (the run computes in {run_dtype}); use "
                        f"lora_base_dtype=float32, or leave it '' to follow --dtype")
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(getattr(torch, dtype))


def adapter_weights(model):
    """The adapters' weights alone, under peft's names (as in its adapter_model.safetensors), on the CPU."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_adapters(model, weights):
    """Put adapter_weights() back into a model that adapted() gave the same adapters."""
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if 'lora_' in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"the adapters do not fit the model: missing {missing[:2]}, unexpected "
                         f"{result.unexpected_keys[:2]}")


def merged_weights(model):
    """The weights of the plain GPT that computes what model computes with its adapters, on the CPU in float32:
    each target's W + its adapter's delta (peft's get_delta_weight), the rest as they are. model is unchanged."""
    from peft.tuners.lora import LoraLayer
    state = {k.replace('.base_layer.', '.'): v.detach().float().cpu() for k, v in model.state_dict().items()
             if 'lora_' not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):  # (in float32: a small delta added to 16-bit weights would be rounded away)
            state[f'{name}.weight'] = (module.get_base_layer().weight.float()
                                       + module.get_delta_weight(ADAPTER).float()).cpu()
    return state


def merged(model, record):
    """model, with adapters matching record and their weights loaded, turned into the plain GPT (peft's
    merge_and_unload, in the base's dtype)."""
    return adapted(model, record).merge_and_unload()
