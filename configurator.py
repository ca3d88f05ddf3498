"""
nanoGPT's configuration convention, with clear errors. A script defines its settings as globals, then calls
    configure(globals())
which runs each positional argument as a Python config file, then applies each --key=value override:
$ python train.py config/override_file.py --batch_size=32
Values are parsed as Python literals (strings otherwise) and must match the type of the default.
What was overridden is echoed on stderr, keeping stdout for the script's output (samples, say).
Any mistake stops the script with one line on stderr and exit code 2.
"""

import ast
import difflib
import sys
import types

SETTING_TYPES = (int, float, bool, str)


def die(message, code=1):
    """Stop with one plain line instead of a traceback: for mistakes the user can fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def settings_of(namespace):
    """The names of a script's settings: its public globals holding an int, float, bool or str."""
    return [k for k, v in namespace.items() if not k.startswith('_') and type(v) in SETTING_TYPES]


def unknown_key_message(key, known, where):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown config key '{key}' {where}{hint}"


def coerce(key, value, default):
    """value converted to the type of default, accepting what people type: 5e3 for an int, false for a bool,
    an int for a float, and any text for a string. Raises ValueError with a message otherwise."""
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
    raise ValueError(f"config key '{key}' expects {expected.__name__} (default {default!r}), got {value!r}")


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # not a Python literal: take it as a string


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to namespace.
    Returns the set of keys that were set, so a script can tell a user's choice from a default."""
    argv = sys.argv[1:] if argv is None else argv
    known = settings_of(namespace)
    user_keys = set()
    for arg in argv:
        if not arg.startswith('--'):
            user_keys |= apply_config_file(namespace, known, arg)
            continue
        key, sep, text = arg[2:].partition('=')  # partition: the value itself may contain '='
        if not sep:
            die(f"override '{arg}' has no value; write it as --{key}=VALUE", code=2)
        if key not in known:
            die(unknown_key_message(key, known, f"in '{arg}'"), code=2)
        default = namespace[key]
        value = text if type(default) is str and not text.startswith(("'", '"')) else parse_value(text)
        try:
            namespace[key] = coerce(key, value, default)
        except ValueError as e:
            die(str(e), code=2)
        user_keys.add(key)
        print(f"Overriding: {key} = {namespace[key]!r}", file=sys.stderr)
    return user_keys


def apply_config_file(namespace, known, path):
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except OSError as e:
        die(f"config file '{path}' could not be read ({e.strerror}); config files are passed as paths, "
            "e.g. python train.py config/train_shakespeare_char.py", code=2)
    print(f"Overriding config with {path}:\n{source}", file=sys.stderr)
    scope = {k: namespace[k] for k in known}  # a config file may build on the values set so far
    scope['__file__'] = path  # and find the config files beside it
    try:
        exec(compile(source, path, 'exec'), scope)
    except Exception as e:
        die(f"config file '{path}' failed to run: {type(e).__name__}: {' '.join(str(e).split())}", code=2)
    changed = set()
    for key, value in scope.items():
        if key.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
            continue
        if key in known and value is namespace[key]:
            continue
        if key not in known:
            die(unknown_key_message(key, known, f"in config file '{path}'"), code=2)
        try:
            namespace[key] = coerce(key, value, namespace[key])
        except ValueError as e:
            die(f"{e} in config file '{path}'", code=2)
        changed.add(key)
    return changed
