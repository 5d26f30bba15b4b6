"""Synthetic sequence tasks generated on the fly: copy and reverse (encoder-decoder), and the same as
language modelling (decoder-only: `source EOS target EOS`). Deterministic from the seed, no files.

They exercise the whole engine (packing-free padding, masks, grain iterator state) and are learnable
by a tiny model in seconds: a loss near 0 means the model attends correctly.
"""

import math

import grain
import numpy as np

from transformer.data.batching import pad_batch
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

  def _dataset(self, size, seed, batch_size, process_index, process_count, repeat):
    ds = grain.MapDataset.range(size)
    if repeat:
      ds = ds.shuffle(seed=seed).repeat()  # reshuffled each epoch
    ds = ds[process_index::process_count].map(lambda i: self.example(seed, int(i)))
    return ds.batch(batch_size, drop_remainder=repeat,
                    batch_fn=lambda examples: pad_batch(examples, batch_size, self.seq_len))

  def train_iter(self, batch_size: int, process_index: int = 0, process_count: int = 1):
    """An endless iterator of this process's share; `get_state()` / `set_state()` resume it exactly."""
    return iter(self._dataset(self.num_train, self.seed, batch_size, process_index, process_count,
                              repeat=True).to_iter_dataset())

  def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1):
    """The fixed held-out set (other seed), once; the last batch is padded with empty rows, and every
    process yields the same number of batches (collectives in the eval step need all of them)."""
    batches = self._dataset(self.num_eval, self.seed + _EVAL_SEED_OFFSET, batch_size, process_index,
                            process_count, repeat=False)
    count = math.ceil(math.ceil(self.num_eval / process_count) / batch_size)
    empty = {key: np.zeros_like(value) for key, value in batches[0].items()}
    return (batches[i] if i < len(batches) else empty for i in range(count))
