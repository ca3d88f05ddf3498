"""GPT-2 in and out, end to end: finetune from local GPT-2 weights on BPE data, sample, export back to
Hugging Face, and read checkpoints written by nanoGPT itself."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from scripts import REPO_ROOT, TINY, args_of, assert_one_line_error, iter_losses, run_script, script_env, tiktoken_cache_dir


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, small_text):
    """config/finetune_shakespeare_cpu.py's run (block_size 128) from a small random GPT-2 with the real
    50257-token vocabulary and a 128-token context, on small_text prepared by data/shakespeare/prepare.py:
    the finetune's out_dir."""
    from transformers import GPT2Config, GPT2LMHeadModel
    if tiktoken_cache_dir() is None:
        pytest.skip("tiktoken's GPT-2 BPE files not found: set NANOGPT_DATA_DIR to the folder holding tiktoken/")
    os.environ['TIKTOKEN_CACHE_DIR'] = tiktoken_cache_dir()  # for every script these tests run
    root = tmp_path_factory.mktemp('finetune')
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0)).save_pretrained(root / 'tiny-gpt2')
    (root / 'text.txt').write_text(small_text, encoding='utf-8')
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'data', 'shakespeare', 'prepare.py'),
                    f'--input={root / "text.txt"}', f'--out_dir={root / "data"}'],
                   check=True, capture_output=True, env=script_env())
    out_dir = str(root / 'out-shakespeare-cpu')
    proc = run_script('train.py', 'config/finetune_shakespeare_cpu.py', f'--init_from={root / "tiny-gpt2"}',
                      f'--dataset={root / "data"}', f'--out_dir={out_dir}', '--max_iters=4', '--eval_interval=2',
                      '--learning_rate=1e-3', '--device=cpu')
    assert 'Initializing from GPT-2 weights' in proc.stdout
    assert sorted(iter_losses(proc.stdout)) == list(range(4))
    return out_dir


@pytest.mark.slow
def test_cpu_finetune_from_local_gpt2_then_sample_decodes_with_tiktoken(finetuned):
    import tiktoken
    from checkpoint import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint(os.path.join(finetuned, 'ckpt.pt'))
    assert ckpt['model_args']['vocab_size'] == 50257 and ckpt['model_args']['block_size'] == 128
    assert ckpt['model_args']['gelu_approximate'] == 'tanh'  # GPT-2's GELU survives into the checkpoint

    prompt = 'KING:\nThe crown'
    sample = run_script('sample.py', f'--out_dir={finetuned}', '--device=cpu', '--num_samples=1',
                        '--max_new_tokens=20', '--temperature=0', f'--start={prompt}')
    # oracle: greedy decoding of the same checkpoint in this process, decoded with tiktoken's GPT-2 BPE
    enc = tiktoken.get_encoding('gpt2')
    model = model_from_checkpoint(load_checkpoint(os.path.join(finetuned, 'best.pt'))).eval()
    x = torch.tensor([enc.encode(prompt)])
    y = model.generate(x, 20, temperature=0, stop_token=enc.eot_token)[0, x.size(1):].tolist()
    if enc.eot_token in y:
        y = y[:y.index(enc.eot_token)]
    assert sample.stdout.split('---------------')[0] == prompt + enc.decode(y) + '\n'


@pytest.mark.slow
def test_fsdp_from_gpt2_weights_hands_every_process_its_shards_of_them(finetuned, tmp_path):
    """Under FSDP rank 0 alone loads GPT-2's weights (a local save_pretrained directory here) and hands out the
    shards; the other processes build the model on the meta device, cropped to block_size alike. One step at
    learning rate 0 leaves the weights as loaded: those of GPT.from_pretrained in one process, cropped."""
    from checkpoint import load_checkpoint
    from model import GPT
    from test_ddp import two_processes
    root = os.path.dirname(finetuned)
    out_dir = str(tmp_path / 'out')
    two_processes(dataset=os.path.join(root, 'data'), out_dir=out_dir, init_from=os.path.join(root, 'tiny-gpt2'),
                  max_iters=1, learning_rate=0.0, min_lr=0.0, fsdp=True, block_size=64)
    saved = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model']
    expected = GPT.from_pretrained(os.path.join(root, 'tiny-gpt2'))
    expected.crop_block_size(64)  # from the 128 positions it was saved with
    expected = expected.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def readme_line(start):
    with open(os.path.join(REPO_ROOT, 'README.md'), encoding='utf-8') as f:
        [line] = [line.strip() for line in f if line.startswith(start)]
    return line


@pytest.mark.slow
def test_the_readmes_export_and_pipeline_lines_work_offline_for_the_cpu_finetune(finetuned, tmp_path):
    # the README's two lines, exactly, run where out-shakespeare-cpu is, with no network
    shutil.copytree(finetuned, tmp_path / 'out-shakespeare-cpu')
    env = script_env(HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, HF_HOME=tmp_path / 'hf-home')
    export = readme_line('python export_hf.py --out_dir=out-shakespeare-cpu')
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'export_hf.py'), *export.split()[2:]], cwd=tmp_path,
                   env=env, check=True, capture_output=True)
    assert (tmp_path / 'gpt2-shakespeare' / 'tokenizer.json').exists()
    pipeline_line = readme_line('python -c "from transformers import pipeline')
    proc = subprocess.run(pipeline_line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith('To be') and len(proc.stdout) > len('To be') + 20
    assert 'IndexError' not in proc.stderr and 'max_new_tokens' not in proc.stderr, proc.stderr  # no warning
    # with no length given, generation stops at the export's context of 128 tokens, not in an IndexError
    default = subprocess.run([sys.executable, '-c', "from transformers import pipeline; p = pipeline('text-generation', "
                              "model='gpt2-shakespeare'); print(len(p('To be', return_tensors=True)[0]"
                              "['generated_token_ids']))"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert default.returncode == 0, default.stderr[-3000:]
    assert int(default.stdout.split()[-1]) <= 128


# written by upstream nanoGPT's own train.py (karpathy/nanoGPT at commit 3adf61e) on a CPU, in its checkout, with
#   python data/shakespeare_char/prepare.py   (tiny Shakespeare)
#   python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=2 --log_interval=1
#     --block_size=16 --batch_size=4 --n_layer=1 --n_head=2 --n_embd=16 --max_iters=6 --lr_decay_iters=6
#     --dropout=0.0 --eval_interval=5 --out_dir=out-nanogpt-fixture --always_save_checkpoint=True
# and copied from out-nanogpt-fixture/ckpt.pt: the checkpoint of iter 5, which names its dataset
# 'shakespeare_char' and holds no vocabulary, and records nanoGPT's CPU settings (dtype float16, no compile)
NANOGPT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'nanogpt_ckpt.pt')
SCRIPTS = ('train.py', 'sample.py', 'eval.py', 'model.py', 'checkpoint.py', 'dataset.py', 'configurator.py',
           'hardware.py', 'metrics.py', 'lora.py', 'sharding.py', os.path.join('data', 'prepare_utils.py'))


@pytest.mark.slow
def test_a_checkpoint_written_by_nanogpt_samples_and_resumes(tmp_path, shakespeare_path):
    # a checkout of this repository in which shakespeare_char is prepared, as in a nanoGPT user's
    checkout = tmp_path / 'checkout'
    checkout.mkdir()
    for name in SCRIPTS:
        os.makedirs(os.path.dirname(checkout / name), exist_ok=True)
        shutil.copy(os.path.join(REPO_ROOT, name), checkout / name)
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
