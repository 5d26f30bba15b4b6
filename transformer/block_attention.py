"""Self-attention's mask in the form it is made from, and attention by blocks: each query block attends
only to the key blocks a table allows, so time and memory follow the number of non-empty blocks.

`SelfMask` holds positions, segment ids, causality, the sliding window and the block pattern
(`patterns.py`); `attend` routes it to a kernel: splash (TPU) and flash (GPU) take segment ids and the
pattern, the einsum kernel takes it by blocks (`block_attention`), the others its dense form (`dense`).

The einsum kernel's blocks come from one table of (query block, key block) pairs (`SelfMask.blocks`):
- a pattern: its own table;
- a sliding window of w tokens: blocks of w, each query block with the one before (and after, not
  causal), since within a segment positions advance with the index;
- causal attention at 128 tokens or more: 4 blocks, query block i with key blocks 0..i (10 of 16).
Each query block attends to its key blocks under the dense mask's own rule, evaluated there, so the
outputs equal the dense kernel's (a masked key adds exactly 0 to a float32 softmax sum).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from transformer import layers, patterns
from transformer.attention import dot_product_attention, make_attention_mask

CAUSAL_BLOCKS = 4
MIN_CAUSAL_LENGTH = 128  # shorter sequences: small blocks cost more in overhead than they save
MAX_GROUPS = 8  # query blocks attend in at most this many widths (see `_groups`)


@flax.struct.dataclass
class SelfMask:
  """What self-attention's mask is made of. `q_offset` (decoding over a whole cache: the first query's
  slot) makes `dense` place the queries among the keys; the pattern is on a row's indices (its slots)."""

  q_positions: jax.Array  # int [B, T]
  kv_positions: jax.Array  # int [B, S]
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_offset: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=True)
  window: int = flax.struct.field(pytree_node=False, default=0)
  pattern: patterns.Pattern | None = flax.struct.field(pytree_node=False, default=None)
  alibi: bool = flax.struct.field(pytree_node=False, default=False)
  layer: int = flax.struct.field(pytree_node=False, default=0)

  def for_layer(self, layer: int):
    """The mask of stack layer `layer` (BigBird's random blocks are drawn per layer)."""
    return self.replace(layer=layer) if self.pattern is not None and self.pattern.depends_on_layer else self

  def dense(self):
    """bool `[B, 1, T, S]`."""
    mask = make_attention_mask(
      self.q_positions,
      self.kv_positions,
      self.q_segment_ids,
      self.kv_segment_ids,
      causal=self.causal,
      window=self.window,
    )
    if self.pattern is None:
      return mask
    length, keys = self.q_positions.shape[1], self.kv_positions.shape[1]
    q_index = jnp.arange(length) + (0 if self.q_offset is None else self.q_offset)
    allowed = self.pattern.token_mask(q_index[:, None], jnp.arange(keys)[None, :], keys, keys, self.layer)
    return mask & allowed[None, None]

  def blocks(self) -> tuple[int, np.ndarray] | None:
    """(tokens per block, bool table `[query blocks, key blocks]`) for attention by blocks, or None."""
    length = self.q_positions.shape[1]
    if self.q_offset is not None or self.kv_positions.shape[1] != length:
      return None
    if self.pattern is not None:
      count = self.pattern.blocks(length)
      return (self.pattern.block, self.pattern.table(count, count, self.layer)) if count > 1 else None
    if self.window and 2 * self.window < length:
      count = -(-length // self.window)
      gap = np.arange(count)[:, None] - np.arange(count)[None, :]
      return self.window, (gap >= 0) & (gap <= 1) if self.causal else np.abs(gap) <= 1
    if self.causal and not self.window and length >= MIN_CAUSAL_LENGTH:
      return -(-length // CAUSAL_BLOCKS), np.tril(np.ones((CAUSAL_BLOCKS, CAUSAL_BLOCKS), bool))
    return None

  def attend(self, query, key, value, bias=None, *, impl='reference', dropout_rate=0.0, dropout_rng=None):
    """`attention.dot_product_attention` under `self.dense()` (and `bias`), by the kernel `impl` names."""
    if impl in ('splash', 'flash') and self.q_offset is not None:  # queries among a cache's keys
      impl = 'xla'
    if impl in ('splash', 'flash'):
      from transformer import flash, splash  # the kernels import Pallas: only when asked for

      kernel = splash.attention if impl == 'splash' else flash.attention
      options = dict(window=self.window, pattern=self.pattern, layer=self.layer) if impl == 'splash' else {}
      return kernel(query, key, value, self.q_segment_ids, self.kv_segment_ids, causal=self.causal, **options)
    blocks = self.blocks() if impl == 'reference' and not dropout_rate else None
    # A bias other than ALiBi's (which blocks rebuild from positions) has to be read whole.
    if blocks is None or (bias is not None and not self.alibi):
      return dot_product_attention(
        query, key, value, self.dense(), bias, impl=impl, dropout_rate=dropout_rate, dropout_rng=dropout_rng
      )
    return block_attention(query, key, value, self, *blocks)


def block_attention(query, key, value, mask: SelfMask, size: int, table: np.ndarray):
  """Self-attention under `mask.dense()`, query block i of `size` tokens attending to the key blocks j
  with `table[i, j]`: shapes as `attention.dot_product_attention`'s.

  Query blocks attend in groups of equal width (`_groups`), each to its key blocks gathered side by side;
  a row short of its group's width gets the null block, a block of keys no query sees.
  """
  batch, length = query.shape[:2]
  count = table.shape[0]

  def blocks(x, fill, extra=0):  # [B, T, ...] -> [B, count + extra, size, ...], the tail padded with `fill`
    pad = (count + extra) * size - length
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((batch, count + extra, size) + x.shape[2:])

  # Segment -2 marks the padded queries and -1 the padded and null keys: neither matches a real segment,
  # padding (0) included, so every real query keeps exactly the keys the dense mask gives it.
  q_blocks = [blocks(query, 0), blocks(mask.q_positions, 0), blocks(mask.q_segment_ids, -2)]
  k_blocks = [blocks(x, 0, 1) for x in (key, value, mask.kv_positions)] + [blocks(mask.kv_segment_ids, -1, 1)]
  outputs, order = [], []
  for rows, cols in _groups(table):
    width = cols.shape[1]
    q, q_pos, q_seg = (x[:, rows].reshape((-1, size) + x.shape[3:]) for x in q_blocks)
    k, v, k_pos, k_seg = (x[:, cols].reshape((-1, width * size) + x.shape[3:]) for x in k_blocks)
    block_mask = make_attention_mask(q_pos, k_pos, q_seg, k_seg, causal=mask.causal, window=mask.window)
    bias = layers.alibi_bias(q_pos, k_pos, query.shape[2]) if mask.alibi else None
    out = dot_product_attention(q, k, v, block_mask, bias)
    outputs.append(out.reshape((batch, len(rows)) + out.shape[1:]))
    order.extend(rows)
  out = jnp.concatenate(outputs, axis=1)[:, np.argsort(order)]
  return out.reshape((batch, count * size) + out.shape[3:])[:, :length]


def _groups(table: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """The query blocks by the number of key blocks they attend to, rounded up to at most `MAX_GROUPS`
  widths: [(query blocks `[g]`, their key blocks `[g, width]`, the null block `count` filling rows)].
  Rounding costs at most max / MAX_GROUPS blocks per row; a width per row count would compile one
  attention per distinct count (a strided pattern at 16k tokens has dozens)."""
  count = table.shape[0]
  sizes = table.sum(axis=1)
  step = max(1, -(-int(sizes.max()) // MAX_GROUPS))
  widths = np.maximum(-(-sizes // step) * step, 1)
  groups = []
  for width in np.unique(widths):
    rows = np.flatnonzero(widths == width)
    cols = np.full((len(rows), width), count)
    for n, row in enumerate(rows):
      keys = np.flatnonzero(table[row])
      cols[n, : len(keys)] = keys
    groups.append((rows, cols))
  return groups
