"""Token cross-entropy over the vocabulary, with a hand-written gradient.

The logits `[tokens, vocab]` are the largest activation of a language model, so the loss is written
to touch them as few times as possible: the forward pass reads them for logsumexp and the label's
logit and writes nothing vocabulary-sized; the backward pass writes one array, the logits' gradient
`softmax * (1 + 2 z log_z) - target distribution`, in one fused pass. Autodiff of the textbook form
materialises `log_probs`, a broadcast of the smoothing term and their sum (three vocabulary-sized
arrays), even with smoothing off.
"""

import functools

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, weights, label_smoothing: float = 0.0, z_loss: float = 0.0):
  """Summed token cross-entropy and summed weights.

  With smoothing the target puts 1 - eps on the label and eps / (V - 1) on every other token; the
  distribution's own entropy is subtracted so that a perfect prediction scores exactly 0. `z_loss`
  adds z * log_z ** 2 per token (PaLM's auxiliary loss keeping the softmax normaliser near 1).
  """
  per_token = _token_loss(logits, targets, float(label_smoothing), float(z_loss))
  return jnp.sum(per_token * weights), jnp.sum(weights)


def _parts(logits, targets, smoothing, z_loss):
  """(per-token loss, log_z), from the logits' two reductions. Since the target distribution sums to
  1, -sum_j q_j log p_j = log_z - (c - l) x_label - l sum_j x_j, with c = 1 - eps, l = eps / (V - 1)."""
  vocab = logits.shape[-1]
  low = smoothing / (vocab - 1)
  logits32 = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits32, axis=-1)
  label = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
  loss = log_z - (1.0 - smoothing - low) * label
  if smoothing > 0:
    loss -= low * jnp.sum(logits32, axis=-1)
    confidence = 1.0 - smoothing
    loss += confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low)  # minus the target's entropy
  if z_loss > 0:
    loss += z_loss * log_z**2
  return loss, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_loss(logits, targets, smoothing, z_loss):
  return _parts(logits, targets, smoothing, z_loss)[0]


def _token_loss_fwd(logits, targets, smoothing, z_loss):
  loss, log_z = _parts(logits, targets, smoothing, z_loss)
  return loss, (logits, targets, log_z)


def _token_loss_bwd(smoothing, z_loss, residuals, g):
  logits, targets, log_z = residuals
  vocab = logits.shape[-1]
  low = smoothing / (vocab - 1)
  probs_scale = g * (1.0 + 2.0 * z_loss * log_z) if z_loss > 0 else g
  probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
  is_label = jnp.arange(vocab, dtype=targets.dtype) == targets[..., None]
  target = jnp.where(is_label, 1.0 - smoothing, low)
  grad = probs * probs_scale[..., None] - target * g[..., None]
  # Integer targets take a float0 cotangent (JAX's "no gradient" for integer inputs).
  return grad.astype(logits.dtype), jnp.zeros(targets.shape, jax.dtypes.float0)


_token_loss.defvjp(_token_loss_fwd, _token_loss_bwd)
