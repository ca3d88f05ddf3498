"""
FSDP2 (torch.distributed.fsdp.fully_shard) over a run's processes: every transformer block is a unit whose
parameters are gathered for its forward and backward only, the root holds the rest (embeddings, final norm, the
tied lm_head). A model built on the meta device is materialised shard by shard: no device ever holds the whole
model, and in host memory only rank 0 does, for a start from other weights (GPT-2's, a checkpoint file's).
"""

import copy

import torch

from model import rotary_tables


def shard(model, dtype, device, weights=None):
    """Shard model in place: compute in dtype, gradients reduced in float32. The model is on the meta device (on
    rank 0 it may hold weights to hand out) and gets its shards on device, filled with weights: 'init' draws
    GPT()'s initial weights, 'rank0' hands out rank 0's, None leaves them for a sharded checkpoint to fill."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # (imported here: see checkpoint.py)
    mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    full_state = model.state_dict() if weights == 'rank0' and not is_meta(model) else {}
    if full_state:
        model.to_empty(device='meta')  # (its weights stay in full_state)
        model.transformer.wte.weight = model.lm_head.weight  # tied again: to_empty gave each its own parameter
    # each module's own unsharded copy, still on the meta device, to draw the initial weights in
    hosts = [(name, copy.deepcopy(m)) for name, m in model.named_modules()
             if weights == 'init' and list(m.parameters(recurse=False))]
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    model.to_empty(device=device)
    if model.config.rope:  # computed, never saved: computed again on the device
        cos, sin = rotary_tables(model.config.block_size, model.config.n_embd // model.config.n_head)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    if weights == 'init':
        draw_initial_weights(model, hosts)
    elif weights == 'rank0':
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))
        full_state.clear()  # rank 0's whole copy is no longer needed


def draw_initial_weights(model, hosts):
    """GPT()'s initial weights, drawn again one module at a time in host memory (hosts: each module's unsharded
    copy on the meta device), each process keeping its own shards of them: the same random numbers in the same
    order as GPT() under the same seed, so every process holds its shards and at most one module whole."""
    from torch.distributed.tensor import distribute_tensor

    # every module is drawn in one buffer, as big as the biggest module: memory freed and taken again for each
    # module would be kept by the C allocator (~10% more resident memory for GPT-2 large)
    buffer = torch.empty(max(sum(p.numel() for p in host.parameters()) for _, host in hosts))
    for _, host in hosts:
        offset = 0
        for k, p in list(host.named_parameters()):
            setattr(host, k, torch.nn.Parameter(buffer[offset:offset + p.numel()].view(p.shape)))
            offset += p.numel()

    def drawn(draw):  # draw(name, host): the names of the host's parameters to keep
        for name, host in hosts:
            for k in draw(name, host) or ():
                shards = model.get_parameter(f'{name}.{k}')  # (src_data_rank=None: this process's own draws)
                mine = distribute_tensor(host.get_parameter(k).detach(), shards.device_mesh, shards.placements,
                                         src_data_rank=None)
                with torch.no_grad():
                    shards.to_local().copy_(mine.to_local())
    drawn(lambda name, host: host.reset_parameters())  # the constructors' draws, which GPT() then draws over
    drawn(lambda name, host: model._init_weights(host) or [k for k, _ in host.named_parameters()])
    drawn(lambda name, host: ['weight'] if model._init_residual(name, host) else [])


def is_meta(model):
    return any(p.is_meta for p in model.parameters())
