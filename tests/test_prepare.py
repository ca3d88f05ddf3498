"""
Tests for the data/*/prepare.py scripts. Each test copies a script (and the modules it imports) into a temp
dir and runs it there as a real subprocess, then checks the outputs against an independent oracle:
the input text itself, tiktoken run in the test, and the datasets library's own train/val split.
"""
import hashlib
import json
import os
import pathlib
import pickle
import random
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import scripts
from scripts import REPO_ROOT, install_prepare_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
DEAD_PROXY = 'http://127.0.0.1:9'  # nothing listens on the discard port, so requests fail at once
EOT = 50256  # gpt2's <|endoftext|>


def install(tmp_path, name):
    """A copy of data/<name>/prepare.py (with what it imports) under tmp_path; returns its path."""
    return pathlib.Path(install_prepare_script(str(tmp_path), name))


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(script), *args], cwd=script.parent, env=env,
                          capture_output=True, text=True, encoding='utf-8', timeout=300)


def offline_env(**extra):
    env = dict(os.environ, http_proxy=DEAD_PROXY, https_proxy=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY,
               HTTPS_PROXY=DEAD_PROXY, **extra)
    env.pop('no_proxy', None)
    env.pop('NO_PROXY', None)
    return env


def assert_one_line_error(result):
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), result.stderr
    return lines[0]


def tokens(path):
    return np.fromfile(path, dtype=np.uint16)


class PlainDataUnpickler(pickle.Unpickler):
    # any class or function in the pickle means it is not plain data
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl names {module}.{name}")


def load_meta(path):
    with open(path, 'rb') as f:
        return PlainDataUnpickler(f).load()


def make_text(n_words=900, seed=0):
    rng = random.Random(seed)
    words = ['to', 'be', 'or', 'not', 'café', 'naïve', '—', 'Ωmega', '日本語', 'über', '!', '\n', '  ', 'Thou', 'art']
    return ' '.join(rng.choice(words) for _ in range(n_words))


# -----------------------------------------------------------------------------
# shakespeare_char

def check_char_outputs(script_dir, text, val_fraction=0.1, input_path=None):
    """The bins decode to the text's first and last characters and the vocabulary is the text's sorted
    characters; the manifest records every file's size, the vocabulary size and the input file."""
    meta = load_meta(script_dir / 'meta.pkl')
    chars = sorted(set(text))
    assert set(meta) == {'vocab_size', 'itos', 'stoi'}
    assert meta['vocab_size'] == len(chars)
    assert meta['itos'] == dict(enumerate(chars))
    assert meta['stoi'] == {ch: i for i, ch in enumerate(chars)}
    train, val = tokens(script_dir / 'train.bin'), tokens(script_dir / 'val.bin')
    n_train = int(len(text) * (1 - val_fraction))
    assert ''.join(meta['itos'][i] for i in train.tolist()) == text[:n_train]
    assert ''.join(meta['itos'][i] for i in val.tolist()) == text[n_train:]
    assert_manifest(script_dir, ['meta.pkl', 'train.bin', 'val.bin'], len(chars), input_path)
    return meta, train, val


def assert_manifest(out_dir, files, vocab_size, input_path=None):
    manifest = json.loads((out_dir / 'manifest.json').read_text())
    source = manifest.pop('source', None)
    assert manifest == {'complete': True, 'vocab_size': vocab_size,
                        'files': {name: os.path.getsize(out_dir / name) for name in files}}
    if input_path is None:  # a corpus: nothing recorded
        assert source is None
    else:
        raw = pathlib.Path(input_path).read_bytes()
        assert (source['path'], source['bytes'], source['sha256']) == \
            (os.path.abspath(input_path), len(raw), hashlib.sha256(raw).hexdigest())


def test_char_prepare_small_text(tmp_path):
    script = install(tmp_path, 'shakespeare_char')
    text = make_text()
    input_path = tmp_path / 'text.txt'
    input_path.write_text(text, encoding='utf-8')
    result = run(script, f'--input={input_path}')
    assert result.returncode == 0, result.stderr
    meta, train, val = check_char_outputs(script.parent, text, input_path=input_path)
    assert f"length of dataset in characters: {len(text):,}" in result.stdout
    assert f"vocab size: {meta['vocab_size']}" in result.stdout
    assert f"train has {len(train):,} tokens" in result.stdout
    assert f"val has {len(val):,} tokens" in result.stdout
    # only the outputs, no temp files left over
    assert sorted(os.listdir(script.parent)) == ['manifest.json', 'meta.pkl', 'prepare.py', 'train.bin', 'val.bin']


def test_char_prepare_of_your_own_book_into_its_own_dataset_with_its_own_split(tmp_path):
    # the README's command for one book: --input, --out_dir and --val_fraction, the script left where it is
    text = make_text(seed=3)
    (tmp_path / 'book.txt').write_text(text, encoding='utf-8')
    out_dir = tmp_path / 'data' / 'mybook'
    result = run(pathlib.Path(REPO, 'data', 'shakespeare_char', 'prepare.py'), f'--input={tmp_path / "book.txt"}',
                 f'--out_dir={out_dir}', '--val_fraction=0.25')
    assert result.returncode == 0, result.stderr
    check_char_outputs(out_dir, text, val_fraction=0.25, input_path=tmp_path / 'book.txt')
    assert sorted(os.listdir(out_dir)) == ['manifest.json', 'meta.pkl', 'train.bin', 'val.bin']


