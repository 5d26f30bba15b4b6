"""Attention by blocks equals the dense kernel: causal blocks (10/16 of the score work), windows, patterns."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer import attention, block_attention, hlo_audit, layers, models


def _packed(rng, batch, length, pieces):
  """Positions restarting per segment, and segment ids (0: padding at the end), like packed batches."""
  segments = np.zeros((batch, length), np.int32)
  positions = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = sorted(rng.choice(np.arange(1, length), size=pieces - 1, replace=False)) if pieces > 1 else []
    bounds = [0, *cuts, length - rng.integers(0, length // 4)]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
      segments[row, a:b] = i + 1
      positions[row, a:b] = np.arange(b - a)
  return jnp.asarray(positions), jnp.asarray(segments)


@jax.jit
def _both(query, key, value, positions, segments, bias, cotangent):
  mask = block_attention.SelfMask(positions, positions, segments, segments, alibi=bias is not None)
  dense = lambda q, k, v: attention.dot_product_attention(q, k, v, mask.dense(), bias)
  blocked = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, bias)
  results = []
  for fn in (dense, blocked):
    out, vjp = jax.vjp(fn, query, key, value)
    results.append((out, vjp(cotangent)))
  return results


@settings(max_examples=8, deadline=None)
@given(
  length=st.sampled_from([8, 13]),
  pieces=st.integers(1, 3),
  kv_heads=st.sampled_from([1, 2, 4]),
  alibi=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_blocks_equal_the_dense_kernel_with_gradients(length, pieces, kv_heads, alibi, seed):
  rng = np.random.default_rng(seed)
  batch, heads, size = 2, 4, 8
  positions, segments = _packed(rng, batch, length, pieces)
  keys = jax.random.split(jax.random.key(seed), 4)
  query = jax.random.normal(keys[0], (batch, length, heads, size))
  key = jax.random.normal(keys[1], (batch, length, kv_heads, size))
  value = jax.random.normal(keys[2], (batch, length, kv_heads, size))
  # Padding queries (segment 0, position 0 in packed batches) may see other keys by blocks than dense;
  # their outputs carry no loss, so they get no cotangent, as in training.
  cotangent = jax.random.normal(keys[3], (batch, length, heads, size)) * (segments > 0)[:, :, None, None]
  bias = layers.alibi_bias(positions, positions, heads) if alibi else None
  (dense, dense_grads), (blocked, blocked_grads) = _both(query, key, value, positions, segments, bias, cotangent)
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-6)
  for ours, ref in zip(blocked_grads, dense_grads):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def _model(**overrides):
  return models.build_model(tiny(max_len=256, **overrides))


def test_model_logits_and_gradients_equal_the_dense_path(monkeypatch):
  model = _model(num_kv_heads=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 130), 3, 37).at[1, 100:].set(0)  # padded, 130 % 4 != 0
  params = models.init_params(model, jax.random.key(1))
  loss = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, tokens)))
  blocked = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(block_attention, 'MIN_CAUSAL_LENGTH', 10**9)
  dense = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(blocked[0], dense[0], rtol=1e-5)
  # Gradients sum over every token: entries near 0 are held to 1e-5 of their array's scale.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  jax.tree.map(close, blocked[1], dense[1])


def test_blocks_compute_ten_of_sixteen_score_blocks(monkeypatch):
  cfg = tiny(max_len=256)
  model = models.build_model(cfg)
  tokens = jnp.ones((2, 128), jnp.int32)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  flops = lambda: hlo_audit.dot_flops(jax.jit(model.apply).lower({'params': params}, tokens).compile().as_text())
  blocked = flops()
  monkeypatch.setattr(block_attention, 'MIN_CAUSAL_LENGTH', 10**9)
  dense = flops()
  # Per layer two score-sized matmuls (q k^T and weights v), each 2 B N T^T Dh FLOPs when dense.
  score_flops = cfg.num_decoder_layers * 2 * 2 * 2 * cfg.num_heads * 128 * 128 * cfg.head_dim_qk
  assert dense - blocked == score_flops * 6 // 16
