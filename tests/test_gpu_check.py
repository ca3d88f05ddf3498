"""benchmarks/gpu_check.py, the acceptance run for a GPU machine, at toy size on the CPU (--tiny): one launch
runs every check, and its JSON report holds the verdicts and the figures a GPU run is judged by."""

import json
import os

import pytest

from scripts import run_script

CHECKS = ['dtypes', 'time_to_loss', 'mfu', 'sampling', 'distributed']


@pytest.fixture
def input_text(tmp_path, small_text):
    """tiny Shakespeare's input.txt from NANOGPT_DATA_DIR, else the session's small text written to a file."""
    data_dir = os.environ.get('NANOGPT_DATA_DIR')
    path = os.path.join(data_dir, 'tinyshakespeare', 'input.txt') if data_dir else ''
    if os.path.isfile(path):
        return path
    path = tmp_path / 'input.txt'
    path.write_text(small_text, encoding='utf-8')
    return str(path)


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_check_and_each_passes(tmp_path, input_text):
    out = tmp_path / 'gpu_check.json'
    proc = run_script('benchmarks/gpu_check.py', '--device=cpu', '--tiny', f'--input={input_text}',
                      f'--out={out}', cwd=tmp_path, timeout=600)
    report = json.loads(out.read_text())
    checks = report['checks']
    assert list(checks) == CHECKS and report['passed']
    for name, check in checks.items():
        assert check['passed'] and not check.get('skipped'), f"{name}: {check['summary']}"
        assert check['seconds'] > 0
        assert f"| {CHECKS.index(name) + 1}. {name} | pass |" in proc.stdout  # the printed table
    assert proc.stdout.rstrip().splitlines()[-1].startswith('every check passed')

    # every dtype eager, one compiled (--tiny keeps compiles to one), each within tolerance of float32 eager
    dtypes = checks['dtypes']
    runs = dtypes['runs']
    assert sorted(runs) == ['bfloat16 compiled', 'bfloat16 eager', 'float16 eager', 'float32 eager']
    reference = runs['float32 eager']['val_loss']
    assert dtypes['tolerance'] == 0.05  # the GPU run's, kept at --tiny
    for name, run in runs.items():
        assert run['ran_as'] == f"{run['dtype']}, compile {'on' if run['compile'] else 'off'}", name
        assert abs(run['val_loss'] - reference) <= dtypes['tolerance'], name

    # greedy tokens and logits: compiled = eager with the KV cache = eager without it
    sampling = checks['sampling']
    tokens = sampling['tokens']
    assert len(tokens['eager']) == 20 and tokens['compiled'] == tokens['eager'] == tokens['uncached']
    assert sampling['max_logit_difference'] <= sampling['logit_tolerance']

    # two gloo processes stand in for two GPUs: DDP and FSDP end where one process does
    distributed = checks['distributed']
    assert distributed['backend'] == 'gloo' and set(distributed['runs']) == {'DDP', 'FSDP'}
    for run in distributed['runs'].values():
        assert run['processes'] == 2
        assert abs(run['val_loss'] - reference) <= distributed['tolerance']
    assert distributed['one_process'] == reference  # the same float32 eager run serves both checks

    # both time-to-loss runs trained to the tiny target, scored on the whole val split
    time_to_loss = checks['time_to_loss']
    for run in time_to_loss['runs'].values():
        assert run['reached'] and run['full_val_loss'] <= time_to_loss['target'] + time_to_loss['tolerance']
    assert 0 < checks['mfu']['mfu'] <= 1 and checks['mfu']['ran_as'] == 'bfloat16, compile off'