def distinct_chars(n):
    # n different characters that UTF-8 can encode (surrogates cannot be)
    codepoints = (c for c in range(0x20, 0x110000) if not 0xD800 <= c <= 0xDFFF)
    return ''.join(chr(next(codepoints)) for _ in range(n))


def test_char_prepare_vocab_limit(tmp_path):
    # uint16 ids 0..65535: 65,536 distinct characters fit, one more does not
    script = install(tmp_path, 'shakespeare_char')
    input_path = tmp_path / 'text.txt'
    text = distinct_chars(65536)
    input_path.write_text(text, encoding='utf-8')
    result = run(script, f'--input={input_path}')
    assert result.returncode == 0, result.stderr
    check_char_outputs(script.parent, text, input_path=input_path)

    for name in ('train.bin', 'val.bin', 'meta.pkl'):
        os.remove(script.parent / name)
    input_path.write_text(distinct_chars(65537), encoding='utf-8')
    line = assert_one_line_error(run(script, f'--input={input_path}'))
    assert '65,537' in line
    assert not (script.parent / 'train.bin').exists()


@pytest.mark.slow
def test_char_prepare_tiny_shakespeare(tmp_path, shakespeare_path):
    script = install(tmp_path, 'shakespeare_char')
    result = run(script, f'--input={shakespeare_path}')
    assert result.returncode == 0, result.stderr
    with open(shakespeare_path, encoding='utf-8') as f:
        text = f.read()
    meta, train, val = check_char_outputs(script.parent, text, input_path=shakespeare_path)
    assert len(train) == int(len(text) * 0.9) and len(val) == len(text) - len(train)
    # the figures quoted in data/shakespeare_char/readme.md
    assert (meta['vocab_size'], len(train), len(val)) == (65, 1_003_854, 111_540)
    assert "vocab size: 65\n" in result.stdout
    assert "train has 1,003,854 tokens\n" in result.stdout
    assert "val has 111,540 tokens\n" in result.stdout


# -----------------------------------------------------------------------------
# shakespeare (gpt2 bpe)

def check_bpe_outputs(out_dir, text, input_path):
    """The bins are tiktoken's gpt2 encoding of the text's first 90% and last 10%, decoding back to them; the
    manifest records every file's size, the vocabulary size and the input file."""
    import tiktoken
    n_train = int(len(text) * 0.9)
    enc = tiktoken.get_encoding('gpt2')
    train, val = tokens(out_dir / 'train.bin'), tokens(out_dir / 'val.bin')
    assert train.tolist() == enc.encode_ordinary(text[:n_train])
    assert val.tolist() == enc.encode_ordinary(text[n_train:])
    assert enc.decode(train.tolist()) == text[:n_train]
    assert enc.decode(val.tolist()) == text[n_train:]
    assert_manifest(out_dir, ['train.bin', 'val.bin'], 50257, input_path)
    return train, val


@pytest.mark.slow
def test_bpe_prepare_tiny_shakespeare(tmp_path, shakespeare_path, tiktoken_cache):
    script = install(tmp_path, 'shakespeare')
    result = run(script, f'--input={shakespeare_path}')
    assert result.returncode == 0, result.stderr
    with open(shakespeare_path, encoding='utf-8') as f:
        text = f.read()
    train, val = check_bpe_outputs(script.parent, text, shakespeare_path)
    # the figures quoted in data/shakespeare/readme.md
    assert (len(train), len(val)) == (301_966, 36_059)
    assert "train has 301,966 tokens\n" in result.stdout
    assert "val has 36,059 tokens\n" in result.stdout
    assert sorted(os.listdir(script.parent)) == ['manifest.json', 'prepare.py', 'train.bin', 'val.bin']


def test_both_shakespeare_datasets_read_the_same_downloaded_text(tmp_path, tiktoken_cache):
    char_script, bpe_script = install(tmp_path, 'shakespeare_char'), install(tmp_path, 'shakespeare')
    text = make_text(seed=5)
    (char_script.parent / 'input.txt').write_text(text, encoding='utf-8')  # as the char script's download left it
    result = run(bpe_script, env=offline_env())  # no network: it must not try to download again
    assert result.returncode == 0, result.stderr
    import tiktoken
    n_train = int(len(text) * 0.9)
    assert tokens(bpe_script.parent / 'train.bin').tolist() == tiktoken.get_encoding('gpt2').encode_ordinary(text[:n_train])
    assert not (bpe_script.parent / 'input.txt').exists()


