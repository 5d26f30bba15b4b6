"""Synthetic sequence tasks generated on the fly: copy and reverse (encoder-decoder), and the same as
language modelling (decoder-only: `source EOS target EOS`). Deterministic from the seed, no files.

They exercise the whole engine (packing-free padding, masks, grain iterator state) and are learnable
by a tiny model in seconds: a loss near 0 means the model attends correctly.
"""

import grain
import numpy as np

from transformer.config import ConfigError
from transformer.data import pipeline
from transformer.data.batching import pad_batch
from transformer.tasks.common import EVAL_SEED_OFFSET
from transformer.tokens import EOS_ID, FIRST_FREE_ID

_EXACT_MATCH_EXAMPLES = 64


class SyntheticTask:
  def __init__(self, config):
    data = config.data
    self.kind = config.model.kind
    self.task = config.task
    self.vocab_size = int(data.vocab_size)
    self.min_len, self.max_len = int(data.min_len), int(data.max_len)
    self.seq_len = int(data.seq_len)
    self.num_train, self.num_eval = int(data.num_train), int(data.num_eval)
    self.seed = int(config.train.seed)
    self.pack = bool(data.get('pack', False))
    self.streams = int(data.get('streams', 0))
    needed = self.max_len + 1 if self.kind == 'encoder_decoder' else 2 * self.max_len + 2
    if needed > self.seq_len:
      raise ConfigError(
        f'config.data.seq_len={self.seq_len} is too short for config.data.max_len='
        f'{self.max_len}: it needs at least {needed}.'
      )

  def example(self, seed: int, index: int):
    rng = np.random.default_rng([seed, index])
    length = rng.integers(self.min_len, self.max_len + 1)
    source = rng.integers(FIRST_FREE_ID, self.vocab_size, length)
    target = source[::-1] if self.task == 'reverse' else source
    if self.kind == 'encoder_decoder':
      return {'inputs': source, 'targets': np.append(target, EOS_ID)}
    return {'targets': np.concatenate([source, [EOS_ID], target, [EOS_ID]])}

  def _examples(self, size, seed):
    return grain.MapDataset.range(size).map(lambda i: self.example(seed, int(i)))

  def train_iter(self, batch_size: int, rows: tuple[int, int] | None = None):
    """An endless iterator of `rows` of the global batches; `get_state()` / `set_state()` resume it exactly."""
    return pipeline.train_iter(
      self._examples(self.num_train, self.seed),
      seq_len=self.seq_len,
      batch_size=batch_size,
      seed=self.seed,
      pack=self.pack,
      rows=rows,
      streams=self.streams,
    )

  def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1, seq_len: int | None = None):
    """The fixed held-out set (another seed), once. Generated sequences have no windows of other lengths
    (`seq_len`): `tasks.check_eval_lengths` refuses config.train.eval_lengths for this task."""
    if seq_len is not None:
      raise ConfigError(f'config.task={self.task!r} cannot be evaluated at other lengths (seq_len={seq_len}).')
    return pipeline.eval_batches(
      self._examples(self.num_eval, self.seed + EVAL_SEED_OFFSET),
      seq_len=self.seq_len,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
    )

  def _greedy(self, predictor, count):
    """(examples, greedy outputs) for the first `count` eval examples, each output cut after EOS."""
    examples = [self.example(self.seed + EVAL_SEED_OFFSET, i) for i in range(min(count, self.num_eval))]
    width = self.max_len + 1  # the answer and its EOS
    rows = max(len(examples), _EXACT_MATCH_EXAMPLES)  # metric and samples share one shape: one compile
    if self.kind == 'encoder_decoder':
      sources = [ex['inputs'] for ex in examples]
      batch = pad_batch([{'inputs': src} for src in sources], rows, self.seq_len)
      tokens = predictor.generate(inputs=batch['inputs'], max_len=width)
    else:  # the prompt is the source and its EOS; the answer follows
      sources = [ex['targets'][: (len(ex['targets']) - 2) // 2] for ex in examples]
      batch = pad_batch([{'p': np.append(src, EOS_ID)} for src in sources], rows, width)
      tokens = predictor.generate(prompts=batch['p'], max_len=width)
    answers = [src[::-1] if self.task == 'reverse' else src for src in sources]
    outputs = [
      list(row[: list(row).index(EOS_ID)] if EOS_ID in row else row) for row in np.asarray(tokens)[: len(examples)]
    ]
    return sources, answers, outputs

  def eval_metrics(self, predictor, losses: dict) -> dict:
    """Exact-match rate of greedy outputs: did the model learn the rule, not just most tokens."""
    del losses
    _, answers, outputs = self._greedy(predictor, _EXACT_MATCH_EXAMPLES)
    return {'eval/exact_match': float(np.mean([list(a) == o for a, o in zip(answers, outputs)]))}

  def samples(self, predictor, num: int, workdir: str | None = None) -> list[dict]:
    del workdir
    return [
      {'source': ' '.join(map(str, s)), 'answer': ' '.join(map(str, a)), 'output': ' '.join(map(str, o))}
      for s, a, o in zip(*self._greedy(predictor, num))
    ]
