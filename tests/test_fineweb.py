"""
Tests for data/fineweb/prepare.py on a small FineWeb-edu look-alike: parquet shards the test writes, laid out as
on the hub (sample/10BT/000_00000.parquet ...). The oracles: tiktoken run here on the documents, an uninterrupted
prepare for a resumed one, the fork start method for spawn.
"""
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

import scripts
from configurator import UserError
from scripts import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, 'data', 'fineweb', 'prepare.py')
EOT = 50256  # gpt2's <|endoftext|>
VAL_TOKENS = 500
N_SHARDS = 4


def write_corpus(root):
    """N_SHARDS parquet shards of 80 short documents each (one null text in the second) under
    root/sample/10BT, with FineWeb-edu's other columns beside the text; returns the texts in stream order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(2357)
    words = ['the', 'web', 'edu', 'é', 'naïve', '—', '日本語', 'Ωmega', '\n', '  ', '<|endoftext|>', '42']
    folder = os.path.join(root, 'sample', '10BT')
    os.makedirs(folder)
    texts = []
    for shard in range(N_SHARDS):
        docs = [' '.join(rng.choice(words) for _ in range(rng.randint(0, 50))) for _ in range(80)]
        if shard == 1:
            docs[7] = None
        ids = [f'<urn:uuid:{len(texts) + i}>' for i in range(len(docs))]
        table = pa.table({'text': docs, 'id': ids, 'score': [3.5] * len(docs), 'int_score': [4] * len(docs)})
        pq.write_table(table, os.path.join(folder, f'{shard:03d}_00000.parquet'))
        texts += docs
    return texts


def expected_splits(texts, val_tokens=VAL_TOKENS):
    """The oracle: each document tiktoken-encoded and ended with EOT, null texts left out, the first documents
    to val until it holds val_tokens tokens, the rest to train."""
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    docs = [enc.encode_ordinary(text) + [EOT] for text in texts if text is not None]
    n_val, val = 0, []
    while len(val) < val_tokens:
        val += docs[n_val]
        n_val += 1
    return [t for d in docs[n_val:] for t in d], val, len(docs) - n_val, n_val


def run(*args, env=None, **popen):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120, **popen)


def prepare_env(cache_dir, site_code=None, **extra):
    """A script's environment with its own datasets cache, offline, tiktoken's files found; site_code: a
    sitecustomize.py run before the script (scripts.site_env)."""
    extra.update(HF_DATASETS_CACHE=str(cache_dir), HF_HUB_OFFLINE='1', TIKTOKEN_CACHE_DIR=scripts.tiktoken_cache_dir())
    if site_code is None:
        return scripts.script_env(**extra)
    return scripts.site_env(os.path.join(os.path.dirname(cache_dir), 'site'), site_code, **extra)


def read_bytes(out_dir):
    return {name: open(os.path.join(out_dir, name), 'rb').read() for name in ('train.bin', 'val.bin', 'manifest.json')}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp('fineweb-edu')
    return root, write_corpus(str(root))


@pytest.fixture(scope='module')
def prepared(corpus, tmp_path_factory):
    """One uninterrupted prepare of the corpus (num_proc=2, an empty datasets cache): (out_dir, cache, result)."""
    if scripts.tiktoken_cache_dir() is None:
        pytest.skip("tiktoken's GPT-2 BPE files not found: set NANOGPT_DATA_DIR or TIKTOKEN_CACHE_DIR")
    work = tmp_path_factory.mktemp('prepared')
    out_dir, cache = work / 'out', work / 'cache'
    result = run(f'--dataset={corpus[0]}', '--num_proc=2', f'--val_tokens={VAL_TOKENS}', f'--out_dir={out_dir}',
                 env=prepare_env(cache))
    assert result.returncode == 0, result.stderr
    return out_dir, cache, result


def test_bins_are_tiktoken_of_the_documents_and_a_null_text_is_skipped(corpus, prepared, tiktoken_cache):
    out_dir, _, result = prepared
    train, val, n_train, n_val = expected_splits(corpus[1])
    assert np.fromfile(out_dir / 'train.bin', dtype=np.uint16).tolist() == train
    assert np.fromfile(out_dir / 'val.bin', dtype=np.uint16).tolist() == val
    manifest = json.loads((out_dir / 'manifest.json').read_text())
    assert manifest == {'complete': True, 'vocab_size': 50257,
                        'files': {'train.bin': 2 * len(train), 'val.bin': 2 * len(val)}}
    assert f"train has {len(train):,} tokens ({n_train:,} documents)" in result.stdout
    assert f"val has {len(val):,} tokens ({n_val:,} documents)" in result.stdout
    assert "skipped 1 rows whose text was null or not a string" in result.stdout
    assert sorted(os.listdir(out_dir)) == ['manifest.json', 'train.bin', 'val.bin']  # no progress record left


def test_streamed_prepare_leaves_no_copy_of_the_corpus_in_the_datasets_cache(corpus, prepared):
    _, cache, _ = prepared
    cached = [os.path.join(d, name) for d, _, names in os.walk(cache) for name in names]
    assert not [path for path in cached if path.endswith(('.arrow', '.parquet'))], cached
    assert sum(map(os.path.getsize, cached)) < 1024, cached  # lock files at most


@pytest.mark.parametrize('hold_at, recorded_shards', [
    ('fsync5', 2),  # train.bin.partial of the third shard written, before the progress record that counts it
    ('val.bin', N_SHARDS),  # all tokenized and train.bin.partial renamed to train.bin, val.bin.partial not yet
], ids=['while tokenizing', 'while renaming the finished files'])
def test_prepare_killed_mid_way_and_run_again_gives_identical_bins_and_manifest(corpus, prepared, tmp_path, hold_at,
                                                                               recorded_shards):
    out_dir = tmp_path / 'out'
    args = [f'--dataset={corpus[0]}', '--num_proc=2', f'--val_tokens={VAL_TOKENS}', f'--out_dir={out_dir}']
    env = prepare_env(tmp_path / 'cache', scripts.HOLD, HOLD_AT=hold_at, HELD_MARKER=tmp_path / 'held')
    scripts.kill_when_held([sys.executable, SCRIPT, *args], env, tmp_path / 'held')
    progress = json.loads((out_dir / 'progress.json').read_text())
    assert progress['shards_done'] == recorded_shards
    if hold_at == 'fsync5':  # the third shard's tokens were written but not recorded: the run again cuts them off
        assert os.path.getsize(out_dir / 'train.bin.partial') > 2 * progress['counts']['train_tokens']
    else:  # the finished train.bin is taken back, not tokenized again
        assert (out_dir / 'train.bin').exists() and not (out_dir / 'train.bin.partial').exists()
    assert not json.loads((out_dir / 'manifest.json').read_text())['complete']

    result = run(*args, env=prepare_env(tmp_path / 'cache'))
    assert result.returncode == 0, result.stderr
    assert f"resuming after {recorded_shards} of {N_SHARDS} shards" in result.stdout
    assert read_bytes(out_dir) == read_bytes(prepared[0])
    assert sorted(os.listdir(out_dir)) == ['manifest.json', 'train.bin', 'val.bin']


def test_ctrl_c_stops_the_prepare_without_a_traceback_and_the_same_command_continues(corpus, prepared, tmp_path):
    out_dir = tmp_path / 'out'
    args = [f'--dataset={corpus[0]}', '--num_proc=2', f'--val_tokens={VAL_TOKENS}', f'--out_dir={out_dir}']
    # Ctrl-C after its third fsync (train.bin.partial of the second shard), with the workers busy with the next
    env = prepare_env(tmp_path / 'cache', scripts.HOLD, HOLD_AT='fsync3', HOLD_THEN='ctrl-c',
                      HELD_MARKER=tmp_path / 'held')
    result = run(*args, env=env, start_new_session=True, preexec_fn=scripts.default_sigint)
    assert (tmp_path / 'held').exists() and result.returncode in (-signal.SIGINT, 130), result.stderr
    assert 'Traceback' not in result.stderr and 'error' not in result.stderr

    result = run(*args, env=prepare_env(tmp_path / 'cache'))
    assert result.returncode == 0, result.stderr
    assert f"resuming after 1 of {N_SHARDS} shards" in result.stdout
    assert read_bytes(out_dir) == read_bytes(prepared[0])


def test_spawn_gives_the_same_bins_as_fork(corpus, prepared, tmp_path):
    # as a user runs it: python data/fineweb/prepare.py with two workers, spawn (macOS's and Windows' default,
    # and like forkserver a fresh interpreter per worker) set before it starts
    env = prepare_env(tmp_path / 'cache', "import multiprocessing\nmultiprocessing.set_start_method('spawn')\n")
    out_dir = tmp_path / 'out'
    result = run(f'--dataset={corpus[0]}', '--num_proc=2', f'--val_tokens={VAL_TOKENS}', f'--out_dir={out_dir}',
                 env=env)
    assert result.returncode == 0, result.stderr
    assert read_bytes(out_dir) == read_bytes(prepared[0])


def load_prepare_module():
    spec = importlib.util.spec_from_file_location('fineweb_prepare', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('flags, hub_arguments', [
    ([], {'name': 'sample-10BT', 'revision': None}),
    (['--dataset=HuggingFaceFW/fineweb-edu@v1.4.0', '--name=sample-100BT'],
     {'name': 'sample-100BT', 'revision': 'v1.4.0'}),
])
def test_the_hub_is_streamed_from_fineweb_edu(corpus, prepared, tmp_path, monkeypatch, tiktoken_cache, flags,
                                              hub_arguments):
    # the hub cannot be reached here: load_dataset records its arguments and streams the local shards instead
    import datasets
    real_load_dataset, calls = datasets.load_dataset, []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        shards = sorted(str(p) for p in (corpus[0] / 'sample' / '10BT').iterdir())
        return real_load_dataset('parquet', data_files=shards, split='train', streaming=True,
                                 cache_dir=str(tmp_path / 'cache'))

    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    load_prepare_module().main([*flags, '--num_proc=1', f'--val_tokens={VAL_TOKENS}', f'--out_dir={tmp_path / "out"}'])
    assert calls == [(('HuggingFaceFW/fineweb-edu',), dict(hub_arguments, split='train', streaming=True))]
    assert read_bytes(tmp_path / 'out') == read_bytes(prepared[0])


@pytest.mark.parametrize('flags, message', [
    (['--text_column=body'], "has no column 'body'; its columns are: text, id, score, int_score"),
    (['--name=sample-100BT'], "no .parquet files in .*empty; .* FOLDER/sample/100BT/"),
    (['--max_tokens=100'], "leaves nothing to train on"),
])
def test_a_mistake_is_one_user_error(corpus, tmp_path, flags, message, tiktoken_cache):
    dataset = tmp_path / 'empty' if '--name=sample-100BT' in flags else corpus[0]
    dataset.mkdir(exist_ok=True)
    with pytest.raises(UserError, match=message):
        load_prepare_module().main([f'--dataset={dataset}', *flags, f'--out_dir={tmp_path / "out"}'])


def test_train_runs_on_the_prepared_dataset(prepared, tmp_path):
    proc = scripts.train(str(prepared[0]), str(tmp_path / 'run'), max_iters=2, eval_interval=2, eval_iters=1)
    losses = scripts.iter_losses(proc.stdout)
    assert sorted(losses) == [0, 1] and all(np.isfinite(list(losses.values())))
    assert 2 in scripts.eval_losses(proc.stdout)  # and evaluated on both splits
