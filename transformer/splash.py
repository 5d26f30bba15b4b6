"""Splash attention on a TPU: JAX's Pallas kernel, `jax.experimental.pallas.ops.tpu.splash_attention`.

The kernel (JAX 0.10.2) computes softmax(q k^T) v one block of queries and keys at a time, skipping the
blocks its mask rules out, so no [T, S] score matrix exists in memory, forward or backward (its own dq and
dk/dv kernels; the fused backward kernel is not used: its dq is [S / block, N, T, D], quadratic again).
What it takes, and what `attention` does about the rest:
- heads-major `[heads, length, features]` per row: the batch is a vmap over rows;
- grouped heads natively (its MHA kernel: query head n reads key/value head n // G, the grouping of
  `attention.dot_product_attention`), and d_k != d_v, any head size (a block spans a whole head);
- no scale: q is multiplied by 1/sqrt(d_k) first (in q's dtype: exact in float32, one rounding in bfloat16);
- lengths that are whole blocks of at least 128 tokens (its lane width: the backward pass tiles segment ids
  by it): a row is padded with tokens of a segment id no real token has (-1), which no real query sees and
  whose own outputs are sliced off;
- a static mask, the same for every row and head, given as an object it reads block by block: causal
  (`CausalMask`), a sliding window (`LocalMask`, causal or not) and nothing (`FullMask`) are computed inside
  the kernel, so 64k tokens build no [T, T] array; a block pattern (`patterns.Pattern`) is `_PatternMask`,
  its table read per block (with causality and the window), and only the blocks that are partly masked
  are stored;
- segment ids for queries and keys, compared for equality: segment 0 (padding) attends within itself, as
  under `attention.make_attention_mask`;
- causality and the window on array indices, which is the mask's rule on positions when positions advance
  with the index within a segment (every training row, packed or not; not a decoding cache, which `SelfMask`
  sends to `xla`).
It has no bias (ALiBi) and no dropout: `supports` says so.

A pallas_call cannot be partitioned by XLA: under a mesh the kernel runs in `jax.shard_map`, each device on
its rows and heads as the model's activation rules split them (`parallel.LOGICAL_RULES`: the batch over
data x fsdp, heads over tensor; inside the train step's vmap over batch shards the vmap splits the batch).
Off a TPU it runs in Pallas' interpret mode (for tests of its numerics on the CPU), which is slow.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from transformer import patterns, platform
from transformer.config import ModelConfig

LANES = 128  # the kernel's smallest block (the TPU's lane width)
BLOCKS = (512, 256, LANES)  # block sizes tried, largest first: 512 is MaxText's default (base.yml), unfused as there
PAD_SEGMENT = -1  # the segment of the tokens that pad a row to whole blocks: real ids are >= 0


def block_size(length: int, pattern: patterns.Pattern | None = None) -> int:
  """The kernel's query and key block for a `length`-token row: the largest of `BLOCKS` that divides the
  row rounded up to 128 tokens (never longer than it). Under a pattern, a block that is a whole number of
  the pattern's blocks, or 128 when those are smaller: a kernel block then holds few pattern blocks, and
  few distinct partly masked blocks need storing (each is a [block, block] array)."""
  padded = -(-length // LANES) * LANES
  fits = [size for size in BLOCKS if padded % size == 0]
  if pattern is not None:
    fits = [size for size in fits if pattern.block % size == 0] or [LANES]
  return fits[0]


@dataclasses.dataclass(frozen=True)
class _PatternMask(splash.Mask):
  """The pattern's table (`Pattern.table` of the `length`-token row) at token level, with causality and the
  window, over a row padded to `padded` tokens: what the kernel reads block by block, never built whole.
  Padding tokens (index >= length) are allowed by it: the segment ids keep them apart."""

  pattern: patterns.Pattern
  layer: int
  length: int
  padded: int
  causal: bool
  window: int

  @property
  def shape(self) -> tuple[int, int]:
    return (self.padded, self.padded)

  def __getitem__(self, index) -> np.ndarray:
    (top, bottom), (left, right) = (part.indices(self.padded)[:2] for part in index)
    i, j = np.arange(top, bottom)[:, None], np.arange(left, right)[None, :]
    if self.causal and bottom - 1 < left:  # above the diagonal (most blocks of a long causal row): fast
      return np.zeros((bottom - top, right - left), bool)
    count, size, last = self.pattern.blocks(self.length), self.pattern.block, self.length - 1
    table = self.pattern.table(count, count, self.layer)
    rows, cols = np.minimum(i, last) // size, np.minimum(j, last) // size
    if (
      bottom <= self.length
      and right <= self.length
      and not table[rows[0, 0] : rows[-1, 0] + 1, cols[0, 0] : cols[0, -1] + 1].any()
    ):
      return np.zeros((bottom - top, right - left), bool)  # no pattern block here (most of a sparse pattern)
    allowed = table[rows, cols] | (i > last) | (j > last)
    if self.causal:
      allowed &= i >= j
    if self.window:
      allowed &= np.abs(i - j) < self.window
    return allowed


def _mask(length: int, padded: int, causal: bool, window: int, pattern: patterns.Pattern | None, layer: int):
  """One head's mask over the padded row."""
  shape = (padded, padded)
  if pattern is not None:
    return _PatternMask(pattern, layer, length, padded, causal, window)
  if window:  # keys at distance < window: (q - window, q] when causal, else both sides
    return splash.LocalMask(shape, (window - 1, 0 if causal else window - 1), offset=0)
  if causal:
    return splash.CausalMask(shape)
  return splash.FullMask(shape)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, padded: int, block: int, mask_key: tuple, interpret: bool):
  """The splash kernel for `heads` query heads (of any key/value heads dividing them) over a padded row.
  Cached: turning a mask into the kernel's block tables reads it block by block (seconds at 64k tokens),
  and a model calls the same kernel in every layer."""
  mask = _mask(*mask_key)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  # Its block tables become concrete arrays even when first asked for inside a trace (the cache outlives it).
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(
      splash.MultiHeadMask((mask,) * heads),
      block_sizes=sizes,
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
    )


