"""Flash attention on a GPU: JAX's Pallas (Triton) kernel, `jax.experimental.pallas.ops.gpu.attention.mha`.

The kernel (JAX 0.10.2) computes softmax(scale q k^T) v one query block at a time against key blocks held
on chip, so no [B, N, T, S] score tensor exists in memory, forward or backward (its own Triton backward).
What it takes, and what `attention` does about the rest:
- one head count for q, k and v: grouped key/value heads are repeated to the query heads (head n reads key
  head n // G, the grouping of `attention.dot_product_attention`); the repeat's gradient sums them back;
- one head size: d_k != d_v is zero-padded to the larger (zero features change no logit and give zero
  outputs, which are sliced off); sizes that are not a power of two are padded by the kernel itself;
- lengths that are multiples of its blocks (128 tokens forward, 32 backward; Triton's blocks are powers of
  two of at least 16): a row is padded with tokens of a segment id no real token has (-1), which no real
  query sees and whose own outputs are sliced off;
- one segment-id array for queries and keys (self-attention), compared for equality: segment 0 (padding)
  attends within itself, as under `attention.make_attention_mask`;
- causality on array indices, which is the mask's rule on positions when positions advance with the index
  within a segment (every training row, packed or not; not a decoding cache, which `SelfMask` sends to `xla`).
It has no bias (ALiBi), no dropout, no sliding window and no block-sparse pattern: `supports` says so.

Off a GPU it runs in Pallas' interpret mode (for tests of its numerics on the CPU), which is slow.
"""

import jax.numpy as jnp

from transformer import platform

BLOCK = 128  # the kernel's default query and key block (forward)
BACKWARD_BLOCK = 32  # its default blocks of the backward pass
MIN_BLOCK = 16  # Triton's smallest matmul side
PAD_SEGMENT = -1  # the segment of the tokens that pad a row to whole blocks: real ids are >= 0


def padded_length(length: int) -> int:
  """The kernel's length for a `length`-token row: whole blocks of 128, or one power-of-two block."""
  if length > BLOCK:
    return -(-length // BLOCK) * BLOCK
  return max(MIN_BLOCK, 1 << (length - 1).bit_length())


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
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # imports Triton: only when used

  batch, length, heads, d_qk = query.shape
  kv_heads, d_v = key.shape[2], value.shape[-1]
  if key.shape[1] != length or q_segment_ids.shape != kv_segment_ids.shape:
    raise ValueError(f'flash.attention is self-attention: queries {query.shape}, keys {key.shape}.')
  if interpret is None:
    interpret = platform.target() != 'gpu'
  # Grouped heads: head n reads key/value head n // G.
  key, value = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (key, value))
  size = max(d_qk, d_v)
  padded = padded_length(length)
  features = lambda x: jnp.pad(x, [(0, 0), (0, padded - length), (0, 0), (0, size - x.shape[-1])])
  segment_ids = jnp.pad(q_segment_ids.astype(jnp.int32), [(0, 0), (0, padded - length)], constant_values=PAD_SEGMENT)
  out = pallas_attention.mha(
    features(query),
    features(key),
    features(value),
    segment_ids,
    sm_scale=d_qk**-0.5,
    causal=causal,
    block_sizes=pallas_attention.BlockSizes(
      block_q=BLOCK,
      block_k=BLOCK,
      block_q_dkv=BACKWARD_BLOCK,
      block_kv_dkv=BACKWARD_BLOCK,
      block_q_dq=BACKWARD_BLOCK,
      block_kv_dq=BACKWARD_BLOCK,
    ),
    interpret=interpret,
  )
  return out[:, :length, :, :d_v].astype(value.dtype)


def supports(config, *, dropout: bool, bias: bool, window: bool, pattern: bool) -> str | None:
  """None if the flash kernel runs `config`'s self-attention; else the reason, phrased as what to change."""
  if dropout:
    return 'the flash kernel has no attention dropout: set config.model.attention_dropout_rate=0.'
  if bias:
    return 'the flash kernel adds no bias (ALiBi): pick another config.model.positional, or attention_impl=auto.'
  if window:
    return 'the flash kernel has no sliding window: set config.model.attention_window=0, or attention_impl=auto.'
  if pattern:
    return (
      f'the flash kernel has no block-sparse pattern ({config.attention_pattern}): '
      'set config.model.attention_pattern=dense, or attention_impl=auto.'
    )
  return None
