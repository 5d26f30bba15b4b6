"""The one place an experiment config is resolved: `resolve` (cheap) and `build` (the task and the model).

`resolve(config)` reads `config.model` and `config.train` into a `ModelConfig` and a `TrainConfig`: no
tokenizer is trained, no data loaded, nothing compiled, so a dry run and a sweep's planning use it freely.
`build(config)` builds the task first, then the model, optimizer and schedule from the resolved configs.

The vocabulary rule: the model's `vocab_size` is the task's (its tokenizer's or its event vocabulary's)
whenever a task is built; `config.model.vocab_size` counts only when there is no task (a dry run, a
benchmark on synthetic batches).
"""

import dataclasses
from typing import Any

from transformer.config import ModelConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A config's typed settings, before anything is built."""

  model_config: ModelConfig
  train_config: TrainConfig


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the loop and the benchmarks run: the task (None when not built), the configs it resolved to, the
  model, and the optimizer with its learning-rate schedule."""

  task: Any
  model_config: ModelConfig
  train_config: TrainConfig
  model: Any
  optimizer: Any
  schedule: Any


def resolve(config, vocab_size: int | None = None) -> Resolved:
  """The typed `config.model` (with `vocab_size` when given) and `config.train`; misspelt keys and bad
  values are a `ConfigError` naming the key, as is `config.train.eval_lengths` for a task that cannot use it."""
  from transformer import tasks  # the registry only: no task's libraries load

  resolved = Resolved(resolve_model(config.model, vocab_size), TrainConfig.from_config(config.train))
  tasks.check_eval_lengths(config, resolved.train_config.eval_lengths)
  return resolved


def resolve_model(model, vocab_size: int | None = None) -> ModelConfig:
  """`config.model` alone (a `ConfigDict` or mapping, e.g. the `model` of a workdir's config.json), typed."""
  values = dict(model.to_dict() if hasattr(model, 'to_dict') else model)
  if vocab_size is not None:
    values['vocab_size'] = int(vocab_size)
  return ModelConfig.from_config(values)


def build(config, with_task: bool = True) -> Setup:
  """The task (when `with_task` and the config names one), then the model, optimizer and schedule, the
  model's vocabulary being the task's. The configs are checked before the task is built: a misspelt key
  fails before a tokenizer is trained."""
  resolve(config)
  task = None
  if with_task and 'task' in config:
    from transformer import tasks  # a task's libraries (grain, sentencepiece) load only when one is built

    task = tasks.get_task(config)
  resolved = resolve(config, task.vocab_size if task is not None else None)
  return build_model(resolved.model_config, resolved.train_config, task)


def build_model(model_config: ModelConfig, train_config: TrainConfig, task=None) -> Setup:
  """The model, optimizer and schedule of resolved configs (for a caller that varies them itself)."""
  from transformer import models, optim

  model = models.build_model(model_config)
  optimizer = optim.make_optimizer(train_config, model_config.d_model)
  schedule = optim.learning_rate_schedule(train_config, model_config.d_model)
  return Setup(task, model_config, train_config, model, optimizer, schedule)
