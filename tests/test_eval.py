"""
Tests of eval.py against an independent oracle: transformers' GPT2LMHeadModel, run here on the same weights,
scores every text token, HellaSwag ending and LAMBADA target one sequence at a time; and per-token losses
computed here by hand for a prepared dataset's whole split. The benchmark files are small local files in
HellaSwag's and LAMBADA's formats, written here.
"""

import json
import math
import os
import random
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import checkpoint
import eval as evaluate
from configurator import UserError
from dataset import Tokenizer, load_meta, load_tokens
from model import GPT, GPTConfig
from scripts import assert_one_line_error, prepare_char_dataset, run_script, script_env

pytestmark = pytest.mark.usefixtures('one_thread')
WORDS = ('the', 'king', 'queen', 'sword', 'crown', 'night', 'day', 'speak', 'love', 'death', 'fair', 'noble', 'of',
         'and', 'to', 'a', 'my', 'lord', 'is', 'was')


@pytest.fixture(scope='module')
def gpt2_dir(tmp_path_factory):
    """A small random GPT-2 with the real 50257-token vocabulary and a 24-token context, as save_pretrained writes it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('gpt2') / 'tiny-gpt2'
    GPT2LMHeadModel(GPT2Config(n_positions=24, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0, initializer_range=0.2)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope='module')
def oracle(gpt2_dir):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


def sentence(rng, n):
    return ' '.join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope='module')
def benchmark_files(tmp_path_factory):
    """Small HellaSwag (.jsonl, labels as the hub's strings) and LAMBADA (.json) files; some contexts are longer
    than the model's 24 tokens, so they must be cropped on the left."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp('benchmarks')
    hellaswag = [{'ctx': sentence(rng, rng.randint(3, 30)), 'endings': [sentence(rng, rng.randint(1, 6)) for _ in range(4)],
                  'label': str(rng.randrange(4)), 'activity_label': 'x'} for _ in range(12)]
    with open(root / 'hellaswag.jsonl', 'w') as f:
        f.writelines(json.dumps(item) + '\n' for item in hellaswag)
    lambada = [{'text': sentence(rng, rng.randint(4, 30)) + ' ' + rng.choice(('swordsman', 'kingdom', 'lord'))}
               for _ in range(10)]
    with open(root / 'lambada.json', 'w') as f:
        json.dump(lambada, f)
    return {'hellaswag': str(root / 'hellaswag.jsonl'), 'lambada': str(root / 'lambada.json'),
            'hellaswag_items': hellaswag, 'lambada_items': lambada}


def oracle_token_losses(oracle, tokens):
    """transformers' losses of tokens[1:] given the tokens before each, for one sequence."""
    with torch.no_grad():
        logits = oracle(torch.tensor([tokens[:-1]])).logits[0]
    return F.cross_entropy(logits, torch.tensor(tokens[1:]), reduction='none').numpy()


def gpt2_encoding():
    import tiktoken
    return tiktoken.get_encoding('gpt2')


# ----------------------------------------------------------------------------- text

@pytest.mark.parametrize('stride', [0, 7], ids=['windows side by side', 'overlapping windows'])
def test_text_loss_equals_transformers_scoring_every_token_once(tmp_path, gpt2_dir, oracle, tiktoken_cache, stride):
    text = sentence(random.Random(1), 60) + '\n' + sentence(random.Random(2), 25)
    (tmp_path / 'text.txt').write_text(text, encoding='utf-8')
    result = run_script('eval.py', f'--init_from={gpt2_dir}', f'--text={tmp_path / "text.txt"}', f'--stride={stride}',
                        '--device=cpu', f'--out={tmp_path / "results.json"}', env=script_env(HF_HUB_OFFLINE=1))
    results = json.loads((tmp_path / 'results.json').read_text())
    assert list(results) == ['text'] and '| text | loss |' in result.stdout

    # oracle: token t is scored by the first window reaching it, the one starting at s = the first multiple of
    # the stride with s + 24 >= t, given the tokens s..t-1
    tokens = gpt2_encoding().encode(text)
    block, step = 24, stride or 24
    losses = []
    for t in range(1, len(tokens)):
        s = max(0, math.ceil((t - block) / step) * step)
        losses.append(oracle_token_losses(oracle, tokens[s:t + 1])[-1])
    expected = float(np.mean(losses))
    assert results['text']['tokens'] == len(tokens) - 1
    assert results['text']['loss'] == pytest.approx(expected, abs=1e-4)
    assert results['text']['ppl'] == pytest.approx(math.exp(expected), rel=1e-4)
    scored_bytes = len(text.encode('utf-8')) - len(gpt2_encoding().decode_single_token_bytes(tokens[0]))
    assert results['text']['bits_per_byte'] == pytest.approx(sum(losses) / math.log(2) / scored_bytes, rel=1e-4)


def losses_by_hand(model, ids, block_size):
    """Every token's loss given its window so far, the ids cut into block_size windows side by side."""
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block_size):
            window = torch.tensor(ids[start:start + block_size + 1])
            logits, _ = model(window[None, :-1], targets=window[None, 1:])
            losses += F.cross_entropy(logits[0], window[1:], reduction='none').tolist()
    return losses


