"""
Export a checkpoint as a Hugging Face GPT-2 directory, loadable with transformers:
$ python export_hf.py --out_dir=out-shakespeare --export_dir=hf-model
then GPT2LMHeadModel.from_pretrained('hf-model') or pipeline('text-generation', model='hf-model').
A LoRA run's checkpoint exports merged; --adapter_dir=DIR also writes its adapter in peft's format, with the base
it adapts in DIR/base: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('DIR/base'), 'DIR').
This is the reverse of GPT.from_pretrained in model.py: the parameter names are the same, and the four
Conv1D weights of Hugging Face's GPT-2 are stored transposed relative to our nn.Linear.
"""

from configurator import UserError, configure, report_errors

if __name__ == '__main__':
    report_errors()  # first: a mistake is one 'error:' line, Ctrl-C (even while importing) no traceback

import hashlib
import os
import shutil
import tempfile
import warnings

import torch

from checkpoint import load_checkpoint, lora_base, model_from_checkpoint, newest_name
from dataset import first_line
from model import GPT

# -----------------------------------------------------------------------------
out_dir = 'out'  # the training run's directory
checkpoint = ''  # file in out_dir to export; '' means best.pt if present, else ckpt.pt
export_dir = ''  # where to write the Hugging Face model; '' means <out_dir>/hf (an earlier export there is replaced)
adapter_dir = ''  # a LoRA run's: also write its adapter (peft's format) here, and the base it adapts in <adapter_dir>/base
# -----------------------------------------------------------------------------

GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE; training pads it to 50304, rows that no token ever uses
PADDED_VOCAB_SIZE = 50304
HF_BUFFERS = ('.attn.bias', '.attn.masked_bias')  # causal-mask buffers of older transformers, not weights
TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# what an export holds: an export_dir holding only these (an earlier export) may be replaced, anything else not
EXPORT_FILES = {'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
                'vocab.json', 'merges.txt', 'special_tokens_map.json', 'added_tokens.json', 'chat_template.jinja'}
ADAPTER_FILES = {'adapter_config.json', 'adapter_model.safetensors', 'README.md', 'base'}  # what peft writes, and ours
TIKTOKEN_GPT2_FILES = {  # tiktoken caches each file under the sha1 of its URL
    'vocab.json': 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json',
    'merges.txt': 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe',
}


def hf_state_dict(model, hf_keys, vocab_size):
    """Our weights under Hugging Face's names: Conv1D weights transposed, the vocabulary cut to vocab_size,
    and zeros for the biases a bias=False model lacks (adding zero changes nothing)."""
    ours = model.state_dict()
    state = {}
    for key, hf_shape in hf_keys.items():
        if key.endswith(HF_BUFFERS):
            continue
        if key not in ours:
            assert key.endswith('.bias'), f"no weights for {key}"
            state[key] = torch.zeros(hf_shape)
            continue
        tensor = ours[key].t() if key.endswith(TRANSPOSED) else ours[key]
        if key in ('transformer.wte.weight', 'lm_head.weight'):
            tensor = tensor[:vocab_size]
        state[key] = tensor.detach().float().contiguous()
    return state


def offline_gpt2_tokenizer():
    """GPT-2's tokenizer if it can be had without network: from the Hugging Face cache, or built from the
    BPE files tiktoken has cached (when data/shakespeare/prepare.py or sample.py used them). None otherwise."""
    from transformers import GPT2TokenizerFast
    try:  # (recent transformers return an empty tokenizer instead of failing, hence the length check)
        tokenizer = GPT2TokenizerFast.from_pretrained('gpt2', local_files_only=True)
        if len(tokenizer) == GPT2_VOCAB_SIZE:
            return tokenizer
    except Exception:
        pass
    # where tiktoken keeps them, by tiktoken's own rule
    cache_dir = (os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR')
                 or os.path.join(tempfile.gettempdir(), 'data-gym-cache'))
    paths = {name: os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
             for name, url in TIKTOKEN_GPT2_FILES.items()}
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained wants the files under their usual names
        for name, path in paths.items():
            shutil.copyfile(path, os.path.join(tmp, name))
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
    return tokenizer if len(tokenizer) == GPT2_VOCAB_SIZE else None


