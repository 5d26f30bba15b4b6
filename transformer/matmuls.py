"""How the model multiplies: `dot_general`, the one product behind every Dense layer, attention projection and
the logits (through `platform.dot_general`), in the forms each backend compiles best (docs/performance.md,
"The matmul forms"). The same sums in another order: values equal `lax.dot_general` to float32 rounding, not
bitwise (tests/test_matrix_product.py, tests/test_kernel_first.py).

On every backend:
- one 2-d matrix product of `[tokens, d]` rows, so that a weight gradient contracts one axis, not batch and
  length, with a gradient of its own that keeps the input as given (the q, k and v projections of one input
  share it). The CPU's step copied its activations transposed without it; the TPU's `text.py:gpt2_medium` step
  needs 13.63 GiB per v5e chip with it, 18.13 without.
On the CPU only (`cpu=True`), each with an optimization barrier, which the TPU and GPU programs never hold:
- a wide kernel's weight gradient, and the logits table's (`layers.logits_matmul`), from the rows transposed
  first (`WIDE_KERNEL`);
- decoding steps of a few rows multiply kernel first (`kernel_first_matmuls`, `FEW_ROWS`).
"""

import contextlib
import contextvars
import functools
import math

import jax
from jax.ad_checkpoint import checkpoint_name

# The row counts (a decoding step's batch times beams) for which `dot_general` puts the kernel first.
FEW_ROWS = (2, 32)
# A weight gradient `rows^T g` takes rows transposed first from this ratio of the kernel's output to input
# features up: measured 1.2-1.5x at 4 (a [512, 2048] FFN input) and 1.7-2x at 16 (the [512, 8192] logits),
# even at 1, slower at 1/4.
WIDE_KERNEL = 2
# The name of a row product, a matmul with a gradient of its own: remat's `dots` policy saves it by name
# (`platform.SAVE_MATMULS`), as it saves a plain matmul.
ROW_PRODUCT = 'row_product'

_KERNEL_FIRST = contextvars.ContextVar('kernel_first', default=False)


@contextlib.contextmanager
def kernel_first_matmuls():
  """Within it, `dot_general` multiplies few rows kernel first. For the steps of a decoding loop over unrolled
  layers only: there XLA makes the kernels' transposed copies once, before the loop; applied to one call, or in
  `scan_layers`' loop over layers, it would transpose every kernel at every call. Inert off the CPU."""
  token = _KERNEL_FIRST.set(True)
  try:
    yield
  finally:
    _KERNEL_FIRST.reset(token)


def dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None, *, cpu: bool = True):
  """`lax.dot_general(x, kernel, ...)` as one 2-d matrix product of rows (a weight gradient `rows^T g`, the
  logits table's in `layers.logits_matmul`, as given). With `cpu`, in the CPU's layouts: the weight gradient
  from the rows transposed first, kernel first for a decoding step's few rows."""
  (x_contract, k_contract), (x_batch, _) = dimension_numbers
  if x_batch:
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision, preferred_element_type)
  if x.ndim == kernel.ndim == 2 and tuple(x_contract) == tuple(k_contract) == (0,):
    out = _weight_gradient(x, kernel, precision, preferred_element_type, cpu)
    # Kept as computed for a wide g: else XLA folds a later transpose of it (the logits table's gradient is
    # `(x^T g)^T`) into the matmul, which then contracts g's major axis, the form that the transposed rows
    # avoid (without the barrier the whole `lm` step was 1.03-1.06x slower).
    return jax.lax.optimization_barrier(out) if _transposes_rows(x, kernel.shape[1], cpu) else out
  rows = math.prod(size for axis, size in enumerate(x.shape) if axis not in x_contract)
  if cpu and _KERNEL_FIRST.get() and FEW_ROWS[0] <= rows <= FEW_ROWS[1]:
    return _kernel_first(x, kernel, x_contract, k_contract, precision, preferred_element_type)
  return _matrix_product(x, kernel, dimension_numbers, precision, preferred_element_type, cpu)