@pytest.fixture(scope='module')
def char_run(tmp_path_factory, small_text):
    """A prepared char dataset and a random char model saved as train.py saves a checkpoint."""
    root = tmp_path_factory.mktemp('char')
    dataset = prepare_char_dataset(str(root), small_text)
    meta = load_meta(dataset)
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=meta['vocab_size'], bias=False))
    out_dir = root / 'out'
    checkpoint.save_checkpoint({'model': model.state_dict(), 'model_args': asdict(model.config), 'iter_num': 0,
                                'best_val_loss': 9.9, 'config': {'dataset': dataset}, 'meta': meta},
                               str(out_dir / 'ckpt.pt'))
    return dataset, str(out_dir), model.eval(), meta


def test_whole_split_loss_is_the_mean_of_every_tokens_loss(tmp_path, char_run):
    dataset, out_dir, model, meta = char_run
    # a stride of block_size, the most it may be, is windows side by side as with no stride
    result = run_script('eval.py', f'--out_dir={out_dir}', f'--dataset={dataset}', '--stride=48', '--device=cpu',
                        f'--out={tmp_path / "r.json"}')
    results = json.loads((tmp_path / 'r.json').read_text())['text']
    val = np.fromfile(os.path.join(dataset, 'val.bin'), dtype=np.uint16).tolist()
    losses = losses_by_hand(model, val, 48)
    assert len(losses) == len(val) - 1 == results['tokens']
    assert results['loss'] == pytest.approx(np.mean(losses), abs=1e-5)
    assert results['bits_per_char'] == pytest.approx(np.mean(losses) / math.log(2), abs=1e-5)
    assert f"evaluating {os.path.join(out_dir, 'ckpt.pt')}" in result.stderr


def test_a_char_model_reads_a_text_file_with_its_own_characters(tmp_path, char_run, small_text):
    _, out_dir, model, meta = char_run
    (tmp_path / 'known.txt').write_text(small_text[:500], encoding='utf-8')
    result = run_script('eval.py', f'--out_dir={out_dir}', f'--text={tmp_path / "known.txt"}', '--device=cpu')
    ids = [meta['stoi'][c] for c in small_text[:500]]
    expected = np.mean(losses_by_hand(model, ids, 48))
    assert f"| text | loss | {expected:.4f} |" in result.stdout
    assert f"| text | bits_per_char | {expected / math.log(2):.4f} |" in result.stdout

    (tmp_path / 'unseen.txt').write_text(small_text[:100] + ' Ωmega 42', encoding='utf-8')
    error = assert_one_line_error(run_script('eval.py', f'--out_dir={out_dir}', f'--text={tmp_path / "unseen.txt"}',
                                             '--device=cpu', check=False))
    assert str(tmp_path / 'unseen.txt') in error and 'never seen' in error and 'Ω' in error


