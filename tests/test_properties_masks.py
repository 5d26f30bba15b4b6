"""Property tests for attention masks: the one mask builder and blocked local attention against a plain
loop over (query, key) pairs, for any lengths, segment layouts, windows and KV-cache shapes; and a
model's output for a packed row against its segments run one by one.

Shapes are drawn from small fixed sets so that the jitted functions compile a few times only.
"""

import functools

import hypothesis.strategies as st
import jax
import numpy as np
from conftest import tiny
from hypothesis import HealthCheck, given, settings

from transformer import attention, block_attention, models

# Derandomized: CI runs exactly the examples a developer ran locally, never a new one nobody has seen.
settings.register_profile(
  'properties', derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile('properties')


def reference_mask(q_positions, kv_positions, q_segments, kv_segments, causal, window):
  """The mask rule spelled out pair by pair: same segment (padding 0 only with padding), key not after
  the query when causal, key within `window` positions (behind the query when causal) when windowed."""
  batch, q_len, kv_len = len(q_segments), len(q_segments[0]), len(kv_segments[0])
  mask = np.zeros((batch, 1, q_len, kv_len), bool)
  for b in range(batch):
    for t in range(q_len):
      for s in range(kv_len):
        allowed = q_segments[b][t] == kv_segments[b][s]
        if causal or window:
          p, k = q_positions[b][t], kv_positions[b][s]
          if causal and k > p:
            allowed = False
          if window and not (p - k < window if causal else abs(p - k) < window):
            allowed = False
        mask[b, 0, t, s] = allowed
  return mask


@st.composite
def packed_rows(draw, batch, length, max_segments=4):
  """`[batch, length]` positions and segment ids as the pipeline packs them: segments 1, 2, ... of random
  lengths, positions restarting at 0 in each, then padding (segment 0, position 0). A row may be all padding."""
  positions = np.zeros((batch, length), np.int32)
  segments = np.zeros((batch, length), np.int32)
  for b in range(batch):
    start = 0
    for segment in range(1, max_segments + 1):
      if start == length or not draw(st.booleans()):
        break
      size = draw(st.integers(1, length - start))
      positions[b, start : start + size] = np.arange(size)
      segments[b, start : start + size] = segment
      start += size
  return positions, segments


@settings(PROFILE, max_examples=40)
@given(
  batch=st.sampled_from([1, 2]),
  length=st.sampled_from([1, 2, 5, 9]),
  causal=st.booleans(),
  window=st.sampled_from([0, 1, 2, 4, 16]),
  data=st.data(),
)
def test_self_attention_mask_equals_the_loop(batch, length, causal, window, data):
  positions, segments = data.draw(packed_rows(batch, length))
  mask = attention.make_attention_mask(positions, positions, segments, segments, causal=causal, window=window)
  expected = reference_mask(positions, positions, segments, segments, causal, window)
  np.testing.assert_array_equal(np.asarray(mask), expected)
  # What the rule is for: a real query never sees padding or another segment.
  real = segments > 0
  sees_other = (segments[:, :, None] != segments[:, None, :]) & np.asarray(mask[:, 0])
  assert not sees_other[real].any()


@settings(PROFILE, max_examples=30)
@given(
  q_len=st.sampled_from([1, 3]),
  kv_len=st.sampled_from([1, 4, 7]),
  causal=st.booleans(),
  window=st.sampled_from([0, 1, 3]),
  data=st.data(),
)
def test_cache_shaped_mask_equals_the_loop(q_len, kv_len, causal, window, data):
  """Query length != key length (a KV cache): positions and segment ids are arbitrary per slot."""
  ints = lambda n, hi: data.draw(st.lists(st.integers(0, hi), min_size=n, max_size=n))
  q_pos, kv_pos = np.array([ints(q_len, 8)]), np.array([ints(kv_len, 8)])
  q_seg, kv_seg = np.array([ints(q_len, 2)]), np.array([ints(kv_len, 2)])
  mask = attention.make_attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal, window=window)
  np.testing.assert_array_equal(np.asarray(mask), reference_mask(q_pos, kv_pos, q_seg, kv_seg, causal, window))


LOCAL_LENGTH, HEADS, DIM = 11, 2, 4


@functools.partial(jax.jit, static_argnames=('window', 'causal'))
def _local_and_dense(query, key, value, positions, segments, *, window, causal):
  local = block_attention.SelfMask(positions, positions, segments, segments, window=window, causal=causal)
  blocked = block_attention.block_attention(query, key, value, local, *local.blocks())
  dense = attention.dot_product_attention(query, key, value, local.dense())
  return blocked, dense


