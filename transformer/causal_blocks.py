"""Causal self-attention that skips the key blocks after each query block.

A causal mask hides every key after the query: within a segment positions advance with the index,
and other segments are hidden anyway (the same property `attention.local_attention` relies on). So
query block i (of `BLOCKS` equal blocks) needs only keys 0 .. end of block i: 4 blocks compute
10 of the 16 score blocks (62.5%), and the softmax runs over as many elements. Each block attends
under the dense mask's own entries for its slice, so the output equals the dense kernel's (the softmax
of a row sums the same terms: masked keys add exactly 0 in float32).

Used for training and evaluation (no cache) by the einsum kernel without attention dropout; other
kernels get the dense mask (cuDNN and XLA's kernel skip masked blocks themselves).
"""

import flax
import jax
import jax.numpy as jnp

from transformer.attention import dot_product_attention, make_attention_mask

BLOCKS = 4
MIN_LENGTH = 128  # shorter sequences: small blocks cost more in overhead than they save


@flax.struct.dataclass
class CausalBlocks:
  """A causal self-attention mask kept as positions and segment ids, cut per query block."""

  positions: jax.Array  # int [B, T]
  segment_ids: jax.Array  # int [B, T]

  def dense(self):
    return make_attention_mask(self.positions, self.positions, self.segment_ids, self.segment_ids, causal=True)

  def attend(self, query, key, value, bias=None, *, impl='reference', dropout_rate=0.0, dropout_rng=None):
    """`attention.dot_product_attention` under `self.dense()`, by query blocks."""
    if impl != 'reference' or dropout_rate > 0:
      # Dropout draws one mask for the whole [T, T] weights: blocks would draw other numbers.
      return dot_product_attention(
        query, key, value, self.dense(), bias, impl=impl, dropout_rate=dropout_rate, dropout_rng=dropout_rng
      )
    length = query.shape[1]
    size = -(-length // BLOCKS)
    outputs = []
    for start in range(0, length, size):
      end = min(start + size, length)
      mask = make_attention_mask(
        self.positions[:, start:end],
        self.positions[:, :end],
        self.segment_ids[:, start:end],
        self.segment_ids[:, :end],
        causal=True,
      )
      block_bias = None if bias is None else bias[:, :, start:end, :end]
      outputs.append(dot_product_attention(query[:, start:end], key[:, :end], value[:, :end], mask, block_bias))
    return jnp.concatenate(outputs, axis=1)


def applies(length: int, kv_length: int) -> bool:
  return length >= MIN_LENGTH and kv_length == length
