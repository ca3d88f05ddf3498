"""
The GPT-2 language model in one file, with a key/value cache for fast generation.
References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's PyTorch port: https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to block_size."""

    def __init__(self, config, batch_size):
        # one buffer per layer holding keys and values side by side: an update is one slice and one copy
        self.shape = (batch_size, 2, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.kv = [None] * config.n_layer  # allocated at first use, in the dtype autocast gives keys and values
        self.length = 0  # tokens cached so far; advanced by GPT.forward after all layers

    def update(self, layer, kv):
        """Append kv (B, 2, nh, T, hs) to the layer's cache; return all its keys and values so far."""
        if self.kv[layer] is None:
            self.kv[layer] = kv.new_empty(self.shape)
        end = self.length + kv.size(3)
        cache = self.kv[layer]
        cache[:, :, :, self.length:end] = kv
        return cache[:, 0, :, :end], cache[:, 1, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}"
        self.layer = layer
        # key, query, value projections for all heads, in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, rotary=None, kv_cache=None):
        B, T, C = x.size()
        # queries, keys and values of all heads from one matmul, viewed as (B, 3, nh, T, hs) without a copy
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.unbind(1)
        if self.qk_norm:  # unit-RMS queries and keys: attention logits cannot blow up
            # (in v's dtype: CUDA autocast computes rms_norm in float32, which would double the KV cache)
            q, k = F.rms_norm(q, (q.size(-1),)).to(v.dtype), F.rms_norm(k, (k.size(-1),)).to(v.dtype)
        if rotary is not None:  # positions enter as rotations of queries and keys, cached already rotated
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, torch.stack((k, v), dim=1))
        past = k.size(2) - T  # keys of earlier positions, from the cache, before the T new ones
        dropout_p = self.dropout if self.training else 0.0
        # SDPA's is_causal aligns its mask top-left, which is right only without a past
        mask = causal_mask(T, past, x.device) if past and T > 1 else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=not past)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


def causal_mask(T, past, device):
    """(T, past + T) booleans: the query at position past + i sees the keys at positions up to its own."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)


def rotary_tables(block_size, head_size, base=10000.0):
    """cos and sin (block_size, head_size / 2) of rotary embeddings: RoFormer, https://arxiv.org/abs/2104.09864"""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle: q.k then depends on
    the positions' difference only."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.gelu_approximate in ('none', 'tanh'), f"unknown gelu_approximate '{config.gelu_approximate}'"
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rotary, kv_cache)
        return x + self.mlp(self.ln_2(x))



