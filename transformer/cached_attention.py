"""Attention of a few new queries over the filled part of a KV cache (a decoding step), and the cache's blocks.

A self-attention cache is two tuples of blocks (`split`), keys `[B, K, D, block]` and values
`[B, K, block, D]`: consecutive runs of slots, all `block_size(S)` long but the last. Every row of a
decoding batch has written the same number of slots, so one number, `filled` (the cache index after this
call's write), bounds what any query can see: slots [0, filled). Each block that holds a written slot is
attended with an online softmax (a running maximum and sum per query, the partial results rescaled as each
block comes in); the others are skipped by a `lax.cond`. So a step costs O(filled), not O(S).

Why separate arrays and not one `[B, K, S, D]` cache read in slices: XLA's CPU dot takes whole buffers, so a
slice (dynamic in a loop, or static under a `cond`) was copied out of the cache before its two matmuls: a
quarter of a batch-8 decoding step (docs/performance.md). A block is a buffer of its own: the matmuls read it
where it lies, and a step's write goes into the block that holds its slot (`write`), in place.

Masks and ALiBi biases are made block by block from the positions and segment ids the cache recorded,
never as `[T, S]` arrays. Shapes as in attention.py: B batch, T queries, S cache slots, N query heads,
K key/value heads (N = K * G), D per-head size.
"""

import flax
import jax
import jax.numpy as jnp

from transformer import layers, patterns

# Slots per block. On the benchmark LM's 288-slot cache, 64, 128 and 256 measured within noise of each other
# (batch 8, one loaded machine); 128 keeps the blocks few (3 there) and the masked tail short.
BLOCK = 128
# Each block is a `cond` and two matmuls in every layer's step: longer caches get longer blocks, so that the
# compiled step stays small (a 32k-slot cache: 16 blocks of 2k).
MAX_BLOCKS = 16

# Test-only switch: True makes decoding attend over the whole cache with the dense kernel and reorder
# beams over the whole cache, as before blocked attention (the reference tests compare against).
# Read while tracing, so flip it before a decoding loop is compiled.
DENSE_REFERENCE = False

# attention._MASKED's value: a fully masked query (padding) averages its keys instead of giving NaN.
_MASKED = -1e9


# The slots' axis of the cached keys, `[B, K, D, S]`, and values, `[B, K, S, D]`. Keys with their slots last
# make q k^T a plain matrix product at any batch: as `[B, K, S, D]`, at batch 1 (two batch axes collapsed
# into one) XLA CPU transposed every key block before its matmul.
KEY_AXIS, VALUE_AXIS = 3, 2


