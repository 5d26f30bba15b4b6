"""The on-disk token store: a corpus tokenized ONCE, read by document index with memory bounded by construction.

A store is a folder:
  tokenizer.model          the SentencePiece model (pad 0, bos 1, eos 2, unk 3), trained on a sample of the corpus
  plan.json                what is being built: format, source and tokenizer settings, the source shards
  shard-00000.tokens       the shard's documents' ids back to back, little-endian uint16 (uint32 past 65,536 ids)
  shard-00000.offsets.npy  int64, documents + 1 entries: document d is tokens[offsets[d]:offsets[d + 1]]
  shard-00000.json         the shard's counts, source bytes read, sha256 of its two files, its source: written
                           LAST and atomically, it is the shard's done marker
  manifest.json            written last of all: the store is finished (format, source, tokenizer settings and
                           sha256, shards, totals, and the content fingerprint)
Files are memory-mapped (`np.memmap`, `np.load(mmap_mode='r')`): a reader holds the pages it touches, whatever the
corpus size. Flat arrays beat ArrayRecord for random access by document here (benchmarks/store_formats.py).

`prepare` tokenizes the source shards (`transformer.data.sources`) with worker processes (spawned: the parent
may have JAX loaded; the workers import only this module's light dependencies), each streaming its shard and
encoding batches with SentencePiece's C++ batch encoder. A shard depends only on its source and the tokenizer,
so any number of workers writes the same bytes; after a kill, a re-run skips the shards whose done marker
matches and overwrites the partial files of the others.
"""

import concurrent.futures
import dataclasses
import fcntl
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from transformer.config import ConfigError
from transformer.files import write_atomic

FORMAT_VERSION = 1
MANIFEST, PLAN, TOKENIZER = 'manifest.json', 'plan.json', 'tokenizer.model'
HOLD_ENV = 'TRANSFORMER_TEST_HOLD_PREPARE'  # tests: the worker of this shard stops after its first batch
_BATCH_DOCUMENTS, _BATCH_CHARS = 1024, 1 << 20  # one call of the batch encoder


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<u4')


def shard_name(index: int) -> str:
  return f'shard-{index:05d}'


