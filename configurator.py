"""
nanoGPT's configuration convention, with clear errors. A script defines its settings as globals, then calls
    configure(globals())
which runs each positional argument as a Python config file, then applies each --key=value override:
$ python train.py config/override_file.py --batch_size=32
Values are parsed as Python literals (strings otherwise) and must match the type of the default. Every
setting is then checked against one table of rules (RULES below), before the script does any work.
What was overridden is echoed on stderr, keeping stdout for the script's output (samples, say).
--help (or -h) lists the settings with their defaults and the comments beside them in the script.

Mistakes raise UserError; report_errors() makes a script print them as one 'error:' line, exit code 1.
"""

import ast
import difflib
import io
import math
import os
import sys
import tokenize
import types

SETTING_TYPES = (int, float, bool, str)


class UserError(Exception):
    """A mistake the user can fix (a setting, a file, a checkpoint), with a message that says how."""


class EveryRankError(UserError):
    """A UserError that every process of a torchrun launch meets alike (a setting, an all-reduced loss): only
    rank 0 prints it."""


def report_errors():
    """Make this script print a UserError as one 'error:' line (exit code 1) and stop on Ctrl-C without a
    traceback (Python then exits as killed by SIGINT: code 130); any other exception keeps its traceback."""
    default_hook = sys.excepthook

    def hook(kind, error, tb):
        if issubclass(kind, UserError):
            said_by_rank_0 = issubclass(kind, EveryRankError) and os.environ.get('RANK', '0') != '0'
            if not said_by_rank_0:  # under torchrun, once for all
                print(f"error: {error}", file=sys.stderr)
        elif not issubclass(kind, KeyboardInterrupt):
            default_hook(kind, error, tb)

    sys.excepthook = hook


def settings_of(namespace):
    """The names of a script's settings: its public lowercase globals holding an int, float, bool or str
    (UPPERCASE ones are constants)."""
    return [k for k, v in namespace.items() if not k.startswith('_') and k.islower() and type(v) in SETTING_TYPES]


# -----------------------------------------------------------------------------
# what every setting must be, for whichever script has it: one table, checked before any work
LORA_TARGETS = ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')  # every Linear of a block
MAX_COUNT = 2**31 - 1  # sizes and counts: beyond any real run, so that a typo (1e20) fails here, not in numpy
RULES = [
    (('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'gradient_accumulation_steps', 'eval_interval',
      'eval_iters', 'log_interval', 'num_samples', 'max_new_tokens', 'num_steps', 'prompt_tokens', 'hellaswag_items',
      'warmup_steps'),
     lambda v: 1 <= v <= MAX_COUNT, "from 1 to 2**31 - 1"),
    (('max_iters', 'warmup_iters', 'lr_decay_iters', 'top_k', 'vocab_size', 'stride', 'limit', 'lora_rank'),
     lambda v: 0 <= v <= MAX_COUNT, "from 0 to 2**31 - 1"),
    (('learning_rate', 'min_lr', 'muon_lr', 'weight_decay', 'grad_clip', 'peak_flops'), lambda v: v >= 0, "0 or more"),
    (('seed',), lambda v: 0 <= v < 2**63, "0 or more and below 2**63"),
    (('temperature',), lambda v: v == 0 or v >= 1e-3, "0 (greedy) or 0.001 or more (smaller ones are greedy in "
                                                      "effect and overflow)"),
    (('dropout', 'beta1', 'beta2', 'lora_dropout'), lambda v: 0 <= v < 1, "at least 0 and below 1"),
    (('lora_alpha',), lambda v: v > 0, "above 0 (the adapters' scale is lora_alpha / lora_rank)"),
    (('lora_targets',), lambda v: v != '' and set(v.split(',')) <= set(LORA_TARGETS),
     f"a comma-separated list of {', '.join(LORA_TARGETS)}"),
    (('lora_base_dtype',), lambda v: v in ('', 'float32', 'bfloat16', 'float16'),
     "'' (the run's dtype), float32, bfloat16 or float16"),
    (('top_p',), lambda v: 0 < v <= 1, "above 0 and at most 1"),
    (('backend',), lambda v: v in ('', 'nccl', 'gloo'), "'' (automatic), nccl or gloo"),
    (('optimizer',), lambda v: v in ('adamw', 'muon'), "adamw or muon"),
    (('out_dir',), lambda v: v != '', "a directory's name, not empty"),
    (('checkpoint_format',), lambda v: v in ('full', 'sharded'), "full or sharded"),
]
# rules between settings, for the scripts that have all the settings named
JOINT_RULES = [
    (('n_embd', 'n_head'), lambda s: s['n_embd'] % s['n_head'] == 0,
     "n_embd={n_embd} is not divisible by n_head={n_head}: each head gets n_embd / n_head channels"),
    (('decay_lr', 'min_lr', 'learning_rate'), lambda s: not s['decay_lr'] or s['min_lr'] <= s['learning_rate'],
     "min_lr={min_lr} is above learning_rate={learning_rate}, so the decay would raise it; lower --min_lr "
     "or set --decay_lr=False"),
    (('fsdp', 'optimizer'), lambda s: not (s['fsdp'] and s['optimizer'] == 'muon'),
     "optimizer=muon orthogonalises whole matrices, which fsdp=True splits over the processes; use "
     "optimizer=adamw with FSDP, or DDP (fsdp=False) with Muon"),
    (('lora_rank', 'init_from'), lambda s: not (s['lora_rank'] and s['init_from'] in ('scratch', 'auto')),
     "lora_rank={lora_rank} trains adapters on a trained model, and init_from={init_from} names none: set --init_from "
     "to a GPT-2 name, a Hugging Face directory or a checkpoint file (another run's best.pt), or drop --lora_rank"),
    (('lora_rank', 'fsdp'), lambda s: not (s['lora_rank'] and s['fsdp']),
     "lora_rank={lora_rank} with fsdp=True is not supported: LoRA's frozen 16-bit base fits where FSDP would be "
     "needed (README: LoRA); drop --fsdp (DDP under torchrun works with LoRA)"),
    (('lora_rank', 'checkpoint_format'), lambda s: not (s['lora_rank'] and s['checkpoint_format'] == 'sharded'),
     "lora_rank={lora_rank} saves only the adapters, a small file: use checkpoint_format=full with LoRA"),
    (('async_checkpoint', 'checkpoint_format'),
     lambda s: not s['async_checkpoint'] or s['checkpoint_format'] == 'sharded',
     "async_checkpoint=True writes sharded checkpoints in the background: add --checkpoint_format=sharded"),
    (('lora_rank', 'optimizer'), lambda s: not (s['lora_rank'] and s['optimizer'] == 'muon'),
     "lora_rank={lora_rank} trains rank-{lora_rank} adapter matrices, which Muon does not suit; use "
     "optimizer=adamw with LoRA"),
]