def main():
    name = checkpoint or newest_name(out_dir)
    target = export_dir or os.path.join(out_dir, 'hf')
    ckpt = load_checkpoint(os.path.join(out_dir, name))
    if adapter_dir and not ckpt.get('lora'):
        raise UserError(f"{os.path.join(out_dir, name)} is not of a LoRA run (lora_rank=0), so it has no adapter to "
                        "export; drop --adapter_dir")
    model = model_from_checkpoint(ckpt, dropout=0.0)
    model.eval()
    cfg = model.config
    not_gpt2 = [f'{setting}=True' for setting in ('rope', 'qk_norm') if getattr(cfg, setting)]
    if not_gpt2:
        raise UserError(f"{os.path.join(out_dir, name)} was trained with {', '.join(not_gpt2)}, which GPT-2's "
                        "architecture (transformers' GPT2LMHeadModel) does not have; only models trained without "
                        "them can be exported")
    check_target(target, EXPORT_FILES, '--export_dir')
    if adapter_dir:
        check_target(adapter_dir, ADAPTER_FILES, '--adapter_dir')
    hf_model, vocab_size, bpe = to_hf(model)
    tokenizer = offline_gpt2_tokenizer() if bpe else None
    publish([hf_model] + ([tokenizer] if tokenizer else []), target)
    print(f"exported {ckpt.get('sharded', os.path.join(out_dir, name))} (iter {ckpt.get('iter_num', '?')}) to {target}"
          + (f", vocabulary trimmed from {cfg.vocab_size} to {vocab_size}" if cfg.vocab_size != vocab_size else ''))
    if not bpe:
        print(f"note: no tokenizer saved, vocab_size {vocab_size} is not GPT-2's; a character-level model "
              "encodes text with the stoi/itos of its dataset's meta.pkl")
    elif tokenizer is not None:
        print(f"saved GPT-2's tokenizer to {target}")
    else:
        print("note: GPT-2's tokenizer is not available offline, so none was saved; with network, add it with "
              f"python -c \"from transformers import GPT2TokenizerFast; "
              f"GPT2TokenizerFast.from_pretrained('gpt2').save_pretrained('{target}')\"")
    if adapter_dir:
        export_adapter(ckpt, hf_model, tokenizer)


