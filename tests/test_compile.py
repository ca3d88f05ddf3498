"""
torch.compile on the CPU: compiled training and sampling against eager code, a compiled run resumed, and a
compiler that fails, which must leave a run that works (eager) with one warning line.
"""

import re

import pytest

from scripts import eval_losses, iter_losses, run_script, site_env, train

pytestmark = pytest.mark.slow

SHORT = dict(max_iters=8, eval_interval=4, eval_iters=2, peak_flops=1e12)
# compiled kernels sum in another order than eager ones (as in test_ddp's FSDP compile test)
TOL = 1e-3

# every torch.compile gets a backend that fails as one without a working C++ compiler or Triton does
FAILING_COMPILER = """
import torch
compile = torch.compile
def failing_backend(graph, example_inputs):
    raise RuntimeError("no working C++ compiler (injected by the test)")
torch.compile = lambda model=None, **kwargs: compile(model, **dict(kwargs, backend=failing_backend))
"""


@pytest.fixture(scope='module')
def eager(dataset, tmp_path_factory):
    """An eager run to 8 iterations: (stdout, out_dir)."""
    out_dir = str(tmp_path_factory.mktemp('eager') / 'out')
    return train(dataset, out_dir, **SHORT).stdout, out_dir


def test_compiled_training_matches_eager_and_resumes_on_its_curve(dataset, eager, tmp_path):
    out_dir = str(tmp_path / 'out')
    first = train(dataset, out_dir, compile=True, **dict(SHORT, max_iters=4)).stdout
    resumed = train(dataset, out_dir, compile=True, init_from='resume', **SHORT).stdout
    assert re.search(r'^run: .*, compile on,', first, re.M) and re.search(r'^run: .*, compile on,', resumed, re.M)
    reference = eager[0]
    losses, evaluations = {**iter_losses(first), **iter_losses(resumed)}, {**eval_losses(first), **eval_losses(resumed)}
    assert sorted(losses) == list(range(8)) and sorted(evaluations) == [0, 4, 8]
    assert losses == pytest.approx(iter_losses(reference), abs=TOL)
    for step, expected in eval_losses(reference).items():
        assert evaluations[step] == pytest.approx(expected, abs=TOL)


def test_a_failed_compile_trains_eagerly_with_one_warning(dataset, eager, tmp_path):
    proc = train(dataset, str(tmp_path / 'out'), compile=True, env=site_env(str(tmp_path / 'site'), FAILING_COMPILER),
                 **dict(SHORT, max_iters=4))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert 'no working C++ compiler (injected by the test)' in warnings[0] and '--compile=False' in warnings[0]
    assert re.search(r'^run: .*, compile off,', proc.stdout, re.M)
    expected = iter_losses(eager[0])
    assert iter_losses(proc.stdout) == {i: expected[i] for i in range(4)}  # eager: the same to the last digit


SAMPLE = ('--device=cpu', '--num_samples=1', '--max_new_tokens=40', '--temperature=0')


def test_compiled_sampling_gives_the_eager_tokens_and_falls_back_when_compiling_fails(eager, tmp_path):
    out_dir = f'--out_dir={eager[1]}'
    reference = run_script('sample.py', out_dir, *SAMPLE).stdout
    compiled = run_script('sample.py', out_dir, *SAMPLE, '--compile=True')
    assert compiled.stdout == reference and 'warning' not in compiled.stderr
    failed = run_script('sample.py', out_dir, *SAMPLE, '--compile=True',
                        env=site_env(str(tmp_path / 'site'), FAILING_COMPILER))
    assert failed.stdout == reference
    warnings = [line for line in failed.stderr.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1 and 'injected by the test' in warnings[0] and 'Traceback' not in failed.stderr