def test_bpe_prepare_without_tiktoken_files(tmp_path):
    script = install(tmp_path, 'shakespeare')
    input_path = tmp_path / 'text.txt'
    input_path.write_text(make_text(), encoding='utf-8')
    env = offline_env(TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty_cache'))
    line = assert_one_line_error(run(script, f'--input={input_path}', env=env))
    assert 'TIKTOKEN_CACHE_DIR' in line
    assert not (script.parent / 'train.bin').exists()


# -----------------------------------------------------------------------------
# errors shared by both shakespeare scripts

@pytest.mark.parametrize('name', ['shakespeare_char', 'shakespeare'])
@pytest.mark.parametrize('content, message', [
    (b'', 'empty'),
    (b'\xff\xfe\x00bad', 'not UTF-8'),
    (b'a', 'at least 2'),
    (None, 'does not exist'),
    ('a folder', 'is a directory'),
])
def test_bad_input(tmp_path, name, content, message):
    script = install(tmp_path, name)
    input_path = tmp_path / 'text.txt'
    if content == 'a folder':
        input_path.mkdir()
    elif content is not None:
        input_path.write_bytes(content)
    line = assert_one_line_error(run(script, f'--input={input_path}'))
    assert message in line
    if content != b'a':  # the too-short message is about the text, not the file
        assert str(input_path) in line
    assert not (script.parent / 'train.bin').exists()


@pytest.mark.parametrize('script, flag, message', [
    ('shakespeare_char', '--val_fraction=abc', "argument --val_fraction: invalid float value: 'abc'"),
    ('shakespeare', '--bogus=1', 'unrecognized arguments: --bogus=1'),
    ('openwebtext', '--num_proc=two', "argument --num_proc: invalid int value: 'two'"),
])
def test_a_flag_mistake_is_one_line(script, flag, message):
    line = assert_one_line_error(run(pathlib.Path(REPO_ROOT) / 'data' / script / 'prepare.py', flag))
    assert message in line and '--help' in line


@pytest.mark.parametrize('name', ['shakespeare_char', 'shakespeare'])
def test_download_offline(tmp_path, name):
    script = install(tmp_path, name)
    line = assert_one_line_error(run(script, env=offline_env()))
    assert URL in line
    assert str(script.parent / 'input.txt') in line
    # neither input.txt nor a partial download is left behind
    assert os.listdir(script.parent) == ['prepare.py']


# -----------------------------------------------------------------------------
# the manifest records the input file, and train.py prepares a dataset again when its input.txt changed

QUICK = dict(max_iters=0, eval_only=True, eval_iters=1)  # train.py up to its first eval, which reads the data


def prepared_from_input_txt(tmp_path, name, text, folder=None):
    """data/<name> under tmp_path, laid out as in the repository and prepared by its prepare.py with no
    arguments from the input.txt in data/<folder> (its own by default) holding text; returns data/<name>."""
    script = install(tmp_path, name)
    input_path = tmp_path / 'data' / (folder or name) / 'input.txt'
    input_path.parent.mkdir(exist_ok=True)
    input_path.write_text(text, encoding='utf-8')
    result = run(script, env=offline_env())  # offline: it must read input.txt, never download
    assert result.returncode == 0, result.stderr
    return script.parent


@pytest.mark.parametrize('name', ['shakespeare_char', 'shakespeare'])
def test_train_prepares_a_dataset_again_when_its_input_txt_changed(tmp_path, request, name):
    from dataset import script_to_prepare
    if name == 'shakespeare':
        request.getfixturevalue('tiktoken_cache')
    text = make_text(seed=6)
    data_dir = prepared_from_input_txt(tmp_path, name, text)
    input_path = data_dir / 'input.txt'
    assert script_to_prepare(str(data_dir)) is None  # unchanged (train.py on it: the next test)

    # the same number of bytes (upper case of these letters is as long in UTF-8): only the sha256 tells
    new_text = text.upper()
    input_path.write_text(new_text, encoding='utf-8')
    assert len(new_text.encode()) == len(text.encode()) and new_text != text
    changed = scripts.train(str(data_dir), str(tmp_path / 'out'), **QUICK)
    assert f"(or its new input) is not prepared yet; running {data_dir / 'prepare.py'}" in changed.stdout
    assert 'step 0: train loss' in changed.stdout  # and went on with it
    if name == 'shakespeare_char':
        check_char_outputs(data_dir, new_text, input_path=input_path)
    else:
        check_bpe_outputs(data_dir, new_text, input_path)


def test_unchanged_deleted_or_unrecorded_inputs_are_not_prepared_again(tmp_path):
    from dataset import script_to_prepare
    data_dir = prepared_from_input_txt(tmp_path, 'shakespeare_char', make_text(seed=7))
    input_path = data_dir / 'input.txt'
    train_bin = (data_dir / 'train.bin').read_bytes()
    unchanged = scripts.train(str(data_dir), str(tmp_path / 'out'), **QUICK)
    assert 'running' not in unchanged.stdout and 'step 0: train loss' in unchanged.stdout
    assert (data_dir / 'train.bin').read_bytes() == train_bin
    os.utime(input_path, (0, 0))  # touched, the same bytes
    assert script_to_prepare(str(data_dir)) is None
    input_path.write_text(make_text(seed=8), encoding='utf-8')
    assert script_to_prepare(str(data_dir)) == str(data_dir / 'prepare.py')
    manifest = json.loads((data_dir / 'manifest.json').read_text())
    del manifest['source']  # as prepared before manifests recorded one
    (data_dir / 'manifest.json').write_text(json.dumps(manifest))
    assert script_to_prepare(str(data_dir)) is None
    prepared_from_input_txt(tmp_path, 'shakespeare_char', make_text(seed=7))
    os.remove(input_path)  # the prepared files are what counts
    assert script_to_prepare(str(data_dir)) is None


def test_a_new_input_txt_in_the_datasets_own_folder_is_a_changed_input(tmp_path):
    # prepared from data/shakespeare/input.txt, which it reads when its own folder has none; then its own appears
    from dataset import script_to_prepare
    data_dir = prepared_from_input_txt(tmp_path, 'shakespeare_char', make_text(seed=9), folder='shakespeare')
    assert script_to_prepare(str(data_dir)) is None
    (data_dir / 'input.txt').write_text(make_text(seed=10), encoding='utf-8')
    assert script_to_prepare(str(data_dir)) == str(data_dir / 'prepare.py')


def test_a_changed_input_named_by_flags_is_not_prepared_from_another_file(tmp_path):
    # prepared into the shakespeare_char folder, which train.py prepares by itself, but from --input
    from configurator import UserError
    from dataset import script_to_prepare
    script = install(tmp_path, 'shakespeare_char')
    book = tmp_path / 'book.txt'
    book.write_text(make_text(seed=11), encoding='utf-8')
    assert run(script, f'--input={book}').returncode == 0
    book.write_text(make_text(seed=12), encoding='utf-8')
    expected = f"the input {re.escape(str(book))} changed since .*: python {re.escape(str(script))} --input="
    with pytest.raises(UserError, match=expected):
        script_to_prepare(str(script.parent))


def test_a_changed_input_of_your_own_dataset_is_one_error_line_with_the_command_that_prepares_it(tmp_path):
    book = tmp_path / 'my book.txt'
    book.write_text(make_text(seed=13), encoding='utf-8')
    out_dir = tmp_path / 'data' / 'mybook'
    script = pathlib.Path(REPO, 'data', 'shakespeare_char', 'prepare.py')
    assert run(script, f'--input={book}', f'--out_dir={out_dir}', '--val_fraction=0.25').returncode == 0
    train_bin = (out_dir / 'train.bin').read_bytes()
    new_text = make_text(seed=14)
    book.write_text(new_text, encoding='utf-8')
    proc = scripts.train(str(out_dir), str(tmp_path / 'out'), check=False, **QUICK)
    line = scripts.assert_one_line_error(proc)
    assert f"the input {book} changed since dataset {out_dir} was prepared from it" in line
    assert (out_dir / 'train.bin').read_bytes() == train_bin  # not prepared again by train.py
    # oracle for the command: run as the error gives it, it prepares the new text with the same flags
    command = shlex.split(line.split('prepare it again: ')[1])
    assert command == ['python', str(script), f'--input={book}', f'--out_dir={out_dir}', '--val_fraction=0.25']
    assert subprocess.run([sys.executable, *command[1:]], capture_output=True).returncode == 0
    check_char_outputs(out_dir, new_text, val_fraction=0.25, input_path=book)


# -----------------------------------------------------------------------------
# openwebtext, on a small local dataset

def owt_env(tmp_path, cache_name, **extra):
    # a private datasets cache per run, so a second run recomputes everything instead of reusing the first
    return dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / cache_name), HF_HUB_OFFLINE='1',
                HF_DATASETS_DISABLE_PROGRESS_BARS='1', **extra)