def _files(name: str) -> dict:
  return {'tokens': f'{name}.tokens', 'offsets': f'{name}.offsets.npy'}


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(functools.partial(f.read, 1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  write_atomic(path, json.dumps(value, indent=1, sort_keys=True) + '\n')


def fingerprint(tokenizer_sha256: str, shards: list[dict]) -> str:
  """sha256 over the format version, the tokenizer's sha256 and the shards' file checksums in order."""
  digest = hashlib.sha256(f'{FORMAT_VERSION}:{tokenizer_sha256}'.encode())
  for shard in shards:
    digest.update(f':{shard["sha256"]["tokens"]}:{shard["sha256"]["offsets"]}'.encode())
  return digest.hexdigest()


def cache_key(source: dict, tokenizer: dict) -> str:
  """The store's name in the cache: a hash of the source description, tokenizer settings and format version."""
  text = json.dumps({'format': FORMAT_VERSION, 'source': source, 'tokenizer': tokenizer}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _difference(wanted: dict, stored: dict):
  """The first top-level key whose values differ, with both values (a list's first differing item)."""
  for key in sorted(set(wanted) | set(stored)):
    a, b = wanted.get(key), stored.get(key)
    if a == b:
      continue
    if isinstance(a, list) and isinstance(b, list):
      for i, (x, y) in enumerate(itertools.zip_longest(a, b)):
        if x != y:
          return f'{key}[{i}]', x, y
    return key, a, b
  return None


# ----------------------------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass(frozen=True)
class _Job:
  store: str
  index: int
  shard: object  # a transformer.data.sources shard
  dtype: str
  threads: int
  tokenizer_sha256: str


def _tokenize_shard(job: _Job) -> dict:
  """In a worker process: streams the shard's documents, encodes them in batches, writes its files, then its
  done marker. Returns the marker's content."""
  import sentencepiece as spm

  processor = spm.SentencePieceProcessor(model_file=os.path.join(job.store, TOKENIZER))
  name, dtype = shard_name(job.index), np.dtype(job.dtype)
  files = {key: os.path.join(job.store, file) for key, file in _files(name).items()}
  hold = os.environ.get(HOLD_ENV) == str(job.index)
  digest, lengths, source_bytes = hashlib.sha256(), [], 0
  with open(files['tokens'], 'wb') as out:  # a partial file from an interrupted run is overwritten

    def encode(batch):
      ids = processor.encode(batch, out_type=int, num_threads=job.threads)
      sizes = [len(row) for row in ids]
      data = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=sum(sizes)).tobytes()
      out.write(data)
      digest.update(data)
      lengths.extend(sizes)
      if hold:
        out.flush()
        print(f'Holding shard {job.index} after its first batch ({HOLD_ENV})', file=sys.stderr, flush=True)
        time.sleep(3600)

    batch, chars = [], 0
    for text, size in job.shard.read():
      batch.append(text)
      chars, source_bytes = chars + len(text), source_bytes + size
      if len(batch) >= _BATCH_DOCUMENTS or chars >= _BATCH_CHARS:
        encode(batch)
        batch, chars = [], 0
    if batch:
      encode(batch)
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  buffer = io.BytesIO()
  np.save(buffer, offsets)
  with open(files['offsets'], 'wb') as out:
    out.write(buffer.getvalue())
  marker = {
    'name': name,
    'documents': len(lengths),
    'tokens': int(offsets[-1]),
    'source_bytes': source_bytes,
    'source': job.shard.describe(),
    'tokenizer_sha256': job.tokenizer_sha256,
    'files': _files(name),
    'bytes': {'tokens': os.path.getsize(files['tokens']), 'offsets': len(buffer.getvalue())},
    'sha256': {'tokens': digest.hexdigest(), 'offsets': hashlib.sha256(buffer.getvalue()).hexdigest()},
  }
  _write_json(os.path.join(job.store, f'{name}.json'), marker)
  return marker


def _sizes_match(path: str, shard: dict) -> bool:
  for key, file in shard['files'].items():
    full = os.path.join(path, file)
    if not os.path.isfile(full) or os.path.getsize(full) != shard['bytes'][key]:
      return False
  return True


def _finished_shard(path: str, index: int, shard, tokenizer_sha256: str) -> dict | None:
  """The done marker of shard `index` if it is there and describes this source shard and tokenizer."""
  marker_path = os.path.join(path, f'{shard_name(index)}.json')
  if not os.path.isfile(marker_path):
    return None
  marker = _read_json(marker_path)
  if marker.get('source') != shard.describe() or marker.get('tokenizer_sha256') != tokenizer_sha256:
    return None
  return marker if _sizes_match(path, marker) else None


def sample_texts(shards, sample_bytes: int) -> list[str]:
  """A deterministic sample of the corpus to train the tokenizer on: the first documents of every shard, about
  `sample_bytes / len(shards)` bytes of each (the whole corpus when it is smaller than `sample_bytes`)."""
  per_shard = -(-sample_bytes // max(len(shards), 1))
  texts = []
  for shard in shards:
    taken = 0
    for text, _ in shard.read():
      if taken >= per_shard:
        break
      texts.append(text)
      taken += len(text.encode('utf-8'))
  return texts


def _tokenizer(path: str, plan: dict, shards, tokenizer: dict, name: str, cache_dir: str | None) -> str:
  """Puts the store's tokenizer.model in place (trained on `sample_texts`, or the one of an interrupted run of
  the same plan) and returns its sha256."""
  model_path = os.path.join(path, TOKENIZER)
  plan_path = os.path.join(path, PLAN)
  if os.path.isfile(plan_path):
    before = _read_json(plan_path)
    sha = before.pop('tokenizer_sha256', None)
    if before != plan:
      key, wanted, stored = _difference(plan, before) or ('plan', plan, before)
      raise ConfigError(
        f'{path} holds an unfinished store of other settings ({key}: {stored!r} there, {wanted!r} now): delete '
        'the folder, or set config.data.store to another path.'
      )
    if os.path.isfile(model_path) and _sha256_file(model_path) == sha:
      return sha
  from transformer.data import tokenizer as tokenizer_lib  # sentencepiece

  sample = sample_texts(shards, int(tokenizer['tokenizer_sample_mb'] * 2**20))
  trained = tokenizer_lib.train_tokenizer(
    sample, int(tokenizer['vocab_size']), model_type=tokenizer['tokenizer'], name=name, cache_dir=cache_dir
  )
  proto = trained.processor.serialized_model_proto()
  write_atomic(model_path, proto)
  sha = hashlib.sha256(proto).hexdigest()
  _write_json(plan_path, {**plan, 'tokenizer_sha256': sha})
  return sha


def _run(jobs, workers: int):
  """Yields (shard index, done marker) as each job finishes: in this process for one worker (a small corpus
  built on first use spawns nothing), else in spawned worker processes."""
  if workers == 1:
    for job in jobs:
      yield job.index, _tokenize_shard(job)
    return
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
    futures = {pool.submit(_tokenize_shard, job): job.index for job in jobs}
    try:
      for future in concurrent.futures.as_completed(futures):
        yield futures[future], future.result()
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise


def prepare(
  path: str,
  *,
  source: dict,
  shards: list,
  tokenizer: dict,
  workers: int = 0,
  name: str = 'corpus',
  tokenizer_cache_dir: str | None = None,
  log=logging.info,
) -> dict:
  """Builds (or finishes) the store at `path` from the source `shards`; returns a summary.

  `source`: the description the manifest keeps (the corpus settings); `tokenizer`: `vocab_size`, `tokenizer`
  (model type) and `tokenizer_sample_mb`; `workers`: processes (0: one per CPU); `log`: progress lines."""
  start = time.perf_counter()
  manifest_path = os.path.join(path, MANIFEST)
  if os.path.isfile(manifest_path):
    manifest = open_store(path, source, tokenizer).manifest
    log(f'{path} is prepared already.')
    return _summary(path, manifest, done=0, read=0, seconds=time.perf_counter() - start)
  os.makedirs(path, exist_ok=True)
  plan = {
    'format': FORMAT_VERSION,
    'source': source,
    'tokenizer': tokenizer,
    'shards': [shard.describe() for shard in shards],
  }
  tokenizer_sha = _tokenizer(path, plan, shards, tokenizer, name, tokenizer_cache_dir)
  tokenizer_s, start = time.perf_counter() - start, time.perf_counter()  # a one-off: timed apart
  dtype = token_dtype(int(tokenizer['vocab_size'])).str
  markers = {index: _finished_shard(path, index, shard, tokenizer_sha) for index, shard in enumerate(shards)}
  todo = [index for index, marker in markers.items() if marker is None]
  if len(todo) < len(shards):
    log(f'{len(shards) - len(todo)} of {len(shards)} shards are done already: skipping them.')
  read = 0
  if todo:
    cpus = os.cpu_count() or 1
    workers = max(1, min(workers or cpus, len(todo)))
    threads = max(1, cpus // workers)
    jobs = [_Job(path, index, shards[index], dtype, threads, tokenizer_sha) for index in todo]
    for index, marker in _run(jobs, workers):
      markers[index] = marker
      read += marker['source_bytes']
      elapsed = time.perf_counter() - start
      log(
        f'shard {index + 1}/{len(shards)}: {marker["documents"]} documents, {marker["tokens"]} '
        f'tokens, {marker["source_bytes"] / 1e6:.1f} MB ({read / 1e6 / max(elapsed, 1e-9):.1f} MB/s so far)'
      )
  shard_list = [markers[index] for index in range(len(shards))]
  _check_documents(shards, shard_list)
  manifest = {
    'format': FORMAT_VERSION,
    'source': source,
    'tokenizer': {**tokenizer, 'sha256': tokenizer_sha},
    'dtype': dtype,
    'shards': shard_list,
    'documents': sum(shard['documents'] for shard in shard_list),
    'tokens': sum(shard['tokens'] for shard in shard_list),
    'source_bytes': sum(shard['source_bytes'] for shard in shard_list),
    'fingerprint': fingerprint(tokenizer_sha, shard_list),
  }
  _write_json(manifest_path, manifest)
  summary = _summary(path, manifest, done=len(todo), read=read, seconds=time.perf_counter() - start)
  return {**summary, 'tokenizer_s': tokenizer_s}


def _check_documents(shards, markers: list[dict]) -> None:
  """As `corpora.read_documents`: a file without documents (all its ranges empty), or a corpus without any, is
  an error."""
  from transformer.data import corpora

  per_file = {}
  for shard, marker in zip(shards, markers):
    if hasattr(shard, 'path'):
      per_file[shard.path] = per_file.get(shard.path, 0) + marker['documents']
  for path, count in per_file.items():
    if not count:
      raise ConfigError(corpora.no_documents_message(path))
  if not sum(marker['documents'] for marker in markers):
    raise ConfigError('The corpus has no documents: check config.data.')


def _summary(path: str, manifest: dict, done: int, read: int, seconds: float) -> dict:
  return {
    'path': path,
    'documents': manifest['documents'],
    'tokens': manifest['tokens'],
    'shards': len(manifest['shards']),
    'shards_prepared': done,
    'mb_read': read / 1e6,
    'seconds': seconds,  # tokenizing the shards (the tokenizer's training is `tokenizer_s`)
    'mb_per_s': read / 1e6 / max(seconds, 1e-9),
    'tokenizer_s': 0.0,
    'fingerprint': manifest['fingerprint'],
  }


def prepare_cached(path: str, **kwargs) -> dict:
  """`prepare` into `path`.partial, then renamed to `path`: processes building the same store at once wait for
  one another (a file lock) and never see half of one; an interrupted build resumes from the `.partial`."""
  if os.path.isfile(os.path.join(path, MANIFEST)):
    return prepare(path, **kwargs)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(f'{path}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.isfile(os.path.join(path, MANIFEST)):  # another process finished it while this one waited
      return prepare(path, **kwargs)
    if os.path.isdir(path):  # a folder without a manifest is no store of this cache's making
      shutil.rmtree(path)
    partial = f'{path}.partial'
    summary = prepare(partial, **kwargs)
    os.rename(partial, path)
  return {**summary, 'path': path}


# ----------------------------------------------------------------------------------------------
# Reading.


def open_store(path: str, source: dict | None = None, tokenizer: dict | None = None) -> 'TokenStore':
  """The store at `path`, checked: it exists, is finished, was prepared from `source` with `tokenizer` settings
  (when given), and its files have the sizes the manifest records. Otherwise one ConfigError saying what to do."""
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    if os.path.isfile(os.path.join(path, PLAN)):
      raise ConfigError(
        f'The token store {path} is unfinished: prepare was interrupted: run the same --mode prepare again to '
        'finish it.'
      )
    raise ConfigError(
      f'There is no token store at {path}: run --mode prepare with this config (and --config.data.store={path}) '
      "to build it, or set config.data.store='' to build one in the cache on first use."
    )
  manifest = _read_json(manifest_path)
  if manifest.get('format') != FORMAT_VERSION:
    raise ConfigError(
      f'The token store {path} has format {manifest.get("format")!r}; this code reads format {FORMAT_VERSION}: '
      'prepare it again (--mode prepare into a new folder).'
    )
  stored_tokenizer = {key: value for key, value in manifest['tokenizer'].items() if key != 'sha256'}
  for wanted, stored in ((source, manifest['source']), (tokenizer, stored_tokenizer)):
    difference = wanted is not None and _difference(wanted, stored)
    if difference:
      key, value, was = difference
      raise ConfigError(
        f'The token store {path} was prepared with config.data.{key}={was!r}, but the config has {value!r}: '
        f"set config.data.{key} back, or set config.data.store to a store prepared with these settings ('' "
        'builds one in the cache).'
      )
  for shard in manifest['shards']:
    for key, file in shard['files'].items():
      full = os.path.join(path, file)
      size = os.path.getsize(full) if os.path.isfile(full) else None
      if size != shard['bytes'][key]:
        raise ConfigError(
          f'The token store {path} is damaged: {file} has {"no file" if size is None else f"{size} bytes"}, the '
          f'manifest says {shard["bytes"][key]} bytes. Prepare it again: delete the folder and run --mode prepare.'
        )
  return TokenStore(path, manifest)


class TokenStore:
  """A grain random-access source of a store's documents: `store[i]` is `{'targets': int32 ids}` of document i
  (corpus order, no EOS). Picklable; each process maps the shard files it reads, when it first reads them."""

  def __init__(self, path: str, manifest: dict):
    self.path, self.manifest = path, manifest
    self._starts = np.concatenate([[0], np.cumsum([shard['documents'] for shard in manifest['shards']])])
    self._dtype = np.dtype(manifest['dtype'])
    self._maps = {}  # shard -> (tokens, offsets) memory maps

  @property
  def fingerprint(self) -> str:
    return self.manifest['fingerprint']

  @functools.cached_property
  def tokenizer(self):
    from transformer.data import tokenizer

    return tokenizer.load_tokenizer(os.path.join(self.path, TOKENIZER))

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _shard(self, index: int):
    if index not in self._maps:
      shard = self.manifest['shards'][index]
      files = {key: os.path.join(self.path, file) for key, file in shard['files'].items()}
      tokens = np.memmap(files['tokens'], self._dtype, mode='r') if shard['tokens'] else np.zeros(0, self._dtype)
      self._maps[index] = tokens, np.load(files['offsets'], mmap_mode='r')
    return self._maps[index]

  def __getitem__(self, index) -> dict:
    count = len(self)
    index = int(index)
    if index < 0:
      index += count
    if not 0 <= index < count:
      raise IndexError(f'document {index} of a store of {count}')
    shard = int(np.searchsorted(self._starts, index, side='right')) - 1
    tokens, offsets = self._shard(shard)
    local = index - int(self._starts[shard])
    return {'targets': np.asarray(tokens[offsets[local] : offsets[local + 1]], np.int32)}

  def __getstate__(self):
    return {'path': self.path, 'manifest': self.manifest}

  def __setstate__(self, state):
    self.__init__(state['path'], state['manifest'])

  def __repr__(self):
    return f'TokenStore({self.path!r}, documents={len(self)}, fingerprint={self.fingerprint[:12]})'
