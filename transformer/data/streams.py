"""Per-row streams: row r of the global batch at step s is a pure function of (seed, s, r), built without the
other rows.

The records (documents, sentence pairs, pieces) are read in one order: epoch e is grain's index shuffle of
them with seed + e, epochs back to back (`grain.MapDataset.source(records).shuffle(seed)`, read by index;
nothing is materialised, so a corpus of any size costs no memory here). Stream k of S reads every S-th
record of that order, starting at k, turns each into examples (`examples_of`: a document's windows), and
fills rows of `seq_len` tokens: first fit over a few open rows, the fullest finished when none has room
(packing), or one example per row. Stream k fills rows [k m, (k + 1) m) of every batch, m = batch_size / S.

So a process builds only the streams of its own rows and reads only their records (about 1/P of the corpus),
and its rows are those one process building the whole batch would build, bitwise. A stream's state is one
small record (the next example it reads, and the examples, by reference, in its open and finished rows); a
checkpoint holds each process's streams, and their union resumes on any process count that divides S.
"""

import collections

import grain
import numpy as np

from transformer.config import ConfigError

FORMAT = 'streams-1'
BINS_PER_ROW = 4  # open rows a stream packs into, per row it fills each step (docs/tasks.md: how full rows are)


def fit(example, seq_len: int):
  """Every side truncated to `seq_len` tokens, as int32."""
  return {key: np.asarray(value[:seq_len], np.int32) for key, value in example.items()}


def fits(example, seq_len: int) -> bool:
  return all(len(v) <= seq_len for v in example.values())


class Stream:
  """The rows of one stream. `next` is (record ordinal, example index): the stream's i-th record is record
  `k + i * S` of the shuffled order. Open and finished rows hold their examples and, for the state, their
  (ordinal, index) references."""

  def __init__(self, spec: 'Spec', k: int):
    self.spec, self.k = spec, k
    self.next = (0, 0)
    self.open = []  # [(refs, examples, used tokens per side)]
    self.done = collections.deque()  # [(refs, examples)] of finished rows, oldest first
    self._cached = (None, None)  # (ordinal, examples of that record): a document yields many windows

  def _examples(self, ordinal: int) -> list:
    if self._cached[0] != ordinal:
      spec = self.spec
      record = spec.order[self.k + ordinal * spec.streams]
      examples = [fit(ex, spec.seq_len) for ex in spec.examples_of(record) if spec.keep(ex)]
      self._cached = (ordinal, examples)
    return self._cached[1]

  def _example(self, ref):
    return self._examples(ref[0])[ref[1]]

  def _take(self):
    """The next (reference, example); records without a kept example are skipped."""
    ordinal, index = self.next
    for _ in range(len(self.spec.order) + 1):
      examples = self._examples(ordinal)
      if index < len(examples):
        self.next = (ordinal, index + 1)
        return (ordinal, index), examples[index]
      ordinal, index = ordinal + 1, 0
    raise ConfigError(
      f'Stream {self.k} read every record once and found no example of at most seq_len={self.spec.seq_len} '
      "tokens: raise config.data.seq_len or set config.data.overlong='truncate'."
    )

  def row(self) -> list:
    """The examples of this stream's next row."""
    if not self.spec.pack:
      return [self._take()[1]]
    seq_len, limit = self.spec.seq_len, self.spec.bins
    while not self.done:
      ref, example = self._take()
      lengths = {key: len(value) for key, value in example.items()}
      for b, (refs, examples, used) in enumerate(self.open):
        if all(used[key] + lengths[key] <= seq_len for key in lengths):
          refs.append(ref)
          examples.append(example)
          for key in used:
            used[key] += lengths[key]
          break
      else:
        if len(self.open) == limit:  # no room anywhere: the fullest row (the oldest of equals) is finished
          self._finish(max(range(limit), key=lambda b: sum(self.open[b][2].values())))
        self.open.append(([ref], [example], lengths))
        b = len(self.open) - 1
      if any(used == seq_len for used in self.open[b][2].values()):  # a full side takes nothing more
        self._finish(b)
    return self.done.popleft()[1]

  def _finish(self, b: int):
    refs, examples, _ = self.open.pop(b)
    self.done.append((refs, examples))

  def get_state(self) -> dict:
    return {
      'next': list(self.next),
      'open': [[list(r) for r in refs] for refs, _, _ in self.open],
      'done': [[list(r) for r in refs] for refs, _ in self.done],
    }

  def set_state(self, state: dict):
    self.next = tuple(state['next'])
    self.open, self.done = [], collections.deque()
    for refs in state['open']:
      examples = [self._example(r) for r in refs]
      used = {key: sum(len(ex[key]) for ex in examples) for key in examples[0]}
      self.open.append(([tuple(r) for r in refs], examples, used))
    for refs in state['done']:
      self.done.append(([tuple(r) for r in refs], [self._example(r) for r in refs]))


