"""Translation and text tasks end to end: real corpora load, metrics are right, training logs BLEU /
bits per byte and decoded samples, `--mode decode` writes outputs, bad settings fail clearly."""

import importlib
import inspect
import json
import math
import os
import sys

import numpy as np
import pytest
import sacrebleu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the experiments package
from conftest import PEAK_FLOPS

from experiments import synthetic as synthetic_experiment  # noqa: E402
from experiments import text as text_experiment  # noqa: E402
from experiments import translation as translation_experiment  # noqa: E402
from transformer import loop, tasks  # noqa: E402
from transformer.config import ConfigError  # noqa: E402
from transformer.tasks import translation  # noqa: E402

_WORDS = 'the a cat dog sees runs big small red green house tree'.split()
_FRENCH = dict(zip(_WORDS, 'le un chat chien voit court grand petit rouge vert maison arbre'.split()))


def _pairs(count, seed):
  rng = np.random.default_rng(seed)
  sentences = [' '.join(rng.choice(_WORDS, rng.integers(2, 7))) for _ in range(count)]
  return [(s, ' '.join(_FRENCH[w] for w in s.split())) for s in sentences]


def _tiny(config, workdir):
  config.model.update(num_encoder_layers=1, num_decoder_layers=1, d_model=32, d_ff=64, num_heads=2)
  config.train.update(
    num_steps=12,
    batch_size=8,
    log_every=6,
    eval_every=6,
    checkpoint_every=6,
    warmup_steps=2,
    num_samples=2,
    decode_examples=3,
    peak_flops=PEAK_FLOPS,  # no matmul timed for MFU
  )
  os.environ['TRANSFORMER_CACHE'] = str(workdir / 'cache')  # tokenizers of the test's own corpora
  return config


@pytest.fixture
def translation_config(tmp_path):
  for name, seed, count in (('train', 0, 300), ('dev', 1, 8)):
    with open(tmp_path / f'{name}.tsv', 'w') as f:
      f.writelines(f'{s}\t{t}\n' for s, t in _pairs(count, seed))
  config = _tiny(translation_experiment.get_config('tiny'), tmp_path)
  config.data.update(
    corpus='files',
    train_files=str(tmp_path / 'train.tsv'),
    eval_files=str(tmp_path / 'dev.tsv'),
    vocab_size=40,
    seq_len=16,
    bleu_examples=8,
    decode_batch_size=8,
  )
  config.train.num_samples = 8  # every dev pair: the logged samples are the translations BLEU scores
  return config


def test_bleu_and_chrf_are_sacrebleus():
  hyps = ['le chat voit le chien', 'un arbre vert', 'maison']
  refs = ['le chat voit un chien', 'un arbre vert', 'la maison rouge']
  assert translation.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert translation.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
  assert translation.bleu(refs, refs) == pytest.approx(100.0)


def test_translation_metrics_are_sacrebleus_on_its_translations(translation_config, monkeypatch):
  """eval_metrics scores the task's translations of the BLEU pairs against their references, exactly as
  sacrebleu does: outputs half right and half missing a word, so BLEU is far from both 0 and 100 and a
  wrong formula, smoothing or pairing changes it."""
  task = tasks.get_task(translation_config)
  pairs = _pairs(8, 1)
  references = [t for _, t in pairs]
  outputs = [t if i % 2 else ' '.join(t.split()[1:]) for i, t in enumerate(references)]
  translations = dict(zip([s for s, _ in pairs], outputs))
  monkeypatch.setattr(task, 'translate', lambda predictor, sources: [translations[s] for s in sources])
  scores = task.eval_metrics(None, {})
  bleu = sacrebleu.corpus_bleu(outputs, [references]).score
  assert scores == {'eval/bleu': bleu, 'eval/chrf': sacrebleu.corpus_chrf(outputs, [references]).score}
  assert round(bleu, 1) == 84.6  # the figure this fixed set gives: neither 0 nor 100


def test_translation_trains_logs_bleu_samples_and_decodes(translation_config, tmp_path):
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(translation_config, str(workdir))
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  evals = [r for r in records if 'eval/bleu' in r]
  assert [r['step'] for r in evals] == [6, 12]
  assert evals[-1]['eval/loss'] < evals[0]['eval/loss']
  samples = [json.loads(line) for line in open(workdir / 'samples.jsonl')]
  assert len(samples) == 16 and set(samples[0]) == {'step', 'source', 'reference', 'output'}
  assert [(s['source'], s['reference']) for s in samples] == 2 * _pairs(8, 1)
  for r in evals:  # BLEU and chrF are sacrebleu's on this step's beam-search outputs, exactly
    outputs = [s['output'] for s in samples if s['step'] == r['step']]
    references = [t for _, t in _pairs(8, 1)]
    assert r['eval/bleu'] == sacrebleu.corpus_bleu(outputs, [references]).score
    assert r['eval/chrf'] == sacrebleu.corpus_chrf(outputs, [references]).score

  decoded = loop.decode_checkpoint(translation_config, str(workdir))
  written = [json.loads(line) for line in open(workdir / 'decode' / 'step_12.jsonl')]
  assert written == decoded and len(written) == 3
  assert written[0]['output'] == samples[-8]['output']  # the same beam search on the same checkpoint


