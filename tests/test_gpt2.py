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
    data_dir.mkdir(parents=True)
    shutil.copy(os.path.join(REPO_ROOT, 'data', 'shakespeare', 'prepare.py'), data_dir)
    shutil.copy(os.path.join(REPO_ROOT, 'data', 'prepare_utils.py'), tmp_path / 'data')
    (tmp_path / 'text.txt').write_text(small_text, encoding='utf-8')
    subprocess.run([sys.executable, str(data_dir / 'prepare.py'), f'--input={tmp_path / "text.txt"}'],
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


def write_nanogpt_checkpoint(path, dataset, iter_num=7):
    """A ckpt.pt laid out exactly as nanoGPT's train.py writes it after torch.compile on a GPU."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=None, dropout=0.0)
    from checkpoint import load_meta
    model_args['vocab_size'] = load_meta(dataset)['vocab_size']
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    config = dict(TINY, dataset=dataset, out_dir='out-shakespeare-char', backend='nccl', device='cuda',
                  dtype='bfloat16', compile=True, init_from='scratch')
    torch.save({'model': {'_orig_mod.' + k: v for k, v in model.state_dict().items()},
                'optimizer': optimizer.state_dict(), 'model_args': model_args, 'iter_num': iter_num,
                'best_val_loss': torch.tensor(2.5), 'config': config}, path)


@pytest.mark.slow
def test_nanogpt_checkpoint_samples_and_resumes(tmp_path, small_text):
    from scripts import prepare_char_dataset
    dataset = prepare_char_dataset(tmp_path, small_text)
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    write_nanogpt_checkpoint(out_dir / 'ckpt.pt', dataset)
    sample = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1',
                        '--max_new_tokens=30', '--start=KING:')
    text = sample.stdout.split('---------------')[0]
    assert text.startswith('KING:') and len(text) >= len('KING:') + 30 and set(text) <= set(small_text) | {'\n'}
    # resume on a CPU: the checkpoint's machine settings (cuda, bfloat16, nccl, compile) are this machine's
    proc = run_script('train.py', '--init_from=resume', f'--out_dir={out_dir}', '--max_iters=10')
    assert sorted(iter_losses(proc.stdout)) == [7, 8, 9]


def test_hub_model_without_network_fails_with_one_line(tmp_path, small_text):
    from scripts import prepare_char_dataset
    dataset = prepare_char_dataset(tmp_path, small_text)
    env = script_env(HF_HUB_OFFLINE=1, HF_HOME=tmp_path / 'hf-home')
    settings = dict(TINY, init_from='gpt2', dataset=dataset, out_dir=tmp_path / 'out')
    proc = run_script('train.py', *args_of(settings), env=env, check=False)
    message = assert_one_line_error(proc)
    assert 'could not download' in message and 'init_from=' in message