class Spec:
  """What every stream shares: the record order and how records become rows. `manifest` is what a saved state
  must match to be resumed with it."""

  def __init__(self, records, *, seq_len, seed, streams, rows_per_stream, pack, overlong, examples_of):
    source = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(records)
    self.order = source.shuffle(seed=seed)  # index j: epoch j // N, reshuffled each epoch
    self.seq_len, self.streams, self.pack = seq_len, streams, pack
    self.rows_per_stream = rows_per_stream
    self.bins = BINS_PER_ROW * rows_per_stream
    self.examples_of = examples_of or (lambda record: [record])
    self.keep = (lambda ex: fits(ex, seq_len)) if overlong == 'drop' else (lambda ex: True)
    self.manifest = dict(
      seed=seed,
      streams=streams,
      batch_size=streams * rows_per_stream,
      seq_len=seq_len,
      pack=pack,
      overlong=overlong,
      records=len(records),
      fingerprint=getattr(records, 'fingerprint', None),
    )


class StreamsIterator:
  """This process's rows of every global batch, from its streams; `get_state` / `set_state` resume exactly
  (see the module's docstring)."""

  def __init__(self, spec: Spec, first: int, last: int):
    self.spec = spec
    self.streams = [Stream(spec, k) for k in range(first, last)]
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = [stream.row() for stream in self.streams for _ in range(self.spec.rows_per_stream)]
    self.step += 1
    return _stack(rows, self.spec.seq_len, self.spec.pack)

  def get_state(self) -> dict:
    states = {str(stream.k): stream.get_state() for stream in self.streams}
    return {'format': FORMAT, 'manifest': self.spec.manifest, 'step': self.step, 'streams': states}

  def set_state(self, state):
    """`state`: one process's state, or a list of them (every process's, from another process count)."""
    parts = state if isinstance(state, list) else [state]
    merged = {}
    for part in parts:
      if not isinstance(part, dict) or part.get('format') != FORMAT:
        raise ConfigError(
          'The checkpoint holds a data position written by an older version of the input pipeline (one global '
          'order, before per-row streams), which this version cannot continue exactly. Resume it with the '
          'version that wrote it, or start a new workdir.'
        )
      _check_manifest(part['manifest'], self.spec.manifest)
      merged.update(part['streams'])
    steps = {part['step'] for part in parts}
    if len(steps) != 1:
      raise ConfigError(f'The data positions in the checkpoint are at different steps {sorted(steps)}.')
    missing = [stream.k for stream in self.streams if str(stream.k) not in merged]
    if missing:
      raise ConfigError(
        f'The checkpoint holds no data position for streams {missing}: its process files are incomplete '
        '(a copy of the checkpoint that left some out?).'
      )
    for stream in self.streams:
      stream.set_state(merged[str(stream.k)])
    self.step = steps.pop()


def _check_manifest(saved: dict, current: dict):
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      raise ConfigError(
        f"The checkpoint's data position was saved with {key}={saved.get(key)!r}; this run has "
        f'{current.get(key)!r}. A data position resumes only with the same data settings: set them back '
        '(config.data, config.train.batch_size, seed), or start a new workdir.'
      )


def _stack(rows: list, seq_len: int, pack: bool) -> dict:
  """[rows, seq_len] int32 arrays per side; packed rows add `<side>_segment_ids` (1, 2, ... per example, 0 for
  padding) and `<side>_positions` (restarting at 0 in every example)."""
  keys = list(rows[0][0])
  batch = {key: np.zeros((len(rows), seq_len), np.int32) for key in keys}
  if pack:
    batch.update({f'{key}{suffix}': np.zeros_like(batch[key]) for key in keys for suffix in SUFFIXES})
  for r, examples in enumerate(rows):
    for key in keys:
      start = 0
      for segment, example in enumerate(examples, start=1):
        values = example[key]
        stop = start + len(values)
        batch[key][r, start:stop] = values
        if pack:
          batch[f'{key}_segment_ids'][r, start:stop] = segment
          batch[f'{key}_positions'][r, start:stop] = np.arange(len(values))
        start = stop
  return batch


SUFFIXES = ('_segment_ids', '_positions')
