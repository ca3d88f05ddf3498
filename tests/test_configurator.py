"""Tests of configurator.configure: nanoGPT's config files and --key=value overrides, the table of rules
every setting is checked against, and the one-line error (a UserError) for every mistake a user can make."""

import math
import re

import pytest

from configurator import UserError, check_settings, configure


def defaults():
    return {'batch_size': 12, 'learning_rate': 6e-4, 'compile': True, 'out_dir': 'out', 'max_iters': 100}


def configured(argv):
    namespace = defaults()
    configure(namespace, argv)
    return namespace


def write_config(tmp_path, text, name='config.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- what works

def test_no_arguments_leave_defaults_untouched():
    assert configured([]) == defaults()


def test_float_notation_for_an_int_setting_becomes_int():
    value = configured(['--max_iters=5e3'])['max_iters']
    assert value == 5000 and type(value) is int


@pytest.mark.parametrize('text, expected', [('false', False), ('False', False), ('true', True),
                                            ('True', True), ('TRUE', True)])
def test_bool_setting_accepts_true_and_false_in_any_case(text, expected):
    namespace = defaults()
    namespace['compile'] = not expected  # so that the override has to change it
    configure(namespace, [f'--compile={text}'])
    assert namespace['compile'] is expected


def test_int_value_for_a_float_setting_becomes_float():
    value = configured(['--learning_rate=1'])['learning_rate']
    assert value == 1.0 and type(value) is float


def test_scientific_notation_for_a_float_setting():
    assert configured(['--learning_rate=3e-4'])['learning_rate'] == 3e-4


@pytest.mark.parametrize('text, expected', [('out-x', 'out-x'), ('123', '123'), ('1+1=', '1+1='),
                                            ('a=b=c', 'a=b=c'), ('True', 'True'), ("'quoted'", 'quoted'),
                                            ('runs/some dir/x', 'runs/some dir/x')])
def test_string_setting_keeps_text_as_typed(text, expected):
    value = configured([f'--out_dir={text}'])['out_dir']
    assert value == expected and type(value) is str


def test_other_settings_are_unchanged_by_an_override():
    namespace = configured(['--batch_size=3'])
    assert namespace == dict(defaults(), batch_size=3)


def test_config_file_sets_values(tmp_path):
    path = write_config(tmp_path, "# a nanoGPT-style config\n"
                                  "import math\n"
                                  "batch_size = 64\n"
                                  "learning_rate = 1e-3\n"
                                  "compile = False\n"
                                  "out_dir = 'out-shakespeare'\n"
                                  "max_iters = int(math.sqrt(250000))\n")
    assert configured([path]) == {'batch_size': 64, 'learning_rate': 1e-3, 'compile': False,
                                  'out_dir': 'out-shakespeare', 'max_iters': 500}


def test_later_arguments_override_earlier_ones(tmp_path):
    first = write_config(tmp_path, "batch_size = 64\nmax_iters = 7\n", 'first.py')
    second = write_config(tmp_path, "batch_size = 32\n", 'second.py')
    namespace = configured([first, '--max_iters=9', second, '--batch_size=5', '--max_iters=11'])
    assert namespace['batch_size'] == 5
    assert namespace['max_iters'] == 11
    namespace = configured(['--batch_size=5', first])
    assert namespace['batch_size'] == 64  # the file came later


def test_config_file_can_build_on_earlier_values(tmp_path):
    path = write_config(tmp_path, "max_iters = max_iters * 2\nout_dir = out_dir + '-long'\n")
    namespace = configured(['--max_iters=300', path])
    assert namespace['max_iters'] == 600
    assert namespace['out_dir'] == 'out-long'


def test_configure_returns_the_keys_the_user_set(tmp_path):
    path = write_config(tmp_path, "batch_size = 64\n")
    namespace = defaults()
    assert configure(namespace, [path, '--max_iters=5']) == {'batch_size', 'max_iters'}
    assert configure(defaults(), []) == set()


def test_config_file_int_for_float_setting_becomes_float(tmp_path):
    path = write_config(tmp_path, "learning_rate = 1\n")
    value = configured([path])['learning_rate']
    assert value == 1.0 and type(value) is float


# ----------------------------------------------------------------------------- mistakes: one line

def expect_error(capsys, argv, namespace=None):
    """Run configure on argv expecting a UserError; return its message, which must be a single line."""
    with pytest.raises(UserError) as info:
        configure(defaults() if namespace is None else namespace, argv)
    message = str(info.value)
    assert '\n' not in message, message
    return message


def test_unknown_key_suggests_closest_key(capsys):
    line = expect_error(capsys, ['--batchsize=3'])
    assert 'batchsize' in line and 'batch_size' in line


def test_unknown_key_without_close_match_lists_known_keys(capsys):
    line = expect_error(capsys, ['--zzz=3'])
    assert 'zzz' in line
    for key in defaults():
        assert key in line


@pytest.mark.parametrize('arg, must_mention', [
    ('--batch_size=abc', ['batch_size', 'int', "'abc'"]),  # not a number
    ('--max_iters=5.5', ['max_iters', 'int', '5.5']),  # a fraction for an int
    ('--batch_size=True', ['batch_size', 'int']),  # a bool for an int
    ('--compile=1', ['compile', 'bool']),  # a number for a bool
    ('--compile=maybe', ['compile', 'bool', 'maybe']),  # neither true nor false
    ('--learning_rate=fast', ['learning_rate', 'float', 'fast']),  # text for a float
])
def test_wrong_type_names_the_setting_its_type_and_the_value(capsys, arg, must_mention):
    line = expect_error(capsys, [arg])
    for text in must_mention:
        assert text in line


def test_override_without_value_is_refused(capsys):
    line = expect_error(capsys, ['--batch_size'])
    assert 'batch_size' in line


def test_missing_config_file_is_refused(capsys, tmp_path):
    missing = str(tmp_path / 'no_such_config.py')
    line = expect_error(capsys, [missing])
    assert missing in line


def test_unknown_key_in_config_file_is_refused(capsys, tmp_path):
    path = write_config(tmp_path, "batch_size = 8\nlearning_rat = 1e-3\n")
    line = expect_error(capsys, [path])
    assert 'learning_rat' in line and 'learning_rate' in line and path in line


def test_wrong_type_in_config_file_is_refused(capsys, tmp_path):
    path = write_config(tmp_path, "max_iters = 'many'\n")
    line = expect_error(capsys, [path])
    assert 'max_iters' in line and 'int' in line and path in line


def test_config_file_with_syntax_error_is_refused(capsys, tmp_path):
    path = write_config(tmp_path, "batch_size = = 3\n")
    line = expect_error(capsys, [path])
    assert path in line and 'SyntaxError' in line


def test_config_file_that_raises_is_refused(capsys, tmp_path):
    path = write_config(tmp_path, "batch_size = undefined_name * 2\n")
    line = expect_error(capsys, [path])
    assert path in line and 'undefined_name' in line


@pytest.mark.parametrize('exit_call', ['import sys\nsys.exit(0)', 'exit()', 'quit()', 'raise SystemExit(3)'])
def test_config_file_that_calls_exit_is_refused_instead_of_ending_the_script(tmp_path, exit_call):
    path = write_config(tmp_path, f"batch_size = 4\n{exit_call}\n")
    assert f"config file '{path}' called exit" in expect_error(None, [path])


def test_config_file_error_with_multiline_message_still_prints_one_line(capsys, tmp_path):
    path = write_config(tmp_path, "raise ValueError('first line\\nsecond line')\n")
    line = expect_error(capsys, [path])
    assert path in line and 'first line' in line


# ----------------------------------------------------------------------------- what a config file set

@pytest.mark.parametrize('line, key', [('compile = True', 'compile'), ('batch_size = 12', 'batch_size'),
                                       ("out_dir = 'out'", 'out_dir'), ('learning_rate = 6e-4', 'learning_rate')],
                         ids=['bool', 'small int', 'short string', 'float'])
def test_config_file_setting_a_value_equal_to_the_current_one_still_counts_as_set(tmp_path, line, key):
    # the value is the default's own object for bools, small ints and interned strings: identity cannot tell
    path = write_config(tmp_path, line + '\n')
    assert configure(defaults(), [path]) == {key}


def test_settings_assigned_by_a_config_file_it_includes_count_as_set(tmp_path):
    write_config(tmp_path, "compile = True\nmax_iters = 100\n", 'base.py')
    path = write_config(tmp_path, "import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\n"
                                  "batch_size = 7\n")
    namespace = defaults()
    assert configure(namespace, [path]) == {'compile', 'max_iters', 'batch_size'}
    assert namespace == dict(defaults(), batch_size=7)


def test_functions_in_a_config_file_see_its_values(tmp_path):
    path = write_config(tmp_path, "batch_size = 16\ndef doubled():\n    return 2 * batch_size\n"
                                  "max_iters = doubled()\nout_dir = ''.join(c for c in out_dir)\n")
    assert configured([path])['max_iters'] == 32


# ----------------------------------------------------------------------------- the table of rules

def train_like(**overrides):
    """A namespace with train.py's and sample.py's names (only the names matter to the rules) at valid values."""
    settings = dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, gradient_accumulation_steps=1,
                    eval_interval=250, eval_iters=20, log_interval=1, max_iters=2000, warmup_iters=100,
                    lr_decay_iters=2000, learning_rate=1e-3, min_lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.99,
                    grad_clip=1.0, dropout=0.0, decay_lr=True, seed=1337, peak_flops=0.0, backend='',
                    num_samples=2, max_new_tokens=10, temperature=0.8, top_k=200, top_p=1.0, out_dir='out')
    settings.update(overrides)
    return settings


