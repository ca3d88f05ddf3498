"""Shared test setup: the scripts live at the repository root, so make them importable."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


# test data for the dataset tests, found through NANOGPT_DATA_DIR (CI points it at a folder holding
# tinyshakespeare/input.txt and tiktoken/, tiktoken's cache of the GPT-2 BPE files)

@pytest.fixture
def shakespeare_path():
    """Path of tiny Shakespeare's input.txt, or skip the test when it is not available."""
    data_dir = os.environ.get('NANOGPT_DATA_DIR')
    path = os.path.join(data_dir, 'tinyshakespeare', 'input.txt') if data_dir else None
    if path is None or not os.path.isfile(path):
        pytest.skip("tiny Shakespeare not found: set NANOGPT_DATA_DIR to the folder holding tinyshakespeare/input.txt")
    return path


@pytest.fixture
def tiktoken_cache(monkeypatch):
    """Make tiktoken's GPT-2 BPE loadable without network (here and in subprocesses), or skip the test."""
    from scripts import tiktoken_cache_dir
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None:
        pytest.skip("tiktoken's GPT-2 BPE files not found: set NANOGPT_DATA_DIR to the folder holding tiktoken/ "
                    "(or TIKTOKEN_CACHE_DIR to tiktoken's cache)")
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', cache_dir)
    return cache_dir


# a small text for the end-to-end tests: made here, so they need no downloaded data

@pytest.fixture(scope='session')
def small_text():
    """About 60k characters of pseudo-English with enough structure that a tiny char model learns it."""
    import random
    rng = random.Random(0)
    words = ('the king queen lord lady speak thou thee thy love death night day sword crown blood heart '
             'fair good noble sweet old young man woman god heaven earth fire hath doth shall will').split()
    lines = []
    while sum(len(line) + 1 for line in lines) < 60_000:
        name = rng.choice(('KING', 'QUEEN', 'HAMLET', 'ROMEO', 'JULIET'))
        lines.append(f"{name}:\n" + ' '.join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + '.\n')
    return '\n'.join(lines)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, small_text):
    """small_text as a char dataset, made by the real data/shakespeare_char/prepare.py once per test file."""
    from scripts import prepare_char_dataset
    return prepare_char_dataset(str(tmp_path_factory.mktemp('dataset')), small_text)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; with more, thread hand-offs dominate (badly on a busy machine)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a stand-in GPU (tests/fake_gpu.py), so that what the scripts choose on a GPU machine is tested on any machine

@pytest.fixture
def fake_gpu(monkeypatch):
    """fake(name, capability, count) makes torch, in this test, see that GPU; undone after the test."""
    import fake_gpu as gpu

    def fake(name='NVIDIA A100-SXM4-80GB', capability=(8, 0), count=1):
        gpu.install(name, capability, count, setattr=monkeypatch.setattr)
    return fake


@pytest.fixture
def fake_gpu_env(tmp_path):
    """env(name, capability, count): the environment for a script (run_script's env) that sees that GPU, the
    same fake installed by a sitecustomize.py on PYTHONPATH."""
    from fake_gpu import sitecustomize_source
    from scripts import script_env

    def env(name='NVIDIA A100-SXM4-80GB', capability=(8, 0), count=1):
        folder = tmp_path / 'fake_gpu_site'
        folder.mkdir(exist_ok=True)
        (folder / 'sitecustomize.py').write_text(sitecustomize_source(name, capability, count))
        return script_env(PYTHONPATH=os.pathsep.join(filter(None, (str(folder), os.environ.get('PYTHONPATH')))))
    return env


# the longest files first: pytest-xdist hands out whole files (--dist loadfile) in this order, so the two workers
# finish together instead of one running the last long file alone
LONGEST_FIRST = ('test_ddp.py', 'test_train.py', 'test_errors.py', 'test_sharded.py', 'test_lora.py', 'test_restart.py',
                 'test_precision.py', 'test_compile.py', 'test_gpu_check.py', 'test_prepare.py', 'test_fineweb.py')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