def split_documents(ids):
    """Token ids cut after every EOT, one list per document; the file must end with an EOT."""
    assert ids and ids[-1] == EOT
    docs, current = [], []
    for i in ids:
        if i == EOT:
            docs.append(current)
            current = []
        else:
            current.append(i)
    return docs


@pytest.fixture
def owt_dataset(tmp_path):
    """A folder with one .jsonl file of 300 documents; returns (folder, documents)."""
    rng = random.Random(2357)
    words = ['the', 'web', 'text', 'é', 'naïve', '—', '日本語', 'Ωmega', '\n', '  ', '<|endoftext|>', 'news', '42']
    docs = [' '.join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    folder = tmp_path / 'corpus'
    folder.mkdir()
    with open(folder / 'docs.jsonl', 'w', encoding='utf-8') as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({'text': doc, 'id': i}, ensure_ascii=False) + '\n')
    return folder, docs


def test_openwebtext_prepare_local_dataset(tmp_path, owt_dataset, tiktoken_cache):
    import datasets
    import tiktoken
    folder, docs = owt_dataset
    script = install(tmp_path, 'openwebtext')
    out_dir = tmp_path / 'out'
    result = run(script, f'--dataset={folder}', '--num_proc=2', f'--out_dir={out_dir}', env=owt_env(tmp_path, 'cache1'))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out_dir)) == ['manifest.json', 'train.bin', 'val.bin']

    # oracle: the split done by datasets here, with as many val documents as the documented rule gives (0.05%
    # of the documents, 1 here, then more while the val split is short of 4096 tokens, up to half of them),
    # and tiktoken decoding each document
    enc = tiktoken.get_encoding('gpt2')
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / 'oracle_cache'))['train']
    shuffled = loaded.train_test_split(test_size=len(docs) - 1, seed=2357, shuffle=True)['test']['text']
    n_val = 1
    while sum(len(enc.encode_ordinary(d)) + 1 for d in shuffled[:n_val]) < 4096 and n_val < len(docs) // 2:
        n_val += 1
    assert 1 < n_val < len(docs) // 2  # the floor, not the fraction, decided it
    split = loaded.train_test_split(test_size=n_val, seed=2357, shuffle=True)
    train, val = tokens(out_dir / 'train.bin').tolist(), tokens(out_dir / 'val.bin').tolist()
    train_docs = [enc.decode(d) for d in split_documents(train)]
    val_docs = [enc.decode(d) for d in split_documents(val)]
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert len(val_docs) == len(split['test']) >= 1
    assert val_docs == split['test']['text']
    assert train_docs == split['train']['text']
    assert f"train has {len(train):,} tokens" in result.stdout
    assert f"val has {len(val):,} tokens" in result.stdout
    assert_manifest(out_dir, ['train.bin', 'val.bin'], 50257)

    # a second run from scratch writes the same bytes
    out_dir2 = tmp_path / 'out2'
    result = run(script, f'--dataset={folder}', '--num_proc=2', f'--out_dir={out_dir2}', env=owt_env(tmp_path, 'cache2'))
    assert result.returncode == 0, result.stderr
    assert (out_dir2 / 'val.bin').read_bytes() == (out_dir / 'val.bin').read_bytes()
    assert (out_dir2 / 'train.bin').read_bytes() == (out_dir / 'train.bin').read_bytes()


