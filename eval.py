"""
Evaluate a model, loaded as sample.py loads it (a checkpoint in out_dir, or GPT-2 weights), on:
- text: loss, perplexity and bits per character (char models) or per byte (BPE) of any UTF-8 file
  (--text=PATH) or of a prepared dataset's whole split (--dataset=NAME --split=val)
- hellaswag: zero-shot accuracy on HellaSwag's validation split (10,042 items)
- lambada: zero-shot accuracy and per-word perplexity on LAMBADA (OpenAI's test split, 5,153 items)
$ python eval.py --out_dir=out-shakespeare-char --dataset=shakespeare_char
$ python eval.py --init_from=gpt2 --tasks=hellaswag,lambada --out=results.json
Benchmarks are read with datasets.load_dataset: a hub NAME or NAME@REVISION (the defaults, and their revisions:
data/prepare_utils.py's HUB_SOURCES), or a local .json/.jsonl/.parquet file.
"""

from configurator import UserError, configure, report_errors

if __name__ == '__main__':
    report_errors()  # first: a mistake is one 'error:' line, Ctrl-C (even while importing) no traceback

import json
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from checkpoint import load_model
from data.prepare_utils import BUILDERS, HUB_SOURCES, load_hub
from dataset import Tokenizer, check_vocabulary, dataset_dir, first_line, load_meta, load_tokens, read_manifest
from hardware import autocast_context, best_device, best_dtype, check_device, dtype_default

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a GPT-2 name ('gpt2' ... 'gpt2-xl') or a local Hugging Face directory
out_dir = 'out'  # ignored if init_from is not 'resume'
checkpoint = ''  # file in out_dir to load; '' means best.pt if present, else ckpt.pt
tasks = 'text'  # comma-separated: text, hellaswag, lambada
text = ''  # task text: a UTF-8 file, encoded with the model's own vocabulary
dataset = ''  # task text, instead of --text: a prepared dataset (as in train.py), its split scored whole
split = 'val'  # which split of --dataset: 'val' or 'train'
stride = 0  # task text: tokens between window starts, at most block_size (the default, 0); less gives overlap
hellaswag = HUB_SOURCES['hellaswag'][0]  # hub NAME[@REVISION], or a .json/.jsonl/.parquet file: ctx, endings, label
lambada = HUB_SOURCES['lambada'][0]  # hub NAME[@REVISION], or a local .json/.jsonl/.parquet file with a text field
limit = 0  # evaluate only the first N items of each benchmark; 0 is all
batch_size = 16  # sequences per forward pass
out = ''  # also write the results to this JSON file
device = best_device()  # 'cpu', 'cuda', 'cuda:0', 'mps'; the default is the best one this machine has
dtype = best_dtype(device)  # float32, bfloat16 or float16; auto is the device's best (README: Precision)
# -----------------------------------------------------------------------------
TASKS = ('text', 'hellaswag', 'lambada')


@torch.no_grad()
def token_losses(model, sequences, ctx=nullcontext()):
    """For each sequence of token ids (at most block_size + 1 long), the loss (nats) and the greedy hit
    (argmax == token) of each of its tokens after the first, given all the tokens before it, as numpy arrays.
    Sequences are padded into one batch; padding is never seen by real tokens (attention is causal)."""
    device = next(model.parameters()).device
    lengths = [len(s) for s in sequences]
    padded = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    for i, s in enumerate(sequences):
        padded[i, :len(s)] = torch.as_tensor(s)
    x, y = padded[:, :-1].contiguous().to(device), padded[:, 1:].contiguous().to(device)
    with ctx:
        logits, _ = model(x, targets=y)  # with targets: logits at every position
    logits = logits.float()
    losses = F.cross_entropy(logits.transpose(1, 2), y, reduction='none').cpu().numpy()
    hits = (logits.argmax(-1) == y).cpu().numpy()
    return [(losses[i, :n - 1], hits[i, :n - 1]) for i, n in enumerate(lengths)]


