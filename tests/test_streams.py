"""Per-row streams (`transformer.data.streams`): any number of processes, each building only its own rows,
together build the one-process global batch bitwise; their states resume on any other process count; an
epoch reads every document once; each process reads only its share; mismatches are refused."""

import collections
import functools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer.checkpoint import ProcessStateHandler
from transformer.config import ConfigError
from transformer.data import pipeline
from transformer.tasks.text import windows

BATCH, SEQ_LEN, STEPS = 64, 16, 50
PROCESSES = (1, 2, 4, 16, 64)


class Documents:
  """A token store stand-in: document i's token j is 1000 (i + 1) + j + 3; it counts which documents it is
  asked for (`reads`)."""

  def __init__(self, count=400, seed=0, fingerprint='abc'):
    lengths = np.random.default_rng(seed).integers(1, 24, count)  # some longer than a row: several windows
    self.docs = [1000 * (i + 1) + np.arange(n) + 3 for i, n in enumerate(lengths)]
    self.reads = collections.Counter()
    self.fingerprint = fingerprint

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, index):
    self.reads[index] += 1
    return {'targets': self.docs[index]}


def _iterator(docs, processes=1, index=0, pack=True, seed=7, streams_count=0, batch=BATCH):
  rows = batch // processes
  return pipeline.train_iter(
    docs,
    seq_len=SEQ_LEN,
    batch_size=batch,
    seed=seed,
    pack=pack,
    rows=(index * rows, (index + 1) * rows),
    streams=streams_count,
    examples_of=functools.partial(_windows, length=SEQ_LEN),
    prefetch=0,
  )


def _windows(record, length):
  return windows(record['targets'], length)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_equal(batches, expected):
  assert len(batches) == len(expected)
  for step, (got, want) in enumerate(zip(batches, expected)):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f'step {step + 1}, {key}')


def _gathered(processes, docs_per_process, pack, steps=STEPS, states=None, streams_count=0):
  """`steps` global batches assembled from `processes` iterators (each from `states` when given)."""
  iterators = [
    _iterator(docs, processes, i, pack=pack, streams_count=streams_count) for i, docs in enumerate(docs_per_process)
  ]
  if states is not None:
    for it in iterators:
      it.set_state(states)
  parts = [_take(it, steps) for it in iterators]
  batches = [{key: np.concatenate([p[s][key] for p in parts]) for key in parts[0][s]} for s in range(steps)]
  return batches, iterators


@functools.cache
def _reference(pack):
  docs = Documents()
  batches, _ = _gathered(1, [docs], pack)
  return batches, docs.reads


@pytest.mark.parametrize('pack', [True, False])
@pytest.mark.parametrize('processes', PROCESSES)
def test_any_process_count_builds_the_one_process_batch_reading_only_its_share(processes, pack):
  reference, reference_reads = _reference(pack)
  docs = [Documents() for _ in range(processes)]
  batches, _ = _gathered(processes, docs, pack)
  _assert_equal(batches, reference)
  if pack:  # the rows really are packed: several documents' windows per row
    assert np.mean([(b['targets_segment_ids'].max(axis=1) > 1).mean() for b in reference]) > 0.3
  # Each process reads only the documents of its own streams: together exactly what one process reads.
  assert sum((d.reads for d in docs), collections.Counter()) == reference_reads
  total = sum(reference_reads.values())
  for d in docs:
    assert abs(sum(d.reads.values()) - total / processes) <= 0.25 * total / processes


@pytest.mark.parametrize('pack', [True, False])
def test_saved_at_four_processes_mid_pack_resumes_at_one_and_at_sixteen(pack):
  reference, _ = _reference(pack)
  _, iterators = _gathered(4, [Documents() for _ in range(4)], pack, steps=7)
  states = [it.get_state() for it in iterators]
  if pack:  # mid-pack: rows begun and not yet handed out are part of the state
    assert any(stream['open'] for state in states for stream in state['streams'].values())
  for processes in (1, 16):
    resumed, _ = _gathered(processes, [Documents() for _ in range(processes)], pack, steps=STEPS - 7, states=states)
    _assert_equal(resumed, reference[7:])


def test_one_process_state_resumes_itself_through_the_prefetch_thread():
  docs = Documents()
  run = lambda: pipeline.train_iter(
    docs, seq_len=SEQ_LEN, batch_size=8, seed=1, examples_of=functools.partial(_windows, length=SEQ_LEN)
  )
  whole, partial = _take(run(), 12), run()
  _take(partial, 5)
  resumed = run()
  resumed.set_state(partial.get_state())  # the batches the thread made ahead are not counted as handed out
  _assert_equal(_take(resumed, 7), whole[5:])


class Logged(Documents):
  """Documents that log the order they are read in."""

  def __init__(self, count):
    super().__init__(count=count)
    self.docs = [d[: SEQ_LEN - 1] for d in self.docs]  # one window each (EOS included): a row reads one record
    self.log = []

  def __getitem__(self, index):
    self.log.append(index)
    return super().__getitem__(index)


