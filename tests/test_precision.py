"""
Mixed precision on the CPU: the bfloat16 and float16 branches a GPU takes (autocast, float16's gradient scaler,
FSDP's parameter dtype), run here. The oracles are float32 runs, uninterrupted runs, weights built here with the
run's seed, and a by-hand halving of the loss scale.
"""

import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from checkpoint import load_checkpoint
from model import GPT, GPTConfig, KVCache
from scripts import eval_losses, iter_losses, run_script, site_env, train

DTYPES = ('float32', 'bfloat16', 'float16')
# a few short launches: checkpoints at 4, resumed to 8; a fixed peak skips measuring matmuls at start-up
SHORT = dict(max_iters=8, eval_interval=4, eval_iters=2, peak_flops=1e12)
# how far a low-precision run's losses may drift from float32's on the tiny model (observed: under 0.005)
TOLERANCE = 0.03


@pytest.fixture(scope='module')
def runs(dataset, tmp_path_factory):
    """Per dtype: (stdout of an uninterrupted run to 8, out_dir of a run stopped at 4)."""
    root = tmp_path_factory.mktemp('precision')
    result = {}
    for dtype in DTYPES:
        full = train(dataset, str(root / f'{dtype}-full'), dtype=dtype, **SHORT).stdout
        train(dataset, str(root / f'{dtype}-half'), dtype=dtype, **dict(SHORT, max_iters=4))
        result[dtype] = full, str(root / f'{dtype}-half')
    return result


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_low_precision_training_tracks_float32(runs, dtype):
    low, reference = runs[dtype][0], runs['float32'][0]
    assert re.search(rf'^run: .*, dtype {dtype},', low, re.M), "the dtype asked for is the dtype used"
    assert iter_losses(low) == pytest.approx(iter_losses(reference), abs=TOLERANCE)
    for step, losses in eval_losses(reference).items():
        assert eval_losses(low)[step] == pytest.approx(losses, abs=TOLERANCE)
    assert iter_losses(low) != iter_losses(reference), "autocast changed nothing: was the dtype applied?"


@pytest.mark.parametrize('saved', DTYPES)
@pytest.mark.parametrize('resumed', DTYPES)
def test_resume_in_any_dtype_from_a_checkpoint_of_any_dtype(runs, dataset, tmp_path, saved, resumed):
    """dtype is a machine setting: a run started on a CPU or an A100 may resume on a T4 (float16, whose scaler
    state a float32 or bfloat16 checkpoint does not hold), and the reverse."""
    out_dir = str(tmp_path / 'out')
    shutil.copytree(runs[saved][1], out_dir)
    proc = train(dataset, out_dir, init_from='resume', dtype=resumed, **SHORT)
    uninterrupted = runs[resumed][0]
    got, expected = iter_losses(proc.stdout), iter_losses(uninterrupted)
    assert sorted(got) == [4, 5, 6, 7]
    if saved == resumed:  # bit-exact: the same losses to the last printed digit, the scaler's state included
        assert got == {i: expected[i] for i in got}
        assert eval_losses(proc.stdout)[8] == eval_losses(uninterrupted)[8]
    else:
        assert got == pytest.approx({i: expected[i] for i in got}, abs=TOLERANCE)
    if resumed == 'float16' and saved == 'float16':
        scale = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['scaler']['scale']
        assert scale == load_checkpoint(os.path.join(runs['float16'][1], 'ckpt.pt'))['scaler']['scale']


# ----------------------------------------------------------------------------- float16 overflow

# GradScaler's first scale, raised from 2**16: every float16 gradient overflows until it has halved far enough
HUGE_SCALE = """
import torch
init = torch.amp.GradScaler.__init__
def huge(self, *args, **kwargs):
    init(self, *args, **dict(kwargs, init_scale=2.0 ** 40))
torch.amp.GradScaler.__init__ = huge
"""

# an infinite gradient in the token embedding only (an AdamW parameter), at every training step
EMBEDDING_OVERFLOW = """
import torch
import torch.nn.functional as F
embedding = F.embedding
def overflowing(*args, **kwargs):
    out = embedding(*args, **kwargs)
    if out.requires_grad:
        out.register_hook(lambda grad: grad * float('inf'))
    return out
F.embedding = overflowing
"""


def initial_weights(checkpoint):
    """The weights train.py starts from with TINY's seed: the oracle of a run none of whose steps was taken."""
    torch.manual_seed(1337)  # train.py's default seed
    return GPT(GPTConfig(**checkpoint['model_args'])).state_dict()


