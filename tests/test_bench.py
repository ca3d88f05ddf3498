"""bench.py and the scripts in benchmarks/: what they report must be self-consistent and computed from the
model in use (the peak FLOP/s behind MFU is tested in test_hardware.py). Speed itself is never asserted here."""

import re

import pytest

from model import GPT, GPTConfig
from scripts import args_of, assert_one_line_error, prepare_char_dataset, run_script, train

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)


def bench(*args, check=True):
    return run_script('bench.py', '--device=cpu', *args, check=check)


@pytest.mark.parametrize('recipe', [{}, dict(optimizer='muon', rope=True, qk_norm=True)], ids=['nanoGPT', 'recipe'])
def test_train_mode_reports_consistent_throughput_and_mfu_of_the_given_peak(recipe):
    peak = 1e9  # small, so that the printed MFU has many significant digits
    proc = bench(*args_of(dict(SHAPE, **recipe)), '--batch_size=4', '--warmup_steps=2', '--num_steps=3',
                 f'--peak_flops={peak}')
    first, last = (float(x) for x in re.findall(r'loss ([\d.]+)', proc.stdout))
    assert last < first  # the timed steps really train: a fixed batch is being fitted
    tokens_per_s, ms_per_iter, mfu = re.search(
        r'^([\d,]+) tokens/s, ([\d.]+) ms/iter, MFU ([\d.]+)% of 0\.00 TFLOP/s', proc.stdout, re.M).groups()
    tokens_per_s = float(tokens_per_s.replace(',', ''))
    assert tokens_per_s * float(ms_per_iter) / 1000 == pytest.approx(4 * 16, rel=0.01)
    model_args = {k: v for k, v in recipe.items() if k != 'optimizer'}
    flops_per_token = GPT(GPTConfig(**SHAPE, **model_args, bias=False)).flops_per_token()
    assert float(mfu) / 100 == pytest.approx(flops_per_token * tokens_per_s / peak, rel=0.01)
    assert 'peak memory' in proc.stdout


def test_train_mode_reads_batches_from_a_prepared_dataset(tmp_path, small_text):
    dataset = prepare_char_dataset(tmp_path, small_text)
    proc = bench(*args_of(dict(SHAPE, vocab_size=0)), f'--dataset={dataset}', '--batch_size=4',
                 '--warmup_steps=1', '--num_steps=2')
    assert re.search(r'^train: .* vocab 50304,', proc.stdout, re.M)  # vocab 0: train.py's padded default
    assert re.search(r'^[\d,]+ tokens/s', proc.stdout, re.M)


def test_train_mode_on_a_missing_dataset_fails_with_one_line(tmp_path):
    proc = bench(f'--dataset={tmp_path / "nowhere"}', check=False)
    assert 'no train.bin' in assert_one_line_error(proc)


def test_sample_mode_compares_cache_and_no_cache_along_the_sequence_past_block_size():
    # 4 + 30 tokens outgrow block_size 16: the cached run must slide its window like the uncached one
    proc = bench(*args_of(SHAPE), '--mode=sample', '--prompt_tokens=4', '--max_new_tokens=30')
    assert 'warning' not in proc.stdout  # greedy tokens identical with and without the cache
    rows = re.findall(r'^\| (KV cache|no cache) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$', proc.stdout, re.M)
    assert [name for name, *_ in rows] == ['KV cache', 'no cache']
    positions = re.findall(r'^\| (\d+)-(\d+) \| (\d+)-(\d+) \| [\d.]+ \| [\d.]+ \|$', proc.stdout, re.M)
    assert positions[0][:2] == ('2', '5') and positions[-1][1] == '30'  # every new token after the first
    for lo, hi, pos_lo, pos_hi in positions:
        assert int(pos_lo) == int(lo) + 4 and int(pos_hi) == int(hi) + 4


def test_sample_mode_from_a_checkpoint(tmp_path, small_text):
    dataset = prepare_char_dataset(tmp_path, small_text)
    out_dir = str(tmp_path / 'out')
    train(dataset, out_dir, max_iters=2, eval_interval=2)
    proc = bench('--mode=sample', '--init_from=resume', f'--out_dir={out_dir}', '--max_new_tokens=5',
                 '--compare_uncached=False')
    assert re.search(r'^sample: 2 layers, 2 heads, 32 wide, block 32,', proc.stdout, re.M)
    assert re.search(r'^\| KV cache \|', proc.stdout, re.M)


def test_a_dataset_beyond_the_model_vocabulary_fails_with_one_line(tmp_path, small_text):
    dataset = prepare_char_dataset(tmp_path, small_text)  # ids up to its character count, above vocab_size 8
    proc = bench(*args_of(dict(SHAPE, vocab_size=8)), f'--dataset={dataset}', '--warmup_steps=1', check=False)
    assert "beyond the model's vocabulary of 8" in assert_one_line_error(proc)


def test_a_prompt_that_fills_the_context_fails_with_one_line():
    proc = bench(*args_of(SHAPE), '--mode=sample', '--prompt_tokens=16', check=False)
    assert 'prompt_tokens=16 leaves no room' in assert_one_line_error(proc)


def test_unknown_mode_fails_with_one_line():
    assert 'unknown mode' in assert_one_line_error(bench('--mode=fast', check=False))


@pytest.mark.slow
def test_generate_vs_hf_benchmark_runs_and_all_methods_agree():
    proc = run_script('benchmarks/generate_vs_hf.py', '--n_layer=1', '--n_head=2', '--n_embd=32',
                      '--prompt_tokens=4', '--max_new_tokens=8', '--repeats=1')
    assert 'all three generated the same 8 tokens' in proc.stdout
    methods = re.findall(r'^\| (ours, KV cache|transformers, KV cache|ours, no cache) \|', proc.stdout, re.M)
    assert methods == ['ours, KV cache', 'transformers, KV cache', 'ours, no cache']


@pytest.mark.slow
def test_train_cpu_benchmark_runs_every_step_kind():
    proc = run_script('benchmarks/train_cpu.py', '--num_tokens=5000', '--warmup_iters=1', '--iters=2',
                      '--repeats=1', '--compile_check=False')
    steps = re.findall(r'^\| (nanoGPT|this repository[^|]*) \| [\d.]+ \|', proc.stdout, re.M)
    assert steps == ['nanoGPT', 'this repository (train.py)', "this repository, GPT-2's tanh GELU"]