def check_settings(namespace):
    """Raise UserError for the first setting that breaks a rule: every number finite, then RULES, JOINT_RULES."""
    settings = {k: namespace[k] for k in settings_of(namespace)}
    for key, value in settings.items():
        if type(value) is float and not math.isfinite(value):
            raise EveryRankError(f"{key}={value} is not a finite number")
    for keys, ok, must_be in RULES:
        for key in keys:
            if key in settings and not ok(settings[key]):
                raise EveryRankError(f"{key}={settings[key]!r} is out of range: it must be {must_be}")
    for keys, ok, message in JOINT_RULES:
        if set(keys) <= set(settings) and not ok(settings):
            raise EveryRankError(message.format(**settings))


# -----------------------------------------------------------------------------

def unknown_key_message(key, known, where):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown config key '{key}' {where}{hint}"


def coerce(key, value, default):
    """value converted to the type of default, accepting what people type: 5e3 for an int, false for a bool,
    an int for a float, and any text for a string. Raises UserError with a message otherwise."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        if type(value) is bool:
            return value
    elif expected is int:
        if type(value) is int:
            return value
        if type(value) is float and value.is_integer():
            return int(value)
    elif expected is float:
        if type(value) in (int, float):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    raise EveryRankError(f"config key '{key}' expects {expected.__name__} (default {default!r}), got {value!r}")


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # not a Python literal: take it as a string


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to namespace, then check
    every setting. Returns the set of keys that were set, so a script can tell a user's choice from a default."""
    argv = sys.argv[1:] if argv is None else argv
    known = settings_of(namespace)
    if '--help' in argv or '-h' in argv:
        print_help(namespace, known)
        sys.exit(0)
    echo = int(os.environ.get('RANK', 0)) == 0  # under torchrun, one process tells what was set
    user_keys = set()
    for arg in argv:
        if not arg.startswith('--'):
            user_keys |= apply_config_file(namespace, known, arg, echo)
            continue
        key, sep, text = arg[2:].partition('=')  # partition: the value itself may contain '='
        if not sep:
            raise EveryRankError(f"override '{arg}' has no value; write it as --{key}=VALUE")
        if key not in known:
            raise EveryRankError(unknown_key_message(key, known, f"in '{arg}'"))
        default = namespace[key]
        value = text if type(default) is str and not text.startswith(("'", '"')) else parse_value(text)
        namespace[key] = coerce(key, value, default)
        user_keys.add(key)
        if echo:
            print(f"Overriding: {key} = {namespace[key]!r}", file=sys.stderr)
    check_settings(namespace)
    return user_keys