def test_a_folder_of_text_files_is_one_document_per_file(tmp_path, tiktoken_cache):
    import tiktoken
    folder = tmp_path / 'my_corpus'
    folder.mkdir()
    files = {'a.txt': 'First file.\n\nIts second paragraph.\n', 'b.txt': 'Second file, one line', 'c.txt': 'Third\nfile\n'}
    for name, text in files.items():
        (folder / name).write_text(text, encoding='utf-8')
    script = install(tmp_path, 'openwebtext')
    out_dir = tmp_path / 'mycorpus'
    result = run(script, f'--dataset={folder}', '--val_fraction=0.3', '--num_proc=1', f'--out_dir={out_dir}',
                 env=owt_env(tmp_path, 'cache'))
    assert result.returncode == 0, result.stderr
    enc = tiktoken.get_encoding('gpt2')
    train = [enc.decode(d) for d in split_documents(tokens(out_dir / 'train.bin').tolist())]
    val = [enc.decode(d) for d in split_documents(tokens(out_dir / 'val.bin').tolist())]
    assert sorted(train + val) == sorted(files.values())  # each file whole, blank lines and all
    assert len(val) == 1  # 30% of 3 documents, rounded up (the token floor never takes half of them)
    assert "val has" in result.stdout and "(1 documents)" in result.stdout


def test_a_single_text_file_is_pointed_to_the_one_book_scripts(tmp_path, tiktoken_cache):
    (tmp_path / 'book.txt').write_text('a book', encoding='utf-8')
    script = install(tmp_path, 'openwebtext')
    line = assert_last_line_error(run(script, f'--dataset={tmp_path / "book.txt"}', '--num_proc=1',
                                      f'--out_dir={tmp_path / "out"}', env=owt_env(tmp_path, 'cache')))
    assert 'single document' in line and 'data/shakespeare/prepare.py --input=' in line


def assert_last_line_error(result):
    # datasets logs its own warnings to stderr first; the script's error is the one 'error:' line, at the end
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith('error:')] == lines[-1:], result.stderr
    return lines[-1]


def test_openwebtext_missing_text_column(tmp_path, owt_dataset, tiktoken_cache):
    folder, _ = owt_dataset
    script = install(tmp_path, 'openwebtext')
    out_dir = tmp_path / 'out'
    result = run(script, f'--dataset={folder}', '--text_column=body', '--num_proc=1', f'--out_dir={out_dir}',
                 env=owt_env(tmp_path, 'cache'))
    line = assert_last_line_error(result)
    assert "'body'" in line and 'text, id' in line
    assert not out_dir.exists()


