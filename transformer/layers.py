"""Embeddings, positional encodings, norms and feed-forward blocks."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import platform
from transformer.config import ModelConfig


class Embed(nn.Module):
  """Token embedding scaled by sqrt(d_model) (paper, 3.4; unless `scale_embeddings=False`); `attend` reuses it
  as the pre-softmax layer."""

  config: ModelConfig
  vocab_size: int

  def setup(self):
    cfg = self.config
    # std d_model^-0.5: scaled inputs have unit variance, and tied output logits start near unit scale.
    init = nn.initializers.normal(stddev=cfg.d_model**-0.5)
    self.embedding = self.param(
      'embedding',
      nn.with_logical_partitioning(init, ('vocab', 'embed')),
      (self.vocab_size, cfg.d_model),
      cfg.storage_dtype,
    )

  def __call__(self, tokens):
    table = jnp.asarray(self.embedding, self.config.compute_dtype)
    embedded = jnp.take(table, tokens, axis=0)
    return embedded * math.sqrt(self.config.d_model) if self.config.scale_embeddings else embedded

  def attend(self, x):
    """Logits `x @ E^T`, in float32 for a stable softmax and loss."""
    return logits_matmul(x, jnp.asarray(self.embedding, self.config.compute_dtype))


@jax.custom_vjp
def logits_matmul(x, table):
  """`x [..., d] @ table [vocab, d]^T` in float32, with the table's gradient computed as `(x^T g)^T`:
  autodiff's `g^T x` makes compilers copy the transposed `[tokens, vocab]` gradient first (the largest copy of
  a language model's step on the CPU; on a TPU v5p-8 `text.py:gpt2_medium` needed 3.57 GiB more per chip,
  `text.py:1b` on v5p-16 18.04 GiB more); the small `[d, vocab]` result is transposed after the matmul."""
  return platform.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _logits_matmul_fwd(x, table):
  return logits_matmul(x, table), (x, table)


def _logits_matmul_bwd(residuals, g):
  x, table = residuals
  d_x = jnp.einsum('...v,vd->...d', g, table, preferred_element_type=jnp.float32)
  rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  d_table = platform.dot_general(rows_x, rows_g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_table.T.astype(table.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


def sinusoidal(positions, d_model: int, dtype=jnp.float32, layout: str = 'interleaved'):
  """The paper's encoding (3.5): sin on even features, cos on odd ones, wavelengths up to 10000 * 2pi.
  `layout='split'`: the same values, all sines first, then all cosines (Marian's order)."""
  dims = jnp.arange(0, d_model, 2, dtype=jnp.float32)
  angles = positions[..., None].astype(jnp.float32) / (10000.0 ** (dims / d_model))
  if layout == 'split':
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)[..., :d_model].astype(dtype)
  interleaved = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., d/2, 2]: sin, cos, sin, ...
  return interleaved.reshape(positions.shape + (-1,))[..., :d_model].astype(dtype)


class LearnedPositions(nn.Module):
  """A learned table of `max_len` position embeddings."""

  config: ModelConfig

  @nn.compact
  def __call__(self, positions):
    cfg = self.config
    table = self.param(
      'embedding',
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, 'embed')),
      (cfg.max_len, cfg.d_model),
      cfg.storage_dtype,
    )
    return jnp.take(jnp.asarray(table, cfg.compute_dtype), positions, axis=0)


def rope_frequencies(head_dim: int, base: float = 10000.0, config: ModelConfig | None = None):
  """RoPE's `head_dim / 2` angular frequencies base^(-2i/D); a `config` with `rope_scaling='llama3'` applies
  Llama 3.1's long-context rescaling: wavelengths above original_max_len / low_freq_factor divided by the
  factor, those below original_max_len / high_freq_factor kept, the band between interpolated smoothly."""
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if config is None or config.rope_scaling == 'none':
    return inv_freq
  factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
  original = config.rope_original_max_len
  wavelength = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelength > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelength - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelength >= original / high) & (wavelength <= original / low)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, base: float = 10000.0, config: ModelConfig | None = None):
  """Rotary embedding (Su et al., 2021) on `[B, T, heads, D]`: rotates feature pairs (i, i + D/2), the
  half-split layout of GPT-NeoX and Hugging Face's Llama. `config`: its rope_base and rope_scaling instead."""
  inv_freq = rope_frequencies(x.shape[-1], config.rope_base if config is not None else base, config)
  angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [B, T, 1, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int):
  """Per-head slopes of ALiBi (Press et al., 2022): a geometric sequence, interleaved for non-powers of 2."""

  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = powers(closest)
  if closest < num_heads:
    slopes += powers(2 * closest)[0::2][: num_heads - closest]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(q_positions, kv_positions, num_heads: int):
  """`[B, heads, T, S]` bias -slope * |query position - key position| (linear in distance)."""
  distance = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
  return -alibi_slopes(num_heads)[None, :, None, None] * distance[:, None]


def norm(config: ModelConfig, name: str):
  kind = nn.LayerNorm if config.norm_type == 'layernorm' else nn.RMSNorm
  kwargs = dict(scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)))
  if config.norm_type == 'layernorm':
    kwargs['bias_init'] = nn.with_logical_partitioning(nn.initializers.zeros, ('embed',))
  return kind(
    epsilon=config.norm_epsilon, dtype=config.compute_dtype, param_dtype=config.storage_dtype, name=name, **kwargs
  )


class FeedForward(nn.Module):
  """FFN(x) = W2 act(W1 x + b1) + b2 (paper, 3.3); `swiglu` gates it: W2 (silu(W1 x) * W3 x)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config

    def dense(features, axes, name, use_bias=True):
      return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype,
        name=name,
        dot_general=platform.dot_general,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      )

    if cfg.activation == 'swiglu':
      hidden = nn.silu(dense(cfg.d_ff, ('embed', 'mlp'), 'gate', False)(x))
      hidden *= dense(cfg.d_ff, ('embed', 'mlp'), 'up', False)(x)
      return dense(cfg.d_model, ('mlp', 'embed'), 'down', False)(hidden)
    activation = {
      'relu': jax.nn.relu,
      'gelu': jax.nn.gelu,  # the tanh approximation (GPT-2's gelu_new)
      'gelu_exact': functools.partial(jax.nn.gelu, approximate=False),
      'silu': jax.nn.silu,
    }[cfg.activation]
    hidden = activation(dense(cfg.d_ff, ('embed', 'mlp'), 'wi')(x))
    return dense(cfg.d_model, ('mlp', 'embed'), 'wo')(hidden)