class AssignmentRecorder(dict):
    """The namespace a config file runs in: it records every name the file assigns, even to the value it
    already had, and keeps the file's globals in step so that functions defined in the file see the values."""

    def __init__(self, file_globals):
        super().__init__(file_globals)
        self.file_globals = file_globals
        self.assigned = set()

    def __setitem__(self, key, value):
        self.assigned.add(key)
        self.file_globals[key] = value
        super().__setitem__(key, value)


def apply_config_file(namespace, known, path, echo=True):
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except OSError as e:
        raise EveryRankError(f"config file '{path}' could not be read ({e.strerror}); config files are passed "
                             "as paths, e.g. python train.py config/train_shakespeare_char.py") from None
    except UnicodeDecodeError:
        raise EveryRankError(f"config file '{path}' is not UTF-8 text; save it as UTF-8") from None
    file_globals = {k: namespace[k] for k in known}  # a config file may build on the values set so far
    file_globals['__file__'] = path  # and find the config files beside it
    scope = AssignmentRecorder(file_globals)
    try:
        exec(compile(source, path, 'exec'), file_globals, scope)
    except SystemExit:  # not an Exception: it would end the run silently, with its exit code (often 0)
        raise EveryRankError(f"config file '{path}' called exit (sys.exit, exit or quit); a config file only "
                             "sets values, so remove the call") from None
    except Exception as e:
        raise EveryRankError(f"config file '{path}' failed to run: {type(e).__name__}: "
                             f"{' '.join(str(e).split())}") from None
    changed = set()
    for key in sorted(scope.assigned):
        value = scope[key]
        if key.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
            continue
        if key not in known:
            raise EveryRankError(unknown_key_message(key, known, f"in config file '{path}'"))
        try:
            namespace[key] = coerce(key, value, namespace[key])
        except UserError as e:
            raise EveryRankError(f"{e} in config file '{path}'") from None
        changed.add(key)
        if echo:  # what the file chose, not its code (a config may pick a recipe with Python)
            print(f"Overriding: {key} = {namespace[key]!r} ({path})", file=sys.stderr)
    return changed


def print_help(namespace, known):
    """The script's docstring, how settings are given, and every setting with its default and meaning."""
    script = os.path.basename(namespace.get('__file__', 'SCRIPT.py'))
    print((namespace.get('__doc__') or '').strip())
    example = f"--{known[0]}={namespace[known[0]]}" if known else ''
    print(f"\nusage: python {script} [CONFIG_FILE.py ...] [--key=value ...]\n"
          "Config files (Python files that assign settings, e.g. config/train_shakespeare_char.py) run in order,\n"
          "then each --key=value overrides one setting; values are Python literals, or text for a string\n"
          f"setting. Example: python {script} {example}\n\nsettings (--name=default, then what it means):")
    comments, headings = source_comments(namespace.get('__file__'))
    for key in known:
        if key in headings:
            print(f"  # {headings[key]}")
        value = namespace[key]
        default = value if type(value) is str and value.isprintable() and value else repr(value)
        meaning = f"  {comments[key]}" if key in comments else ''
        print(f"  --{key}={default}{meaning}")


def source_comments(path):
    """From a script's source: {setting: the comment on its line} and {setting: the heading comment on the
    line just above it}; the one place the settings' meanings are written."""
    comments, headings = {}, {}
    if not path or not os.path.isfile(path):
        return comments, headings
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        name = line.split(' = ', 1)[0]
        if not name.isidentifier() or ' = ' not in line:
            continue
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
        except (tokenize.TokenError, SyntaxError):
            continue
        comment = [t.string for t in tokens if t.type == tokenize.COMMENT]
        if comment:
            comments[name] = comment[0].lstrip('#').strip()
        above = lines[i - 1] if i > 0 else ''
        if above.startswith('# ') and not above.startswith('# ---'):
            headings[name] = above[2:].strip()
    return comments, headings