@pytest.mark.parametrize('case', ['empty', 'missing'])
def test_openwebtext_unloadable_dataset(tmp_path, tiktoken_cache, case):
    script = install(tmp_path, 'openwebtext')
    folder = tmp_path / 'corpus'
    if case == 'empty':
        folder.mkdir()
        (folder / 'docs.jsonl').write_text('', encoding='utf-8')
    out_dir = tmp_path / 'out'
    result = run(script, f'--dataset={folder}', '--num_proc=1', f'--out_dir={out_dir}', env=owt_env(tmp_path, 'cache'))
    line = assert_last_line_error(result)
    assert str(folder) in line
    if case == 'empty':
        assert 'no documents' in line
    assert not out_dir.exists()


def docs_of(out_dir):
    """The documents in a prepared dataset's train.bin and val.bin, decoded: the sorted list of both."""
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    return sorted(enc.decode(d) for split in ('train', 'val')
                  for d in split_documents(tokens(out_dir / f'{split}.bin').tolist()))


def test_rows_with_null_text_are_skipped_and_counted(tmp_path, tiktoken_cache):
    docs = [f"document {i} " * (i + 1) for i in range(12)]
    rows = [{'text': doc} for doc in docs]
    rows[3:3] = [{'text': None}]
    rows.append({'text': None})
    (tmp_path / 'corpus.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows), encoding='utf-8')
    script = install(tmp_path, 'openwebtext')
    out_dir = tmp_path / 'out'
    result = run(script, f'--dataset={tmp_path / "corpus.jsonl"}', '--num_proc=2', f'--out_dir={out_dir}',
                 env=owt_env(tmp_path, 'cache'))
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr
    assert "12 documents, 2 rows skipped (their 'text' is null or not text)" in result.stdout
    assert docs_of(out_dir) == sorted(docs)


def test_a_folder_of_parquet_shards_laid_out_as_on_the_hub_is_read_whole(tmp_path, tiktoken_cache):
    # as Skylion007/openwebtext@refs/pr/18 lays out its conversion: plain_text/train-0000N-of-0000M.parquet, in
    # row groups of a few documents (read by the workers themselves); the first file is one row group of 5,000
    # (pyarrow's default for a small file), too large for a worker: read by the main process, a batch at a time
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(18)
    docs = [' '.join(rng.choice(['web', 'text', 'naïve', '日本語', '\n']) for _ in range(rng.randint(1, 40)))
            for _ in range(60)] + [f"short {i}" for i in range(5000)]
    (tmp_path / 'owt' / 'plain_text').mkdir(parents=True)
    pq.write_table(pa.table({'text': docs[60:]}), tmp_path / 'owt' / 'plain_text' / 'train-00000-of-00003.parquet')
    for shard in (1, 2):
        pq.write_table(pa.table({'text': docs[shard - 1:60:2]}), row_group_size=7,
                       where=tmp_path / 'owt' / 'plain_text' / f'train-{shard:05d}-of-00003.parquet')
    script = install(tmp_path, 'openwebtext')
    out_dir = tmp_path / 'out'
    result = run(script, f'--dataset={tmp_path / "owt"}', '--num_proc=2', f'--out_dir={out_dir}',
                 env=owt_env(tmp_path, 'cache'))
    assert result.returncode == 0, result.stderr
    assert docs_of(out_dir) == sorted(docs)
    assert not [name for _, _, names in os.walk(tmp_path / 'cache') for name in names if not name.endswith('.lock')]


def write_jsonl_shards(folder, n_shards=3):
    """n_shards .jsonl files of 30 short documents (datasets streams them as n_shards shards); the documents."""
    rng = random.Random(4)
    folder.mkdir()
    docs = []
    for shard in range(n_shards):
        shard_docs = [' '.join(rng.choice(['resume', 'kill', 'é', '\n', '42']) for _ in range(rng.randint(1, 30)))
                      for _ in range(30)]
        with open(folder / f'part{shard}.jsonl', 'w', encoding='utf-8') as f:
            f.writelines(json.dumps({'text': doc}) + '\n' for doc in shard_docs)
        docs += shard_docs
    return docs


@pytest.fixture(scope='module')
def owt_shards(tmp_path_factory):
    """Three .jsonl shards and one uninterrupted prepare of them (num_proc=2, an empty datasets cache):
    (root, documents, the bytes of train.bin, val.bin and manifest.json, the datasets cache)."""
    if scripts.tiktoken_cache_dir() is None:
        pytest.skip("tiktoken's GPT-2 BPE files not found: set NANOGPT_DATA_DIR to the folder holding tiktoken/")
    root = tmp_path_factory.mktemp('owt_shards')
    docs = write_jsonl_shards(root / 'corpus')
    script = install(root, 'openwebtext')
    env = owt_env(root, 'cache', TIKTOKEN_CACHE_DIR=scripts.tiktoken_cache_dir())
    result = run(script, f'--dataset={root / "corpus"}', '--num_proc=2', f'--out_dir={root / "out"}', env=env)
    assert result.returncode == 0, result.stderr
    return root, docs, read_outputs(root / 'out'), root / 'cache'


def read_outputs(out_dir):
    return {name: (out_dir / name).read_bytes() for name in ('train.bin', 'val.bin', 'manifest.json')}


def test_openwebtext_streams_and_leaves_no_copy_of_the_corpus_in_the_datasets_cache(owt_shards):
    root, docs, _, cache = owt_shards
    assert docs_of(root / 'out') == sorted(docs)
    assert sorted(os.listdir(root / 'out')) == ['manifest.json', 'train.bin', 'val.bin']  # no partial files left
    cached = [os.path.join(d, name) for d, _, names in os.walk(cache) for name in names]
    assert not [path for path in cached if path.endswith(('.arrow', '.parquet', '.jsonl'))], cached
    assert sum(map(os.path.getsize, cached)) < 1024, cached  # lock files at most


@pytest.mark.parametrize('hold_at, recorded_shards', [
    ('fsync6', 2),  # both files of the third shard written, before the progress record that counts them
    ('val.bin', 3),  # every shard tokenized and train.bin written, val.bin not yet in place
], ids=['while tokenizing', 'while writing the splits'])
def test_openwebtext_killed_mid_way_and_run_again_gives_identical_bins_and_manifest(owt_shards, tmp_path,
                                                                                   tiktoken_cache, hold_at,
                                                                                   recorded_shards):
    root, _, uninterrupted, _ = owt_shards
    script = install(tmp_path, 'openwebtext')
    args = [f'--dataset={root / "corpus"}', '--num_proc=2', f'--out_dir={tmp_path / "out"}']
    env = scripts.site_env(str(tmp_path / 'site'), scripts.HOLD, HOLD_AT=hold_at, HELD_MARKER=tmp_path / 'held',
                           HF_DATASETS_CACHE=tmp_path / 'cache', HF_HUB_OFFLINE='1')
    scripts.kill_when_held([sys.executable, str(script), *args], env, tmp_path / 'held')
    progress = json.loads((tmp_path / 'out' / 'progress.json').read_text())
    assert progress['shards_done'] == recorded_shards
    assert not json.loads((tmp_path / 'out' / 'manifest.json').read_text())['complete']
    if hold_at == 'fsync6':  # the third shard was written but not recorded: the run again must cut it off
        for name in ('tokens.bin', 'lengths.bin'):
            assert os.path.getsize(tmp_path / 'out' / f'{name}.partial') > progress['sizes'][name]

    result = run(script, *args, env=owt_env(tmp_path, 'cache'))
    assert result.returncode == 0, result.stderr
    assert f"resuming after {recorded_shards} of 3 shards" in result.stdout
    assert read_outputs(tmp_path / 'out') == uninterrupted
    assert sorted(os.listdir(tmp_path / 'out')) == ['manifest.json', 'train.bin', 'val.bin']


def test_a_progress_record_is_continued_only_with_the_same_settings_and_whole_files(tmp_path, monkeypatch):
    # data/tokenize_corpus.py's Progress, which both corpus prepares resume from: oracle, the bytes appended
    monkeypatch.syspath_prepend(os.path.join(REPO, 'data'))
    from tokenize_corpus import PROGRESS, Progress

    def stopped(settings):
        # a prepare stopped after recording one shard of 10 ids, with 5 more ids written after the record
        if (tmp_path / PROGRESS).exists():
            (tmp_path / PROGRESS).unlink()
        progress = Progress(str(tmp_path), settings, ('a.bin',), counts={'n': 0})
        progress.append('a.bin', np.arange(10, dtype=np.uint16))
        progress.counts['n'] = 10
        progress.commit(1, finished=False)
        progress.append('a.bin', np.arange(5, dtype=np.uint16))
        progress.close()

    def reopened(settings):
        progress = Progress(str(tmp_path), settings, ('a.bin',), counts={'n': 0})
        progress.close()
        return progress.record['shards_done'], progress.counts, tokens(tmp_path / 'a.bin.partial').tolist()

    stopped({'corpus': 1})
    assert reopened({'corpus': 1}) == (1, {'n': 10}, list(range(10)))  # continued, what followed the record cut off
    stopped({'corpus': 1})
    assert reopened({'corpus': 2}) == (0, {'n': 0}, [])  # other settings: from the beginning
    stopped({'corpus': 1})
    with open(tmp_path / 'a.bin.partial', 'r+b') as f:
        f.truncate(8)  # shorter than its record says
    assert reopened({'corpus': 1}) == (0, {'n': 0}, [])


# a stand-in for datasets.load_dataset, installed by a sitecustomize.py: it writes down the arguments it was called
# with and answers with HUB_DOCS streamed from two shards, as the hub's parquet files stream, or with the error
# datasets>=4 gives for a repository holding a loading script
FAKE_HUB = '''
import json, os
import datasets

def load_dataset(path, *args, **kwargs):
    with open(os.environ['HUB_CALLS'], 'a') as f:
        f.write(json.dumps(dict(path=path, **{k: kwargs.get(k) for k in ('name', 'revision', 'split', 'streaming')}))
                + '\\n')
    if os.environ.get('HUB_SCRIPT'):
        raise RuntimeError(f"Dataset scripts are no longer supported, but found {path.split('/')[-1]}.py")
    return datasets.Dataset.from_dict({'text': json.loads(os.environ['HUB_DOCS'])}).to_iterable_dataset(num_shards=2)

datasets.load_dataset = load_dataset
'''


def fake_hub_env(tmp_path, docs=(), script=False):
    return scripts.site_env(str(tmp_path / 'site'), FAKE_HUB, HUB_CALLS=tmp_path / 'calls.jsonl',
                            HUB_DOCS=json.dumps(list(docs)), HUB_SCRIPT='1' if script else '',
                            HF_DATASETS_CACHE=tmp_path / 'cache', HF_HUB_OFFLINE='1')


def hub_calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / 'calls.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('args, call', [
    ([], dict(path='Skylion007/openwebtext', name=None, revision='refs/pr/18')),  # the parquet conversion
    (['--dataset=me/corpus@v2', '--name=en'], dict(path='me/corpus', name='en', revision='v2')),
    (['--dataset=me/corpus', '--revision=refs/pr/3'], dict(path='me/corpus', name=None, revision='refs/pr/3')),
], ids=['default', 'name@revision', '--revision'])
def test_openwebtext_reads_the_hub_source_it_is_given(tmp_path, tiktoken_cache, args, call):
    docs = [f"hub document {i}" for i in range(10)]
    script = install(tmp_path, 'openwebtext')
    result = run(script, *args, '--num_proc=1', f'--out_dir={tmp_path / "out"}', env=fake_hub_env(tmp_path, docs))
    assert result.returncode == 0, result.stderr
    assert hub_calls(tmp_path) == [dict(call, split='train', streaming=True)]  # streamed: nothing in the cache
    assert docs_of(tmp_path / 'out') == sorted(docs)


