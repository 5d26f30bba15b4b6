"""Property tests for the training pipeline's packing and padding: for random example sets, sequence
lengths, batch sizes and overlong rules, every row is checked token by token against the examples it
came from (each token's value encodes its example, side and place)."""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from transformer.config import ConfigError
from transformer.data import pipeline

# Derandomized: CI runs exactly the examples a developer ran locally, never a new one nobody has seen.
settings.register_profile(
  'properties', derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile('properties')

SIDE_OFFSET = {'targets': 0, 'inputs': 50}


@st.composite
def example_sets(draw):
  """1-5 examples; token j of example i's side is 100 * (i + 1) + offset(side) + j + 3."""
  pairs = draw(st.booleans())
  examples = []
  for i in range(draw(st.integers(1, 5))):
    example = {}
    for side in ('targets', 'inputs') if pairs else ('targets',):
      length = draw(st.integers(1, 12))
      example[side] = 100 * (i + 1) + SIDE_OFFSET[side] + np.arange(length) + 3
    examples.append(example)
  return examples


def _identify(values):
  """(example index, side) of a run of token values, checking they are one example's side."""
  example, rest = divmod(int(values[0]) - 3, 100)
  return example - 1, 'inputs' if rest >= 50 else 'targets'


def _kept(examples, seq_len, overlong):
  fits = lambda ex: all(len(v) <= seq_len for v in ex.values())
  return [i for i, ex in enumerate(examples) if overlong == 'truncate' or fits(ex)]


def _all_dropped(examples, seq_len, overlong):
  return not _kept(examples, seq_len, overlong)


@settings(PROFILE, max_examples=10)
@given(
  examples=example_sets(),
  seq_len=st.sampled_from([4, 8, 16]),
  batch_size=st.sampled_from([1, 3]),
  overlong=st.sampled_from(pipeline.OVERLONG),
  seed=st.integers(0, 100),
)
def test_packed_rows_hold_whole_examples_in_order(examples, seq_len, batch_size, overlong, seed):
  kept = _kept(examples, seq_len, overlong)
  if not kept:  # nothing fits and overlong=drop: an error, not an endless search for a batch
    with pytest.raises(ConfigError, match=f'longer than seq_len={seq_len}'):
      pipeline.train_iter(examples, seq_len=seq_len, batch_size=batch_size, seed=seed, overlong=overlong)
    return
  it = pipeline.train_iter(examples, seq_len=seq_len, batch_size=batch_size, seed=seed, overlong=overlong)
  sides = list(examples[0])
  # Enough rows for every kept example to come out several times (each row holds >= 1 example).
  num_batches = math.ceil(2 * len(examples) / batch_size) + 2
  seen = set()
  for _ in range(num_batches):
    batch = next(it)
    assert set(batch) == {f'{side}{suffix}' for side in sides for suffix in ('', '_segment_ids', '_positions')}
    for row in range(batch_size):
      row_examples = {}
      for side in sides:
        tokens, segments, positions = (batch[f'{side}{s}'][row] for s in ('', '_segment_ids', '_positions'))
        assert tokens.shape == (seq_len,) and tokens.dtype == np.int32
        count = int(segments.max())
        # Segments 1..count back to back from the start, then padding (token, segment and position 0).
        lengths = [int((segments == s).sum()) for s in range(1, count + 1)]
        assert all(lengths)
        order = np.append(np.arange(1, count + 1), 0)
        np.testing.assert_array_equal(segments, np.repeat(order, lengths + [seq_len - sum(lengths)]))
        np.testing.assert_array_equal(tokens[segments == 0], 0)
        np.testing.assert_array_equal(positions[segments == 0], 0)
        for s in range(1, count + 1):
          values, where = tokens[segments == s], positions[segments == s]
          np.testing.assert_array_equal(where, np.arange(len(values)))  # positions restart at 0
          example, found_side = _identify(values)
          assert found_side == side and example in kept
          # The whole example (cut at seq_len), in order: nothing lost, split, merged or repeated.
          np.testing.assert_array_equal(values, examples[example][side][:seq_len])
          row_examples.setdefault(side, {})[s] = example
          seen.add(example)
      # Inputs and targets of one example share its segment id.
      assert len({tuple(sorted(v.items())) for v in row_examples.values()}) == 1
  assert seen == set(kept)


@settings(PROFILE, max_examples=10)
@given(
  examples=example_sets(),
  seq_len=st.sampled_from([4, 16]),
  batch_size=st.sampled_from([1, 2, 3]),
  overlong=st.sampled_from(pipeline.OVERLONG),
  seed=st.integers(0, 100),
)
def test_padded_rows_are_each_epoch_once(examples, seq_len, batch_size, overlong, seed):
  """Without packing every row is one example, and each epoch is every kept example exactly once."""
  kept = _kept(examples, seq_len, overlong)
  if not kept:
    with pytest.raises(ConfigError, match='config.data.overlong'):
      pipeline.train_iter(examples, seq_len=seq_len, batch_size=batch_size, seed=seed, pack=False, overlong=overlong)
    return
  it = pipeline.train_iter(examples, seq_len=seq_len, batch_size=batch_size, seed=seed, pack=False, overlong=overlong)
  epochs = 2
  batches = [next(it) for _ in range(math.ceil(epochs * len(kept) / batch_size))]
  rows = [{side: batch[side][r] for side in batch} for batch in batches for r in range(batch_size)]
  order = []
  for row in rows[: epochs * len(kept)]:
    example = _identify(row['targets'])[0]
    for side, tokens in row.items():
      expected = examples[example][side][:seq_len]
      np.testing.assert_array_equal(tokens, np.pad(expected, (0, seq_len - len(expected))))
    order.append(example)
  for epoch in range(epochs):
    assert sorted(order[epoch * len(kept) : (epoch + 1) * len(kept)]) == kept


@settings(PROFILE, max_examples=40)
@given(
  examples=example_sets(),
  seq_len=st.sampled_from([4, 16]),
  batch_size=st.integers(1, 3),
  process_count=st.integers(1, 4),
)
def test_eval_batches_give_each_process_its_examples_in_order_and_equal_counts(
  examples, seq_len, batch_size, process_count
):
  """Process p gets examples p, p + P, ... padded (never packed), then all-padding rows and batches up to
  the count every process shares; together the processes hold each example once. Fewer examples than
  processes included."""
  count = math.ceil(math.ceil(len(examples) / process_count) / batch_size)
  for process in range(process_count):
    batches = list(
      pipeline.eval_batches(
        examples, seq_len=seq_len, batch_size=batch_size, process_index=process, process_count=process_count
      )
    )
    assert len(batches) == count
    mine = examples[process::process_count]
    for side in examples[0]:
      rows = np.concatenate([batch[side] for batch in batches])
      expected = np.zeros((count * batch_size, seq_len), np.int32)
      for row, example in enumerate(mine):
        fitted = example[side][:seq_len]
        expected[row, : len(fitted)] = fitted
      np.testing.assert_array_equal(rows, expected)
      assert rows.dtype == np.int32
