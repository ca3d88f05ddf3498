"""
FSDP2 (torch.distributed.fsdp.fully_shard) over a run's processes: every transformer block is a unit whose
parameters are gathered for its forward and backward only, the root holds the rest (embeddings, final norm, the
tied lm_head). A model built on the meta device is materialised shard by shard: no device, and at most one
process (rank 0, in host memory, for a start from scratch), ever holds the whole model.
"""

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import rotary_tables


def shard(model, dtype, device, full_state=None):
    """Shard model in place: compute in dtype, gradients reduced in float32. A model on the meta device gets its
    shards on device, filled from rank 0's full_state (a state_dict; {} on the other ranks) if given, else left
    for a sharded checkpoint to fill."""
    mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    if full_state is None and not is_meta(model):
        return
    model.to_empty(device=device)
    if model.config.rope:  # computed, never saved: computed again on the device
        cos, sin = rotary_tables(model.config.block_size, model.config.n_embd // model.config.n_head)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    if full_state is not None:
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))
        full_state.clear()  # rank 0's whole copy is no longer needed


def is_meta(model):
    return any(p.is_meta for p in model.parameters())