@pytest.mark.parametrize('args, message', [
    (['--dataset=openwebtext'], "--dataset=openwebtext: this hub dataset has a loading script, which datasets>=4 "
                                "no longer runs: name a revision with its parquet conversion, e.g. "
                                "--dataset=Skylion007/openwebtext@refs/pr/18"),
    (['--dataset=me/corpus'], "e.g. --dataset=me/corpus@refs/convert/parquet"),
    (['--dataset=me/corpus@v2', '--revision=v3'], "--dataset=me/corpus@v2 and --revision=v3 name two revisions"),
    (['--dataset=me/corpus@'], "'me/corpus@' is not a hub source: write NAME or NAME@REVISION"),
], ids=['openwebtext script', 'other script', 'two revisions', 'no revision after @'])
def test_a_hub_source_that_cannot_be_read_is_one_line_naming_the_option_to_pass(tmp_path, tiktoken_cache, args,
                                                                                message):
    script = install(tmp_path, 'openwebtext')
    result = run(script, *args, '--num_proc=1', f'--out_dir={tmp_path / "out"}',
                 env=fake_hub_env(tmp_path, script=True))
    assert message in assert_last_line_error(result)
    assert not (tmp_path / 'out').exists()


# the start method of both multiprocessing and multiprocess (datasets' pools), set before the script runs
START_METHOD = '''
import multiprocessing, multiprocess
multiprocessing.set_start_method({method!r}, force=True)
multiprocess.set_start_method({method!r}, force=True)
'''