@settings(PROFILE, max_examples=12)
@given(causal=st.booleans(), window=st.sampled_from([1, 3]), seed=st.integers(0, 2**16), data=st.data())
def test_blocked_local_attention_equals_dense_on_real_tokens(causal, window, seed, data):
  positions, segments = data.draw(packed_rows(2, LOCAL_LENGTH))
  q, k, v = jax.random.normal(jax.random.key(seed), (3, 2, LOCAL_LENGTH, HEADS, DIM))
  blocked, dense = _local_and_dense(q, k, v, positions, segments, window=window, causal=causal)
  real = segments > 0  # padding queries' outputs are never used
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], atol=1e-5)


# --- a packed row through the whole model equals its segments run alone

PACK_LENGTH, MAX_SEGMENTS = 10, 3
PACK_CONFIGS = {
  'decoder_only-rope-window': dict(kind='decoder_only', positional='rope', attention_window=3),
  'decoder_only-learned': dict(kind='decoder_only', positional='learned', num_kv_heads=2),
  'encoder_decoder-alibi-window': dict(kind='encoder_decoder', positional='alibi', attention_window=2),
}


@functools.lru_cache
def _packing_model(name):
  model = models.build_model(tiny(num_encoder_layers=1, num_decoder_layers=1, **PACK_CONFIGS[name]))
  # Any weights will do: random ones of the initialiser's shapes (traced, not compiled: fast).
  shapes = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  return model, params, jax.jit(functools.partial(_forward, model))


def _forward(model, params, source, source_positions, source_segments, target, positions, segments):
  if model.config.kind == 'encoder_decoder':
    return model.apply(
      {'params': params},
      source,
      target,
      inputs_positions=source_positions,
      inputs_segment_ids=source_segments,
      decoder_positions=positions,
      decoder_segment_ids=segments,
    )
  return model.apply({'params': params}, target, positions=positions, segment_ids=segments)


def _pack(sequences):
  """One packed row `[1, PACK_LENGTH]` of `sequences`, and the same sequences one per row
  `[MAX_SEGMENTS, PACK_LENGTH]` (missing rows all padding), each with positions and segment ids."""
  packed = np.zeros((3, 1, PACK_LENGTH), np.int32)  # tokens, positions, segments
  alone = np.zeros((3, MAX_SEGMENTS, PACK_LENGTH), np.int32)
  start = 0
  for i, seq in enumerate(sequences):
    n = len(seq)
    for out, row, span, segment in ((packed, 0, slice(start, start + n), i + 1), (alone, i, slice(0, n), 1)):
      out[0, row, span], out[1, row, span], out[2, row, span] = seq, np.arange(n), segment
    start += n
  return packed, alone


def _sequences(count=None):
  """1 to MAX_SEGMENTS (or `count`) token sequences that fit one row together."""
  sequence = st.lists(st.integers(3, 36), min_size=1, max_size=4)
  low, high = (1, MAX_SEGMENTS) if count is None else (count, count)
  return st.lists(sequence, min_size=low, max_size=high).filter(lambda seqs: sum(map(len, seqs)) <= PACK_LENGTH)


@settings(PROFILE, max_examples=12)
@given(name=st.sampled_from(sorted(PACK_CONFIGS)), targets=_sequences(), data=st.data())
def test_a_packed_row_equals_its_segments_run_alone(name, targets, data):
  model, params, forward = _packing_model(name)
  packed, alone = _pack(targets)
  if model.config.kind == 'encoder_decoder':
    sources = data.draw(_sequences(len(targets)))
    packed_source, alone_source = _pack(sources)
  else:
    packed_source, alone_source = np.zeros((3, 1, 1), np.int32), np.zeros((3, MAX_SEGMENTS, 1), np.int32)  # unused
  # One call (one compiled shape): row 0 the packed row, rows 1.. its segments alone.
  logits = np.asarray(
    forward(params, *np.concatenate([packed_source, alone_source], 1), *np.concatenate([packed, alone], 1))
  )
  packed_logits, alone_logits = logits[:1], logits[1:]
  start = 0
  for i, seq in enumerate(targets):
    n = len(seq)
    np.testing.assert_allclose(packed_logits[0, start : start + n], alone_logits[i, :n], atol=2e-5)
    start += n
