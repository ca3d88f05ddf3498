"""Tests of configurator.configure: nanoGPT's config files and --key=value overrides, and the one-line
errors (exit code 2) for every mistake a user can make with them."""

import pytest

from configurator import configure


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


# ----------------------------------------------------------------------------- mistakes: one line, exit code 2

def expect_error(capsys, argv):
    """Run configure on argv expecting the one-line error exit; return that line. Progress notes such as
    'Overriding config with ...' may come before it on stderr, but the error is exactly one line, the last."""
    capsys.readouterr()  # discard anything printed before
    with pytest.raises(SystemExit) as info:
        configure(defaults(), argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [i for i, line in enumerate(err.splitlines()) if line.startswith('error:')]
    assert len(error_lines) == 1, f'expected one error line on stderr, got: {err!r}'
    assert error_lines[0] == len(err.splitlines()) - 1, f'the error message spans several lines: {err!r}'
    return err.splitlines()[-1]


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


def test_config_file_error_with_multiline_message_still_prints_one_line(capsys, tmp_path):
    path = write_config(tmp_path, "raise ValueError('first line\\nsecond line')\n")
    line = expect_error(capsys, [path])
    assert path in line and 'first line' in line