# ----------------------------------------------------------------------------- benchmarks

def test_hellaswag_scores_every_ending_as_transformers_does(gpt2_dir, oracle, benchmark_files, tiktoken_cache):
    model, meta, _ = checkpoint.load_model(gpt2_dir, out_dir='')
    tokenizer = Tokenizer(meta)
    items = evaluate.load_items(benchmark_files['hellaswag'], 'validation', ('ctx', 'endings', 'label'), 'hellaswag')
    scores = evaluate.hellaswag_scores(model, tokenizer, items, progress=False)
    enc = gpt2_encoding()
    correct = correct_norm = 0
    for item, (sums, means, label) in zip(benchmark_files['hellaswag_items'], scores):
        expected_sums, expected_means = [], []
        for ending in item['endings']:
            ending_tokens = enc.encode(' ' + ending)
            sequence = (enc.encode(item['ctx']) + ending_tokens)[-25:]  # the context cropped to 24 + 1 tokens
            losses = oracle_token_losses(oracle, sequence)[-len(ending_tokens):]
            expected_sums.append(losses.sum())
            expected_means.append(losses.mean())
        assert sums == pytest.approx(expected_sums, abs=1e-4) and means == pytest.approx(expected_means, abs=1e-4)
        assert label == int(item['label'])
        correct += int(np.argmin(expected_sums) == label)
        correct_norm += int(np.argmin(expected_means) == label)
    n = len(scores)
    assert evaluate.hellaswag_accuracy(scores) == {'acc': correct / n, 'acc_norm': correct_norm / n, 'n': n}


def test_lambada_predictions_and_perplexity_equal_transformers_greedy_decoding(gpt2_dir, oracle, benchmark_files,
                                                                              tiktoken_cache):
    model, meta, _ = checkpoint.load_model(gpt2_dir, out_dir='')
    items = evaluate.load_items(benchmark_files['lambada'], 'test', ('text',), 'lambada')
    scores = evaluate.lambada_scores(model, Tokenizer(meta), items, batch_size=3, progress=False)
    enc = gpt2_encoding()
    losses = []
    for item, (loss, hit) in zip(benchmark_files['lambada_items'], scores):
        context, word = item['text'].rsplit(' ', 1)
        target = enc.encode(' ' + word)
        prompt = (enc.encode(context) + target)[-25:][:-len(target)]
        with torch.no_grad():  # greedy continuation of the passage, as long as the target
            generated = oracle.generate(torch.tensor([prompt]), max_new_tokens=len(target), do_sample=False,
                                        pad_token_id=0)[0, len(prompt):].tolist()
        assert hit == (generated == target), item
        expected = oracle_token_losses(oracle, prompt + target)[-len(target):].sum()
        assert loss == pytest.approx(expected, abs=1e-4)
        losses.append(expected)
    metrics = evaluate.lambada_metrics(scores)
    assert metrics['ppl'] == pytest.approx(math.exp(np.mean(losses)), rel=1e-4) and metrics['n'] == len(items)