def test_text_task_bits_per_byte_and_samples(tmp_path):
  docs = [' '.join(np.random.default_rng(i).choice(_WORDS, 40)) for i in range(60)]
  (tmp_path / 'train.txt').write_text('\n'.join(docs[:50]) + '\n')
  (tmp_path / 'dev.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs[50:]))
  config = _tiny(text_experiment.get_config('tiny'), tmp_path)
  config.data.update(
    corpus='files',
    train_files=str(tmp_path / 'train.txt'),
    eval_files=str(tmp_path / 'dev.jsonl'),
    vocab_size=40,
    seq_len=32,
    sample_len=8,
  )
  task = tasks.get_task(config)
  assert task.eval_bytes == sum(len(d.encode()) for d in docs[50:])
  losses = {'eval/loss': 1.5, 'eval/tokens': 1000.0}
  assert task.eval_metrics(None, losses)['eval/bits_per_byte'] == pytest.approx(1500 / math.log(2) / task.eval_bytes)
  # A document longer than seq_len is cut into windows: every token (and its EOS) is kept.
  ids = task.tokenizer.encode(docs[0])
  windows = task.examples_of(task.train_examples[0])  # the store's first document is docs[0]
  assert len(windows) == math.ceil((len(ids) + 1) / 32) and sum(len(ex['targets']) for ex in windows) == len(ids) + 1

  workdir = tmp_path / 'run'
  loop.train_and_evaluate(config, str(workdir))
  last = [json.loads(line) for line in open(workdir / 'metrics.jsonl')][-1]
  # Every eval token (each document's tokens and its EOS) is scored once; bits per byte is the total
  # loss in bits over the documents' UTF-8 bytes, both counted here from the documents themselves.
  assert last['eval/tokens'] == sum(len(task.tokenizer.encode(d)) + 1 for d in docs[50:])
  eval_bytes = sum(len(d.encode('utf-8')) for d in docs[50:])
  assert last['eval/bits_per_byte'] == pytest.approx(
    last['eval/loss'] * last['eval/tokens'] / math.log(2) / eval_bytes, rel=1e-12
  )
  assert last['eval/perplexity'] == pytest.approx(math.exp(last['eval/loss']), rel=1e-12)
  samples = [json.loads(line) for line in open(workdir / 'samples.jsonl')]
  assert samples[0]['prompt'] == ' '.join(docs[50].split()[:8]) and samples[0]['output']


def test_the_bible_corpora_load_through_the_tasks(tmp_path):
  config = translation_experiment.get_config('tiny')
  config.data.vocab_size = 1000
  os.environ['TRANSFORMER_CACHE'] = str(tmp_path)
  task = tasks.get_task(config)
  assert task.vocab_size == 1000 and len(task.eval_pairs) == 678  # Mark
  assert len(task.train_examples) == 29545 and 0 < task.overlong_count < 200  # long ones dropped in the pipeline
  source, target = task.eval_pairs[0]
  assert source.startswith('The beginning of the gospel') and target.startswith("Commencement de l'Évangile")
  batch = next(task.train_iter(4))
  assert batch['inputs'].shape == (4, 128) and batch['targets_segment_ids'].max() > 1  # packed


@pytest.mark.parametrize(
  'override, message',
  [
    (dict(corpus='wiki'), "config.data.corpus='wiki' is not one of"),
    (dict(corpus='files'), 'needs config.data.train_files'),
    (dict(corpus='files', train_files='/nonexistent/train.tsv', eval_files='x'), '/nonexistent/train.tsv'),
    (dict(tokenizer='wordpiece'), "config.data.tokenizer='wordpiece'"),
    (dict(eval_split='valid'), "config.data.eval_split='valid' is not one of dev, test"),
  ],
)
def test_bad_data_settings_fail_clearly(override, message, tmp_path):
  config = translation_experiment.get_config('tiny')
  config.data.update(override)
  os.environ['TRANSFORMER_CACHE'] = str(tmp_path)
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('?', r'\?')):
    tasks.get_task(config)


def test_unknown_task_names_the_nearest():
  config = translation_experiment.get_config('tiny')
  config.task = 'translate'
  with pytest.raises(ConfigError, match="config.task='translate' is not a task \\(did you mean 'translation'\\?\\)"):
    tasks.get_task(config)


@pytest.mark.parametrize('name', sorted(tasks.TASKS))
def test_every_task_has_the_protocols_signatures(name):
  module, cls = tasks.TASKS[name].split(':')
  task_class = getattr(importlib.import_module(module), cls)
  for member in ('train_iter', 'eval_batches', 'eval_metrics', 'samples'):
    assert inspect.signature(getattr(task_class, member)) == inspect.signature(getattr(tasks.Task, member)), member


def test_synthetic_task_is_a_task_and_refuses_a_short_seq_len():
  config = synthetic_experiment.get_config('reverse')
  assert isinstance(tasks.get_task(config), tasks.Task)
  config.data.seq_len = 16
  with pytest.raises(ConfigError, match='config.data.seq_len=16 is too short for config.data.max_len=16'):
    tasks.get_task(config)
