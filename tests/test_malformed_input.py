"""Hostile input (issue 13): malformed data files, a config file that raises, and settings the chosen
corpus would silently ignore each give one ConfigError naming the file and line, or the key and the
setting that would make it apply; no file is written over. No training: loaders and tasks are called
directly."""

import os
import sys

import ml_collections
import numpy as np
import pytest

from transformer import tasks
from transformer.config import ConfigError
from transformer.data import corpora
from transformer.experiment import overrides
from transformer.tasks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the experiments package


def _unchanged_after(path, call, message):
  """`call()` raises a ConfigError matching `message`, and the file it read is byte for byte the same."""
  before = (path.read_bytes(), os.stat(path).st_mtime_ns)
  with pytest.raises(ConfigError, match=message) as raised:
    call()
  assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
  return str(raised.value)


# --------------------------------------------------------------------------- malformed data files

JUNK = bytes(np.random.default_rng(13).integers(0, 256, 4096, dtype=np.uint8))


MALFORMED = [
  # Random bytes: the first line that is not UTF-8 is named.
  ('junk.tsv', JUNK, corpora.read_pairs, r'junk\.tsv, line \d+: not UTF-8 \(byte 0x[0-9a-f]{2} at column \d+\)'),
  # Valid UTF-8 with NUL bytes (e.g. UTF-16 text, a compressed file of ASCII-looking bytes).
  (
    'utf16.txt',
    'one\ntwo\n'.encode('utf-16-le'),
    corpora.read_documents,
    r'utf16\.txt, line 1: a NUL byte at column 2: this looks like a binary file',
  ),
  ('nul.tsv', b'a\tb\nc\x00d\te\n', corpora.read_pairs, r'nul\.tsv, line 2: a NUL byte at column 2'),
  ('cp1252.jsonl', '{"text": "\u201cquoted\u201d"}\n'.encode('cp1252'), corpora.read_documents, r'line 1: not UTF-8'),
  ('columns.tsv', b'a\tb\n' * 5 + b'a\tb\tc\td\n', corpora.read_pairs, r'columns\.tsv, line 6: .*found 3 tabs'),
  (
    'truncated.jsonl',
    b'{"source": "a", "target": "b"}\n{"source": "a", "tar',
    corpora.read_pairs,
    r'line 2: not valid',
  ),
  ('empty.jsonl', b'', corpora.read_documents, r'empty\.jsonl: the file has no documents \(it is empty or blank\)'),
  ('empty.tsv', b'\n\n', corpora.read_pairs, r'empty\.tsv: the file has no pairs .*give source<TAB>target lines'),
]


