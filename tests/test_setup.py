"""`setup.resolve` is cheap and checks every key; `setup.build` builds the task first and takes its vocabulary."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import synthetic, translation  # noqa: E402
from transformer import setup  # noqa: E402
from transformer.config import ConfigError, MeshConfig, ModelConfig, TrainConfig  # noqa: E402


def test_resolve_types_both_configs_and_trains_no_tokenizer(tmp_path, monkeypatch):
  monkeypatch.setenv('TRANSFORMER_CACHE', str(tmp_path))  # where a trained tokenizer would be cached
  config = translation.get_config('tiny')
  resolved = setup.resolve(config)
  assert resolved.model_config == ModelConfig(**config.model.to_dict())
  assert resolved.train_config.mesh == MeshConfig(**config.train.mesh)
  assert resolved.train_config == TrainConfig(**{**config.train.to_dict(), 'mesh': MeshConfig(**config.train.mesh)})
  assert setup.resolve(config, vocab_size=77).model_config.vocab_size == 77
  saved = {'d_model': 64, 'num_heads': 4}  # e.g. the model of a workdir's config.json
  assert setup.resolve_model(saved, vocab_size=50) == ModelConfig(d_model=64, num_heads=4, vocab_size=50)
  assert os.listdir(tmp_path) == []


def test_a_misspelt_key_fails_before_the_task_is_built(tmp_path, monkeypatch):
  monkeypatch.setenv('TRANSFORMER_CACHE', str(tmp_path))
  config = translation.get_config('tiny')
  config.train.unlock()
  config.train.lerning_rate = 0.1
  with pytest.raises(
    ConfigError, match='Unknown key config.train.lerning_rate. Did you mean config.train.learning_rate?'
  ):
    setup.build(config)
  assert os.listdir(tmp_path) == []  # no tokenizer was trained for a config that cannot run


def test_the_model_vocabulary_is_the_tasks():
  config = synthetic.get_config('reverse')
  config.model.vocab_size = 999  # ignored once a task is built
  built = setup.build(config)
  assert built.task.vocab_size == config.data.vocab_size != 999
  assert built.model_config.vocab_size == built.model.config.vocab_size == config.data.vocab_size
  assert built.train_config == setup.resolve(config).train_config
  without = setup.build(config, with_task=False)  # synthetic batches: the config's own vocabulary
  assert without.task is None and without.model_config.vocab_size == 999
