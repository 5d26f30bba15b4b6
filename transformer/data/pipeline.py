"""grain pipelines from tokenized examples to fixed-shape numpy batches.

Train: shuffle (anew each epoch) -> repeat -> fit to `seq_len` -> pack or pad -> global batch -> this
process's rows. Every process builds the same global batches and keeps its own rows, so a step trains on
the same examples for any number of processes or devices, and every process's iterator state is the
same (a checkpoint from one topology resumes exactly on another). The price: each process does the
whole global batch's data work (cheap for token ids; see the README's scaling section).
Eval: the held-out set once, padded, never packed. Examples are dicts of 1-D int arrays:
`targets` (EOS included) and, for encoder-decoder tasks, `inputs`.

Everything is deterministic from the seed and the iterator's `get_state()` / `set_state()` resume it
exactly (the state goes into every checkpoint).
"""

import math
from typing import Sequence

import grain
import numpy as np
from absl import logging

from transformer.config import ConfigError
from transformer.data.batching import pad_batch

OVERLONG = ('truncate', 'drop')


def _as_dataset(examples) -> grain.MapDataset:
  return examples if isinstance(examples, grain.MapDataset) else grain.MapDataset.source(examples)


def report_overlong(examples: Sequence[dict], seq_len: int, overlong: str, name: str = 'training') -> int:
  """Counts examples with a side longer than `seq_len` and logs what happens to them."""
  count = sum(any(len(v) > seq_len for v in ex.values()) for ex in examples)
  if count:
    logging.warning(
      '%d of %d %s examples are longer than seq_len=%d: %s (config.data.overlong).',
      count,
      len(examples),
      name,
      seq_len,
      'dropped' if overlong == 'drop' else 'truncated',
    )
  return count


def _fits(example, seq_len: int) -> bool:
  return all(len(v) <= seq_len for v in example.values())


def _fit(example, seq_len: int):
  """Truncates every side to `seq_len` tokens, as int32."""
  return {key: np.asarray(value[:seq_len], np.int32) for key, value in example.items()}


def train_iter(
  examples,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  pack: bool = True,
  rows: tuple[int, int] | None = None,
  overlong: str = 'truncate',
  prefetch: int = 2,
):
  """An endless iterator of this process's `rows` (start, stop) of `[batch_size, seq_len]` global batches
  (all rows by default).

  Packed batches carry `<key>_segment_ids` (1, 2, ... per example, 0 for padding) and
  `<key>_positions` (restarting at 0 in every example); the models mask across segments.
  """
  if overlong not in OVERLONG:
    raise ValueError(f'overlong={overlong!r}: choose one of {OVERLONG}.')
  start, stop = rows if rows is not None else (0, batch_size)
  if not 0 <= start < stop <= batch_size:
    raise ValueError(f'rows={rows} is not a non-empty range of a global batch of {batch_size} rows.')
  ds = _as_dataset(examples).shuffle(seed=seed).repeat()  # a new permutation every epoch
  if overlong == 'drop':
    if not any(_fits(ex, seq_len) for ex in _as_dataset(examples)):  # else an endless search for a batch
      raise ConfigError(
        f'Every training example is longer than seq_len={seq_len}, so overlong=drop leaves none: raise '
        "config.data.seq_len or set config.data.overlong='truncate'."
      )
    ds = ds.filter(lambda ex: _fits(ex, seq_len))
  ds = ds.map(lambda ex: _fit(ex, seq_len)).to_iter_dataset()
  if pack:
    first = _fit(_as_dataset(examples)[0], seq_len)
    # First-fit over a few batches' worth of bins: little padding, and examples still arrive in
    # shuffled order (bins are shuffled too, so a batch is not all short or all long examples).
    ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={key: seq_len for key in first}, num_packing_bins=4 * batch_size, seed=seed, shuffle_bins=True
    ).batch(batch_size, drop_remainder=True, batch_fn=_stack_int32)
  else:
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=lambda rows: pad_batch(rows, batch_size, seq_len))
  if (start, stop) != (0, batch_size):
    ds = ds.map(lambda batch: {key: value[start:stop] for key, value in batch.items()})
  # A background thread prepares the next batches while the device computes (XLA releases the GIL);
  # its state still counts only the batches handed out, so checkpoints resume exactly.
  return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch))


def _stack_int32(rows):
  return {key: np.stack([row[key] for row in rows]).astype(np.int32) for key in rows[0]}


def eval_batches(examples, *, seq_len: int, batch_size: int, process_index: int = 0, process_count: int = 1):
  """The held-out set once, in order, padded (never packed, so metrics do not depend on packing).

  Every process yields the same number of batches (collectives in the eval step need all of them):
  missing rows and batches are all padding, which the loss weights ignore.
  """
  whole = _as_dataset(examples)
  if not len(whole):
    raise ConfigError('There are no evaluation examples: check config.data.')
  ds = whole[process_index::process_count].map(lambda ex: _fit(ex, seq_len))
  # A process may get no example at all (fewer examples than processes): then every batch is padding.
  batches = ds.batch(batch_size, batch_fn=lambda rows: pad_batch(rows, batch_size, seq_len)) if len(ds) else []
  count = math.ceil(math.ceil(len(whole) / process_count) / batch_size)
  empty = {key: np.zeros((batch_size, seq_len), np.int32) for key in whole[0]}
  return (batches[i] if i < len(batches) else empty for i in range(count))
