"""grain pipelines from tokenized examples to fixed-shape numpy batches.

Train: per-row streams (`transformer.data.streams`): the records' order is grain's index shuffle (anew each
epoch); stream k of S reads every S-th record of it, fits its examples to `seq_len` and packs or pads them
into its rows. A process builds only the streams of its own rows, so a step trains on the same examples for
any number of processes or devices, and the union of the processes' iterator states resumes exactly on
another topology. Eval: the held-out set once, padded, never packed. Examples are dicts of 1-D int arrays:
`targets` (EOS included) and, for encoder-decoder tasks, `inputs`.

Everything is deterministic from the seed and the iterator's `get_state()` / `set_state()` resume it
exactly (the state goes into every checkpoint)."""

import math
from typing import Sequence

import grain
import numpy as np
from absl import logging

from transformer.config import ConfigError
from transformer.data import streams as streams_lib
from transformer.data.batching import pad_batch

OVERLONG = ('truncate', 'drop')


def _as_dataset(examples) -> grain.MapDataset:
  return examples if isinstance(examples, grain.MapDataset) else grain.MapDataset.source(examples)


def report_overlong(examples: Sequence[dict], seq_len: int, overlong: str, name: str = 'training') -> int:
  """Counts examples with a side longer than `seq_len` and logs what happens to them."""
  count = sum(not streams_lib.fits(ex, seq_len) for ex in examples)
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


def train_iter(
  records,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  pack: bool = True,
  rows: tuple[int, int] | None = None,
  overlong: str = 'truncate',
  prefetch: int = 2,
  streams: int = 0,
  examples_of=None,
):
  """An endless iterator of this process's `rows` (start, stop) of `[batch_size, seq_len]` global batches
  (all rows by default), built by `streams` per-row streams (0: one per row; `transformer.data.streams`).

  `records`: a list or any random-access source (`len`, `[i]`: a token store) of records; `examples_of(record)`
  gives a record's examples (default: the record is one). Packed batches carry `<key>_segment_ids` (1, 2, ...
  per example, 0 for padding) and `<key>_positions` (restarting at 0 in every example); the models mask
  across segments.
  """
  if overlong not in OVERLONG:
    raise ValueError(f'overlong={overlong!r}: choose one of {OVERLONG}.')
  start, stop = rows if rows is not None else (0, batch_size)
  if not 0 <= start < stop <= batch_size:
    raise ValueError(f'rows={rows} is not a non-empty range of a global batch of {batch_size} rows.')
  streams = streams or batch_size
  if streams < 0 or batch_size % streams:
    raise ConfigError(
      f'config.data.streams={streams} does not divide the batch of {batch_size} rows: use a divisor of it '
      '(0: one stream per row).'
    )
  per_stream = batch_size // streams
  if start % per_stream or stop % per_stream:
    raise ConfigError(
      f'This process feeds rows [{start}, {stop}) of the batch of {batch_size}, which cuts through a stream of '
      f'{per_stream} rows: the process count must divide config.data.streams={streams} (0: one per row).'
    )
  if examples_of is None and overlong == 'drop':  # records are examples: drop them before the order is drawn
    records = [ex for ex in records if streams_lib.fits(ex, seq_len)]
    if not records:  # else an endless search for a batch
      raise ConfigError(
        f'Every training example is longer than seq_len={seq_len}, so overlong=drop leaves none: raise '
        "config.data.seq_len or set config.data.overlong='truncate'."
      )
  spec = streams_lib.Spec(
    records,
    seq_len=seq_len,
    seed=seed,
    streams=streams,
    rows_per_stream=per_stream,
    pack=pack,
    overlong=overlong,
    examples_of=examples_of,
  )
  iterator = streams_lib.StreamsIterator(spec, start // per_stream, stop // per_stream)
  # A background thread prepares the next batches while the device computes (XLA releases the GIL);
  # its state still counts only the batches handed out, so checkpoints resume exactly.
  return grain.experimental.ThreadPrefetchDatasetIterator(iterator, prefetch)


def eval_batches(examples, *, seq_len: int, batch_size: int, process_index: int = 0, process_count: int = 1):
  """The held-out set once, in order, padded (never packed, so metrics do not depend on packing).

  Every process yields the same number of batches (collectives in the eval step need all of them):
  missing rows and batches are all padding, which the loss weights ignore.
  """
  whole = _as_dataset(examples)
  if not len(whole):
    raise ConfigError('There are no evaluation examples: check config.data.')
  ds = whole[process_index::process_count].map(lambda ex: streams_lib.fit(ex, seq_len))
  # A process may get no example at all (fewer examples than processes): then every batch is padding.
  batches = ds.batch(batch_size, batch_fn=lambda rows: pad_batch(rows, batch_size, seq_len)) if len(ds) else []
  count = math.ceil(math.ceil(len(whole) / process_count) / batch_size)
  empty = {key: np.zeros((batch_size, seq_len), np.int32) for key in whole[0]}
  return (batches[i] if i < len(batches) else empty for i in range(count))
