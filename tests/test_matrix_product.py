"""`matmuls.dot_general` computes every projection as one 2-d matrix product: the numbers of `lax.dot_general`,
a gradient that XLA computes without transposed copies of the activations, and for a wide kernel on the CPU a
weight gradient from the rows transposed first."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer import layers, matmuls, models, platform

# (x's shape after the row axes, kernel's shape, contracting axes of x and of the kernel): nn.Dense, the
# attention's query/key/value (nn.DenseGeneral to heads), its output projection, and the logits' layout,
# which contracts the kernel's last axis and keeps `lax.dot_general`.
LAYOUTS = {
  'dense': ((6,), (6, 10), ((-1,), (0,))),
  'query': ((6,), (6, 3, 4), ((-1,), (0,))),
  'out': ((3, 4), (3, 4, 6), ((-2, -1), (0, 1))),
  'logits': ((6,), (10, 6), ((-1,), (1,))),
}


@settings(max_examples=20, deadline=None)
@given(layout=st.sampled_from(sorted(LAYOUTS)), rows=st.lists(st.integers(1, 5), min_size=0, max_size=3))
def test_values_and_gradients_equal_lax_dot_general(layout, rows):
  """Any number of row axes (none, as one token; batch and length; more): the values and both gradients of
  `lax.dot_general`, to float32 rounding."""
  x_tail, kernel_shape, (x_axes, kernel_axes) = LAYOUTS[layout]
  x = jax.random.normal(jax.random.key(len(rows)), (*rows, *x_tail))
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  numbers = ((tuple(a % x.ndim for a in x_axes), kernel_axes), ((), ()))
  cotangent = jax.random.normal(jax.random.key(2), jax.lax.dot_general(x, kernel, numbers).shape)

  def vjp(dot):
    out, pullback = jax.vjp(lambda x, kernel: dot(x, kernel, numbers), x, kernel)
    return (out, *pullback(cotangent))

  for ours, want in zip(jax.jit(vjp, static_argnums=0)(matmuls.dot_general), vjp(jax.lax.dot_general)):
    assert ours.shape == want.shape
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


class _Projections(nn.Module):
  """The FFN, and attention's projections to heads and back, with a ReLU between (as in the models)."""

  @nn.compact
  def __call__(self, x):
    config = tiny(d_model=32, d_ff=48, activation='relu')
    x = x + layers.FeedForward(config)(nn.LayerNorm()(x))
    heads = nn.DenseGeneral((4, 8), dot_general=platform.dot_general)(nn.LayerNorm()(x))
    return nn.DenseGeneral(32, axis=(-2, -1), dot_general=platform.dot_general)(jax.nn.relu(heads))


def test_the_gradient_copies_no_activation():
  """XLA CPU contracted batch and length of `x^T g` (each weight's gradient) by copying the ReLU's
  gradient, the norms' outputs and the heads' gradients transposed (removing them made the `lm` step 1.15x
  faster: docs/performance.md). Flattened to rows, the compiled gradient copies no activation."""
  model, x = _Projections(), jnp.ones((4, 16, 32))
  params = model.init(jax.random.key(0), x)
  loss = lambda params, x: jnp.sum(model.apply(params, x) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  shapes = re.findall(r'= f32\[([\d,]+)\]\{[\d,]+\} (?:copy|transpose)\(', hlo)
  tokens = 4 * 16
  activations = [s for s in shapes if np.prod([int(d) for d in s.split(',')]) >= tokens * 32]
  assert not activations, activations


DENSE = (((1,), (0,)), ((), ()))


def _compiled_gradient(fn, kernel, x):
  return jax.jit(jax.value_and_grad(fn)).lower(kernel, x).compile().as_text()


def test_a_wide_kernels_gradient_multiplies_the_rows_transposed_first():
  """Rows [64, 8]: for a kernel 4x as wide as deep the compiled weight gradient contracts the minor axis of a
  transposed copy (`lhs_contracting_dims={1}`); for a square one XLA gets the rows as they are ({0})."""
  x = jax.random.normal(jax.random.key(0), (64, 8))
  for features, contracted in ((4 * 8, '1'), (8, '0')):
    kernel = jax.random.normal(jax.random.key(1), (8, features))
    hlo = _compiled_gradient(lambda kernel, x: jnp.sum(matmuls.dot_general(x, kernel, DENSE) ** 2), kernel, x)
    gradient = re.findall(rf'f32\[8,{features}\]\{{1,0\}} dot\([^\n]*lhs_contracting_dims=\{{(\d)\}}', hlo)
    assert gradient == [contracted], hlo


def test_the_logits_table_gradient_is_a_plain_product_transposed_after():
  """The tied table's gradient `(x^T g)^T` is a plain product of the transposed rows and g (contracting
  g's major axis, as autodiff's `g^T x` does, ran 1.7x slower), then a transpose of the small result. Without
  the barrier on the product XLA folded that transpose back into the matmul, as `g^T x`."""
  x = jax.random.normal(jax.random.key(0), (64, 8))
  table = jax.random.normal(jax.random.key(1), (4 * 8, 8))
  hlo = _compiled_gradient(lambda table, x: jnp.sum(layers.logits_matmul(x, table) ** 2), table, x)
  products = re.findall(r'= f32\[(\d+),(\d+)\]\{1,0\} dot\([^\n]*lhs_contracting_dims=\{(\d)\}', hlo)
  gradient = [p for p in products if p[0] != '64']  # the logits and x's gradient have a row per token
  assert gradient == [('8', '32', '1')], hlo


def test_remat_dots_policy_saves_a_wide_product_as_any_matmul():
  """Remat's `dots` policy saves every matmul's result; a wide product (a custom gradient) is named for it.
  Counted in the differentiated program (XLA would merge a recomputed matmul with the forward one): as many
  matmuls as without remat, fewer than with full remat, which recomputes the product."""
  x, kernel = jax.random.normal(jax.random.key(0), (64, 8)), jax.random.normal(jax.random.key(1), (8, 32))
  loss = lambda kernel, x: jnp.sum(jnp.tanh(matmuls.dot_general(x, kernel, DENSE)) ** 2)
  count = lambda fn: str(jax.make_jaxpr(jax.value_and_grad(fn))(kernel, x)).count('dot_general')
  plain, full = count(loss), count(jax.checkpoint(loss))
  assert count(jax.checkpoint(loss, policy=models._REMAT_POLICIES['dots'])) == plain < full


def test_projections_of_one_input_keep_it_once_in_a_scanned_backward_pass():
  """q, k and v project the same input: a scan over layers stacks that input once for their three weight
  gradients, not a flattened copy per projection (which cost a scanned `lm12` step two `[12, 2048, 512]`
  copies more). Counted as the forward scan's stacked outputs of the input's size (linear layers: nothing
  else of that size is needed)."""
  x = jax.random.normal(jax.random.key(0), (4, 16, 32))
  kernels = jax.random.normal(jax.random.key(1), (5, 3, 32, 32)) / 32  # 5 layers of 3 projections

  def layer(h, ks):
    return sum(matmuls.dot_general(h, ks[i], (((2,), (0,)), ((), ()))) for i in range(3)), None

  loss = lambda kernels, x: jnp.sum(jax.lax.scan(layer, x, kernels)[0] ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(kernels, x).jaxpr
  forward = next(eqn for eqn in jaxpr.eqns if eqn.primitive.name == 'scan')
  stacked = [v.aval.shape for v in forward.outvars if np.prod(v.aval.shape) == 5 * x.size]
  assert stacked == [(5, 4, 16, 32)], stacked
