"""Flash attention on a GPU: JAX's Pallas (Triton) kernel, `jax.experimental.pallas.ops.gpu.attention.mha`.

The kernel (JAX 0.10.2) computes softmax(scale q k^T) v one query block at a time against key blocks held
on chip, so no [B, N, T, S] score tensor exists in memory, forward or backward (its own Triton backward).
What it takes, and what `attention` does about the rest:
- one head count for q, k and v: grouped key/value heads are repeated to the query heads (head n reads key
  head n // G, the grouping of `attention.dot_product_attention`); the repeat's gradient sums them back;
- one head size: d_k != d_v is zero-padded to the larger (zero features change no logit and give zero
  outputs, which are sliced off); sizes that are not a power of two are padded by the kernel itself;
- lengths that are whole blocks (blocks are powers of two from 16 to 128 tokens, `block_sizes`): a row is
  padded to whole 128-token blocks (a short row to one power-of-two block) with tokens of a segment id no
  real token has (-1), which no real query sees and whose own outputs are sliced off;
- blocks that fit a GPU's shared memory: the kernel's defaults overflow it from 128 float32 or 256
  bfloat16 features per head, so the blocks shrink as heads grow (`_BLOCKS`);
- one segment-id array for queries and keys (self-attention: `attention` passes the queries' ids, which
  are the keys'), compared for equality: segment 0 (padding) attends within itself, as under
  `attention.make_attention_mask`;
- causality on array indices, which is the mask's rule on positions when positions increase with the index
  within a segment (every training row, packed or not; not a decoding cache, which `SelfMask` sends to `xla`).
Float32 matmuls in the kernel are TF32 on the GPU, as XLA's default precision makes them there.
It has no bias (ALiBi), no dropout, no sliding window and no block-sparse pattern: `supports` says so.

A pallas_call cannot be partitioned by XLA: under a mesh the kernel runs in `jax.shard_map` (`platform.on_each_device`).
Off a GPU it runs in Pallas' interpret mode (for tests of its numerics on the CPU), which is slow.
"""

import functools

import jax.numpy as jnp

from transformer import platform

BLOCK = 128  # the kernel's default query and key block (forward), and the unit of a padded row
MIN_BLOCK = 16  # Triton's smallest matmul side
PAD_SEGMENT = -1  # the segment of the tokens that pad a row to whole blocks: real ids are >= 0
# Blocks (forward query, forward key, backward) by the bytes of one padded feature row (features rounded up
# to a power of two, times the dtype's size): the largest that fit an H100's or B200's 227 KiB of shared
# memory per block, found by compiling the gradient through the CUDA plugin (docs/models.md, "GPU: flash").
# The kernel's default (128, 128, 32) overflows it from 128 float32 or 256 bfloat16 features on.
_BLOCKS = ((256, (128, 128, 32)), (512, (128, 64, 32)), (1024, (64, 32, 32)), (2048, (32, 32, 16)))
MAX_ROW_BYTES = _BLOCKS[-1][0]


def _power_of_two(n: int) -> int:
  """The next power of two from `n`, at least Triton's 16: the kernel's features per head, a short row's length."""
  return max(MIN_BLOCK, 1 << (n - 1).bit_length())


def block_sizes(size: int, dtype):
  """The kernel's `BlockSizes` for heads of `size` features in `dtype`."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention

  row = _power_of_two(size) * jnp.dtype(dtype).itemsize
  q, k, backward = next((blocks for limit, blocks in _BLOCKS if row <= limit), _BLOCKS[-1][1])
  return pallas_attention.BlockSizes(
    block_q=q, block_k=k, block_q_dkv=backward, block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward
  )


def padded_length(length: int) -> int:
  """The kernel's length for a `length`-token row: whole blocks of 128, or one power-of-two block."""
  if length > BLOCK:
    return -(-length // BLOCK) * BLOCK
  return _power_of_two(length)


def attention(query, key, value, q_segment_ids, kv_segment_ids, *, causal: bool, interpret: bool | None = None):
  """Self-attention by the Pallas flash kernel, equal to `attention.dot_product_attention` under
  `make_attention_mask(positions, positions, q_segment_ids, kv_segment_ids, causal=causal)` with positions
  advancing with the index (within each segment), scale 1/sqrt(d_k).

  Args:
    query: `[B, T, N, Dk]`; key: `[B, T, K, Dk]`; value: `[B, T, K, Dv]`, N = K * G.
    q_segment_ids, kv_segment_ids: int `[B, T]`, the same ids (self-attention: the kernel takes one array).
    causal: keys after the query are hidden.
    interpret: Pallas' interpret mode; None: when the step is not built for a GPU.
  Returns:
    `[B, T, N, Dv]` in the dtype of `value`.
  """
  length, d_qk = query.shape[1], query.shape[3]
  if key.shape[1] != length or q_segment_ids.shape != kv_segment_ids.shape:
    raise ValueError(f'flash.attention is self-attention: queries {query.shape}, keys {key.shape}.')
  if interpret is None:
    interpret = platform.target() != 'gpu'
  kernel = functools.partial(_attention, causal=causal, scale=d_qk**-0.5, interpret=interpret)
  return platform.on_each_device(kernel, query, key, value, q_segment_ids)


def _attention(query, key, value, segment_ids, *, causal: bool, scale: float, interpret: bool):
  """On one device's rows and heads: [b, T, n, D] in, [b, T, n, Dv] out."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # imports Triton: only when used

  length, heads, d_v = query.shape[1], query.shape[2], value.shape[-1]
  # Grouped heads: head n reads key/value head n // G.
  key, value = (jnp.repeat(x, heads // key.shape[2], axis=2) for x in (key, value))
  size = max(query.shape[-1], d_v)
  padded = padded_length(length)
  features = lambda x: jnp.pad(x, [(0, 0), (0, padded - length), (0, 0), (0, size - x.shape[-1])])
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded - length)], constant_values=PAD_SEGMENT)
  out = pallas_attention.mha(
    features(query),
    features(key),
    features(value),
    segment_ids,
    sm_scale=scale,
    causal=causal,
    block_sizes=block_sizes(size, query.dtype),
    interpret=interpret,
  )
  return out[:, :length, :, :d_v].astype(value.dtype)


def supports(config, *, dropout: bool, bias: bool, window: bool, pattern: bool) -> str | None:
  """None if the flash kernel runs `config`'s self-attention; else the reason, phrased as what to change."""
  if dropout:
    return (
      'the flash kernel has no attention dropout: set config.model.attention_dropout_rate=0, '
      'or attention_impl=auto (the einsum kernel applies it).'
    )
  if bias:
    return (
      f'the flash kernel adds no bias (positional={config.positional} adds ALiBi): '
      'pick another config.model.positional (e.g. rope), or attention_impl=auto.'
    )
  if window:
    return 'the flash kernel has no sliding window: set config.model.attention_window=0, or attention_impl=auto.'
  if pattern:
    return (
      f'the flash kernel has no block-sparse pattern ({config.attention_pattern}): '
      'set config.model.attention_pattern=dense, or attention_impl=auto.'
    )
  dtype = jnp.dtype(config.compute_dtype)
  size = max(config.head_dim_qk, config.head_dim_v)
  if _power_of_two(size) * dtype.itemsize > MAX_ROW_BYTES:
    most = MAX_ROW_BYTES // dtype.itemsize
    return (
      f"the flash kernel holds at most {most} features per head in {dtype.name} in a GPU's shared memory "
      f'(d_k={config.head_dim_qk}, d_v={config.head_dim_v}): use smaller heads, or attention_impl=auto.'
    )
  return None