def test_eval_script_on_a_checkpoint_of_ours_reports_all_tasks_in_json(tmp_path, gpt2_dir, oracle, benchmark_files,
                                                                      tiktoken_cache):
    # a checkpoint of this repository's (GPT-2 weights loaded into our GPT and saved as train.py saves them)
    model = GPT.from_pretrained(gpt2_dir)
    out_dir = tmp_path / 'out'
    checkpoint.save_checkpoint({'model': model.state_dict(), 'model_args': asdict(model.config), 'iter_num': 3,
                                'best_val_loss': 5.0, 'config': {'dataset': 'openwebtext'}}, str(out_dir / 'ckpt.pt'))
    (tmp_path / 'text.txt').write_text(sentence(random.Random(4), 40), encoding='utf-8')
    result = run_script('eval.py', f'--out_dir={out_dir}', '--tasks=text,hellaswag,lambada', '--limit=5',
                        f'--text={tmp_path / "text.txt"}', f'--hellaswag={benchmark_files["hellaswag"]}',
                        f'--lambada={benchmark_files["lambada"]}', '--device=cpu', f'--out={tmp_path / "r.json"}',
                        env=script_env(HF_HUB_OFFLINE=1))
    results = json.loads((tmp_path / 'r.json').read_text())
    assert set(results) == {'text', 'hellaswag', 'lambada'}
    assert set(results['text']) == {'loss', 'ppl', 'tokens', 'bits_per_byte'}
    assert set(results['hellaswag']) == {'acc', 'acc_norm', 'n'} and results['hellaswag']['n'] == 5
    assert set(results['lambada']) == {'acc', 'ppl', 'n'} and results['lambada']['n'] == 5
    # the oracle on the first 5 items: summed target losses over the passages, exp of their mean
    enc = gpt2_encoding()
    losses = []
    for item in benchmark_files['lambada_items'][:5]:
        context, word = item['text'].rsplit(' ', 1)
        target = enc.encode(' ' + word)
        losses.append(oracle_token_losses(oracle, (enc.encode(context) + target)[-25:])[-len(target):].sum())
    assert results['lambada']['ppl'] == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)
    for task in ('text', 'hellaswag', 'lambada'):
        assert f'| {task} |' in result.stdout


# ----------------------------------------------------------------------------- hub sources (the hub is not
# reachable here: what eval passes to datasets.load_dataset is checked, and the hub's layouts are loaded locally)

HELLASWAG_ITEM = {'ctx': 'the king', 'endings': ['is dead', 'was here'], 'label': '1'}


@pytest.fixture
def hub_calls(monkeypatch):
    """The arguments of every datasets.load_dataset call, which answers with one item of the benchmark."""
    import datasets
    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append(dict(path=path, **{k: kwargs.get(k) for k in ('name', 'revision', 'split')}))
        item = HELLASWAG_ITEM if 'hellaswag' in path else {'text': 'the king is dead'}
        return datasets.Dataset.from_list([item])
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    return calls


@pytest.mark.parametrize('source, split, fields, setting, call', [
    (evaluate.hellaswag, 'validation', ('ctx', 'endings', 'label'), 'hellaswag',
     dict(path='Rowan/hellaswag', name=None, revision='refs/pr/7', split='validation')),
    (evaluate.lambada, 'test', ('text',), 'lambada',
     dict(path='EleutherAI/lambada_openai', name='default', revision=None, split='test')),
    ('Rowan/hellaswag@refs/convert/parquet', 'validation', ('ctx', 'endings', 'label'), 'hellaswag',
     dict(path='Rowan/hellaswag', name=None, revision='refs/convert/parquet', split='validation')),
], ids=['hellaswag default', 'lambada default', 'name@revision'])
def test_benchmarks_are_read_from_the_hub_source_named(hub_calls, source, split, fields, setting, call):
    # the same load_items serves train.py --hellaswag
    assert evaluate.load_items(source, split, fields, setting) and hub_calls == [call]