def _kernel_first(x, kernel, x_contract, k_contract, precision, preferred_element_type):
  """`kernel^T x^T` from a copy of the kernel with its contracting axes minor, then that small result
  transposed: XLA CPU's kernels for a few rows against a wide matrix ran up to twice as fast in this order."""
  free = [axis for axis in range(kernel.ndim) if axis not in k_contract]
  if free + list(k_contract) != list(range(kernel.ndim)):  # the barrier keeps XLA from folding it back
    kernel = jax.lax.optimization_barrier(kernel.transpose(free + list(k_contract)))
    k_contract = tuple(range(len(free), kernel.ndim))
  out = jax.lax.dot_general(kernel, x, ((k_contract, x_contract), ((), ())), precision, preferred_element_type)
  return out.transpose(tuple(range(len(free), out.ndim)) + tuple(range(len(free))))  # x's free axes first


def _matrix_product(x, kernel, dimension_numbers, precision, preferred_element_type, cpu):
  """`lax.dot_general` as one 2-d matrix product when x contracts its trailing axes with the kernel's
  leading ones (every Dense and attention projection): `[batch, length, ...]` flattened to rows. Left
  with several row axes, the gradient's `x^T g` contracts two axes, and XLA CPU copied both operands
  transposed to contract them (the ReLU's `[tokens, d_ff]` gradient and each norm's output, per layer)."""
  (x_contract, k_contract), _ = dimension_numbers
  free = x.ndim - len(x_contract)
  if tuple(x_contract) != tuple(range(free, x.ndim)) or tuple(k_contract) != tuple(range(len(k_contract))):
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision, preferred_element_type)
  matrix = kernel.reshape(math.prod(x.shape[free:]), -1)
  out = checkpoint_name(_row_product(x, matrix, free, precision, preferred_element_type, cpu), ROW_PRODUCT)
  return out.reshape(x.shape[:free] + kernel.shape[len(k_contract) :])


def _rows(x, free: int):
  return x.reshape(math.prod(x.shape[:free]), -1)


def _transposes_rows(rows, features: int, cpu: bool) -> bool:
  return cpu and features >= WIDE_KERNEL * rows.shape[1]


def _rows_transposed(rows, features: int, cpu: bool):
  """`rows^T` for the weight gradient `rows^T g` with `features` columns in g. XLA CPU runs `rows^T g` as
  given (the operand's contracting axis major) with a slower matmul than a plain product; for a wide g,
  a copy of the smaller `rows^T` made first pays for itself. The barrier keeps XLA from folding the
  transpose back into the matmul."""
  return jax.lax.optimization_barrier(rows.T) if _transposes_rows(rows, features, cpu) else rows.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _row_product(x, matrix, free, precision, preferred_element_type, cpu):
  """x's rows `[tokens, d]` (its `free` leading axes flattened) @ `matrix [d, f]`. Its gradient keeps x as
  given, not its rows: q, k and v, projecting one input, then share one residual, where each projection's own
  reshape made a scanned layer's backward pass keep a copy per projection; and the kernel's gradient is
  `_weight_gradient`'s."""
  return jax.lax.dot_general(_rows(x, free), matrix, (((1,), (0,)), ((), ())), precision, preferred_element_type)


def _row_product_fwd(x, matrix, free, precision, preferred_element_type, cpu):
  return _row_product(x, matrix, free, precision, preferred_element_type, cpu), (x, matrix)


def _weight_gradient(rows, g, precision, preferred_element_type, cpu):
  """`rows^T g`, from `_rows_transposed(rows)`."""
  return jax.lax.dot_general(
    _rows_transposed(rows, g.shape[1], cpu), g, (((1,), (0,)), ((), ())), precision, preferred_element_type
  )


def _row_product_bwd(free, precision, preferred_element_type, cpu, residuals, g):
  x, matrix = residuals
  rows = _rows(x, free)
  d_rows = jax.lax.dot_general(g, matrix, (((1,), (1,)), ((), ())), precision, preferred_element_type)
  d_matrix = _weight_gradient(rows, g, precision, preferred_element_type, cpu)
  return d_rows.reshape(x.shape).astype(x.dtype), d_matrix.astype(matrix.dtype)


_row_product.defvjp(_row_product_fwd, _row_product_bwd)