def strict_json_rows(path):
    def refuse(constant):
        raise AssertionError(f"log.jsonl holds {constant}, which strict JSON readers reject")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_float16_overflow_skips_steps_logs_them_and_leaves_weights_unchanged(dataset, tmp_path):
    out_dir = tmp_path / 'out'
    proc = train(dataset, str(out_dir), dtype='float16', max_iters=4, eval_interval=4, eval_iters=2,
                 env=site_env(str(tmp_path / 'site'), HUGE_SCALE))
    skipped = re.findall(r'^iter (\d+): loss [\d.]+, .*float16 overflow: step skipped, loss scale now (\S+)$',
                         proc.stdout, re.M)
    # the scaler halves its scale at each overflow: by hand, 2**40 / 2**(i + 1) after step i
    assert skipped == [(str(i), f'{2.0 ** (39 - i):g}') for i in range(4)], proc.stdout
    checkpoint = load_checkpoint(str(out_dir / 'ckpt.pt'))
    initial = initial_weights(checkpoint)
    assert all(torch.equal(checkpoint['model'][k], initial[k]) for k in initial), "a skipped step moved weights"
    # (saving gives AdamW zero moments if it has none; a step taken would have put the gradients in them)
    assert all(not s['exp_avg'].any() for s in checkpoint['optimizer']['state'].values()), "AdamW took a step"
    rows = strict_json_rows(out_dir / 'log.jsonl')
    steps = [r for r in rows if 'loss' in r]
    assert [r['iter'] for r in steps] == [0, 1, 2, 3]
    assert all(r['skipped'] is True and 'grad_norm' not in r and 'clipped' not in r for r in steps)
    evaluation = [r for r in rows if r['iter'] == 4 and 'val_loss' in r]
    assert evaluation and 'clip_fraction' not in evaluation[0], "skipped steps counted as clipping events"


def test_muon_in_float16_skips_with_adamw_when_only_adamw_parameters_overflow(dataset, tmp_path):
    """Muon's hidden matrices have finite gradients here; a step that AdamW skips must not be taken by Muon
    (before: it stepped on momentum and weight decay with gradients that clipping had multiplied by 0)."""
    out_dir = tmp_path / 'out'
    proc = train(dataset, str(out_dir), dtype='float16', optimizer='muon', max_iters=3, eval_interval=3,
                 eval_iters=2, env=site_env(str(tmp_path / 'site'), EMBEDDING_OVERFLOW))
    assert len(re.findall(r'step skipped', proc.stdout)) == 3, proc.stdout
    checkpoint = load_checkpoint(str(out_dir / 'ckpt.pt'))
    initial = initial_weights(checkpoint)
    moved = [k for k in initial if not torch.equal(checkpoint['model'][k], initial[k])]
    assert moved == [], f"weights changed on skipped steps: {moved}"


# ----------------------------------------------------------------------------- losses and caches in float32

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_the_loss_is_float32_whatever_the_compute_dtype(dtype):
    """As under FSDP's policy, whose parameters are cast to the compute dtype: the logits are low-precision, the
    loss is computed from them in float32 (it was a bfloat16 loss, a multiple of 1/64 near 4)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65)).to(dtype)
    x, y = torch.randint(65, (2, 16)), torch.randint(65, (2, 16))
    logits, loss = model(x, y)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    assert loss.item() == F.cross_entropy(logits.float().view(-1, 65), y.view(-1)).item()
    with torch.autocast('cpu', dtype=dtype):
        assert GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65))(x, y)[1].dtype == \
            torch.float32


def test_kv_cache_keeps_the_compute_dtype_with_qk_norm_and_rope(monkeypatch):
    """CUDA autocast computes rms_norm in float32 (CPU autocast does not): stand in for it, and check that the
    cache holds keys and values in the compute dtype, not float32 (twice the memory, a cast at every token)."""
    rms_norm = F.rms_norm
    monkeypatch.setattr(model_module.F, 'rms_norm', lambda x, *a, **k: rms_norm(x.float(), *a, **k))
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, rope=True, qk_norm=True)
    model = GPT(config).eval()
    cache = KVCache(config, 1)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model(torch.randint(65, (1, 5)), kv_cache=cache)
        model(torch.randint(65, (1, 1)), kv_cache=cache)
    assert [kv.dtype for kv in cache.kv] == [torch.bfloat16] * config.n_layer


# ----------------------------------------------------------------------------- the other scripts

def test_sample_eval_and_bench_run_in_bfloat16(runs, tmp_path):
    out_dir = runs['float32'][1]
    for dtype in ('float32', 'bfloat16'):
        sample = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', f'--dtype={dtype}',
                            '--num_samples=2', '--max_new_tokens=12', '--temperature=0')
        assert sample.stdout.count('---------------') == 2 and f'sampling on cpu in {dtype}' in sample.stderr
    text = tmp_path / 'text.txt'
    text.write_text('the king and the queen speak of love and death\n' * 20)
    scores = {}
    for dtype in ('float32', 'bfloat16'):
        result = tmp_path / f'{dtype}.json'
        run_script('eval.py', f'--out_dir={out_dir}', '--device=cpu', f'--dtype={dtype}', '--tasks=text',
                   f'--text={text}', f'--out={result}')
        scores[dtype] = json.loads(result.read_text())
    assert scores['bfloat16'] != scores['float32']
    assert scores['bfloat16']['text']['loss'] == pytest.approx(scores['float32']['text']['loss'], abs=TOLERANCE)
    bench = run_script('bench.py', '--device=cpu', '--dtype=bfloat16', '--n_layer=1', '--n_head=2', '--n_embd=32',
                       '--block_size=32', '--batch_size=2', '--warmup_steps=1', '--num_steps=2', '--peak_flops=1e12')
    assert 'bfloat16' in bench.stdout
