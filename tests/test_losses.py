"""`losses.cross_entropy` (hand-written gradient) against autodiff of the textbook form it replaced."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer import layers, losses


def textbook(logits, targets, weights, label_smoothing=0.0, z_loss=0.0):
  """The computation before the rewrite: log_probs materialised, smoothing term always evaluated."""
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  label_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  loss = -(confidence - low) * label_log_prob - low * jnp.sum(log_probs, axis=-1)
  if label_smoothing > 0:
    loss -= -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low))
  if z_loss > 0:
    loss += z_loss * log_z**2
  return jnp.sum(loss * weights), jnp.sum(weights)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _grads(fn, logits, targets, weights, smoothing, z_loss):
  """Loss and d loss / d (logits, weights), for a scale of the cotangent that is not 1."""
  loss = lambda x, w: 0.7 * fn(x, targets, w, smoothing, z_loss)[0]
  return jax.value_and_grad(loss, argnums=(0, 1))(logits, weights)


@settings(max_examples=10, deadline=None)
@given(
  shape=st.sampled_from([(1, 1, 2), (2, 3, 7), (3, 5, 40)]),
  smoothing=st.sampled_from([0.0, 0.1]),
  z_loss=st.sampled_from([0.0, 0.1]),
  scale=st.floats(0.1, 50.0),
  seed=st.integers(0, 2**16),
)
def test_loss_and_gradients_equal_the_textbook_form(shape, smoothing, z_loss, scale, seed):
  batch, length, vocab = shape
  keys = jax.random.split(jax.random.key(seed), 3)
  logits = scale * jax.random.normal(keys[0], (batch, length, vocab))
  targets = jax.random.randint(keys[1], (batch, length), 0, vocab)
  weights = (jax.random.uniform(keys[2], (batch, length)) > 0.3).astype(jnp.float32)
  (ours, (d_logits, d_weights)) = _grads(losses.cross_entropy, logits, targets, weights, smoothing, z_loss)
  (ref, (ref_logits, ref_weights)) = _grads(textbook, logits, targets, weights, smoothing, z_loss)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # exp(x - log_z) carries log_z's float32 rounding, which grows with the logits' size (at scale 36 a
  # probability near 1 differed by 1.1e-6 between the two forms): a few units in the last place of the logits.
  atol = max(1e-6, 4 * np.finfo(np.float32).eps * float(jnp.abs(logits).max()))
  np.testing.assert_allclose(d_logits, ref_logits, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(d_weights, ref_weights, rtol=1e-5, atol=1e-5)
  assert float(losses.cross_entropy(logits, targets, weights)[1]) == float(weights.sum())


def test_bfloat16_logits_get_bfloat16_gradients_computed_in_float32():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 17)) * 4
  targets = jnp.array([[1, 2, 3], [16, 0, 5]])
  weights = jnp.ones((2, 3))
  grad = jax.grad(lambda x: losses.cross_entropy(x, targets, weights)[0])(logits.astype(jnp.bfloat16))
  ref = jax.grad(lambda x: textbook(x, targets, weights)[0])(logits.astype(jnp.bfloat16).astype(jnp.float32))
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_backward_writes_one_vocabulary_sized_array():
  """The compiled gradient's fusions that produce a [tokens, vocab] result: one (the logits' gradient),
  where autodiff of the textbook form makes more."""
  logits = jnp.zeros((64, 512))
  targets, weights = jnp.zeros((64,), jnp.int32), jnp.ones((64,))

  def count(fn):
    grad = jax.jit(jax.grad(lambda x: fn(x, targets, weights)[0]))
    text = grad.lower(logits).compile().as_text()
    entry = text[text.index('ENTRY') :]
    made = [line for line in entry.splitlines() if '= f32[64,512]' in line and ' parameter(' not in line]
    return len(made)

  assert count(losses.cross_entropy) == 1
  assert count(textbook) > 1


def test_logits_matmul_gradients_equal_autodiff():
  """The logits layer's hand-written gradient against autodiff of the plain einsum (float32)."""
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (2, 5, 16))
  table = jax.random.normal(keys[1], (23, 16))
  cotangent = jax.random.normal(keys[2], (2, 5, 23))
  plain = lambda x, t: jnp.einsum('...d,vd->...v', x, t, preferred_element_type=jnp.float32)
  ours, ours_vjp = jax.vjp(layers.logits_matmul, x, table)
  ref, ref_vjp = jax.vjp(plain, x, table)
  np.testing.assert_array_equal(ours, ref)
  for a, b in zip(ours_vjp(cotangent), ref_vjp(cotangent)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # bfloat16 weights and activations (accelerators): float32 logits, gradients in the inputs' dtype.
  low = layers.logits_matmul(x.astype(jnp.bfloat16), table.astype(jnp.bfloat16))
  grads = jax.grad(lambda x, t: jnp.sum(layers.logits_matmul(x, t)), argnums=(0, 1))(
    x.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
  )
  assert low.dtype == jnp.float32 and [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
