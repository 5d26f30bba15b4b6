"""The Hugging Face `datasets` and TFDS corpus loaders (corpus='hf' / 'tfds'). `datasets` is in the test extra:
its loader reads small local json / csv / parquet files this test writes (a folder of `<split>.<ext>` files is a
dataset), offline. TFDS needs TensorFlow, which the test extra leaves out: only its missing-package error is
tested."""

import json
import os
import sys

# Offline before `datasets` reads its settings: a test never reaches the network.
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'

import datasets  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from transformer.config import ConfigError  # noqa: E402
from transformer.data import corpora  # noqa: E402
from transformer.experiment import overrides  # noqa: E402
from transformer.tasks import text, translation  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  """Each test's Arrow cache in its own folder, not the user's."""
  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'cache'))


def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))


def test_translation_pairs_from_local_json_csv_and_parquet(tmp_path):
  # Nested {'translation': {lang: text}} rows (WMT's layout) and flat columns per language; empty sides skipped.
  write_jsonl(
    tmp_path / 'nested' / 'train.jsonl',
    [{'translation': {'en': 'Hello', 'fr': 'Bonjour'}}, {'translation': {'en': ' ', 'fr': 'vide'}}],
  )
  write_jsonl(tmp_path / 'nested' / 'validation.jsonl', [{'translation': {'en': ' Yes ', 'fr': 'Oui'}}])
  (tmp_path / 'flat').mkdir()
  (tmp_path / 'flat' / 'train.csv').write_text('en,fr\nHello,Bonjour\nThanks,Merci\n')
  (tmp_path / 'table').mkdir()
  pd.DataFrame({'en': ['Hello', 'No'], 'fr': ['Bonjour', 'Non']}).to_parquet(tmp_path / 'table' / 'train.parquet')
  assert corpora.hf_pairs(str(tmp_path / 'nested'), 'train', 'en', 'fr') == [('Hello', 'Bonjour')]
  assert corpora.hf_pairs(str(tmp_path / 'nested'), 'validation', 'en', 'fr') == [('Yes', 'Oui')]
  assert corpora.hf_pairs(str(tmp_path / 'flat'), 'train', 'fr', 'en') == [('Bonjour', 'Hello'), ('Merci', 'Thanks')]
  assert corpora.hf_pairs(str(tmp_path / 'table'), 'train', 'en', 'fr') == [('Hello', 'Bonjour'), ('No', 'Non')]

  # The same through the translation task's config (corpus='hf', dataset, dataset_eval_split).
  data = overrides.load_config(os.path.join(ROOT, 'experiments', 'translation.py')).data
  data.corpus, data.dataset, data.source, data.target = 'hf', str(tmp_path / 'nested'), 'en', 'fr'
  assert translation.load_pairs(data, 'train') == [('Hello', 'Bonjour')]
  assert translation.load_pairs(data, 'dev') == [('Yes', 'Oui')]  # the eval split is dataset_eval_split


def test_documents_from_local_files_through_the_text_task(tmp_path):
  (tmp_path / 'docs').mkdir()
  pd.DataFrame({'text': ['first doc ', None, '', 'second doc'], 'id': [1, 2, 3, 4]}).to_parquet(
    tmp_path / 'docs' / 'train.parquet'
  )
  pd.DataFrame({'text': ['held out'], 'id': [5]}).to_parquet(tmp_path / 'docs' / 'validation.parquet')
  data = overrides.load_config(os.path.join(ROOT, 'experiments', 'text.py')).data
  data.corpus, data.dataset = 'hf', str(tmp_path / 'docs')
  assert text.load_documents(data, 'train') == ['first doc', 'second doc']
  assert text.load_documents(data, 'dev') == ['held out']


def test_a_missing_column_or_language_is_one_config_error_naming_it(tmp_path):
  write_jsonl(tmp_path / 'pairs' / 'train.jsonl', [{'translation': {'en': 'Hello', 'fr': 'Bonjour'}}])
  (tmp_path / 'flat').mkdir()
  (tmp_path / 'flat' / 'train.csv').write_text('english,fr\nHello,Bonjour\n')
  write_jsonl(tmp_path / 'docs' / 'train.jsonl', [{'body': 'a document'}])
  with pytest.raises(ConfigError) as error:
    corpora.hf_pairs(str(tmp_path / 'pairs'), 'train', 'en', 'de')
  assert (
    str(error.value)
    == f"Hugging Face dataset {str(tmp_path / 'pairs')!r} has no language 'de'; its rows have 'en', 'fr'."
  )
  with pytest.raises(ConfigError, match="has no language 'en'; its rows have 'english', 'fr'"):
    corpora.hf_pairs(str(tmp_path / 'flat'), 'train', 'en', 'fr')
  with pytest.raises(ConfigError) as error:
    corpora.hf_documents(str(tmp_path / 'docs'), 'train')
  assert str(error.value) == f"Hugging Face dataset {str(tmp_path / 'docs')!r} has no column 'text'; its columns: body."


# Bad input the loader does not yet turn into a ConfigError: it needs the `_hf_rows` helper and the None-safe
# `strip` in corpora.py (the helper's report to the coordinator gives the change). Strict: once the fix is in,
# these pass and the marker must go.


def test_an_empty_cell_is_skipped_like_an_empty_string(tmp_path):
  (tmp_path / 'flat').mkdir()
  (tmp_path / 'flat' / 'train.csv').write_text('en,fr\nHello,Bonjour\n,vide\n')  # csv: an empty cell is None
  assert corpora.hf_pairs(str(tmp_path / 'flat'), 'train', 'en', 'fr') == [('Hello', 'Bonjour')]


def test_a_missing_split_or_dataset_is_a_config_error(tmp_path):
  write_jsonl(tmp_path / 'pairs' / 'train.jsonl', [{'translation': {'en': 'Hello', 'fr': 'Bonjour'}}])
  with pytest.raises(ConfigError, match="has no split 'validation'; its splits: train"):
    corpora.hf_pairs(str(tmp_path / 'pairs'), 'validation', 'en', 'fr')
  with pytest.raises(ConfigError, match='was not found'):
    corpora.hf_documents(str(tmp_path / 'no_such_folder'), 'train')
  with pytest.raises(ConfigError, match='was not found'):  # offline: a name neither cached nor a folder
    corpora.hf_documents('no_such_user/no_such_dataset', 'train')


def test_tfds_without_tensorflow_datasets_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # as if not installed, even where it is
  with pytest.raises(ConfigError) as error:
    corpora.tfds_pairs('wmt14_translate/de-en', 'train', 'de', 'en')
  assert str(error.value) == (
    "TFDS dataset 'wmt14_translate/de-en' needs the 'tensorflow-datasets' package, which is not installed: "
    'pip install tensorflow-datasets'
  )
