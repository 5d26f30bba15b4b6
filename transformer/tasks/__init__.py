"""Tasks: each builds its tokenizer, data iterators, metrics and decoding from the config.

A task object has:
  vocab_size, seq_len                          the model's vocabulary and the training length
  train_iter(batch_size, rows=None)            endless iterator of this process's rows (start, stop) of
                                               the global batches of `batch_size` (the same examples for
                                               any topology), `get_state()` / `set_state()` for checkpoints
  eval_batches(batch_size, process_index, process_count)
                                               the held-out set once, never packed, the same number
                                               of batches on every process
  eval_metrics(generator, losses) -> dict      task metrics beyond loss / accuracy / perplexity
                                               (BLEU, bits per byte, ...); `generator` decodes
  samples(generator, num) -> list[dict]        decoded examples for logs and `--mode decode`
Batches are dicts of int32 `[batch, length]` arrays: `targets` (+ `_segment_ids`, `_positions` when
packed) and, for encoder-decoder tasks, `inputs` (+ the same).
"""

import importlib

from transformer.config import ConfigError, did_you_mean

# config.task -> the class that builds it (imported on demand: a task's libraries load only when used).
TASKS = {
  'copy': 'transformer.tasks.synthetic:SyntheticTask',
  'reverse': 'transformer.tasks.synthetic:SyntheticTask',
  'translation': 'transformer.tasks.translation:TranslationTask',
  'text': 'transformer.tasks.text:TextTask',
  'music': 'transformer.tasks.music:MusicTask',
}


def get_task(config):
  if config.task not in TASKS:
    raise ConfigError(
      f'config.task={config.task!r} is not a task{did_you_mean(config.task, TASKS)}; choose one of: {", ".join(TASKS)}.'
    )
  module, name = TASKS[config.task].split(':')
  return getattr(importlib.import_module(module), name)(config)