def test_a_benchmark_with_a_loading_script_is_one_line_naming_the_revision_to_pass(monkeypatch):
    import datasets

    def load_dataset(path, *args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found hellaswag.py")
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    with pytest.raises(UserError, match=r"--hellaswag=Rowan/hellaswag@main: this hub dataset has a loading script, which "
                                        r"datasets>=4 no longer runs: .* e\.g\. --hellaswag=Rowan/hellaswag@refs/pr/7"):
        evaluate.load_items('Rowan/hellaswag@main', 'validation', ('ctx', 'endings', 'label'), 'hellaswag')


@pytest.mark.parametrize('text, source', [
    ('Rowan/hellaswag', ('Rowan/hellaswag', None)),
    ('Skylion007/openwebtext@refs/pr/18', ('Skylion007/openwebtext', 'refs/pr/18')),
    ('EleutherAI/lambada_openai@0123abc', ('EleutherAI/lambada_openai', '0123abc')),
])
def test_a_hub_source_is_name_at_revision(text, source):
    from data.prepare_utils import hub_source
    assert hub_source(text) == source


def test_hellaswag_laid_out_as_its_parquet_revision_loads(tmp_path):
    # Rowan/hellaswag@refs/pr/7: a dataset card naming the splits' files, one parquet file a split
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data.prepare_utils import load_hub
    items = [dict(HELLASWAG_ITEM, ctx=f'the king {i}') for i in range(5)]
    (tmp_path / 'hellaswag' / 'data').mkdir(parents=True)
    (tmp_path / 'hellaswag' / 'README.md').write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: validation\n    path: data/validation-*\n---\n")
    for split in ('train', 'validation'):
        pq.write_table(pa.Table.from_pylist(items), tmp_path / 'hellaswag' / 'data' / f'{split}-00000-of-00001.parquet')
    rows = load_hub(str(tmp_path / 'hellaswag'), 'hellaswag', split='validation', cache_dir=str(tmp_path / 'cache'))
    assert [dict(row) for row in rows] == items
    local = evaluate.load_items(str(tmp_path / 'hellaswag' / 'data' / 'validation-00000-of-00001.parquet'),
                                'validation', ('ctx', 'endings', 'label'), 'hellaswag')
    assert local == items


# ----------------------------------------------------------------------------- mistakes

def test_a_benchmark_that_cannot_be_loaded_offline_says_how_to_use_a_local_copy(tmp_path, char_run):
    _, out_dir, _, _ = char_run
    env = script_env(HF_HUB_OFFLINE=1, HF_HOME=tmp_path / 'hf-home', HF_DATASETS_CACHE=tmp_path / 'cache')
    error = assert_one_line_error(run_script('eval.py', f'--out_dir={out_dir}', '--tasks=lambada', '--device=cpu',
                                             env=env, check=False))
    assert "could not load lambada dataset 'EleutherAI/lambada_openai'" in error and '--lambada=PATH' in error


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
    """Mistakes on disk: a benchmark file of the wrong type, without its field, or with a bad item; a dataset
    prepared with GPT-2's BPE, whose ids lie far beyond a char model's vocabulary."""
    root = tmp_path_factory.mktemp('bad')
    (root / 'notes.txt').write_text('x')
    (root / 'nofield.jsonl').write_text(json.dumps({'passage': 'the king is dead'}) + '\n')
    (root / 'label.jsonl').write_text(json.dumps({'ctx': 'the king', 'endings': ['is', 'was'], 'label': 'abc'}) + '\n')
    (root / 'bpe').mkdir()
    np.array([464, 5822, 318, 50256] * 20, dtype=np.uint16).tofile(root / 'bpe' / 'val.bin')
    return root


@pytest.mark.parametrize('args, message, loads_model', [
    (['--tasks=mmlu'], 'unknown task mmlu', False),
    (['--tasks=text'], 'either --text=PATH', False),
    (['--tasks=hellaswag', '--hellaswag={bad}/notes.txt'], 'expected a .json, .jsonl or .parquet file', False),
    (['--dataset=no_such_dataset'], 'no val.bin in', False),
    (['--dataset={bad}/bpe'], "prepared with another tokenizer than the model's (its val.bin holds token id 50256",
     True),
    (['--dataset={dataset}', '--stride=49'], "--stride=49 is more than the model's block_size (48)", True),
    (['--tasks=text,lambada', '--dataset={dataset}', '--split=train', '--lambada={bad}/nofield.jsonl'],
     'nofield.jsonl has no text field', False),
    (['--tasks=hellaswag', '--hellaswag={bad}/label.jsonl'], "item 1 is not a hellaswag item: label must be", False),
], ids=['unknown task', 'no text', 'not a benchmark file', 'dataset not prepared', 'dataset of another tokenizer',
        'stride over block_size', 'benchmark checked before text scored', 'bad benchmark item'])
def test_eval_mistakes_are_one_line(char_run, bad_inputs, args, message, loads_model):
    dataset, out_dir, _, _ = char_run
    result = run_script('eval.py', f'--out_dir={out_dir}', '--device=cpu',
                        *[a.format(bad=bad_inputs, dataset=dataset) for a in args], check=False)
    assert message in assert_one_line_error(result)
    assert ('evaluating' in result.stderr) == loads_model  # what needs no model is checked before loading it


HELLASWAG_ITEM = {'ctx': 'the king', 'endings': ['is here', 'was there'], 'label': '1'}


@pytest.mark.parametrize('setting, rows, number, problem', [
    ('hellaswag', [{'label': 'abc'}], 1, "label must be the index of the right ending, 0 to 1, not 'abc'"),
    ('hellaswag', [{}, {'label': '7'}], 2, "label must be the index of the right ending, 0 to 1, not '7'"),
    ('hellaswag', [{'label': -1}], 1, "label must be the index of the right ending, 0 to 1, not -1"),
    ('hellaswag', [{'endings': []}], 1, "endings must be a list of 2 or more non-empty strings, not []"),
    ('hellaswag', [{'endings': 'hello'}], 1, "endings must be a list of 2 or more non-empty strings, not 'hello'"),
    ('hellaswag', [{'endings': ['alone']}], 1, "endings must be a list of 2 or more non-empty strings, not "
                                               "['alone']"),
    ('hellaswag', [{'endings': ['is', '']}], 1, "endings must be a list of 2 or more non-empty strings, not "
                                                "['is', '']"),
    ('hellaswag', [{'ctx': None}], 1, "ctx must be a non-empty string, not None"),
    ('lambada', [{'text': ''}], 1, "text must be a passage, words then a space and the last word to predict, not ''"),
    ('lambada', [{}, {'text': 'hello  '}], 2, "text must be a passage, words then a space and the last word to "
                                              "predict, not 'hello  '"),
], ids=['label not a number', 'label too high', 'label negative', 'no endings', 'endings a string', 'one ending',
        'empty ending', 'ctx null', 'empty passage', 'one word'])
def test_a_bad_benchmark_item_is_named_by_its_number_and_field(tmp_path, setting, rows, number, problem):
    good, fields = {'hellaswag': (HELLASWAG_ITEM, ('ctx', 'endings', 'label')),
                    'lambada': ({'text': 'the king is dead'}, ('text',))}[setting]
    path = tmp_path / 'items.jsonl'
    path.write_text(''.join(json.dumps({**good, **row}) + '\n' for row in rows))
    expected = f'--{setting}={path}: item {number} is not a {setting} item: {problem}'
    with pytest.raises(UserError, match=re.escape(expected)):
        evaluate.load_items(str(path), 'validation', fields, setting)


def test_lambada_passage_with_trailing_whitespace_has_its_last_word_as_the_target(tmp_path, char_run):
    _, _, _, meta = char_run
    (tmp_path / 'lambada.jsonl').write_text(json.dumps({'text': 'the king is dead \n'}) + '\n')
    [item] = evaluate.load_items(str(tmp_path / 'lambada.jsonl'), 'test', ('text',), 'lambada')
    tokenizer = Tokenizer(meta)
    stripped = {'text': 'the king is dead'}
    assert evaluate.lambada_item(tokenizer, item, 48) == evaluate.lambada_item(tokenizer, stripped, 48)


@pytest.mark.parametrize('name, content, problem', [
    ('empty.json', '', 'is empty'),
    ('broken.jsonl', '{"text": "the king"\n', 'is not a valid .jsonl file'),
    ('folder', None, 'is a directory'),
])
def test_a_local_benchmark_file_that_cannot_be_read_is_named_without_blaming_the_network(tmp_path, name, content,
                                                                                          problem):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(UserError, match=re.escape(f'--lambada={path} {problem}')) as error:
        evaluate.load_items(str(path), 'test', ('text',), 'lambada')
    assert 'network' not in str(error.value)


def test_out_that_is_a_directory_is_named_so(tmp_path):
    with pytest.raises(UserError, match=re.escape(f'--out={tmp_path}: it is a directory')):
        evaluate.check_writable(str(tmp_path))


def test_a_gpt2_model_refuses_a_char_dataset(char_run):
    dataset, _, _, _ = char_run
    with pytest.raises(UserError, match=re.escape("the model reads GPT-2's BPE tokens but dataset")):
        evaluate.check_tokenizer(load_tokens(dataset, 'val'), dataset, 'val', 50257, None)


def test_a_benchmark_file_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(UserError, match=f'--lambada={tmp_path / "nope.jsonl"}: no such file'):
        evaluate.load_items(str(tmp_path / 'nope.jsonl'), 'test', ('text',), 'lambada')


def test_hellaswag_file_without_its_fields_is_refused(tmp_path):
    (tmp_path / 'rows.jsonl').write_text(json.dumps({'question': 'q', 'answer': 'a'}) + '\n')
    with pytest.raises(UserError, match='has no ctx, endings, label field'):
        evaluate.load_items(str(tmp_path / 'rows.jsonl'), 'validation', ('ctx', 'endings', 'label'), 'hellaswag')


# ----------------------------------------------------------------------------- during training

def test_hellaswag_during_training_is_logged_as_the_checkpoint_scores_it(tmp_path, char_run, small_text):
    from scripts import train
    dataset, _, _, _ = char_run
    lines = [line for line in small_text.splitlines() if len(line) > 10]
    items = [{'ctx': lines[5 * i], 'endings': lines[5 * i + 1:5 * i + 5], 'label': str(i % 4)} for i in range(8)]
    (tmp_path / 'hellaswag.jsonl').write_text(''.join(json.dumps(item) + '\n' for item in items))
    out_dir = str(tmp_path / 'out')
    proc = train(dataset, out_dir, max_iters=4, eval_interval=4, hellaswag=str(tmp_path / 'hellaswag.jsonl'),
                 hellaswag_items=6)
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        logged = [row for row in map(json.loads, f) if row['iter'] == 4 and 'val_loss' in row][0]
    # oracle: eval.py's scoring of the first 6 items with the checkpoint written at that evaluation
    model, meta, _ = checkpoint.load_model('resume', out_dir, 'ckpt.pt')
    expected = evaluate.hellaswag_accuracy(evaluate.hellaswag_scores(model, Tokenizer(meta), items[:6],
                                                                     progress=False))
    assert logged['hellaswag_acc_norm'] == pytest.approx(expected['acc_norm'])
    assert logged['hellaswag_acc'] == pytest.approx(expected['acc'])
    assert f"step 4: hellaswag acc_norm {expected['acc_norm']:.4f}, acc {expected['acc']:.4f} (6 items)" in proc.stdout


def test_hellaswag_with_characters_a_char_model_never_saw_fails_before_training(tmp_path, char_run):
    from scripts import train
    dataset, _, _, _ = char_run
    (tmp_path / 'hellaswag.jsonl').write_text(json.dumps({'ctx': 'Zebra #1', 'endings': ['a', 'b', 'c', 'd'],
                                                          'label': '0'}) + '\n')
    proc = train(dataset, str(tmp_path / 'out'), check=False, hellaswag=str(tmp_path / 'hellaswag.jsonl'))
    error = assert_one_line_error(proc)
    assert 'a HellaSwag context contains characters the model has never seen' in error
    assert 'iter 0' not in proc.stdout