def prepare_under(root, method):
    """data/openwebtext/prepare.py --dataset=corpus.jsonl --num_proc=2, run in root as a user runs it, with
    workers started by method and an empty datasets cache (a cached run starts no workers); its bins' bytes."""
    script = install(root, 'openwebtext')
    rng = random.Random(3)
    with open(root / 'corpus.jsonl', 'w', encoding='utf-8') as f:
        for i in range(40):
            doc = ' '.join(rng.choice(['spawn', 'fork', 'é', '\n']) for _ in range(i + 1))
            f.write(json.dumps({'text': doc}) + '\n')
    env = scripts.site_env(str(root / 'site'), START_METHOD.format(method=method), HF_DATASETS_CACHE=root / 'cache',
                           HF_HUB_OFFLINE='1', TIKTOKEN_CACHE_DIR=scripts.tiktoken_cache_dir())
    command = [sys.executable, os.path.join('data', 'openwebtext', 'prepare.py'), '--dataset=corpus.jsonl', '--num_proc=2']
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr
    assert 'tokenizing in 2 worker processes' in result.stdout  # started by method, as the script ran
    return [(script.parent / name).read_bytes() for name in ('train.bin', 'val.bin')]


@pytest.fixture(scope='module')
def fork_bins(tmp_path_factory):
    if scripts.tiktoken_cache_dir() is None:
        pytest.skip("tiktoken's GPT-2 BPE files not found: set NANOGPT_DATA_DIR to the folder holding tiktoken/")
    return prepare_under(tmp_path_factory.mktemp('fork'), 'fork')


@pytest.mark.parametrize('method', ['spawn', 'forkserver'])
def test_openwebtext_prepare_under_spawn_and_forkserver_writes_the_same_bins_as_fork(tmp_path, tiktoken_cache,
                                                                                      fork_bins, method):
    assert prepare_under(tmp_path, method) == fork_bins
