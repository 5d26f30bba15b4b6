"""Decoding steps multiply kernel first (`matmuls.dot_general` in `kernel_first_matmuls`): the same numbers as
`x @ kernel`, and XLA transposes the kernels once, before the decoding loop, never inside it.

Whole decodes are checked in tests/test_decoding.py: greedy (8 rows) and beam search (4 x 8 rows) take the
kernel-first steps there, and must give the tokens and scores of full forward passes, which multiply
`x @ kernel` (a kernel-first result off by 0.1% fails the beam search test)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from hypothesis import example, given, settings
from hypothesis import strategies as st

from transformer import decoding, hlo_audit, matmuls, models

# (x's shape after the rows, kernel's shape, contracting axes of x and of the kernel): nn.Dense, the attention's
# query/key/value and output projections (nn.DenseGeneral) and the logits against the embedding table.
LAYOUTS = {
  'dense': ((24,), (24, 40), ((-1,), (0,))),
  'query': ((24,), (24, 3, 8), ((-1,), (0,))),
  'out': ((3, 8), (3, 8, 24), ((-2, -1), (0, 1))),
  'logits': ((24,), (40, 24), ((-1,), (1,))),
}


def _numbers(x_axes, kernel_axes, x_ndim):
  return ((tuple(a % x_ndim for a in x_axes), kernel_axes), ((), ()))


@settings(max_examples=16, deadline=None)
@given(layout=st.sampled_from(sorted(LAYOUTS)), batch=st.integers(1, 40), steps=st.sampled_from([1, 2]))
@example(layout='out', batch=1, steps=1).via('the bounds of FEW_ROWS')
@example(layout='dense', batch=1, steps=2).via('the bounds of FEW_ROWS')
@example(layout='query', batch=16, steps=2).via('the bounds of FEW_ROWS')
@example(layout='logits', batch=33, steps=1).via('the bounds of FEW_ROWS')
def test_kernel_first_equals_x_times_kernel(layout, batch, steps):
  """Every layout and row count (batch x steps): equal to `lax.dot_general` to float32 rounding; the kernel is
  put first (an optimisation barrier around its transposed copy, or the table as stored) exactly for 2-32 rows."""
  x_tail, kernel_shape, (x_axes, kernel_axes) = LAYOUTS[layout]
  x = jax.random.normal(jax.random.key(batch), (batch, steps, *x_tail))
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  numbers = _numbers(x_axes, kernel_axes, x.ndim)

  def first(x, kernel):
    with matmuls.kernel_first_matmuls():
      return matmuls.dot_general(x, kernel, numbers)

  want = jax.lax.dot_general(x, kernel, numbers)
  np.testing.assert_allclose(jax.jit(first)(x, kernel), want, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(first)(x, kernel))
  kernel_first = 2 <= batch * steps <= 32
  assert ('transpose' in jaxpr) == kernel_first, jaxpr  # of the result, rows back in front
  assert ('optimization_barrier' in jaxpr) == (kernel_first and layout != 'logits'), jaxpr


@pytest.mark.parametrize('scan_layers', [False, True])
def test_kernels_are_transposed_before_the_decoding_loop_not_in_it(scan_layers):
  """The compiled greedy loop at batch 8: every kernel's transposed copy is made outside the while loops, none
  inside (where it would cost a pass over the weights per token). A `scan_layers` model decodes with its
  layers unrolled (`decoding._unrolled`): no array of its stacked cache's shape is inside the loops, where
  XLA copied the whole cache in and out of the loop over layers at every token."""
  config = tiny(d_model=40, d_ff=56, num_heads=5, scan_layers=scan_layers)
  model = models.build_model(config)
  params = jax.jit(lambda: models.init_params(model, jax.random.key(0)))()
  prompts = jnp.ones((8, 3), jnp.int32) * 5
  lengths = jnp.full((8,), 8, jnp.int32)
  args = (model, params, None, prompts, lengths, jax.random.key(0), 1.0)
  hlo = decoding._generate.lower(*args, max_len=8, sample=False, top_k=0, top_p=1.0).compile().as_text()
  kernels = {tuple(sorted(leaf.shape[scan_layers:])) for leaf in _kernels(params)}  # one layer's shapes
  computations, entry = hlo_audit.split(hlo)
  in_loops = hlo_audit.loop_computations(hlo)

  def kernel_transposes(names):
    found = 0
    for name in names:
      for line in computations[name]:
        match = re.search(r'= f32\[([\d,]+)\]\S* (transpose|copy)\(', line)
        if match and tuple(sorted(int(d) for d in match.group(1).split(','))) in kernels:
          found += 1
    return found

  assert kernel_transposes(in_loops) == 0
  assert kernel_transposes([name for name in computations if name not in in_loops]) > 0
  # BOS, the prompt and all but the last token: the cache's slots.
  cache = jax.eval_shape(lambda: models.init_cache(model, 8, 1 + 3 + 8 - 1))
  stacked = {','.join(map(str, leaf.shape)) for leaf in jax.tree.leaves(cache) if leaf.ndim == 5}
  assert bool(stacked) == scan_layers  # heads-major keys and values, with the layer axis first
  loop_text = '\n'.join(line for name in in_loops for line in computations[name])
  assert not [shape for shape in stacked if f'[{shape}]' in loop_text], stacked


def _kernels(params):
  return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if 'kernel' in str(path[-1])]
