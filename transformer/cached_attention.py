"""Attention of a few new queries over the filled part of a KV cache (a decoding step).

Every row of a decoding batch has written the same number of cache slots, so one number, `filled`
(the cache index after this call's write), bounds what any query can see: slots [0, filled). Attending
to the whole `max_len` cache would cost O(max_len) per step however little is written; here keys are
visited in blocks of `block` slots with an online softmax (a running maximum and sum per query, the
partial results rescaled as each block comes in), in a loop of ceil(filled / block) turns: O(filled).

On CPU each block is copied out of the cache before its two matmuls (XLA's dot needs it contiguous), so
against the dense kernel over a heads-major cache this wins where the cache is much longer than what is
written, and is about even where half of it is (README, Performance).

Masks and ALiBi biases are made block by block from the positions and segment ids the cache recorded,
never as `[T, max_len]` arrays. Shapes as in attention.py: B batch, T queries, S cache slots, N query
heads, K key/value heads (N = K * G), D per-head size.
"""

import flax
import jax
import jax.numpy as jnp

from transformer import layers

# Slots per block. On the benchmark LM's 288-slot cache, 64, 128 and 256 measured within noise of each other
# (batch 8, one loaded machine); 128 keeps the turns few (at most 3 there) and the masked tail short.
BLOCK = 128

# Test-only switch: True makes decoding attend over the whole cache with the dense kernel and reorder
# beams over the whole cache, as before blocked attention (the reference tests compare against).
# Read while tracing, so flip it before a decoding loop is compiled.
DENSE_REFERENCE = False

# attention._MASKED's value: a fully masked query (padding) averages its keys instead of giving NaN.
_MASKED = -1e9


@flax.struct.dataclass
class CacheMask:
  """What a decoding step's self-attention mask is made from: the queries' positions and segment ids
  `[B, T]`, those the cache recorded for its slots `[B, S]`, and `filled`, the number of slots written
  (this call's included). The rule is `attention.make_attention_mask`'s, causal: a query sees a written
  slot of its own segment at a position not after its own (and, with `window`, less than `window`
  before it). Segment 0 (padding, unwritten slots) is seen by no real token. `alibi`: add ALiBi's
  -slope * distance to the logits."""

  q_positions: jax.Array
  kv_positions: jax.Array
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  filled: jax.Array
  window: int = flax.struct.field(pytree_node=False, default=0)
  alibi: bool = flax.struct.field(pytree_node=False, default=False)


def cached_attention(query, key, value, mask: CacheMask, *, block: int | None = None):
  """softmax(q k^T / sqrt(d_k) + bias, masked) v over the cache's first `mask.filled` slots.

  Args:
    query: `[B, T, N, Dk]`; key: `[B, K, S, Dk]`; value: `[B, K, S, Dv]` (the whole cache, heads-major).
    mask: the step's `CacheMask`.
    block: slots per loop turn (default `BLOCK`; capped at S).
  Returns:
    `[B, T, N, Dv]` in the dtype of `value`; logits, softmax statistics and sums in float32.
  """
  batch, q_len, heads, d_k = query.shape
  kv_heads, length, d_v = key.shape[1], key.shape[2], value.shape[-1]
  groups = heads // kv_heads
  block = min(block or BLOCK, length)
  scale = d_k**-0.5
  grouped = query.reshape(batch, q_len, kv_heads, groups, d_k).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dk]
  slopes = layers.alibi_slopes(heads).reshape(1, kv_heads, groups, 1, 1) if mask.alibi else None

  def turn(j, carry):
    peak, total, acc = carry  # [B, K, G, T, 1] twice, [B, K, G, T, Dv]
    # The last block may reach past the cache's end: it is moved back to end there, and the slots the
    # previous block already covered are masked.
    start = jnp.minimum(j * block, length - block)
    cut = lambda x, axis=1: jax.lax.dynamic_slice_in_dim(x, start, block, axis=axis)
    logits = jnp.einsum('bkgtd,bksd->bkgts', grouped, cut(key, 2), preferred_element_type=jnp.float32) * scale
    distance = mask.q_positions[:, :, None] - cut(mask.kv_positions)[:, None, :]  # [B, T, block]
    if slopes is not None:
      logits -= slopes * jnp.abs(distance).astype(jnp.float32)[:, None, None]
    slots = start + jnp.arange(block)
    visible = (mask.q_segment_ids[:, :, None] == cut(mask.kv_segment_ids)[:, None, :]) & (distance >= 0)
    visible &= ((slots >= j * block) & (slots < mask.filled))[None, None]
    if mask.window:
      visible &= jnp.abs(distance) < mask.window
    logits = jnp.where(visible[:, None, None], logits, _MASKED)
    new_peak = jnp.maximum(peak, logits.max(axis=-1, keepdims=True))
    weights = jnp.exp(logits - new_peak)
    rescale = jnp.exp(peak - new_peak)
    total = total * rescale + weights.sum(axis=-1, keepdims=True)
    values = jnp.einsum(
      'bkgts,bksd->bkgtd', weights.astype(value.dtype), cut(value, 2), preferred_element_type=jnp.float32
    )
    return new_peak, total, acc * rescale + values

  stats = (batch, kv_heads, groups, q_len, 1)
  init = (jnp.full(stats, -jnp.inf), jnp.zeros(stats), jnp.zeros(stats[:-1] + (d_v,)))
  _, total, acc = jax.lax.fori_loop(0, (mask.filled + block - 1) // block, turn, init)
  out = (acc / total).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, Dv]
  return out.reshape(batch, q_len, heads, d_v).astype(value.dtype)
