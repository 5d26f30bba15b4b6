"""Masks and the two attention kernels, checked against a plain per-head loop and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from transformer import attention, layers
from transformer.config import ConfigError

B, T, N, D = 2, 6, 4, 8


def naive_attention(q, k, v, mask, bias):
  """Per batch, per head: numpy softmax(q k^T / sqrt(d) + bias) v over allowed keys only."""
  q, k, v, mask = map(np.asarray, (q, k, v, mask))
  heads, kv_heads = q.shape[2], k.shape[2]
  out = np.zeros(q.shape[:3] + (v.shape[-1],), np.float64)
  for b in range(q.shape[0]):
    for h in range(heads):
      g = h // (heads // kv_heads)
      logits = q[b, :, h] @ k[b, :, g].T / np.sqrt(q.shape[-1])
      if bias is not None:
        logits = logits + np.asarray(bias)[min(b, bias.shape[0] - 1), h]
      for t in range(q.shape[1]):
        allowed = mask[b, 0, t]
        if not allowed.any():
          continue
        w = np.exp(logits[t][allowed] - logits[t][allowed].max())
        out[b, t, h] = (w / w.sum()) @ v[b, :, g][allowed]
  return out


def _positions_and_segments(kind):
  positions = np.tile(np.arange(T), (B, 1))
  segments = np.ones((B, T), np.int32)
  if kind in ('padding', 'all'):
    segments[0, 4:] = 0
  if kind in ('segments', 'all'):
    segments[1] = [1, 1, 1, 2, 2, 2]
    positions[1] = [0, 1, 2, 0, 1, 2]
  return jnp.asarray(positions), jnp.asarray(segments)


MASKS = {  # name: (segment layout, causal, window)
  'full': ('none', False, 0),
  'padding': ('padding', False, 0),
  'causal': ('none', True, 0),
  'segments': ('segments', False, 0),
  'window': ('none', False, 2),
  'causal_window': ('none', True, 3),
  'all': ('all', True, 2),
}


def _mask(name):
  layout, causal, window = MASKS[name]
  positions, segments = _positions_and_segments(layout)
  return attention.make_attention_mask(positions, positions, segments, segments, causal=causal, window=window)


def test_mask_semantics():
  positions, segments = _positions_and_segments('all')
  mask = np.asarray(attention.make_attention_mask(positions, positions, segments, segments, causal=True, window=2))[
    :, 0
  ]
  # Row 0: positions 0-3 real, 4-5 padding. Query 3 sees itself and its one predecessor.
  assert mask[0, 3].tolist() == [False, False, True, True, False, False]
  assert not mask[0, :4, 4:].any()  # real tokens never see padding
  # Row 1: two packed segments; the first token of segment 2 sees only itself.
  assert mask[1, 3].tolist() == [False, False, False, True, False, False]
  assert not mask[1, 3:, :3].any() and not mask[1, :3, 3:].any()
  bidirectional = np.asarray(
    attention.make_attention_mask(positions, positions, segments, segments, causal=False, window=2)
  )[1, 0]
  assert bidirectional[1].tolist() == [True, True, True, False, False, False]


def _qkv(kv_heads=N, d_v=D, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, T, N, D))
  k = jax.random.normal(keys[1], (B, T, kv_heads, D))
  v = jax.random.normal(keys[2], (B, T, kv_heads, d_v))
  return q, k, v


@pytest.mark.parametrize('mask_name', sorted(MASKS))
@pytest.mark.parametrize('kv_heads,d_v,alibi', [(4, 8, False), (2, 8, False), (1, 8, True), (4, 12, True)])
def test_kernels_agree_with_naive(mask_name, kv_heads, d_v, alibi):
  q, k, v = _qkv(kv_heads, d_v)
  mask = _mask(mask_name)
  positions, _ = _positions_and_segments(MASKS[mask_name][0])
  bias = layers.alibi_bias(positions, positions, N) if alibi else None
  expected = naive_attention(q, k, v, mask, bias)
  valid = np.asarray(mask).any(-1)[:, 0, :, None, None]  # fully masked rows are padding: undefined
  for impl in ('reference', 'xla'):
    got = np.asarray(attention.dot_product_attention(q, k, v, mask, bias, impl=impl))
    assert got.shape == (B, T, N, d_v)
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, expected, 0), atol=1e-5, err_msg=impl)
    assert np.isfinite(got).all()


def test_grouped_heads_equal_repeated_multi_head():
  q, k, v = _qkv(kv_heads=2)
  mask = _mask('causal')
  grouped = attention.dot_product_attention(q, k, v, mask)
  repeated = attention.dot_product_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
  np.testing.assert_allclose(grouped, repeated, atol=1e-6)


def test_attention_dropout_scales_kept_weights():
  q, k, v = _qkv()
  mask = _mask('full')
  a = attention.dot_product_attention(q, k, v, mask, dropout_rate=0.5, dropout_rng=jax.random.key(1))
  b = attention.dot_product_attention(q, k, v, mask, dropout_rate=0.5, dropout_rng=jax.random.key(2))
  assert not np.allclose(a, b)
  # With v = 1 the output is the sum of the kept, rescaled weights: 1 in expectation.
  ones = jnp.ones_like(v)
  outs = [
    attention.dot_product_attention(q, k, ones, mask, dropout_rate=0.5, dropout_rng=jax.random.key(s))
    for s in range(20)
  ]
  assert abs(float(jnp.mean(jnp.stack(outs))) - 1.0) < 0.05


def test_auto_always_picks_a_working_kernel_on_cpu():
  # The einsum kernel: the faster one on CPU (README, Performance), and the only one with dropout.
  assert attention.resolve_impl(tiny(attention_impl='auto'), dropout=False) == 'reference'
  assert attention.resolve_impl(tiny(attention_impl='auto'), dropout=True) == 'reference'
  assert attention.resolve_impl(tiny(attention_impl='auto', dtype='bfloat16'), dropout=False) == 'reference'


def test_unavailable_kernels_are_clear_errors():
  with pytest.raises(ConfigError, match='attention_impl=cudnn needs a GPU'):
    attention.resolve_impl(tiny(attention_impl='cudnn'), dropout=False)
  with pytest.raises(ConfigError, match='attention_dropout_rate=0'):
    attention.resolve_impl(tiny(attention_impl='xla'), dropout=True)


def test_fused_alibi_bias_stays_float32_in_half_precision():
  # bfloat16 keeps 8 significant bits: with power-of-2 slopes it holds ALiBi penalties exactly up to
  # distance 255 and rounds them beyond. Both kernels must add the float32 bias to float32 logits,
  # and so give the same bits.
  length, heads = 512, 4
  q, k, v = (x.astype(jnp.bfloat16) for x in jax.random.normal(jax.random.key(3), (3, 1, length, heads, D)))
  positions = jnp.arange(length)[None]
  segments = jnp.ones((1, length), jnp.int32)
  mask = attention.make_attention_mask(positions, positions, segments, segments, causal=True)
  bias = layers.alibi_bias(positions, positions, heads)
  reference = attention.dot_product_attention(q, k, v, mask, bias, impl='reference')
  fused = attention.dot_product_attention(q, k, v, mask, bias, impl='xla')
  assert fused.dtype == reference.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(reference, np.float32))
