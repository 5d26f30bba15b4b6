"""Tasks: each builds its tokenizer, data iterators, metrics and decoding from the config, behind `Task`.

Batches are dicts of int32 `[batch, length]` arrays: `targets` (+ `targets_segment_ids`, `targets_positions`
when packed) and, for encoder-decoder tasks, `inputs` (+ the same). A user's mistake in `config.data` (a
bad choice, a missing setting, a corpus with no examples) is a `ConfigError` naming the key.
"""

import importlib
from typing import Protocol, runtime_checkable

from transformer.config import ConfigError, did_you_mean


@runtime_checkable
class Task(Protocol):
  """What the training loop, `--mode eval` and `--mode decode` use of a task. `predictor` is a
  `transformer.predictor.Predictor`: the model with a checkpoint's parameters, which decodes."""

  vocab_size: int  # the model's vocabulary (the task's tokenizer or event vocabulary): `setup.build` uses it
  seq_len: int  # the training length of a batch row

  def train_iter(self, batch_size: int, rows: tuple[int, int] | None = None):
    """An endless iterator of this process's `rows` (start, stop) of the global batches of `batch_size`
    (all rows when None): the same examples for any topology. `get_state()` / `set_state()` save and
    resume its position exactly (checkpoints)."""
    ...

  def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1, seq_len: int | None = None):
    """The held-out set once, never packed, as batches of `batch_size` rows; the same number of batches
    on every process (padded with empty rows). With `seq_len` (`config.train.eval_lengths`), the held-out
    documents cut into windows of that many tokens as training cuts its own (a task in `EVAL_LENGTHS`)."""
    ...

  def eval_metrics(self, predictor, losses: dict) -> dict:
    """Metrics beyond the loop's loss / accuracy / perplexity (`losses`, keys `eval/...`): BLEU and chrF,
    bits per byte or note, exact match. Keys start with `eval/`; {} when the task has none."""
    ...

  def samples(self, predictor, num: int, workdir: str | None = None) -> list[dict]:
    """`num` decoded examples as flat dicts of text (source, reference, output; prompt, output; ...), for
    the logs, `samples.jsonl` and `--mode decode`. With `workdir` a task may also write files there
    (music: MIDI and piano rolls under `workdir/samples/`)."""
    ...


# config.task -> the class that builds it (imported on demand: a task's libraries load only when used).
TASKS = {
  'copy': 'transformer.tasks.synthetic:SyntheticTask',
  'reverse': 'transformer.tasks.synthetic:SyntheticTask',
  'translation': 'transformer.tasks.translation:TranslationTask',
  'text': 'transformer.tasks.text:TextTask',
  'music': 'transformer.tasks.music:MusicTask',
}


# The tasks whose eval set can be cut into windows of any length (`config.train.eval_lengths`), with the
# shortest length each takes, and why the others cannot.
EVAL_LENGTHS = {'text': 1, 'music': 8}
NO_EVAL_LENGTHS = {
  'translation': 'its examples are sentence pairs, not windows cut from documents',
  'copy': 'its examples are generated sequences, not windows cut from documents',
  'reverse': 'its examples are generated sequences, not windows cut from documents',
}


def check_eval_lengths(config, lengths: tuple) -> None:
  """A ConfigError when `config.task` cannot evaluate at `lengths` (`config.train.eval_lengths`), before
  anything is built: a dry run reports it, not the first eval of a long run."""
  task = config.get('task')
  if not lengths or task not in TASKS:  # an unknown task is named by get_task
    return
  setting = f'config.train.eval_lengths={lengths}'
  if task not in EVAL_LENGTHS:
    raise ConfigError(
      f'{setting}: config.task={task!r} cannot be evaluated at other lengths ({NO_EVAL_LENGTHS[task]}). '
      f'Tasks that can: {", ".join(EVAL_LENGTHS)}. Set config.train.eval_lengths=() for this task.'
    )
  shortest = EVAL_LENGTHS[task]
  if min(lengths) < shortest:
    raise ConfigError(f'{setting}: config.task={task!r} needs lengths of at least {shortest} tokens.')


def get_task(config) -> Task:
  """The task `config.task` names, built from `config` (tokenizer trained or loaded from its cache)."""
  if config.task not in TASKS:
    raise ConfigError(
      f'config.task={config.task!r} is not a task{did_you_mean(config.task, TASKS)}; choose one of: {", ".join(TASKS)}.'
    )
  from transformer.tasks import common

  common.check_ignored(config)
  module, name = TASKS[config.task].split(':')
  return getattr(importlib.import_module(module), name)(config)