@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    # 'tanh' for GPT-2's weights, which were trained with that approximation; from scratch the exact GELU
    # (as nanoGPT) learns as well and is ~2x cheaper on CPUs
    gelu_approximate: str = 'none'
    # the faster recipes' options (README "Faster recipes"); the defaults are GPT-2's architecture
    rope: bool = False  # rotary position embeddings instead of learned ones (no wpe)
    qk_norm: bool = False  # RMS-normalised queries and keys


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.rope:
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        else:
            modules['wpe'] = nn.Embedding(config.block_size, config.n_embd)  # GPT-2's learned positions
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: https://paperswithcode.com/method/weight-tying
        self.activation_checkpointing = False  # train.py's setting: see forward
        self.apply(self._init_weights)
        for name, module in self.named_modules():
            self._init_residual(name, module)

    def get_num_params(self, non_embedding=True):
        """Parameter count. The position embeddings are subtracted by default; the token embeddings are
        counted because they are tied to (and so double as) the lm_head weights."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):  # ones and zeros, as built (sharding.py draws into empty memory)
            module.reset_parameters()

    def _init_residual(self, name, module):
        """GPT-2 draws the residual projections again at 0.02/sqrt(2 * n_layer), as each block adds two to the
        residual stream, once every module is drawn. True if module is one (sharding.py draws them again)."""
        if not name.endswith('c_proj'):
            return False
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        return True

    def forward(self, idx, targets=None, kv_cache=None):
        b, t = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        assert start + t <= self.config.block_size, \
            f"cannot forward a sequence of length {start + t}, block size is only {self.config.block_size}"
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.rope:
            rotary = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        else:
            x = x + self.transformer.wpe.weight[start:start + t]  # positions start..start+t-1: a slice, no lookup
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed (same dropout masks) in backward
                x = checkpoint(block, x, rotary, use_reentrant=False)
            else:
                x = block(x, rotary, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.length += t
        if targets is not None:
            logits = self.lm_head(x)
            # in float32 whatever the compute dtype (FSDP's bfloat16 parameters give bfloat16 logits)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        else:
            # inference needs only the last position: skip the lm_head everywhere else
            logits = self.lm_head(x[:, -1:, :])
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to finetune GPT-2 (1024) on shorter windows."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.rope:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """GPT-2 weights from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or from a local
        directory that transformers.GPT2LMHeadModel.from_pretrained accepts. Only dropout can be overridden."""
        override_args = override_args or {}
        assert set(override_args) <= {'dropout'}, 'only dropout can be overridden'
        hf = load_hf_gpt2(name_or_path)
        hf_config = hf.config
        if hf_config.activation_function not in HF_GELUS:
            raise ValueError(f"'{name_or_path}' uses activation_function='{hf_config.activation_function}'; "
                             f"only {', '.join(HF_GELUS)} are supported")
        config = GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                           n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                           dropout=override_args.get('dropout', 0.0), bias=True,
                           gelu_approximate=HF_GELUS[hf_config.activation_function])
        model = GPT(config)
        sd = model.state_dict()
        sd_hf = hf.state_dict()
        # OpenAI's checkpoints use Conv1D modules, which store these weights transposed relative to nn.Linear
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        keys_hf = [k for k in sd_hf if not k.endswith(('.attn.masked_bias', '.attn.bias'))]  # buffers, not weights
        assert set(keys_hf) == set(sd), f"mismatched keys: {sorted(set(keys_hf) ^ set(sd))}"
        with torch.no_grad():
            for k in keys_hf:
                sd[k].copy_(sd_hf[k].t() if k.endswith(transposed) else sd_hf[k])
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon_lr=0.0):
        """The optimizers, as a list: AdamW for every parameter, or with muon_lr > 0 Muon for the hidden matrices
        (the blocks' Linear weights) and AdamW for the rest (embeddings, lm_head, gains, biases), as
        modded-nanogpt and nanochat split them. Each group's peak learning rate is its 'initial_lr'."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = [p for n, p in params if muon_lr and p.dim() == 2 and n.startswith('transformer.h.')]
        rest = [p for n, p in params if not any(p is h for h in hidden)]
        # weight decay on matrices and embeddings (>= 2-D), none on biases and norm gains
        optim_groups = [
            {'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay, 'initial_lr': learning_rate},
            {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0, 'initial_lr': learning_rate},
        ]
        # the fused kernel is one launch for all parameters instead of a dozen per tensor; it exists for CUDA and CPU
        fused = True if device_type in ('cuda', 'cpu') else None
        optimizers = [torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=fused)]
        if hidden:  # orthogonalised momentum updates: https://kellerjordan.github.io/posts/muon/
            optimizers.append(torch.optim.Muon([{'params': hidden, 'initial_lr': muon_lr}], lr=muon_lr,
                                               weight_decay=weight_decay, adjust_lr_fn='original'))
        return optimizers

    def flops_per_token(self):
        """Forward plus backward FLOPs per token, PaLM paper Appendix B: https://arxiv.org/abs/2204.02311"""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over the peak FLOP/s of the device in use."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()  # not inference_mode: generated tokens must stay usable as training inputs
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                 use_cache=True, on_token=None):
        """Extend each row of idx (LongTensor (b, t)) by up to max_new_tokens sampled tokens.
        temperature 0 is greedy decoding; top_k and top_p (nucleus) restrict sampling to the likeliest tokens.
        Generation stops early once every row has produced stop_token. on_token(next_tokens) sees each step.
        With use_cache the prompt is processed once and then one token per step; once the sequence outgrows
        block_size the window slides, positions change, and no cache can be reused: the cropped window is
        processed anew each step, as in the uncached definition (use_cache=False), kept as the reference."""
        kv_cache = None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if not use_cache or idx.size(1) > self.config.block_size:
                logits, _ = self(idx[:, -self.config.block_size:])
            elif kv_cache is None:
                kv_cache = KVCache(self.config, idx.size(0))
                logits, _ = self(idx, kv_cache=kv_cache)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=kv_cache)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p)
            if stop_token is not None:
                idx_next = idx_next.masked_fill(done[:, None], stop_token)  # finished rows keep emitting stop
                done |= idx_next[:, 0] == stop_token
            idx = torch.cat((idx, idx_next), dim=1)
            if on_token is not None:
                on_token(idx_next)
            if stop_token is not None and done.all():
                break
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits (b, vocab): greedy at temperature 0, else softmax sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of tokens whose probabilities add up to top_p (the top token always stays)
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        remove = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before a token already suffices
        logits = logits.scatter(1, sorted_idx, sorted_logits.masked_fill(remove, -float('Inf')))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


HUB_MODELS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # 124M, 350M, 774M, 1558M parameters
# transformers' names for the GELUs, and the matching nn.GELU(approximate=...): gelu_new is GPT-2's own
HF_GELUS = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'none'}


def load_hf_gpt2(name_or_path):
    """transformers' GPT2LMHeadModel from a hub name or a local directory, or a one-line ValueError."""
    import json
    import os
    from transformers import GPT2LMHeadModel
    if name_or_path not in HUB_MODELS and not os.path.isdir(name_or_path):
        raise ValueError(f"unknown model '{name_or_path}': use one of {', '.join(HUB_MODELS)} "
                         "or a local directory saved with transformers' save_pretrained")
    config_path = os.path.join(name_or_path, 'config.json')
    if os.path.isfile(config_path):  # a local directory: refuse another architecture before loading it
        try:
            with open(config_path) as f:
                model_type = json.load(f).get('model_type')
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{config_path} is not a readable Hugging Face config: {e}") from None
        if model_type != 'gpt2':
            raise ValueError(f"'{name_or_path}' holds a {model_type or 'unnamed'} model (model_type in its "
                             "config.json), not GPT-2; only GPT-2 weights (model_type 'gpt2') can be loaded")
    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path)
    except OSError as e:
        if os.path.isdir(name_or_path):
            raise ValueError(f"'{name_or_path}' holds no GPT-2 weights that transformers can load "
                             f"(expected config.json and model.safetensors or pytorch_model.bin): {e}") from None
        raise ValueError(f"could not download the weights of '{name_or_path}' from the Hugging Face hub "
                         "(no network?); download them elsewhere with GPT2LMHeadModel.from_pretrained(...)"
                         ".save_pretrained(DIR) and set init_from=DIR") from None
