"""`--mode prepare` (transformer/experiment/prepare.py) through the real launch.py: the summary, a re-run, a resume
after SIGKILL that redoes no finished shard and ends with the bytes of an uninterrupted prepare, and its refusals."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from transformer.config import ConfigError
from transformer.experiment import overrides, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 'in the beginning god created heaven and earth was without form void darkness upon face of deep'.split()


def write_corpus(folder, count: int = 300):
  folder.mkdir(parents=True, exist_ok=True)
  rng = random.Random(1)
  docs = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(count)]
  (folder / 'a.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs[: count // 2]))
  (folder / 'b.txt').write_text('\n'.join(docs[count // 2 :]) + '\n')


def command(corpus, store_path, *extra):
  return [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config',
    os.path.join(ROOT, 'experiments', 'text.py') + ':tiny',
    '--mode',
    'prepare',
    '--config.data.corpus=files',
    f'--config.data.train_files={corpus}/*',
    f'--config.data.store={store_path}',
    '--config.data.vocab_size=60',
    f'--config.data.shard_mb={1500 / 2**20}',
    *extra,
  ]


def environment(tmp_path, **extra):
  return dict(os.environ, TRANSFORMER_CACHE=str(tmp_path / 'cache'), **extra)


def run(tmp_path, corpus, store_path, *extra) -> str:
  done = subprocess.run(
    command(corpus, store_path, *extra), env=environment(tmp_path), capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def files_of(path) -> dict:
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_prepare_prints_a_summary_and_a_rerun_does_nothing(tmp_path):
  write_corpus(tmp_path / 'corpus')
  out = run(tmp_path, tmp_path / 'corpus', tmp_path / 'store', '--config.data.prepare_workers=2')
  manifest = json.loads((tmp_path / 'store' / 'manifest.json').read_text())
  shards = len(manifest['shards'])
  assert shards > 4
  assert sum(line.startswith('shard ') for line in out.splitlines()) == shards  # a progress line per shard
  summary = out.strip().splitlines()[-1]
  assert summary.startswith(f'Token store {tmp_path / "store"}: 300 documents, {manifest["tokens"]:,} tokens in ')
  assert f'({shards} prepared now: ' in summary and ' s); fingerprint ' + manifest['fingerprint'] in summary
  before = files_of(tmp_path / 'store')
  out = run(tmp_path, tmp_path / 'corpus', tmp_path / 'store')
  assert f'{tmp_path / "store"} is prepared already.' in out
  assert '(0 prepared now: ' in out
  assert files_of(tmp_path / 'store') == before


def test_a_killed_prepare_resumes_without_redoing_finished_shards_and_ends_as_an_uninterrupted_one(tmp_path):
  write_corpus(tmp_path / 'corpus')
  held = subprocess.Popen(
    command(tmp_path / 'corpus', tmp_path / 'store', '--config.data.prepare_workers=1'),
    env=environment(tmp_path, TRANSFORMER_TEST_HOLD_PREPARE='3'),  # shard 3's worker stops after its first batch
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,  # its own process group: the kill takes its worker too
  )
  try:
    deadline = time.monotonic() + 120
    for line in held.stderr:
      if 'Holding shard 3' in line or time.monotonic() > deadline:
        break
    assert held.poll() is None, 'prepare ended before shard 3'
  finally:
    os.killpg(held.pid, signal.SIGKILL)
    held.wait()
  store_path = tmp_path / 'store'
  assert [(store_path / f'shard-0000{i}.json').exists() for i in range(5)] == [True, True, True, False, False]
  assert (store_path / 'shard-00003.tokens').stat().st_size > 0  # a partial file, overwritten on resume
  assert not (store_path / 'manifest.json').exists()
  from transformer.data import store

  with pytest.raises(ConfigError, match='prepare was interrupted: run the same --mode prepare again to finish it'):
    store.open_store(str(store_path))
  finished = {name: os.stat(store_path / name).st_mtime_ns for name in os.listdir(store_path) if name < 'shard-00003'}

  out = run(tmp_path, tmp_path / 'corpus', store_path)
  assert '3 of ' in out and ' shards are done already: skipping them.' in out
  assert {name: os.stat(store_path / name).st_mtime_ns for name in finished} == finished  # not written again
  progress = [line.split(':')[0] for line in out.splitlines() if line.startswith('shard ')]
  assert progress and not any(line.startswith(('shard 1/', 'shard 2/', 'shard 3/')) for line in progress)

  run(tmp_path, tmp_path / 'corpus', tmp_path / 'uninterrupted')
  assert files_of(store_path) == files_of(tmp_path / 'uninterrupted')


def test_prepare_is_for_the_text_task_and_its_config_errors_are_one_message(tmp_path):
  config = overrides.load_config(os.path.join(ROOT, 'experiments', 'translation.py') + ':tiny')
  with pytest.raises(ConfigError) as error:
    prepare.run_prepare(config)
  assert str(error.value).startswith(
    "--mode prepare builds the token store of config.task='text'; this config's task is 'translation'"
  )
  done = subprocess.run(
    command(tmp_path / 'nothing', tmp_path / 'store'), env=environment(tmp_path), capture_output=True, text=True
  )
  assert done.returncode != 0
  assert f'{tmp_path / "nothing"}/*: the pattern matches no files.' in done.stderr
  assert 'Traceback' not in done.stderr
