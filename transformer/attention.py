"""Attention: masks built in one place, the kernels behind `attention_impl`, and `MultiHeadAttention`.

Shapes use B batch, T query length, S key length, N query heads, K key/value heads (N = K * G),
D per-head size. Masks are boolean `[B, 1, T, S]`, True where a query may attend to a key.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import cached_attention, layers, patterns, platform
from transformer.config import ConfigError, ModelConfig

# `decode=PREFILL`: the first decoding call, into an empty cache from slot 0. It writes the cache and attends
# to its own tokens as a forward pass does, so by the training kernels (blocks, splash), not the cache's.
PREFILL = 'prefill'

# A finite "minus infinity": a row with every key masked (a padding query) softmaxes to a uniform
# distribution instead of NaN, whose gradient would poison the whole batch even through a zero weight.
_MASKED = -1e9


def make_attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, causal: bool, window: int = 0):
  """The one mask builder: padding, packed segments, causal and sliding-window, combined.

  Segment id 0 marks padding. A query attends to a key only in its own segment, so real tokens never
  see padding and packed sequences never see each other (block-diagonal). Causality and the window are
  stated on positions, not array indices, so the same rule holds for packed rows (positions restart
  per segment) and for a KV cache (keys carry the positions they were written with).

  Args:
    q_positions, q_segment_ids: int `[B, T]` (positions may be None when neither causal nor windowed).
    kv_positions, kv_segment_ids: int `[B, S]`.
    causal: keys after the query are hidden.
    window: if > 0, a query at position p sees keys at positions in (p - window, p] when causal, and
      with |p - key| < window otherwise.
  Returns:
    bool `[B, 1, T, S]`.
  """
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if causal or window:
    distance = q_positions[:, :, None] - kv_positions[:, None, :]
    if causal:
      mask &= distance >= 0
    if window:
      mask &= jnp.abs(distance) < window
  return mask[:, None]


def resolve_impl(config: ModelConfig, *, dropout: bool) -> str:
  """The kernel `attention_impl` stands for on this backend; `auto` always returns a working one.

  `splash` and `flash` are self-attention kernels (cross-attention then uses `xla`); off their platform
  they run in Pallas' interpret mode, for tests of their numerics only.
  """
  impl = config.attention_impl
  target = platform.target()
  on_gpu = target == 'gpu'
  if impl == 'cudnn' and not on_gpu:
    raise ConfigError(
      f'attention_impl=cudnn needs a GPU (the step is built for: {target}): '
      'set config.model.attention_impl=auto or xla.'
    )
  if impl in ('splash', 'flash'):
    home = 'tpu' if impl == 'splash' else 'gpu'
    if target not in (home, 'cpu'):
      raise ConfigError(
        f'attention_impl={impl} is a {home.upper()} kernel (the step is built for: {target}): '
        'set config.model.attention_impl=auto.'
      )
    reason = _kernel_supports(impl, config, dropout)
    if reason:
      raise ConfigError(f'attention_impl={impl}: {reason}')
    return impl
  if impl in ('xla', 'cudnn') and dropout:
    raise ConfigError(
      f'attention_impl={impl} (jax.nn.dot_product_attention) has no attention dropout: '
      'set config.model.attention_dropout_rate=0, or attention_impl=auto or reference.'
    )
  if impl != 'auto':
    return impl
  if dropout:
    return 'reference'
  # The Pallas kernels first: their memory is linear in the length. cuDNN's, as called here (a dense mask,
  # for packed rows), held 5.3x flash's temporaries at 16k tokens (compiled for an H100, docs/models.md).
  if target in ('tpu', 'gpu'):
    fused = 'splash' if target == 'tpu' else 'flash'
    if _kernel_supports(fused, config, dropout) is None:
      return fused
  if on_gpu and _cudnn_supports(config):
    return 'cudnn'
  if target != 'cpu':
    return 'xla'
  # On CPU the einsum kernel's train step measured 1-10% faster than jax.nn.dot_product_attention's
  # (docs/performance.md, "What the figures rest on"), and it attends by blocks (block_attention.py).
  return 'reference'


def _kernel_supports(impl: str, config: ModelConfig, dropout: bool) -> str | None:
  """None if the Pallas kernel `impl` runs this config's self-attention, else what to change."""
  from transformer import flash, splash  # they import Pallas: only when asked for

  bias = config.positional == 'alibi'
  if impl == 'splash':
    return splash.supports(config, dropout=dropout, bias=bias)
  window, pattern = config.attention_window > 0, config.attention_pattern in patterns.KINDS
  return flash.supports(config, dropout=dropout, bias=bias, window=window, pattern=pattern)