def block_size(length: int, unit: int = 1) -> int:
  """Slots per block of a `length`-slot cache (the last block may be shorter), a multiple of `unit` (a
  block pattern's block: a cache block is then read if the pattern allows any of its pattern blocks)."""
  return min(length, -(-max(BLOCK, -(-length // MAX_BLOCKS)) // unit) * unit)


def split(cache, axis: int, size: int | None = None, unit: int = 1):
  """`cache` -> its blocks along the slots' `axis` (a tuple, for a cache variable), `block_size` long or
  `size`."""
  length = cache.shape[axis]
  size = size or block_size(length, unit)
  return tuple(
    jax.lax.slice_in_dim(cache, start, min(start + size, length), axis=axis) for start in range(0, length, size)
  )


def join(blocks, axis: int):
  """The blocks as one array (for the dense kernels: a copy of the whole cache)."""
  return jnp.concatenate(blocks, axis=axis)


def write(blocks, new, index, axis: int):
  """`blocks` with `new` (their layout, T slots) written at slots [index, index + T).

  One slot (a decoding step) is written into each block at `index`'s place in it, clamped into the block;
  the blocks that do not hold `index` get their own slot there back. So every block is updated in place and
  none is read whole. More slots (a prefill) go through the joined cache, once.
  """
  new = new.astype(blocks[0].dtype)
  if new.shape[axis] != 1:
    whole = jax.lax.dynamic_update_slice_in_dim(join(blocks, axis), new, index, axis)
    return split(whole, axis, blocks[0].shape[axis])
  out, start = [], 0
  for block in blocks:
    size = block.shape[axis]
    at = jnp.clip(index - start, 0, size - 1)
    inside = (index >= start) & (index < start + size)
    kept = jax.lax.dynamic_slice_in_dim(block, at, 1, axis)
    out.append(jax.lax.dynamic_update_slice_in_dim(block, jnp.where(inside, new, kept), at, axis))
    start += size
  return tuple(out)


@flax.struct.dataclass
class CacheMask:
  """What a decoding step's self-attention mask is made from: the queries' positions and segment ids
  `[B, T]`, those the cache recorded for its slots `[B, S]`, and `filled`, the number of slots written
  (this call's included). The rule is `attention.make_attention_mask`'s, causal: a query sees a written
  slot of its own segment at a position not after its own (and, with `window`, less than `window`
  before it). Segment 0 (padding, unwritten slots) is seen by no real token. `alibi`: add ALiBi's
  -slope * distance to the logits. `pattern`: a block pattern (`patterns.py`) on slots, the step's
  queries at slots [filled - T, filled): blocks it rules out for all of them are not read."""

  q_positions: jax.Array
  kv_positions: jax.Array
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  filled: jax.Array
  window: int = flax.struct.field(pytree_node=False, default=0)
  alibi: bool = flax.struct.field(pytree_node=False, default=False)
  pattern: patterns.Pattern | None = flax.struct.field(pytree_node=False, default=None)
  layer: int = flax.struct.field(pytree_node=False, default=0)

  def for_layer(self, layer: int):
    """The mask of stack layer `layer` (BigBird's random blocks are drawn per layer)."""
    return self.replace(layer=layer) if self.pattern is not None and self.pattern.depends_on_layer else self

  def sees(self, start: int, size: int):
    """bool scalar: whether any query of the step may see a slot in [start, start + size): written, and
    (with a pattern) in a block the pattern gives the queries' blocks."""
    seen = start < self.filled
    if self.pattern is None:
      return seen
    slots = self.kv_positions.shape[1]
    table = self.pattern.table(self.pattern.blocks(slots), self.pattern.blocks(slots), self.layer)
    first = (self.filled - self.q_positions.shape[1]) // self.pattern.block  # the step's query blocks
    last = (self.filled - 1) // self.pattern.block
    rows = jnp.arange(table.shape[0])
    cols = table[:, start // self.pattern.block : -(-(start + size) // self.pattern.block)].any(axis=1)
    return seen & jnp.any(jnp.asarray(cols) & (rows >= first) & (rows <= last))


def cached_attention(query, keys, values, mask: CacheMask):
  """softmax(q k^T / sqrt(d_k) + bias, masked) v over the cache's first `mask.filled` slots.

  Args:
    query: `[B, T, N, Dk]`; keys: blocks `[B, K, Dk, block]`; values: blocks `[B, K, block, Dv]` (`split`).
    mask: the step's `CacheMask`.
  Returns:
    `[B, T, N, Dv]` in the dtype of the values; logits, softmax statistics and sums in float32.
  """
  batch, q_len, heads, d_k = query.shape
  kv_heads, d_v, dtype = keys[0].shape[1], values[0].shape[-1], values[0].dtype
  groups = heads // kv_heads
  scale = d_k**-0.5
  grouped = query.reshape(batch, q_len, kv_heads, groups, d_k).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dk]
  slopes = layers.alibi_slopes(heads).reshape(1, kv_heads, groups, 1, 1) if mask.alibi else None

  def attend(carry, key, value, start):
    peak, total, acc = carry  # [B, K, G, T, 1] twice, [B, K, G, T, Dv]
    size = key.shape[KEY_AXIS]
    cut = lambda x: x[:, start : start + size]
    logits = jnp.einsum('bkgtd,bkds->bkgts', grouped, key, preferred_element_type=jnp.float32) * scale
    distance = mask.q_positions[:, :, None] - cut(mask.kv_positions)[:, None, :]  # [B, T, block]
    if slopes is not None:
      logits -= slopes * jnp.abs(distance).astype(jnp.float32)[:, None, None]
    visible = (mask.q_segment_ids[:, :, None] == cut(mask.kv_segment_ids)[:, None, :]) & (distance >= 0)
    visible &= (start + jnp.arange(size) < mask.filled)[None, None]
    if mask.window:
      visible &= jnp.abs(distance) < mask.window
    if mask.pattern is not None:
      slots = mask.kv_positions.shape[1]
      q_slots = mask.filled - q_len + jnp.arange(q_len)
      k_slots = start + jnp.arange(size)
      visible &= mask.pattern.token_mask(q_slots[:, None], k_slots[None, :], slots, slots, mask.layer)[None]
    logits = jnp.where(visible[:, None, None], logits, _MASKED)
    new_peak = jnp.maximum(peak, logits.max(axis=-1, keepdims=True))
    weights = jnp.exp(logits - new_peak)
    rescale = jnp.exp(peak - new_peak)
    total = total * rescale + weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum('bkgts,bksd->bkgtd', weights.astype(dtype), value, preferred_element_type=jnp.float32)
    return new_peak, total, acc * rescale + out

  stats = (batch, kv_heads, groups, q_len, 1)
  carry = (jnp.full(stats, -jnp.inf), jnp.zeros(stats), jnp.zeros(stats[:-1] + (d_v,)))
  start = 0
  for key, value in zip(keys, values):
    # The first block too, though always read: outside a `cond`, at batch 1 XLA fused the step's write
    # into the block into its matmul as well as into the loop's carry, and copied the block for each.
    turn = lambda c, k, v, start=start: attend(c, k, v, start)
    carry = jax.lax.cond(mask.sees(start, key.shape[KEY_AXIS]), turn, lambda c, k, v: c, carry, key, value)
    start += key.shape[KEY_AXIS]
  _, total, acc = carry
  out = (acc / total).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, Dv]
  return out.reshape(batch, q_len, heads, d_v).astype(dtype)