def to_hf(model):
    """Our GPT as transformers' GPT2LMHeadModel, checked to give the same logits. Returns it, its vocabulary size
    (GPT-2's 50257 when ours is it padded) and whether that is GPT-2's BPE."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = model.config
    bpe = GPT2_VOCAB_SIZE <= cfg.vocab_size <= PADDED_VOCAB_SIZE  # GPT-2's tokens, maybe padded
    vocab_size = GPT2_VOCAB_SIZE if bpe else cfg.vocab_size
    activation = 'gelu_new' if cfg.gelu_approximate == 'tanh' else 'gelu'  # transformers' names for the two
    hf_config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                           n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function=activation,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=50256 if bpe else None, eos_token_id=50256 if bpe else None)
    hf_model = GPT2LMHeadModel(hf_config)
    hf_keys = {k: v.shape for k, v in hf_model.state_dict().items()}
    result = hf_model.load_state_dict(hf_state_dict(model, hf_keys, vocab_size), strict=False)
    assert not result.unexpected_keys and all(k.endswith(HF_BUFFERS) for k in result.missing_keys), result
    hf_model.eval()
    # generate() and pipeline() stop at the context length by default, where the position table ends
    hf_model.generation_config.max_length = cfg.block_size
    hf_model.generation_config.pad_token_id = 50256 if bpe else None
    ours = logits_on_sample(model, vocab_size, cfg.block_size)[..., :vocab_size]
    diff = (logits_on_sample(hf_model, vocab_size, cfg.block_size) - ours).abs().max().item()
    assert diff < 1e-4, f"the exported model's logits differ from the checkpoint's by {diff}"
    return hf_model, vocab_size, bpe


@torch.no_grad()
def logits_on_sample(model, vocab_size, block_size):
    """Logits of our GPT or a transformers model on a few fixed tokens: how an export is checked."""
    idx = torch.randint(0, vocab_size, (1, min(block_size, 16)), generator=torch.Generator().manual_seed(0))
    out = model(idx) if not isinstance(model, GPT) else model(idx, targets=idx)[0]
    return out.logits if hasattr(out, 'logits') else out


def export_adapter(ckpt, merged_hf, tokenizer):
    """Write the checkpoint's LoRA adapter with peft (its Conv1D layers are fan_in_fan_out) into adapter_dir and
    the base it adapts into adapter_dir/base, checked to give the merged export's logits."""
    from peft import get_peft_model, set_peft_model_state_dict
    import lora
    warnings.filterwarnings('ignore', category=FutureWarning)  # peft's calls of transformers' renamed methods
    base_hf, vocab_size, _ = to_hf(lora_base(ckpt, dropout=0.0).eval())
    adapted = get_peft_model(base_hf, lora.lora_config(ckpt['lora'], fan_in_fan_out=True))
    weights = {f'base_model.model.{k}': v for k, v in ckpt.get('adapters', ckpt['model']).items()}  # PeftModel's names
    result = set_peft_model_state_dict(adapted, weights)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if 'lora_' in k], result
    adapted.eval()
    block_size = merged_hf.config.n_positions
    diff = (logits_on_sample(adapted, vocab_size, block_size)
            - logits_on_sample(merged_hf, vocab_size, block_size)).abs().max().item()
    assert diff < 1e-4, f"the exported adapter's logits differ from the merged model's by {diff}"

    class AdapterAndBase:
        def save_pretrained(self, directory):  # the adapter alone, then the base without it
            adapted.save_pretrained(directory)
            for part in [adapted.unload()] + ([tokenizer] if tokenizer else []):
                part.save_pretrained(os.path.join(directory, 'base'))
    publish([AdapterAndBase()], adapter_dir)
    print(f"exported the LoRA adapter to {adapter_dir} and its base to {os.path.join(adapter_dir, 'base')}: "
          f"PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('{os.path.join(adapter_dir, 'base')}'), "
          f"'{adapter_dir}')")


def check_target(directory, files, option):
    """Fail now, before any work, unless directory is new, empty or an earlier export (of files), and can be
    written."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{option}={directory} is a file, not a directory; choose another {option}")
    if os.path.isdir(directory) and not set(os.listdir(directory)) <= files:
        raise UserError(f"{option}={directory} holds other files than an earlier export, which the export would "
                        f"replace; choose a new or empty {option}")
    try:  # the export is written beside it, then renamed
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UserError(f"cannot write to {option}={directory} ({e.strerror}); choose another {option}") from None


def publish(parts, target):
    """save_pretrained each of parts into a folder beside target, then swap it in: a failed write (a full disk)
    leaves target as it was."""
    staging = os.path.join(os.path.dirname(os.path.abspath(target)), f'.{os.path.basename(target)}.tmp')
    shutil.rmtree(staging, ignore_errors=True)  # one name: what a killed export left is cleared by the next
    try:
        os.mkdir(staging)
        for part in parts:
            part.save_pretrained(staging)
    except Exception as e:  # OSError, or safetensors' own error type for a failed write
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"could not write the export to {target}: {first_line(e)}; {target} is unchanged") from None
    replaced = staging + '.replaced'
    if os.path.exists(target):
        os.rename(target, replaced)  # renames within one folder: they need no space
    os.rename(staging, target)
    shutil.rmtree(replaced, ignore_errors=True)


if __name__ == '__main__':
    configure(globals())
    main()