def test_an_epoch_reads_every_document_once():
  """Stream k reads records k, k + S, ... of the epochs' shuffled order: the first N / S records of the S
  streams are every document exactly once, and so are the next N / S, in another order. Eight processes of
  one stream each: each one's log is its stream's reads."""
  docs = [Logged(96) for _ in range(8)]
  for i, d in enumerate(docs):
    _take(_iterator(d, processes=8, index=i, batch=8, pack=False), 24)
  assert all(len(d.log) == 24 for d in docs)
  first, second = [j for d in docs for j in d.log[:12]], [j for d in docs for j in d.log[12:]]
  assert sorted(first) == sorted(second) == list(range(96))
  assert first != second


def test_unpacked_rows_are_each_document_once_per_epoch():
  docs = Documents(count=64)
  docs.docs = [d[: SEQ_LEN - 1] for d in docs.docs]  # one window each (EOS included)
  iterator = _iterator(docs, batch=8, pack=False)
  rows = [row for batch in _take(iterator, 16) for row in batch['targets']]
  ids = [int(row[0]) // 1000 - 1 for row in rows]
  assert sorted(ids[:64]) == list(range(64)) and sorted(ids[64:]) == list(range(64))
  for row, i in zip(rows, ids):  # whole document + EOS, padded
    n = len(docs.docs[i])
    np.testing.assert_array_equal(row[:n], docs.docs[i])
    assert row[n] == 2 and not row[n + 1 :].any()


@settings(max_examples=8, deadline=None)
@given(
  streams_count=st.sampled_from([1, 2, 4, 8]),
  processes=st.sampled_from([1, 2, 4]),
  pack=st.booleans(),
  seed=st.integers(0, 2**31),
)
def test_streams_and_process_counts_that_divide_agree(streams_count, processes, pack, seed):
  """S streams fill B / S rows each; any process count dividing S gives the one-process batch."""
  if streams_count % processes:
    return
  one, _ = _gathered(1, [Documents(count=50, seed=seed % 7)], pack, steps=6, streams_count=streams_count)
  docs = [Documents(count=50, seed=seed % 7) for _ in range(processes)]
  many, _ = _gathered(processes, docs, pack, steps=6, streams_count=streams_count)
  _assert_equal(many, one)


def test_packing_fills_rows():
  batches, _ = _reference(True)
  filled = np.mean([(b['targets'] != 0).mean() for b in batches])
  assert filled > 0.9, filled


def test_a_process_count_that_cuts_a_stream_is_refused():
  with pytest.raises(ConfigError, match=r'rows \[0, 2\).*process count must divide config.data.streams=4'):
    pipeline.train_iter(Documents(), seq_len=SEQ_LEN, batch_size=16, seed=0, rows=(0, 2), streams=4)
  with pytest.raises(ConfigError, match='config.data.streams=3 does not divide the batch of 16'):
    pipeline.train_iter(Documents(), seq_len=SEQ_LEN, batch_size=16, seed=0, streams=3)


@pytest.mark.parametrize(
  'change, key',
  [
    (dict(seed=8), 'seed'),
    (dict(pack=False), 'pack'),
    (dict(streams_count=32), 'streams'),
    (dict(docs=Documents(fingerprint='other')), 'fingerprint'),
  ],
)
def test_a_state_of_other_data_settings_is_refused(change, key):
  state = _iterator(Documents(), 2, 0).get_state()
  settings_ = dict(docs=Documents(), processes=2, index=0)
  settings_.update(change)
  with pytest.raises(ConfigError, match=rf'saved with {key}=.*A data position resumes only with the same data'):
    _iterator(**settings_).set_state(state)


def test_an_old_pipeline_state_is_refused_with_what_to_do():
  with pytest.raises(ConfigError, match='older version of the input pipeline.*start a new workdir'):
    _iterator(Documents()).set_state({'next_index': 12})


def test_checkpoint_restores_every_process_state_on_another_process_count(tmp_path):
  """Four processes' files in a checkpoint: a one-process run gets all of them and resumes exactly."""
  reference, _ = _reference(True)
  _, iterators = _gathered(4, [Documents() for _ in range(4)], True, steps=3)
  for i, it in enumerate(iterators):
    (tmp_path / f'process_{i}-of-4.json').write_text(json.dumps(it.get_state()))
  states = ProcessStateHandler().restore(tmp_path)
  assert [set(s['streams']) for s in states] == [{str(k) for k in range(i * 16, (i + 1) * 16)} for i in range(4)]
  resumed, _ = _gathered(1, [Documents()], True, steps=4, states=states)
  _assert_equal(resumed, reference[3:7])
  (tmp_path / 'process_2-of-4.json').unlink()
  with pytest.raises(ConfigError, match=r'no data position for streams \[32, 33'):
    _gathered(1, [Documents()], True, steps=1, states=ProcessStateHandler().restore(tmp_path))
