"""Corpora read as a stream, in shards: what `transformer.data.store` tokenizes a corpus larger than memory from.

A source shard is a small picklable description (it crosses to worker processes) whose `read()` yields its
documents one at a time, each with the source bytes it took, so a worker never holds more than a batch of
them. Three kinds:
  - `FileRange`: the lines of a `.txt` (a document per non-empty line) or `.jsonl` (`{"text": ...}` per line)
    file whose FIRST byte lies in [start, stop). `file_ranges` cuts files into ranges of about `shard_bytes`
    from their sizes alone (no scan): a line belongs to the range its first byte is in, so the ranges of a
    file together give each of its lines once, in order. Malformed lines are the ConfigErrors of
    `corpora.read_documents`, with the same file and line number (counted when an error needs it).
  - `HFShard`: shard `index` of `num_shards` of a Hugging Face dataset split, streamed
    (`datasets.load_dataset(..., streaming=True).shard(...)`): one store shard per dataset shard.
  - `BibleShard`: a Bible translation's split (small: one shard).
"""

import dataclasses
import os
from typing import Iterator

from transformer.config import ConfigError
from transformer.data import corpora


@dataclasses.dataclass(frozen=True)
class FileRange:
  """The documents of the lines of `path` that start in bytes [start, stop)."""

  path: str
  start: int
  stop: int
  text_key: str = 'text'

  def describe(self) -> dict:
    return {'path': self.path, 'start': self.start, 'stop': self.stop}

  def read(self) -> Iterator[tuple[str, int]]:
    """(document, bytes of the lines read for it) in file order; blank lines' bytes count with the next."""
    extension = corpora.document_format(self.path)
    corpora.check_file(self.path)
    pending = 0
    with open(self.path, 'rb') as f:
      position = self._first_line_start(f)
      while position < self.stop:
        raw = f.readline()
        if not raw:
          break
        try:
          line = corpora.decode_line(self.path, 0, raw, first=position == 0)
          document = corpora.document_of(self.path, extension, 0, line, self.text_key)
        except ConfigError:
          number = line_number(self.path, position)  # the same check again, naming the line: it raises
          line = corpora.decode_line(self.path, number, raw, first=position == 0)
          corpora.document_of(self.path, extension, number, line, self.text_key)
          raise
        position += len(raw)
        pending += len(raw)
        if document is not None:
          yield document, pending
          pending = 0

  def _first_line_start(self, f) -> int:
    """Seeks `f` to the first line starting at or after `start` (a line starts at 0 or after a newline)."""
    if self.start == 0:
      return 0
    f.seek(self.start - 1)
    f.readline()  # the rest of the line holding byte start - 1: it ends just before the first line start
    return f.tell()


def line_number(path: str, offset: int) -> int:
  """The 1-based number of the line starting at byte `offset` of `path` (counts the newlines before it)."""
  count, remaining = 0, offset
  with open(path, 'rb') as f:
    while remaining > 0:
      chunk = f.read(min(remaining, 1 << 20))
      if not chunk:
        break
      count += chunk.count(b'\n')
      remaining -= len(chunk)
  return count + 1


def file_ranges(paths: list[str], shard_bytes: int, text_key: str = 'text') -> list[FileRange]:
  """Each file cut into ranges of about `shard_bytes` (at least one per file, even an empty file), in order.
  Only the files' sizes are read."""
  if shard_bytes < 1:
    raise ConfigError(f'The shard size must be positive (config.data.shard_mb gives {shard_bytes} bytes).')
  ranges = []
  for path in paths:
    corpora.document_format(path)
    corpora.check_file(path)
    size = os.path.getsize(path)
    count = max(1, -(-size // shard_bytes))
    bounds = [i * size // count for i in range(count + 1)]
    ranges.extend(FileRange(path, start, stop, text_key) for start, stop in zip(bounds, bounds[1:]))
  return ranges


def _load_streaming(name: str, config_name: str | None, split: str):
  datasets = corpora._import('datasets', 'datasets', f'Hugging Face dataset {name!r}')
  try:
    return datasets.load_dataset(name, config_name, split=split, streaming=True)
  except (FileNotFoundError, ConnectionError) as error:
    raise ConfigError(
      f'Hugging Face dataset {name!r} was not found ({error}); set config.data.dataset to a cached dataset or a '
      'local folder of <split>.jsonl / .csv / .parquet files.'
    ) from None
  except ValueError as error:
    if 'split' in str(error).lower():
      raise ConfigError(
        f'Hugging Face dataset {name!r} has no split {split!r} ({error}). Set config.data.dataset_eval_split '
        '(training reads "train").'
      ) from None
    raise ConfigError(f'Hugging Face dataset {name!r}, split {split!r}: {error}') from None


@dataclasses.dataclass(frozen=True)
class HFShard:
  """Shard `index` of `num_shards` of a Hugging Face dataset split, streamed; empty documents are skipped."""

  name: str
  config_name: str | None
  split: str
  index: int
  num_shards: int
  text_key: str = 'text'

  def describe(self) -> dict:
    return {'dataset_shard': self.index, 'of': self.num_shards}

  def read(self) -> Iterator[tuple[str, int]]:
    rows = _load_streaming(self.name, self.config_name, self.split)
    if rows.n_shards != self.num_shards:
      raise ConfigError(
        f'Hugging Face dataset {self.name!r} now has {rows.n_shards} shards, not the {self.num_shards} planned: '
        'its files changed; prepare the store again in a new folder.'
      )
    for row in rows.shard(num_shards=self.num_shards, index=self.index):
      if self.text_key not in row:
        raise ConfigError(
          f'Hugging Face dataset {self.name!r} has no column {self.text_key!r}; its columns: {", ".join(row)}.'
        )
      text = (row[self.text_key] or '').strip()
      if text:
        yield text, len(text.encode('utf-8'))


def hf_shards(name: str, config_name: str | None, split: str, text_key: str = 'text') -> list[HFShard]:
  """One `HFShard` per shard of the streamed dataset (e.g. one per file of a local folder)."""
  count = _load_streaming(name, config_name, split).n_shards
  return [HFShard(name, config_name, split, index, count, text_key) for index in range(count)]


@dataclasses.dataclass(frozen=True)
class BibleShard:
  """A Bible translation's split, one document per chapter or verse (`corpora.bible_documents`)."""

  language: str
  split: str
  unit: str

  def describe(self) -> dict:
    return {'bible': self.language, 'split': self.split, 'unit': self.unit}

  def read(self) -> Iterator[tuple[str, int]]:
    for text in corpora.bible_documents(self.language, self.split, unit=self.unit):
      yield text, len(text.encode('utf-8'))


def documents(shard) -> Iterator[str]:
  """A source shard's documents."""
  return (text for text, _ in shard.read())