@pytest.mark.parametrize('name,data,reader,message', MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_file_names_file_and_line(tmp_path, name, data, reader, message):
  path = tmp_path / name
  path.write_bytes(data)
  text = _unchanged_after(path, lambda: reader(str(path)), message)
  assert str(path) in text  # the full path, so the user finds the file


def test_ten_megabyte_line_reads_whole_and_overlong_rule_applies(tmp_path):
  # A 10 MB line is text like any other: read whole (no line-length limit, no crash), then the task's
  # overlong rule drops or truncates what is longer than seq_len.
  long = ('word ' * 2_000_000).strip()
  path = tmp_path / 'long.txt'
  path.write_text(f'short one\n{long}\nshort two\n', encoding='utf-8')
  assert corpora.read_documents(str(path)) == ['short one', long, 'short two']

  examples = [{'targets': np.arange(1, 6, dtype=np.int32)}, {'targets': np.ones(len(long) // 5, np.int32)}]
  for overlong, expected_lengths in [('drop', {5}), ('truncate', {5, 8})]:
    config = ml_collections.ConfigDict(dict(data=dict(seq_len=8, pack=False, overlong=overlong), train=dict(seed=0)))
    task = common.TokenizedTask(config, examples, examples)
    assert task.overlong_count == 1
    batch = next(iter(task.train_iter(batch_size=2)))
    lengths = {int((row != 0).sum()) for row in batch['targets'] if (row != 0).any()}
    assert lengths == expected_lengths


# --------------------------------------------------------------------------- a config file that raises


@pytest.mark.parametrize(
  'source,message',
  [
    (
      'def get_config(arg=None):\n  config = {}\n  return config["model"]\n',
      r"broken\.py failed at line 3 \(return config\[\"model\"\]\).*KeyError: 'model'\. Fix the file\.",
    ),
    ('import ml_collections\nx = 1 / 0\n', r'broken\.py failed at line 2 \(x = 1 / 0\).*ZeroDivisionError'),
    ('def get_config(:\n  pass\n', r'broken\.py failed at line 1 .*SyntaxError'),
    ('X = 1\n', r'broken\.py defines no get_config\(\)'),
  ],
  ids=['raises-in-get_config', 'raises-on-import', 'syntax-error', 'no-get_config'],
)
def test_config_file_that_raises(tmp_path, source, message):
  path = tmp_path / 'broken.py'
  path.write_text(source)
  _unchanged_after(path, lambda: overrides.load_config(f'{path}:variant'), message)


# --------------------------------------------------------------------------- silently ignored settings


def _config(experiment, variant, **data):
  config = overrides.load_config(os.path.join(REPO, 'experiments', f'{experiment}.py:{variant}'))
  config.data.update(data)
  return config


@pytest.mark.parametrize(
  'experiment,variant,data,message',
  [
    # The example: files named, but the default corpus is the Bible.
    ('translation', 'tiny', dict(train_files='my.txt'), r"train_files='my\.txt' would be ignored: .*corpus='bible'"),
    ('translation', 'tiny', dict(corpus='files', train_files='a.tsv', source='de'), r"source='de' would be ignored"),
    (
      'translation',
      'tiny',
      dict(corpus='files', eval_split='test'),
      r"eval_split='test'.*Set config\.data\.corpus='bible'",
    ),
    ('translation', 'tiny', dict(corpus='tfds', dataset='wmt', dataset_config='de-en'), r"dataset_config='de-en'"),
    ('translation', 'tiny', dict(dataset='wmt14'), r"dataset='wmt14'.*corpus='hf' or config\.data\.corpus='tfds'"),
    ('text', 'tiny', dict(eval_files='dev.txt'), r"eval_files='dev\.txt' would be ignored"),
    ('text', 'tiny', dict(corpus='hf', dataset='x', unit='verse'), r"unit='verse' would be ignored"),
    ('text', 'tiny', dict(corpus='files', language='l'), r"language='l'.*leave language unset \('k'\)"),
    ('music', 'toy', dict(limit=5), r"limit=5 would be ignored: config\.data\.corpus='toy'.*corpus='bach'"),
    ('music', 'bach', dict(num_pieces=10), r"num_pieces=10 would be ignored.*corpus='toy'"),
  ],
)
def test_ignored_setting_is_an_error(experiment, variant, data, message):
  # get_task checks before any corpus is read or tokenizer trained: the error comes at once.
  with pytest.raises(ConfigError, match=message):
    tasks.get_task(_config(experiment, variant, **data))


def test_applicable_settings_pass():
  # The same keys under the corpus that reads them, and the unset values under any corpus.
  for experiment, variant, data in [
    ('translation', 'tiny', dict(corpus='files', train_files='a.tsv', eval_files='b.tsv')),
    ('translation', 'tiny', dict(corpus='hf', dataset='wmt14', dataset_config='de-en', source='de', target='en')),
    ('translation', 'tiny', dict(corpus='tfds', dataset='wmt14_translate/de-en', dataset_eval_split='test')),
    ('translation', 'tiny', dict(eval_split='test', source='4', target='e')),
    ('text', 'tiny', dict(unit='verse', language='l')),
    ('music', 'bach', dict(limit=5, eval_every_nth=3, cache_dir='/tmp/x')),
    ('music', 'toy', dict(num_pieces=10, num_eval_pieces=2)),
  ]:
    assert common.check_ignored(_config(experiment, variant, **data)) is None


def test_every_experiment_variant_passes_the_rule():
  # No shipped config trips the rule: each experiment file's variants load and pass check_ignored.
  checked = 0
  for name in ('translation', 'text', 'music', 'synthetic', 'bench'):
    module = __import__(f'experiments.{name}', fromlist=['VARIANTS'])
    for variant in module.VARIANTS:
      common.check_ignored(_config(name, variant))
      checked += 1
  assert checked >= 12
