"""The grain pipeline: determinism, exact resume, packing without loss or leaks, process shares."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer.attention import make_attention_mask
from transformer.data import pipeline


def _examples(count=60, seed=0, pairs=True):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):  # every token value encodes (example, position): lost or repeated tokens show
    n, m = rng.integers(1, 12), rng.integers(1, 12)
    ex = {'targets': 1000 * (i + 1) + np.arange(m) + 3}
    if pairs:
      ex['inputs'] = 1000 * (i + 1) + 500 + np.arange(n) + 3
    out.append(ex)
  return out


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize('pack', [True, False])
def test_deterministic_and_resumes_exactly(pack):
  kwargs = dict(seq_len=16, batch_size=4, seed=3, pack=pack)
  first = _take(pipeline.train_iter(_examples(), **kwargs), 12)
  assert _equal(first, _take(pipeline.train_iter(_examples(), **kwargs), 12))
  assert not _equal(first, _take(pipeline.train_iter(_examples(), **{**kwargs, 'seed': 4}), 12))
  it = pipeline.train_iter(_examples(), **kwargs)
  _take(it, 5)
  state = it.get_state()
  resumed = pipeline.train_iter(_examples(), **kwargs)
  resumed.set_state(state)
  assert _equal(first[5:], _take(resumed, 7))


def test_packing_loses_no_token_and_resets_positions():
  examples = _examples(40)
  it = pipeline.train_iter(examples, seq_len=16, batch_size=4, seed=0, pack=True)
  seen = collections.Counter()
  for batch in _take(it, 12):  # ~2 epochs
    for key in ('inputs', 'targets'):
      tokens, seg, pos = batch[key], batch[f'{key}_segment_ids'], batch[f'{key}_positions']
      assert tokens.dtype == np.int32 and tokens.shape == (4, 16)
      assert np.all((tokens == 0) == (seg == 0))
      for row in range(4):
        for s in set(seg[row]) - {0}:
          where = seg[row] == s
          np.testing.assert_array_equal(pos[row][where], np.arange(where.sum()))  # restart at 0
          values = tokens[row][where]
          example = values[0] // 1000 - 1
          side = 'inputs' if values[0] % 1000 >= 500 else 'targets'
          np.testing.assert_array_equal(values, examples[example][side])  # whole, in order
          seen[(example, side)] += 1
  # Each example appears whole, with both sides in one row and the same number of times.
  per_example = {e: (seen[(e, 'inputs')], seen[(e, 'targets')]) for e in range(40)}
  assert all(i == t and i >= 1 for i, t in per_example.values())


def _identity(value):
  """(example, side, position) a token value of `_examples` encodes; None for padding."""
  if value == 0:
    return None
  offset = value % 1000 - 3
  return (value // 1000 - 1, 'inputs' if offset >= 500 else 'targets', offset % 500)


def test_packed_segments_never_attend_to_each_other():
  """The masks the model builds from the pipeline's segment ids and positions equal visibility decided
  position by position from what the tokens are (their values encode example and position)."""
  for batch in _take(pipeline.train_iter(_examples(), seq_len=16, batch_size=4, seed=0, pack=True), 3):
    seg, pos = batch['targets_segment_ids'], batch['targets_positions']
    assert (seg.max(axis=1) > 1).any()  # some rows really hold several examples
    mask = np.asarray(make_attention_mask(pos, pos, seg, seg, causal=True))[:, 0]
    cross = np.asarray(make_attention_mask(None, None, seg, batch['inputs_segment_ids'], causal=False))[:, 0]
    for row in range(4):
      targets = [_identity(v) for v in batch['targets'][row]]
      inputs = [_identity(v) for v in batch['inputs'][row]]
      for i, query in enumerate(targets):
        if query is None:  # a padding query sees no real token
          assert not any(mask[row, i, j] for j, key in enumerate(targets) if key is not None)
          assert not any(cross[row, i, j] for j, key in enumerate(inputs) if key is not None)
          continue
        for j, key in enumerate(targets):  # its own example's tokens up to itself, nothing else
          assert mask[row, i, j] == (key is not None and key[0] == query[0] and key[2] <= query[2]), (row, i, j)
        for j, key in enumerate(inputs):  # all of its own example's source, nothing else
          assert cross[row, i, j] == (key is not None and key[0] == query[0]), (row, i, j)


def test_inputs_and_targets_of_a_packed_example_share_its_segment_id():
  for batch in _take(pipeline.train_iter(_examples(), seq_len=16, batch_size=4, seed=0, pack=True), 6):
    for row in range(4):
      examples = {}
      for key in ('inputs', 'targets'):
        for value, s in zip(batch[key][row], batch[f'{key}_segment_ids'][row]):
          if value:
            examples.setdefault(key, {}).setdefault(int(s), set()).add(_identity(value)[0])
      # Segment s holds one example, the same on both sides, and both sides hold the same segments.
      assert all(len(e) == 1 for side in examples.values() for e in side.values())
      assert examples['inputs'] == examples['targets']


def test_packing_is_efficient():
  def packing_efficiency(iterator, num_batches: int = 20) -> float:  # fraction of token slots holding real tokens
    real = total = 0
    for _ in range(num_batches):
      targets = next(iterator)['targets']
      real, total = real + int((targets != 0).sum()), total + targets.size
    return real / max(total, 1)

  it = pipeline.train_iter(_examples(200, pairs=False), seq_len=32, batch_size=8, seed=0, pack=True)
  padded = pipeline.train_iter(_examples(200, pairs=False), seq_len=32, batch_size=8, seed=0, pack=False)
  assert packing_efficiency(it) > 0.8 > 2 * packing_efficiency(padded)


def test_overlong_examples_are_truncated_or_dropped():
  examples = [{'targets': np.arange(3, 3 + n)} for n in (4, 30, 5)]
  assert pipeline.report_overlong(examples, 8, 'drop') == 1
  for overlong, lengths in (('truncate', {4, 5, 8}), ('drop', {4, 5})):
    it = pipeline.train_iter(examples, seq_len=8, batch_size=1, seed=0, pack=False, overlong=overlong)
    assert {int((next(it)['targets'] != 0).sum()) for _ in range(12)} == lengths


@settings(max_examples=6, deadline=None)
@given(pack=st.booleans(), drop=st.booleans(), cuts=st.sets(st.integers(1, 5), max_size=3))
def test_process_rows_are_the_global_batch_for_any_split(pack, drop, cuts):
  """Processes taking rows [a, b) of the global batch see together exactly what one process sees,
  with packing and dropped examples too, and the union of their iterator states resumes exactly under another
  split (what a restore onto another topology relies on)."""
  examples = _examples(30) + [{'targets': np.arange(3, 40), 'inputs': np.arange(3, 5)}]  # one overlong
  kwargs = dict(seq_len=16, batch_size=6, seed=1, pack=pack, overlong='drop' if drop else 'truncate')
  whole = _take(pipeline.train_iter(examples, **kwargs), 4)
  bounds = [0, *sorted(cuts), 6]
  shares = [pipeline.train_iter(examples, rows=(a, b), **kwargs) for a, b in zip(bounds, bounds[1:])]
  for step in range(2):
    parts = [next(it) for it in shares]
    for key, value in whole[step].items():
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
  resumed = pipeline.train_iter(examples, rows=(0, 6), **kwargs)
  resumed.set_state([it.get_state() for it in shares])
  assert _equal(whole[2:], _take(resumed, 2))


def test_bad_rows_are_refused():
  with pytest.raises(ValueError, match=r'rows=\(4, 9\) is not a non-empty range of a global batch of 8'):
    pipeline.train_iter(_examples(), seq_len=16, batch_size=8, seed=0, rows=(4, 9))


def test_eval_batches_cover_everything_once_with_equal_counts():
  examples = _examples(23, pairs=False)
  shares = [
    list(pipeline.eval_batches(examples, seq_len=16, batch_size=4, process_index=i, process_count=2)) for i in range(2)
  ]
  assert len(shares[0]) == len(shares[1]) == 3  # ceil(ceil(23 / 2) / 4)
  rows = [row for share in shares for batch in share for row in batch['targets'] if row.any()]
  assert sorted(int(r[0]) // 1000 for r in rows) == list(range(1, 24))
  assert all('targets_segment_ids' not in b for share in shares for b in share)  # never packed