def batched(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def text_loss(model, tokens, stride=0, batch_size=16, ctx=nullcontext(), progress=True):
    """Every token after the first scored once, given the tokens before it within a window of block_size:
    windows start every stride tokens (default block_size, side by side), and each scores the tokens that no
    earlier window scored. Returns (sum of the losses in nats, number of tokens scored)."""
    block_size = model.config.block_size
    stride = stride or block_size
    windows, scored_to = [], 0  # (start, end, how many of its last tokens to score)
    for start in range(0, len(tokens) - 1, stride):
        end = min(start + block_size, len(tokens) - 1)
        windows.append((start, end, end - scored_to))
        scored_to = end
        if end == len(tokens) - 1:
            break
    total, count = 0.0, 0
    for batch in tqdm(list(batched(windows, batch_size)), desc='text', disable=None if progress else True):
        results = token_losses(model, [np.asarray(tokens[s:e + 1], dtype=np.int64) for s, e, _ in batch], ctx)
        for (_, _, n), (losses, _) in zip(batch, results):
            total += float(losses[-n:].astype(np.float64).sum())
            count += n
    return total, count


def hellaswag_item(tokenizer, item, block_size):
    """The four sequences (context + ' ' + ending) of a HellaSwag item, cropped on the left to block_size + 1
    tokens, the number of ending tokens of each, and the label."""
    context = tokenizer.encode(item['ctx'], 'a HellaSwag context')
    sequences, ending_lengths = [], []
    for ending in item['endings']:
        ending = tokenizer.encode(' ' + ending, 'a HellaSwag ending')
        sequences.append((context + ending)[-(block_size + 1):])
        ending_lengths.append(len(ending))
    return sequences, ending_lengths, int(item['label'])


def hellaswag_problem(item):
    """What is wrong with a HellaSwag item, or '' if nothing: scoring needs a context, 2 or more endings and the
    index of the right one (an int, or a string of digits as the hub has it)."""
    ctx, endings, label = item['ctx'], item['endings'], item['label']
    if not isinstance(ctx, str) or not ctx:  # the first ending token must have a context to be scored given
        return f"ctx must be a non-empty string, not {shown(ctx)}"
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        return f"endings must be a list of 2 or more non-empty strings, not {shown(endings)}"
    if isinstance(label, str) and label.isdecimal():
        label = int(label)
    if type(label) is not int or not 0 <= label < len(endings):
        return f"label must be the index of the right ending, 0 to {len(endings) - 1}, not {shown(item['label'])}"
    return ''


def hellaswag_scores(model, tokenizer, items, ctx=nullcontext(), progress=True):
    """Per item: (summed loss of each ending's tokens, mean loss per ending token, label). acc picks the lowest
    sum, acc_norm the lowest mean, as build-nanogpt does."""
    scores = []
    for item in tqdm(items, desc='hellaswag', disable=None if progress else True):
        sequences, ending_lengths, label = hellaswag_item(tokenizer, item, model.config.block_size)
        sums = [float(losses[-n:].astype(np.float64).sum())
                for (losses, _), n in zip(token_losses(model, sequences, ctx), ending_lengths)]
        scores.append((sums, [s / n for s, n in zip(sums, ending_lengths)], label))
    return scores


def hellaswag_accuracy(scores):
    acc = np.mean([int(np.argmin(sums) == label) for sums, _, label in scores])
    acc_norm = np.mean([int(np.argmin(means) == label) for _, means, label in scores])
    return {'acc': float(acc), 'acc_norm': float(acc_norm), 'n': len(scores)}


def lambada_parts(passage):
    """A LAMBADA passage's context and its last word, the target. Trailing whitespace (a copy's newline, say) is
    dropped rather than refused: the word before it is still the one to predict."""
    context, _, word = passage.rstrip().rpartition(' ')
    return context, word


def lambada_problem(item):
    """What is wrong with a LAMBADA item, or '' if nothing."""
    passage = item['text']
    if not isinstance(passage, str) or not lambada_parts(passage)[0].strip():
        return f"text must be a passage, words then a space and the last word to predict, not {shown(passage)}"
    return ''


def lambada_item(tokenizer, item, block_size):
    """The tokens of a LAMBADA passage, its last word (with its leading space) the target, cropped on the left
    to block_size + 1 tokens; and the number of target tokens."""
    context, word = lambada_parts(item['text'])
    target = tokenizer.encode(' ' + word, 'a LAMBADA passage')
    return (tokenizer.encode(context, 'a LAMBADA passage') + target)[-(block_size + 1):], len(target)


def lambada_scores(model, tokenizer, items, batch_size=16, ctx=nullcontext(), progress=True):
    """Per item: (summed loss of the target word's tokens given the passage, whether greedy decoding would
    produce exactly the target's tokens). With the true tokens fed in, greedy decoding reproduces the target
    exactly when every target token is the argmax at its position."""
    scores = []
    for batch in tqdm(list(batched(items, batch_size)), desc='lambada', disable=None if progress else True):
        sequences, lengths = zip(*(lambada_item(tokenizer, item, model.config.block_size) for item in batch))
        for (losses, hits), n in zip(token_losses(model, sequences, ctx), lengths):
            scores.append((float(losses[-n:].astype(np.float64).sum()), bool(hits[-n:].all())))
    return scores


def lambada_metrics(scores):
    """acc, and the per-word perplexity of the GPT-2 paper and lm-evaluation-harness: exp of the mean summed
    target loss."""
    return {'acc': float(np.mean([hit for _, hit in scores])),
            'ppl': float(math.exp(np.mean([loss for loss, _ in scores]))), 'n': len(scores)}


ITEM_PROBLEMS = {'hellaswag': hellaswag_problem, 'lambada': lambada_problem}


def shown(value):
    """value's repr, cut short for an error line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def load_items(source, split, fields, setting, limit=0):
    """The rows of a benchmark, through datasets.load_dataset: a hub NAME[@REVISION] (its split; load_hub), or a
    local file. Each row is checked (ITEM_PROBLEMS), so that a bad one is named before anything is scored."""
    import datasets
    extension = os.path.splitext(source)[1].lower()
    if os.path.exists(source) or extension in BUILDERS:  # a local file: what goes wrong is about the file
        if os.path.isdir(source):
            raise UserError(f"--{setting}={source} is a directory; pass a .json, .jsonl or .parquet file")
        if not os.path.isfile(source):
            raise UserError(f"--{setting}={source}: no such file")
        if extension not in BUILDERS:
            raise UserError(f"--{setting}={source}: expected a .json, .jsonl or .parquet file")
        if os.path.getsize(source) == 0:
            raise UserError(f"--{setting}={source} is empty")
        try:
            rows = datasets.load_dataset(BUILDERS[extension], data_files=source, split='train')
        except Exception as e:  # datasets wraps the parser's error: its cause says what is wrong in the file
            raise UserError(f"--{setting}={source} is not a valid {extension} file "
                            f"({first_line(e.__cause__ or e)})") from None
    else:
        try:
            rows = load_hub(source, setting, split=split)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"could not load {setting} dataset {source!r} ({first_line(e)}); without network, "
                            f"download it elsewhere and pass a local .json/.jsonl/.parquet copy with "
                            f"--{setting}=PATH") from None
    missing = [f for f in fields if f not in rows.column_names]
    if missing:
        raise UserError(f"{source} has no {', '.join(missing)} field; --{setting} needs rows with {', '.join(fields)}")
    rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    items = [dict(row) for row in rows]
    for i, item in enumerate(items):
        problem = ITEM_PROBLEMS[setting](item)
        if problem:
            raise UserError(f"--{setting}={source}: item {i + 1} is not a {setting} item: {problem}")
    return items


def read_text(path):
    """The contents of a UTF-8 file, or one line saying why it cannot be read."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not read --text={path}: {getattr(e, 'strerror', None) or e}") from None


