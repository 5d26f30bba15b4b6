"""What the text tasks (translation, language modelling) share: corpus choice, tokenizer, batching."""

import math

import numpy as np
from absl import logging

from transformer.config import ConfigError, did_you_mean
from transformer.data import pipeline
from transformer.tokens import EOS_ID

CORPORA = ('bible', 'files', 'hf', 'tfds')
EVAL_SEED_OFFSET = 1_000_003  # generated tasks draw their eval examples from seed + this: apart from training's


def check_choice(key: str, value: str, choices) -> str:
  if value not in choices:
    raise ConfigError(f'config.data.{key}={value!r} is not one of {", ".join(choices)}{did_you_mean(value, choices)}.')
  return value


# config.data keys that only some corpora read: task -> key -> (the corpora that read it, its value when unset).
# The unset values are those the experiment files give; any other value under a corpus that ignores the key
# would change nothing, so it is an error (a user who sets train_files expects to train on them).
_ALL_FILES = {'train_files': (('files',), ''), 'eval_files': (('files',), '')}
_DATASET = {
  'dataset': (('hf', 'tfds'), ''),
  'dataset_eval_split': (('hf', 'tfds'), 'validation'),
}
ONLY_FOR = {
  'translation': {
    **_ALL_FILES,
    **_DATASET,
    'dataset_config': (('hf',), ''),  # TFDS names its config inside the name: 'wmt14_translate/de-en'
    'source': (('bible', 'hf', 'tfds'), 'k'),
    'target': (('bible', 'hf', 'tfds'), 'l'),
    'eval_split': (('bible',), 'dev'),  # files: eval_files; hf / tfds: dataset_eval_split
  },
  'text': {
    **_ALL_FILES,
    **_DATASET,
    'dataset_config': (('hf',), ''),
    'language': (('bible',), 'k'),
    'unit': (('bible',), 'chapter'),
    'shard_mb': (('files',), 64.0),
    'eval_split': (('bible',), 'dev'),
  },
  'music': {
    'num_pieces': (('toy',), 20_000),
    'num_eval_pieces': (('toy',), 200),
    'limit': (('bach',), 0),
    'eval_every_nth': (('bach',), 10),
    'cache_dir': (('bach',), ''),
  },
}


def check_ignored(config):
  """A ConfigError for a `config.data` key set (away from its unset value) that the chosen corpus never reads."""
  rules = ONLY_FOR.get(config.task, {})
  data = config.data
  corpus = data.get('corpus')
  if corpus not in {c for corpora, _ in rules.values() for c in corpora}:
    return  # no rules, or an unknown corpus: the task's own check names the choices
  for key, (corpora, unset) in rules.items():
    if key in data and corpus not in corpora and data[key] != unset:
      use = ' or '.join(f'config.data.corpus={c!r}' for c in corpora)
      raise ConfigError(
        f'config.data.{key}={data[key]!r} would be ignored: config.data.corpus={corpus!r} does not read it. '
        f'Set {use} to use it, or leave {key} unset ({unset!r}).'
      )


def require(data, key: str, corpus: str) -> str:
  """A setting that `config.data.corpus=<corpus>` needs."""
  value = data.get(key, '')
  if not value:
    raise ConfigError(f'config.data.corpus={corpus!r} needs config.data.{key}: set it, e.g. --config.data.{key}=...')
  return value


def build_tokenizer(data, texts, name: str):
  """SentencePiece trained on `texts` (the training split), cached by content and settings."""
  from transformer.data import tokenizer  # sentencepiece loads only for text tasks

  model_type = check_choice('tokenizer', data.tokenizer, ('bpe', 'unigram'))
  return tokenizer.train_tokenizer(texts, int(data.vocab_size), model_type=model_type, name=name)


def with_eos(ids) -> np.ndarray:
  return np.asarray(list(ids) + [EOS_ID], np.int32)


def bits_per_unit(losses: dict, units: int) -> float:
  """The eval set's total loss in bits over `units` (bytes, notes): comparable across tokenizations."""
  return losses['eval/loss'] * losses['eval/tokens'] / math.log(2) / units


def spread(items, count: int):
  """`count` items spread evenly over `items` (all of them when count is 0 or too large)."""
  if count <= 0 or count >= len(items):
    return list(items)
  return [items[i] for i in np.linspace(0, len(items) - 1, count).astype(int)]


class TokenizedTask:
  """Train / eval batches from tokenized examples (dicts of id arrays, EOS included)."""

  def __init__(self, config, train_examples, eval_examples, examples_of=None):
    """`train_examples`: a list of examples, or any random-access source of records (a token store) with
    `examples_of(record)` giving a record's examples (a document's windows: never overlong)."""
    data = config.data
    self.seq_len = int(data.seq_len)
    self.seed = int(config.train.seed)
    self.pack = bool(data.pack)
    self.streams = int(data.get('streams', 0))
    self.overlong = check_choice('overlong', data.overlong, pipeline.OVERLONG)
    if not len(train_examples) or not len(eval_examples):
      raise ConfigError('The corpus has no training or no evaluation examples: check config.data.')
    self.train_examples, self.eval_examples, self.examples_of = train_examples, eval_examples, examples_of
    self._eval_windows = {}  # length -> the eval set cut into windows of it (config.train.eval_lengths)
    self.overlong_count = 0 if examples_of else pipeline.report_overlong(train_examples, self.seq_len, self.overlong)
    logging.info('%d training and %d evaluation examples.', len(train_examples), len(eval_examples))

  def train_iter(self, batch_size: int, rows: tuple[int, int] | None = None):
    return pipeline.train_iter(
      self.train_examples,
      seq_len=self.seq_len,
      batch_size=batch_size,
      seed=self.seed,
      pack=self.pack,
      rows=rows,
      overlong=self.overlong,
      streams=self.streams,
      examples_of=self.examples_of,
    )

  def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1, seq_len: int | None = None):
    return pipeline.eval_batches(
      self.eval_examples if seq_len is None else self.eval_windows(seq_len),
      seq_len=self.seq_len if seq_len is None else seq_len,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
    )

  def eval_windows(self, length: int) -> list[dict]:
    """The eval set cut into windows of at most `length` tokens, as training cuts its own (`cut_eval`), once
    per length: every eval uses them again."""
    if length not in self._eval_windows:
      self._eval_windows[length] = self.cut_eval(length)
    return self._eval_windows[length]

  def cut_eval(self, length: int) -> list[dict]:
    """`eval_windows`' cutting, for a task that can (text, music; `tasks.check_eval_lengths` refuses the
    others before this is reached)."""
    raise ConfigError(f'This task cannot be evaluated at other lengths (config.train.eval_lengths={length}).')