def attention(
  query,
  key,
  value,
  q_segment_ids,
  kv_segment_ids,
  *,
  causal: bool,
  window: int = 0,
  pattern: patterns.Pattern | None = None,
  layer: int = 0,
  interpret: bool | None = None,
):
  """Self-attention by the splash kernel, equal to `attention.dot_product_attention` under
  `make_attention_mask(positions, positions, q_segment_ids, kv_segment_ids, causal=causal, window=window)`
  and `pattern.token_mask` of the row's indices (stack layer `layer`), with positions advancing with the
  index (within each segment), scale 1/sqrt(d_k).

  Args:
    query: `[B, T, N, Dk]`; key: `[B, T, K, Dk]`; value: `[B, T, K, Dv]`, N = K * G.
    q_segment_ids, kv_segment_ids: int `[B, T]` (0 = padding; packed rows have segments 1, 2, ...).
    causal: keys after the query are hidden. window: if > 0, keys at a distance < window only.
    pattern, layer: a block-sparse pattern (`patterns.Pattern`) and the layer its table is drawn for.
    interpret: Pallas' interpret mode; None: when the step is not built for a TPU.
  Returns:
    `[B, T, N, Dv]` in the dtype of `value`.
  """
  length, d_qk = query.shape[1], query.shape[3]
  if key.shape[1] != length or kv_segment_ids.shape != q_segment_ids.shape:
    raise ValueError(f'splash.attention is self-attention: queries {query.shape}, keys {key.shape}.')
  if interpret is None:
    interpret = platform.target() != 'tpu'
  if pattern is None or not pattern.depends_on_layer:
    layer = 0  # one kernel for every layer
  block = block_size(length, pattern)
  padded = -(-length // block) * block
  mask_key = (length, padded, causal, window, pattern, layer)

  def kernel(query, key, value, q_segment_ids, kv_segment_ids):
    """On one device's rows and heads: [b, T, n, D] in, [b, T, n, Dv] out."""
    run = _kernel(query.shape[2], padded, block, mask_key, interpret)
    rows = lambda x: jnp.pad(x.swapaxes(1, 2), [(0, 0), (0, 0), (0, padded - length), (0, 0)])
    segments = lambda x: jnp.pad(x.astype(jnp.int32), [(0, 0), (0, padded - length)], constant_values=PAD_SEGMENT)
    scaled = query * jnp.asarray(d_qk**-0.5, query.dtype)
    out = jax.vmap(run)(
      rows(scaled), rows(key), rows(value), splash.SegmentIds(segments(q_segment_ids), segments(kv_segment_ids))
    )
    return out[:, :, :length].swapaxes(1, 2).astype(value.dtype)

  return platform.on_each_device(kernel, query, key, value, q_segment_ids, kv_segment_ids)


def supports(config: ModelConfig, *, dropout: bool, bias: bool) -> str | None:
  """None if the splash kernel runs `config`'s self-attention; else the reason, phrased as what to change."""
  if dropout:
    return (
      'the splash kernel has no attention dropout: set config.model.attention_dropout_rate=0, '
      'or attention_impl=auto (the einsum kernel applies it).'
    )
  if bias:
    return (
      f'the splash kernel adds no bias (positional={config.positional} adds ALiBi): '
      'pick another config.model.positional (e.g. rope), or attention_impl=auto.'
    )
  return None