def prepared_split(dataset, split):
    """The token ids of a prepared dataset's split (a memmap), or one line saying how to prepare it."""
    data_dir = dataset_dir(dataset)
    read_manifest(data_dir)  # refuses a dataset whose prepare script stopped, or whose files changed since
    if not os.path.isfile(os.path.join(data_dir, f'{split}.bin')):
        prepare_script = os.path.join(data_dir, 'prepare.py')
        how = (f"python {prepare_script}" if os.path.exists(prepare_script) else "make it with a prepare script, "
               "e.g. python data/openwebtext/prepare.py --dataset=YOUR_TEXT_FOLDER --out_dir=data/NAME")
        raise UserError(f"no {split}.bin in {data_dir}: --dataset={dataset} is not prepared; prepare it first: {how}")
    return load_tokens(data_dir, split)


def check_tokenizer(tokens, dataset, split, vocab_size, meta):
    """Refuse a dataset prepared with another tokenizer than the model's: its ids would index past the model's
    embedding table (an IndexError), or stand for other text than the model learned (a meaningless loss)."""
    top = int(tokens.max())  # a pass over the split, which is scored whole anyway
    if top >= vocab_size:
        raise UserError(f"--dataset={dataset} was prepared with another tokenizer than the model's (its {split}.bin "
                        f"holds token id {top}, beyond the model's {vocab_size}-token vocabulary); score a dataset "
                        "prepared as the model's training data was, or a text file with --text=PATH")
    check_vocabulary(meta, load_meta(dataset_dir(dataset)), dataset)


