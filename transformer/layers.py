"""Embeddings, positional encodings, norms and feed-forward blocks."""

import contextlib
import contextvars
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from transformer import platform
from transformer.config import ModelConfig


class Embed(nn.Module):
  """Token embedding scaled by sqrt(d_model) (paper, 3.4); `attend` reuses it as the pre-softmax layer."""

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
    return jnp.take(table, tokens, axis=0) * math.sqrt(self.config.d_model)

  def attend(self, x):
    """Logits `x @ E^T`, in float32 for a stable softmax and loss."""
    return logits_matmul(x, jnp.asarray(self.embedding, self.config.compute_dtype))


# The row counts (a decoding step's batch times beams) for which `dot_general` puts the kernel first.
FEW_ROWS = (2, 32)
_KERNEL_FIRST = contextvars.ContextVar('kernel_first', default=False)


@contextlib.contextmanager
def kernel_first_matmuls():
  """Within it, `dot_general` multiplies few rows kernel first (on the CPU). For the steps of a decoding loop
  over unrolled layers only: there XLA makes the kernels' transposed copies once, before the loop; applied
  to one call, or in `scan_layers`' loop over layers, it would transpose every kernel at every call."""
  token = _KERNEL_FIRST.set(True)
  try:
    yield
  finally:
    _KERNEL_FIRST.reset(token)


def dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general(x, kernel, ...)` for `nn.Dense`, `nn.DenseGeneral` and the logits. Inside
  `kernel_first_matmuls`, for 2-32 rows on the CPU, it computes `kernel^T x^T` from a copy of the kernel with
  its contracting axes minor, and transposes that small result: XLA CPU's kernels for a few rows against a
  wide matrix ran up to twice as fast in this order (docs/performance.md). The same sums in another order:
  equal to float32 rounding, not bitwise."""
  (x_contract, k_contract), (x_batch, _) = dimension_numbers
  rows = math.prod(size for axis, size in enumerate(x.shape) if axis not in x_contract)
  low, high = FEW_ROWS
  if x_batch or not _KERNEL_FIRST.get() or not low <= rows <= high or not platform.is_cpu():
    return _matrix_product(x, kernel, dimension_numbers, precision, preferred_element_type)
  free = [axis for axis in range(kernel.ndim) if axis not in k_contract]
  if free + list(k_contract) != list(range(kernel.ndim)):  # the barrier keeps XLA from folding it back
    kernel = jax.lax.optimization_barrier(kernel.transpose(free + list(k_contract)))
    k_contract = tuple(range(len(free), kernel.ndim))
  out = jax.lax.dot_general(kernel, x, ((k_contract, x_contract), ((), ())), precision, preferred_element_type)
  return out.transpose(tuple(range(len(free), out.ndim)) + tuple(range(len(free))))  # x's free axes first


def _matrix_product(x, kernel, dimension_numbers, precision, preferred_element_type):
  """`lax.dot_general` as one 2-d matrix product when x contracts its trailing axes with the kernel's
  leading ones (every Dense and attention projection): `[batch, length, ...]` flattened to rows. Left
  with several row axes, the gradient's `x^T g` contracts two axes, and XLA CPU copied both operands
  transposed to contract them (the ReLU's `[tokens, d_ff]` gradient and each norm's output, per layer)."""
  (x_contract, k_contract), (x_batch, _) = dimension_numbers
  free = x.ndim - len(x_contract)
  if x_batch or tuple(x_contract) != tuple(range(free, x.ndim)) or tuple(k_contract) != tuple(range(len(k_contract))):
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision, preferred_element_type)
  depth = math.prod(x.shape[free:])
  rows, matrix = x.reshape(-1, depth), kernel.reshape(depth, -1)
  if _transposes_rows(rows, matrix.shape[1]):
    # Named, so that remat's `dots` policy (models._REMAT_POLICIES) saves it as it saves a plain matmul.
    out = checkpoint_name(_wide_product(rows, matrix, precision, preferred_element_type), WIDE_PRODUCT)
  else:
    out = jax.lax.dot_general(rows, matrix, (((1,), (0,)), ((), ())), precision, preferred_element_type)
  return out.reshape(x.shape[:free] + kernel.shape[len(k_contract) :])


# A weight gradient `rows^T g` takes rows transposed first (on the CPU) from this ratio of the kernel's
# output to input features up: measured 1.2-1.5x at 4 (a [512, 2048] FFN input) and 1.7-2x at 16 (the
# [512, 8192] logits), even at 1, slower at 1/4 (docs/performance.md).
WIDE_KERNEL = 2
WIDE_PRODUCT = 'wide_product'


def _transposes_rows(rows, features: int) -> bool:
  return platform.is_cpu() and features >= WIDE_KERNEL * rows.shape[1]


def _rows_transposed(rows, features: int):
  """`rows^T` for the weight gradient `rows^T g` with `features` columns in g. XLA CPU runs `rows^T g` as
  given (the operand's contracting axis major) with a slower matmul than a plain product; for a wide g,
  a copy of the smaller `rows^T` made first pays for itself. The barrier keeps XLA from folding the
  transpose back into the matmul."""
  return jax.lax.optimization_barrier(rows.T) if _transposes_rows(rows, features) else rows.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _wide_product(rows, kernel, precision, preferred_element_type):
  """`rows [n, d] @ kernel [d, f]`, whose kernel gradient is `_rows_transposed(rows) @ g`."""
  return jax.lax.dot_general(rows, kernel, (((1,), (0,)), ((), ())), precision, preferred_element_type)


def _wide_product_fwd(rows, kernel, precision, preferred_element_type):
  return _wide_product(rows, kernel, precision, preferred_element_type), (rows, kernel)


def _wide_product_bwd(precision, preferred_element_type, residuals, g):
  rows, kernel = residuals
  d_rows = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())), precision, preferred_element_type)
  d_kernel = jax.lax.dot_general(
    _rows_transposed(rows, kernel.shape[1]), g, (((1,), (0,)), ((), ())), precision, preferred_element_type
  )
  return d_rows.astype(rows.dtype), d_kernel.astype(kernel.dtype)


_wide_product.defvjp(_wide_product_fwd, _wide_product_bwd)


@jax.custom_vjp
def logits_matmul(x, table):
  """`x [..., d] @ table [vocab, d]^T` in float32, with the table's gradient computed as
  `(x^T @ g)^T`: autodiff's `g^T @ x` makes XLA copy the transposed `[tokens, vocab]` gradient
  first (on CPU the largest copy of a language model's step); the small `[d, vocab]` result is
  transposed after the matmul."""
  return dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _logits_matmul_fwd(x, table):
  return logits_matmul(x, table), (x, table)


def _logits_matmul_bwd(residuals, g):
  x, table = residuals
  d_x = jnp.einsum('...v,vd->...d', g, table, preferred_element_type=jnp.float32)
  rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # one contracted axis (`_matrix_product`)
  d_table = jnp.matmul(_rows_transposed(rows_x, table.shape[0]), rows_g, preferred_element_type=jnp.float32)
  if _transposes_rows(rows_x, table.shape[0]):
    # Else XLA folds the `.T` below into the matmul, which then contracts g's major axis: the form that
    # the transposed rows avoid (without the barrier the whole `lm` step was 1.03-1.06x slower).
    d_table = jax.lax.optimization_barrier(d_table)
  return d_x.astype(x.dtype), d_table.T.astype(table.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


def sinusoidal(positions, d_model: int, dtype=jnp.float32):
  """The paper's encoding (3.5): sin on even features, cos on odd ones, wavelengths up to 10000 * 2pi."""
  dims = jnp.arange(0, d_model, 2, dtype=jnp.float32)
  angles = positions[..., None].astype(jnp.float32) / (10000.0 ** (dims / d_model))
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


def apply_rope(x, positions, base: float = 10000.0):
  """Rotary embedding (Su et al., 2021) on `[B, T, heads, D]`: rotates feature pairs (i, i + D/2)."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
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
        dot_general=dot_general,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      )

    if cfg.activation == 'swiglu':
      hidden = nn.silu(dense(cfg.d_ff, ('embed', 'mlp'), 'gate', False)(x))
      hidden *= dense(cfg.d_ff, ('embed', 'mlp'), 'up', False)(x)
      return dense(cfg.d_model, ('mlp', 'embed'), 'down', False)(hidden)
    activation = jax.nn.relu if cfg.activation == 'relu' else jax.nn.gelu
    hidden = activation(dense(cfg.d_ff, ('embed', 'mlp'), 'wi')(x))
    return dense(cfg.d_model, ('mlp', 'embed'), 'wo')(hidden)
