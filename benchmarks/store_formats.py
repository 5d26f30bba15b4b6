"""Which on-disk format reads documents fastest by random index? The token store's flat arrays (uint16 tokens +
int64 offsets per shard, memory-mapped: `transformer.data.store.TokenStore`) against ArrayRecord read through
grain (`grain.python.ArrayRecordDataSource`, one record per document; group_size 1, the setting for random
access). Both hold the same synthetic corpus (document lengths drawn log-normally, uint16 ids); each format is
read in its own process, the formats alternating round by round; a read returns the document's int32 ids.
Prints a markdown table of median documents/s and MB/s (of uint16 token bytes) and the ratio to flat arrays.

    python benchmarks/store_formats.py --documents 50000 --reads 20000 --rounds 3

The files are read warm (just written or read: in the page cache), as a training run's re-reads are; a cold
read is the disk's speed for either format.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ('flat', 'arrayrecord')
SHARD_DOCUMENTS = 10_000


def synthetic_documents(count: int, seed: int):
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(np.log(300), 0.8, count).astype(int), 1, 20_000)
  for length in lengths:
    yield rng.integers(4, 32_000, length, dtype=np.uint16)


def write_flat(directory: str, count: int, seed: int) -> None:
  """The token store's layout, with a manifest `TokenStore` reads."""
  shards, documents = [], list(synthetic_documents(count, seed))
  for index, start in enumerate(range(0, count, SHARD_DOCUMENTS)):
    part = documents[start : start + SHARD_DOCUMENTS]
    name = f'shard-{index:05d}'
    tokens = np.concatenate(part).astype('<u2')
    tokens.tofile(os.path.join(directory, f'{name}.tokens'))
    offsets = np.zeros(len(part) + 1, np.int64)
    np.cumsum([len(doc) for doc in part], out=offsets[1:])
    np.save(os.path.join(directory, f'{name}.offsets.npy'), offsets)
    files = {'tokens': f'{name}.tokens', 'offsets': f'{name}.offsets.npy'}
    sizes = {key: os.path.getsize(os.path.join(directory, file)) for key, file in files.items()}
    shards.append({'documents': len(part), 'tokens': len(tokens), 'files': files, 'bytes': sizes})
  manifest = {'dtype': '<u2', 'shards': shards, 'fingerprint': 'synthetic'}
  with open(os.path.join(directory, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)


def write_arrayrecord(directory: str, count: int, seed: int) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter

  documents = synthetic_documents(count, seed)
  for index, start in enumerate(range(0, count, SHARD_DOCUMENTS)):
    writer = ArrayRecordWriter(os.path.join(directory, f'shard-{index:05d}.array_record'), 'group_size:1')
    for _ in range(min(SHARD_DOCUMENTS, count - start)):
      writer.write(next(documents).astype('<u2').tobytes())
    writer.close()


def open_source(fmt: str, directory: str):
  """(a random-access source, a function from its record to int32 ids)."""
  if fmt == 'flat':
    from transformer.data.store import TokenStore

    with open(os.path.join(directory, 'manifest.json')) as f:
      return TokenStore(directory, json.load(f)), lambda record: record['targets']
  import grain.python as grain

  paths = sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith('.array_record'))
  return grain.ArrayRecordDataSource(paths), lambda record: np.frombuffer(record, '<u2').astype(np.int32)


def read_once(fmt: str, directory: str, reads: int, seed: int) -> dict:
  """In its own process: `reads` documents at random indices."""
  source, ids_of = open_source(fmt, directory)
  indices = np.random.default_rng(seed).integers(0, len(source), reads)
  for index in indices[:100]:  # opening files and maps: not what is measured
    ids_of(source[int(index)])
  tokens, start = 0, time.perf_counter()
  for index in indices:
    tokens += len(ids_of(source[int(index)]))
  seconds = time.perf_counter() - start
  return {'docs_per_s': reads / seconds, 'mb_per_s': tokens * 2 / 1e6 / seconds}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--documents', type=int, default=50_000)
  parser.add_argument('--reads', type=int, default=20_000)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--read', choices=FORMATS, help=argparse.SUPPRESS)  # a child: read one format
  parser.add_argument('--dir', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.read:
    print(json.dumps(read_once(args.read, args.dir, args.reads, args.seed)))
    return
  with tempfile.TemporaryDirectory(prefix='store-formats-') as root:
    directories = {fmt: os.path.join(root, fmt) for fmt in FORMATS}
    for fmt, directory in directories.items():
      os.makedirs(directory)
      {'flat': write_flat, 'arrayrecord': write_arrayrecord}[fmt](directory, args.documents, args.seed)
    sizes = {fmt: sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)) for fmt, d in directories.items()}
    results = {fmt: [] for fmt in FORMATS}
    for round_ in range(args.rounds):
      for fmt in FORMATS if round_ % 2 == 0 else FORMATS[::-1]:
        command = [sys.executable, __file__, '--read', fmt, '--dir', directories[fmt], '--reads', str(args.reads)]
        command += ['--seed', str(args.seed + round_)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        results[fmt].append(json.loads(done.stdout.strip().splitlines()[-1]))
  flat = statistics.median(r['docs_per_s'] for r in results['flat'])
  print(f'{args.documents} documents, {args.reads} random reads per round, {args.rounds} rounds (median)\n')
  print('| format | documents/s | MB/s | vs flat | on disk (MB) |\n|---|---|---|---|---|')
  for fmt in FORMATS:
    docs = statistics.median(r['docs_per_s'] for r in results[fmt])
    mb = statistics.median(r['mb_per_s'] for r in results[fmt])
    print(f'| {fmt} | {docs:,.0f} | {mb:,.1f} | {docs / flat:.2f}x | {sizes[fmt] / 1e6:.1f} |')


if __name__ == '__main__':
  main()