def main():
    names = [name.strip() for name in tasks.split(',') if name.strip()]
    unknown = sorted(set(names) - set(TASKS))
    if unknown or not names:
        raise UserError(f"unknown task {', '.join(unknown) or repr(tasks)}; --tasks takes a comma-separated list of "
                        f"{', '.join(TASKS)}")
    if 'text' in names and bool(text) == bool(dataset):
        raise UserError("the text task scores either --text=PATH (a UTF-8 file) or --dataset=NAME (a prepared "
                        "dataset's --split); give one of them")
    if split not in ('train', 'val'):
        raise UserError(f"--split={split}: a prepared dataset has the splits train and val")
    if out:
        check_writable(out)
    device_type, resolved_dtype = check_device(device, dtype)
    ctx = autocast_context(device_type, resolved_dtype)
    # every file is read and checked before the model is loaded, every item encoded before anything is scored
    contents = read_text(text) if 'text' in names and text else None
    data = prepared_split(dataset, split) if 'text' in names and dataset else None
    items = {}
    if 'hellaswag' in names:
        items['hellaswag'] = load_items(hellaswag, 'validation', ('ctx', 'endings', 'label'), 'hellaswag', limit)
    if 'lambada' in names:
        items['lambada'] = load_items(lambada, 'test', ('text',), 'lambada', limit)
    model, meta, loaded = load_model(init_from, out_dir, checkpoint)
    print(f"evaluating {loaded}", file=sys.stderr)
    model.to(device)
    tokenizer = Tokenizer(meta)
    block_size = model.config.block_size
    if 'text' in names:
        if stride > block_size:  # each window scores at most block_size tokens: the ones between would be lost
            raise UserError(f"--stride={stride} is more than the model's block_size ({block_size}), so tokens "
                            f"between windows would go unscored; use a stride of at most {block_size}")
        if text:
            tokens = tokenizer.encode(contents, text)
        else:
            check_tokenizer(data, dataset, split, model.config.vocab_size, meta)
            tokens = data
        if len(tokens) < 2:
            raise UserError("the text has fewer than 2 tokens: nothing to score")
    for item in items.get('hellaswag', []):  # a character a char model never saw is named here
        hellaswag_item(tokenizer, item, block_size)
    for item in items.get('lambada', []):
        lambada_item(tokenizer, item, block_size)

    results = {}
    if 'text' in names:
        total, count = text_loss(model, tokens, stride, batch_size, ctx)
        loss = total / count
        per_unit = count if meta is not None else tokenizer.byte_count(tokens[1:])  # characters or bytes scored
        results['text'] = {'loss': loss, 'ppl': math.exp(loss), 'tokens': count,
                           'bits_per_char' if meta is not None else 'bits_per_byte': total / math.log(2) / per_unit}
    if 'hellaswag' in items:
        results['hellaswag'] = hellaswag_accuracy(hellaswag_scores(model, tokenizer, items['hellaswag'], ctx))
    if 'lambada' in items:
        results['lambada'] = lambada_metrics(lambada_scores(model, tokenizer, items['lambada'], batch_size, ctx))

    print("| task | metric | value |\n| --- | --- | ---: |")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            print(f"| {task} | {metric} | {value:.4f} |" if isinstance(value, float) else f"| {task} | {metric} | {value} |")
    if out:
        try:
            with open(out, 'w') as f:
                json.dump(results, f, indent=1)
        except OSError as e:
            raise UserError(f"could not write --out={out} ({e.strerror})") from None


def check_writable(path):
    if os.path.isdir(path):
        raise UserError(f"cannot write --out={path}: it is a directory; name a file, e.g. "
                        f"--out={os.path.join(path, 'results.json')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UserError(f"cannot write --out={path}: its folder does not exist or is not writable")


if __name__ == '__main__':
    user_keys = configure(globals())
    dtype = dtype_default(device, dtype, user_keys)
    main()
