"""The blocked attention of decoding steps against the dense kernel over the whole cache (the computation
it replaced): any filled length, block size, query count, grouping of heads, window, ALiBi and padding; and
the cache's blocks written in place against a write into the whole cache."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings

from transformer import attention, layers
from transformer import cached_attention as blocks
from transformer.cached_attention import CacheMask, cached_attention

PROFILE = settings(derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BATCH, HEADS, D_K, D_V, LENGTH = 2, 4, 8, 6, 13


@functools.partial(jax.jit, static_argnames=('window', 'alibi', 'block'))
def _both(query, key, value, q_pos, kv_pos, q_seg, kv_seg, filled, poisoned, *, window, alibi, block):
  """(blocked over `poisoned` keys/values, dense over `key`/`value`): the old step's mask and bias span
  the whole cache; its keys are `[B, S, K, D]`, the cache's heads-major layout transposed."""
  mask = CacheMask(q_pos, kv_pos, q_seg, kv_seg, filled, window, alibi)
  keys = blocks.split(poisoned[0].transpose(0, 2, 3, 1), blocks.KEY_AXIS, block)  # the cache's layouts
  values = blocks.split(poisoned[1].transpose(0, 2, 1, 3), blocks.VALUE_AXIS, block)
  blocked = cached_attention(query, keys, values, mask)
  dense_mask = attention.make_attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal=True, window=window)
  bias = layers.alibi_bias(q_pos, kv_pos, HEADS) if alibi else None
  return blocked, attention.dot_product_attention(query, key, value, dense_mask, bias)


def _case(seed, q_len, kv_heads, filled, dtype=jnp.float32):
  """Random queries and a cache of LENGTH slots whose first `filled` are written: positions and segments
  (0 = padding) at random, the last `q_len` written slots being the queries' own (as in decoding, where a
  step writes its keys before attending), the unwritten ones segment 0 as `init_cache` leaves them."""
  rng = np.random.default_rng(seed)
  shape = lambda d, heads: (BATCH, LENGTH, heads, d)
  key = rng.standard_normal(shape(D_K, kv_heads)).astype(np.float32)
  value = rng.standard_normal(shape(D_V, kv_heads)).astype(np.float32)
  kv_pos = rng.integers(0, 20, (BATCH, LENGTH)).astype(np.int32)
  kv_seg = np.where(np.arange(LENGTH) < filled, rng.integers(0, 3, (BATCH, LENGTH)), 0).astype(np.int32)
  written = slice(filled - q_len, filled)
  query = rng.standard_normal((BATCH, q_len, HEADS, D_K)).astype(np.float32)
  args = (query, key, value, kv_pos[:, written], kv_pos, kv_seg[:, written], kv_seg, np.int32(filled))
  return tuple(jnp.asarray(a, dtype) if a.dtype == np.float32 else jnp.asarray(a) for a in args)


@settings(PROFILE, max_examples=12)
@given(
  seed=st.integers(0, 2**16),
  q_len=st.integers(1, 3),
  kv_heads=st.sampled_from([1, 2, 4]),
  data=st.data(),
  window=st.sampled_from([0, 1, 3]),
  alibi=st.booleans(),
)
def test_any_filled_length_and_block_give_the_dense_result(seed, q_len, kv_heads, data, window, alibi):
  filled = data.draw(st.integers(q_len, LENGTH), label='filled')
  block = data.draw(st.integers(1, LENGTH + 2), label='block')
  query, key, value, q_pos, kv_pos, q_seg, kv_seg, filled = _case(seed, q_len, kv_heads, int(filled))
  # Slots past the last block the loop visits are never read: NaN there changes nothing.
  visited = -(-int(filled) // block) * block
  poison = lambda x: x.at[:, visited:].set(jnp.nan)
  blocked, dense = _both(
    query, key, value, q_pos, kv_pos, q_seg, kv_seg, filled, (poison(key), poison(value)),
    window=window, alibi=alibi, block=block,
  )  # fmt: skip
  real = np.asarray(q_seg) != 0  # padding queries see no key in either kernel: any finite output will do
  assert np.isfinite(np.asarray(blocked)).all()
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-6)


def test_bfloat16_keeps_its_dtype_and_float32_statistics():
  """bf16 queries, keys and values: a bf16 output within bf16 rounding of the float32 computation."""
  args32 = _case(5, 2, 2, 11)
  args16 = _case(5, 2, 2, 11, jnp.bfloat16)
  kw = dict(window=0, alibi=True, block=4)
  blocked16, dense16 = _both(*args16, args16[1:3], **kw)
  blocked32, _ = _both(*args32, args32[1:3], **kw)
  real = np.asarray(args32[5]) != 0
  assert blocked16.dtype == jnp.bfloat16
  exact = np.asarray(blocked32)[real]
  for out in (blocked16, dense16):
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[real], exact, atol=3e-2, rtol=3e-2)


@settings(PROFILE, max_examples=20)
@given(length=st.integers(1, 12), axis=st.sampled_from([blocks.KEY_AXIS, blocks.VALUE_AXIS]), data=st.data())
def test_writing_into_the_blocks_equals_writing_into_the_whole_cache(length, axis, data):
  """One slot (a decoding step) or several (a prefill) at any index, into blocks of any size (the last one
  shorter), along either cache's slots: the joined blocks equal `dynamic_update_slice` on the whole cache,
  and the blocks keep their sizes."""
  size = data.draw(st.integers(1, length), label='size')
  count = data.draw(st.integers(1, length), label='slots')
  index = data.draw(st.integers(0, length - count), label='index')
  rng = np.random.default_rng(length * 100 + size)
  shape = [2, 3, 4, 4]
  cache = jnp.asarray(rng.standard_normal(shape[:axis] + [length] + shape[axis + 1 :]), jnp.float32)
  new = jnp.asarray(rng.standard_normal(shape[:axis] + [count] + shape[axis + 1 :]), jnp.float32)
  split = blocks.split(cache, axis, size)
  written = jax.jit(blocks.write, static_argnums=3)(split, new, jnp.int32(index), axis)
  expected = jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis)
  np.testing.assert_array_equal(blocks.join(written, axis), expected)
  assert [b.shape for b in written] == [b.shape for b in split]


@settings(PROFILE, max_examples=50)
@given(length=st.integers(1, 10**6))
def test_a_cache_has_at_most_max_blocks_of_at_least_block_slots(length):
  """Each block is a `cond` in every layer's step: a long cache gets longer blocks, never more of them, and
  no longer than that takes (one slot shorter would make too many)."""
  size = blocks.block_size(length)
  assert -(-length // size) <= blocks.MAX_BLOCKS
  assert size == min(length, blocks.BLOCK) or -(-length // (size - 1)) > blocks.MAX_BLOCKS