@pytest.mark.parametrize('key, value', [
    ('batch_size', 0), ('block_size', -1), ('n_layer', 0), ('gradient_accumulation_steps', 0),
    ('eval_interval', 0), ('eval_iters', 0), ('log_interval', 0), ('num_samples', 0), ('max_new_tokens', 0),
    ('max_iters', -1), ('warmup_iters', -5), ('seed', -1), ('learning_rate', -1e-3), ('min_lr', -1e-5),
    ('weight_decay', -0.1), ('grad_clip', -1.0), ('temperature', -0.5), ('top_k', -1), ('peak_flops', -1.0),
    ('dropout', 1.0), ('dropout', -0.1), ('beta1', 1.0), ('beta2', 1.5), ('top_p', 0.0), ('top_p', 1.01),
    ('backend', 'mpi'), ('out_dir', ''), ('batch_size', 10**20), ('n_embd', 2**31), ('max_iters', 2**31),
    ('top_k', 10**20),
])
def test_out_of_range_setting_is_refused_with_its_name_and_range(key, value):
    with pytest.raises(UserError) as info:
        check_settings(train_like(**{key: value}))
    message = str(info.value)
    assert message.startswith(f"{key}={value!r} is out of range: it must be "), message


@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
def test_a_float_setting_that_is_not_finite_is_refused(value):
    with pytest.raises(UserError, match=f'learning_rate={value} is not a finite number'):
        check_settings(train_like(learning_rate=value))