def _cudnn_supports(config: ModelConfig) -> bool:
  # cuDNN's fused kernel: half precision, equal query/key and value head sizes, multiples of 8 up to 128.
  d = config.head_dim_qk
  return config.compute_dtype in (jnp.bfloat16, jnp.float16) and d == config.head_dim_v and d % 8 == 0 and d <= 128


def dot_product_attention(
  query, key, value, mask, bias=None, *, impl: str = 'reference', dropout_rate: float = 0.0, dropout_rng=None
):
  """softmax(q k^T / sqrt(d_k) + bias, masked) v, with grouped heads when K < N.

  Args:
    query: `[B, T, N, Dk]`; key: `[B, S, K, Dk]`; value: `[B, S, K, Dv]`.
    mask: bool `[B, 1, T, S]`, or a mask object with an `attend` method of this signature (which then
      does the work: `block_attention.SelfMask`); bias: float `[B or 1, N, T, S]` or None (ALiBi).
    impl: `reference` (einsum, softmax in float32) or `xla` / `cudnn` (jax.nn.dot_product_attention);
      `splash` and `flash` need a `SelfMask` (an array mask falls back to `xla`).
    dropout_rate, dropout_rng: attention dropout on the weights (reference only).
  Returns:
    `[B, T, N, Dv]` in the dtype of `value`.
  """
  if hasattr(mask, 'attend'):  # self-attention's mask, which picks its kernel (block_attention.SelfMask)
    return mask.attend(query, key, value, bias, impl=impl, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  if impl in ('splash', 'flash'):  # their kernels take segment ids, which a mask array no longer has
    impl = 'xla'
  scale = query.shape[-1] ** -0.5
  if impl == 'reference':
    return _reference_attention(query, key, value, mask, bias, scale, dropout_rate, dropout_rng)
  return _fused_attention(query, key, value, mask, bias, scale, impl)


def _reference_attention(query, key, value, mask, bias, scale, dropout_rate, dropout_rng):
  batch, q_len, num_heads, _ = query.shape
  kv_heads = key.shape[2]
  grouped = query.reshape(batch, q_len, kv_heads, num_heads // kv_heads, query.shape[-1])
  logits = jnp.einsum('btkgd,bskd->bkgts', grouped, key, preferred_element_type=jnp.float32)
  logits = logits.reshape(batch, num_heads, q_len, key.shape[1]) * scale
  if bias is not None:
    logits += bias.astype(jnp.float32)
  logits = jnp.where(mask, logits, _MASKED)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  weights = weights.astype(value.dtype).reshape(batch, kv_heads, -1, q_len, key.shape[1])
  out = jnp.einsum('bkgts,bskd->btkgd', weights, value)
  return out.reshape(batch, q_len, num_heads, value.shape[-1])


def _fused_attention(query, key, value, mask, bias, scale, impl):
  # jax.nn.dot_product_attention wants one head size for q, k and v. Zero features change no logit
  # (q.k is unchanged) and give zero outputs, which are sliced off again.
  d_qk, d_v = query.shape[-1], value.shape[-1]
  size = max(d_qk, d_v)
  pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, size - x.shape[-1])])
  if bias is not None and impl == 'cudnn':
    # cuDNN casts the bias to the compute dtype: bfloat16 rounds ALiBi penalties at distances >= 256.
    # XLA's kernel adds the float32 bias to float32 logits, like the reference.
    impl = 'xla'
  if mask is not None and impl == 'cudnn':
    # JAX 0.10's cuDNN path cannot vmap a mask shared by the heads (jax-ml/jax#34920), and the train step
    # vmaps over its batch shards: one mask per head.
    mask = jnp.broadcast_to(mask, mask.shape[:1] + (query.shape[2],) + mask.shape[2:])
  out = jax.nn.dot_product_attention(
    pad(query), pad(key), pad(value), bias=bias, mask=mask, scale=scale, implementation=impl
  )
  return out[..., :d_v]


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with per-head sizes d_k / d_v, grouped KV heads and a KV cache.

  In decode mode self-attention writes the keys and values of the new tokens into the `cache`
  collection at `cache_index` and attends to the cache: to its written slots only under a
  `cached_attention.CacheMask`, else to all of it, `mask` and `bias` then covering the cache's length
  (the decoder builds them). Cross-attention (`cross=True`) in decode mode stores the
  projected encoder keys/values whenever `inputs_kv` is given (the first decoding call) and reuses
  them when it is None, so later steps skip the two projections of the whole source.
  """

  config: ModelConfig
  decode: bool = False
  deterministic: bool = True
  cross: bool = False

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask, bias=None, rope_positions=None, cache_index=None, dropout_rng=None):
    """`dropout_rng`: the attention-dropout key (default: `make_rng('dropout')`); the layers pass
    explicit keys so that dropout does not depend on the module path (`scan_layers`)."""
    cfg = self.config
    heads, kv_heads = cfg.num_heads, cfg.kv_heads
    proj = functools.partial(
      nn.DenseGeneral,
      axis=-1,
      use_bias=cfg.attention_bias,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype,
      dot_general=platform.dot_general,
    )
    # DenseGeneral initialises the kernel flattened to [fan_in, fan_out]: plain Glorot is right.
    init_in = init_out = nn.initializers.xavier_uniform()

    def project(name, inputs, features, axes):
      kernel_init = nn.with_logical_partitioning(init_in, axes)
      bias_init = nn.with_logical_partitioning(nn.initializers.zeros, axes[1:])
      return proj(features, name=name, kernel_init=kernel_init, bias_init=bias_init)(inputs)

    query = project('query', inputs_q, (heads, cfg.head_dim_qk), ('embed', 'heads', 'kv'))
    if inputs_kv is None and self.decode and self.cross:
      key, value = self._cached_cross_kv()
    else:
      key = project('key', inputs_kv, (kv_heads, cfg.head_dim_qk), ('embed', 'kv_heads', 'kv'))
      value = project('value', inputs_kv, (kv_heads, cfg.head_dim_v), ('embed', 'kv_heads', 'kv'))
    if rope_positions is not None:
      query = layers.apply_rope(query, rope_positions, config=cfg)
      key = layers.apply_rope(key, rope_positions, config=cfg)
    if self.decode and self.cross and inputs_kv is not None:
      self.variable('cache', 'cached_key', lambda: key).value = key
      self.variable('cache', 'cached_value', lambda: value).value = value
    elif self.decode == PREFILL and not self.cross:
      self._update_cache(key, value, cache_index)
    elif self.decode and not self.cross:
      key, value = self._update_cache(key, value, cache_index)
      if not isinstance(mask, cached_attention.CacheMask):  # the dense kernels' layout
        key = cached_attention.join(key, cached_attention.KEY_AXIS).transpose(0, 3, 1, 2)
        value = cached_attention.join(value, cached_attention.VALUE_AXIS).transpose(0, 2, 1, 3)

    dropout = cfg.attention_dropout_rate > 0.0 and not self.deterministic
    if dropout and dropout_rng is None:
      dropout_rng = self.make_rng('dropout')
    impl = resolve_impl(cfg, dropout=dropout)
    if isinstance(mask, cached_attention.CacheMask):  # a decoding step: only the written slots
      out = cached_attention.cached_attention(query, key, value, mask)
    else:
      out = dot_product_attention(
        query,
        key,
        value,
        mask,
        bias,
        impl=impl,
        dropout_rate=cfg.attention_dropout_rate if dropout else 0.0,
        dropout_rng=dropout_rng if dropout else None,
      )
    return nn.DenseGeneral(
      cfg.d_model,
      axis=(-2, -1),
      use_bias=cfg.attention_bias,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype,
      dot_general=platform.dot_general,
      name='out',
      kernel_init=nn.with_logical_partitioning(init_out, ('heads', 'kv', 'embed')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
    )(out)

  def _cached_cross_kv(self):
    if not self.has_variable('cache', 'cached_key'):
      raise ConfigError(
        'Cross-attention has no cached keys/values: pass `encoded` to the first decode call '
        '(the cache comes from models.init_cache with the right source_length).'
      )
    return self.get_variable('cache', 'cached_key'), self.get_variable('cache', 'cached_value')

  def _update_cache(self, key, value, cache_index):
    """Writes the new keys/values at `cache_index`; returns the cache's key and value blocks
    (`cached_attention.split`). On init it only allocates.

    The cache is heads-major, keys `[B, K, D, S]` and values `[B, K, S, D]`, in blocks: a decoding step's
    matmuls read each head's slots as they lie, where `[B, S, K, D]` made XLA transpose the cache (or the
    block of it read) at every step.
    """
    key, value = key.transpose(0, 2, 3, 1), value.transpose(0, 2, 1, 3)
    initialized = self.has_variable('cache', 'cached_key')
    unit = self.config.pattern_block if self.config.attention_pattern in patterns.KINDS else 1
    split = lambda x, axis: cached_attention.split(x, axis, unit=unit)
    empty = lambda x, axis: split(jnp.zeros(x.shape, x.dtype), axis)
    cached_key = self.variable('cache', 'cached_key', empty, key, cached_attention.KEY_AXIS)
    cached_value = self.variable('cache', 'cached_value', empty, value, cached_attention.VALUE_AXIS)
    if not initialized:
      return split(key, cached_attention.KEY_AXIS), split(value, cached_attention.VALUE_AXIS)
    cached_key.value = cached_attention.write(cached_key.value, key, cache_index, cached_attention.KEY_AXIS)
    cached_value.value = cached_attention.write(cached_value.value, value, cache_index, cached_attention.VALUE_AXIS)
    return cached_key.value, cached_value.value
