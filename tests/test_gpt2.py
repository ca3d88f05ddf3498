"""GPT-2 in and out, end to end: finetune from local GPT-2 weights on BPE data, sample, export back to
Hugging Face, and read checkpoints written by nanoGPT itself."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from scripts import REPO_ROOT, TINY, args_of, assert_one_line_error, iter_losses, run_script, script_env, train


@pytest.fixture
def tiny_gpt2_dir(tmp_path):
    """A small random GPT-2 with the real 50257-token vocabulary, saved the way the hub serves GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    path = tmp_path / 'tiny-gpt2'
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def bpe_dataset(tmp_path, small_text, tiktoken_cache):
    """data/shakespeare/prepare.py (the real script, copied) run on the small test text."""
    data_dir = tmp_path / 'data' / 'shakespeare'
    (tmp_path / 'text.txt').write_text(small_text, encoding='utf-8')
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'data', 'shakespeare', 'prepare.py'),
                    f'--input={tmp_path / "text.txt"}', f'--out_dir={data_dir}'],
                   check=True, capture_output=True, env=script_env())
    return str(data_dir)


def finetune_settings(init_from, dataset, out_dir):
    return dict(init_from=init_from, dataset=dataset, out_dir=out_dir, block_size=32, max_iters=6,
                eval_interval=3, learning_rate=1e-3)


@pytest.mark.slow
def test_cpu_finetune_from_local_gpt2_then_sample_decodes_with_tiktoken(tmp_path, tiny_gpt2_dir, bpe_dataset):
    import tiktoken
    from checkpoint import load_checkpoint, model_from_checkpoint
    out_dir = str(tmp_path / 'out')
    proc = train(**finetune_settings(tiny_gpt2_dir, bpe_dataset, out_dir))
    assert 'Initializing from GPT-2 weights' in proc.stdout
    assert sorted(iter_losses(proc.stdout)) == list(range(6))
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    assert ckpt['model_args']['vocab_size'] == 50257 and ckpt['model_args']['block_size'] == 32
    assert ckpt['model_args']['gelu_approximate'] == 'tanh'  # GPT-2's GELU survives into the checkpoint

    prompt = 'KING:\nThe crown'
    sample = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1',
                        '--max_new_tokens=20', '--temperature=0', f'--start={prompt}')
    # oracle: greedy decoding of the same checkpoint in this process, decoded with tiktoken's GPT-2 BPE
    enc = tiktoken.get_encoding('gpt2')
    name = 'best.pt' if os.path.exists(os.path.join(out_dir, 'best.pt')) else 'ckpt.pt'
    model = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, name))).eval()
    x = torch.tensor([enc.encode(prompt)])
    y = model.generate(x, 20, temperature=0, stop_token=enc.eot_token)[0, x.size(1):].tolist()
    if enc.eot_token in y:
        y = y[:y.index(enc.eot_token)]
    assert sample.stdout.split('---------------')[0] == prompt + enc.decode(y) + '\n'


@pytest.mark.slow
def test_export_after_training_matches_transformers_logits(tmp_path, tiny_gpt2_dir, bpe_dataset):
    from transformers import GPT2LMHeadModel
    from checkpoint import load_checkpoint, model_from_checkpoint
    out_dir, export_dir = str(tmp_path / 'out'), str(tmp_path / 'hf')
    train(**finetune_settings(tiny_gpt2_dir, bpe_dataset, out_dir))
    run_script('export_hf.py', f'--out_dir={out_dir}', f'--export_dir={export_dir}')
    ours = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'best.pt'))).eval()
    theirs = GPT2LMHeadModel.from_pretrained(export_dir).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        expected, _ = ours(idx, targets=idx)  # with targets: logits at every position
        got = theirs(idx).logits
    assert (got - expected[..., :got.size(-1)]).abs().max().item() <= 1e-5


# written by upstream nanoGPT's own train.py (karpathy/nanoGPT at commit 3adf61e) on a CPU, in its checkout, with
#   python data/shakespeare_char/prepare.py   (tiny Shakespeare)
#   python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=2 --log_interval=1
#     --block_size=16 --batch_size=4 --n_layer=1 --n_head=2 --n_embd=16 --max_iters=6 --lr_decay_iters=6
#     --dropout=0.0 --eval_interval=5 --out_dir=out-nanogpt-fixture --always_save_checkpoint=True
# and copied from out-nanogpt-fixture/ckpt.pt: the checkpoint of iter 5, which names its dataset
# 'shakespeare_char' and holds no vocabulary, and records nanoGPT's CPU settings (dtype float16, no compile)
NANOGPT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'nanogpt_ckpt.pt')
SCRIPTS = ('train.py', 'sample.py', 'model.py', 'checkpoint.py', 'configurator.py', 'hardware.py', 'metrics.py')


@pytest.mark.slow
def test_a_checkpoint_written_by_nanogpt_samples_and_resumes(tmp_path, shakespeare_path):
    # a checkout of this repository in which shakespeare_char is prepared, as in a nanoGPT user's
    checkout = tmp_path / 'checkout'
    checkout.mkdir()
    for name in SCRIPTS:
        shutil.copy(os.path.join(REPO_ROOT, name), checkout)
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'data', 'shakespeare_char', 'prepare.py'),
                    f'--input={shakespeare_path}', f'--out_dir={checkout / "data" / "shakespeare_char"}'],
                   check=True, capture_output=True, env=script_env())
    out_dir = checkout / 'out-shakespeare-char'
    out_dir.mkdir()
    shutil.copy(NANOGPT_CHECKPOINT, out_dir / 'ckpt.pt')

    def run_in_checkout(script, *args):
        proc = subprocess.run([sys.executable, str(checkout / script), *args], cwd=checkout, env=script_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    sample = run_in_checkout('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1',
                             '--max_new_tokens=30', '--start=KING:')
    text = sample.stdout.split('---------------')[0]
    with open(shakespeare_path, encoding='utf-8') as f:
        alphabet = set(f.read())
    assert text.startswith('KING:') and len(text) == len('KING:') + 30 + 1 and set(text) <= alphabet
    assert f"loaded {out_dir / 'ckpt.pt'} (iter 5, best val loss 4.1761)" in sample.stderr
    # resume on this CPU: the checkpoint's machine settings (float16 on a CPU) are replaced by this machine's
    proc = run_in_checkout('train.py', '--init_from=resume', f'--out_dir={out_dir}', '--max_iters=10')
    assert 'dtype float32' in proc.stdout
    assert sorted(iter_losses(proc.stdout)) == [5, 6, 7, 8, 9]


def test_hub_model_without_network_fails_with_one_line(tmp_path, small_text):
    from scripts import prepare_char_dataset
    dataset = prepare_char_dataset(tmp_path, small_text)
    env = script_env(HF_HUB_OFFLINE=1, HF_HOME=tmp_path / 'hf-home')
    settings = dict(TINY, init_from='gpt2', dataset=dataset, out_dir=tmp_path / 'out')
    proc = run_script('train.py', *args_of(settings), env=env, check=False)
    message = assert_one_line_error(proc)
    assert 'could not download' in message and 'init_from=' in message