@pytest.mark.parametrize('overrides, names', [
    (dict(n_embd=30, n_head=4), ['n_embd=30', 'n_head=4']),
    (dict(min_lr=1e-2, learning_rate=1e-3), ['min_lr=0.01', 'learning_rate=0.001', '--decay_lr=False']),
])
def test_settings_that_contradict_each_other_are_refused(overrides, names):
    with pytest.raises(UserError) as info:
        check_settings(train_like(**overrides))
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize('overrides', [
    {}, dict(warmup_iters=2000, lr_decay_iters=2000), dict(warmup_iters=100, lr_decay_iters=6), dict(warmup_iters=0), dict(max_iters=0), dict(top_k=0),
    dict(top_p=1.0), dict(temperature=0.0), dict(learning_rate=0.0, min_lr=0.0), dict(grad_clip=0.0),
    dict(decay_lr=False, min_lr=1.0, warmup_iters=5000), dict(beta2=0.999), dict(dropout=0.5),
    dict(batch_size=2**31 - 1, max_iters=2**31 - 1, lr_decay_iters=2**31 - 1),
], ids=str)
def test_valid_settings_and_boundaries_pass(overrides):
    check_settings(train_like(**overrides))


def test_rules_apply_only_to_the_settings_a_script_has():
    check_settings({'out_dir': 'x', 'checkpoint': ''})  # export_hf.py's settings: nothing to check


def test_configure_checks_the_settings_after_all_overrides(tmp_path):
    path = write_config(tmp_path, "batch_size = 0\n")
    assert 'batch_size=0' in expect_error(None, [path])
    assert configured([path, '--batch_size=4'])['batch_size'] == 4  # fixed later on the same command line


# ----------------------------------------------------------------------------- --help

@pytest.mark.parametrize('script, flag', [('train.py', '--help'), ('train.py', '-h'), ('sample.py', '-h'),
                                          ('eval.py', '--help'), ('bench.py', '-h'), ('export_hf.py', '--help')])
def test_help_lists_every_setting_with_its_default_and_exits_0(script, flag):
    import ast
    import os
    import subprocess
    import sys
    from scripts import REPO_ROOT, script_env
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), flag], capture_output=True, text=True,
                          env=script_env(), timeout=120)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr
    # oracle: the script's own settings, read from its source (the assignments before it calls configure)
    with open(os.path.join(REPO_ROOT, script)) as f:
        tree = ast.parse(f.read())
    settings = {}
    for node in tree.body:
        calls = {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        if calls & {'configure', 'settings_of'}:
            break
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.islower():
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # computed, e.g. best_device()
                settings[node.targets[0].id] = None
    listed = dict(re.findall(r'^  --(\w+)=(\S*)', proc.stdout, re.M))
    assert set(listed) == set(settings), set(listed) ^ set(settings)
    for name, default in settings.items():
        if isinstance(default, (bool, int, float)):
            assert listed[name] == repr(default), name
    assert f'usage: python {script}' in proc.stdout and 'Example:' in proc.stdout
