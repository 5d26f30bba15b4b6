"""Train state, loss, and the pure `train_step` / `eval_step` functions."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from transformer import models


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, so it shards and checkpoints as a whole."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: checkpoints store it as a plain array


def init_state(model, optimizer, seed: int) -> TrainState:
  params = models.init_params(model, jax.random.key(seed))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed + 1)))


def cross_entropy(logits, targets, weights, label_smoothing: float = 0.0, z_loss: float = 0.0):
  """Summed token cross-entropy and summed weights.

  With smoothing the target puts 1 - eps on the label and eps / (V - 1) on every other token; the
  distribution's own entropy is subtracted so that a perfect prediction scores exactly 0.
  """
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  label_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  loss = -(confidence - low) * label_log_prob - low * jnp.sum(log_probs, axis=-1)
  if label_smoothing > 0:
    entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low))
    loss -= entropy
  if z_loss > 0:
    loss += z_loss * log_z ** 2
  return jnp.sum(loss * weights), jnp.sum(weights)


def _apply(model, params, batch, deterministic, rng=None):
  """Logits for a batch dict: `targets` (+ `targets_segment_ids`, `targets_positions`) and, for the
  encoder-decoder, `inputs` (+ `inputs_segment_ids`, `inputs_positions`)."""
  segments = batch.get('targets_segment_ids')
  decoder_inputs = models.shift_right(batch['targets'], segments)
  rngs = {'dropout': rng} if rng is not None else {}
  if model.config.kind == 'encoder_decoder':
    return model.apply(
        {'params': params}, batch['inputs'], decoder_inputs,
        inputs_positions=batch.get('inputs_positions'), inputs_segment_ids=batch.get('inputs_segment_ids'),
        decoder_positions=batch.get('targets_positions'), decoder_segment_ids=segments,
        deterministic=deterministic, rngs=rngs)
  return model.apply({'params': params}, decoder_inputs, positions=batch.get('targets_positions'),
                     segment_ids=segments, deterministic=deterministic, rngs=rngs)


def token_weights(batch):
  """1 for real target tokens, 0 for padding."""
  segments = batch.get('targets_segment_ids')
  real = segments > 0 if segments is not None else batch['targets'] != models.PAD_ID
  return real.astype(jnp.float32)


def _sums(model, params, batch, deterministic, rng, label_smoothing, z_loss):
  logits = _apply(model, params, batch, deterministic, rng)
  weights = token_weights(batch)
  loss, count = cross_entropy(logits, batch['targets'], weights, label_smoothing, z_loss)
  correct = jnp.sum((jnp.argmax(logits, -1) == batch['targets']) * weights)
  return loss, (count, correct)


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(model, optimizer, schedule, train_config, axis_name=None):
  """A pure `train_step(state, batch) -> (state, metrics)`.

  Gradients are of the *summed* loss, divided once by the number of real tokens in the whole batch
  (psum'd over `axis_name` under pmap): the update is the same for any device count, any split into
  `grad_accum_steps` micro-batches, and any amount of padding.
  """
  accum = int(train_config.grad_accum_steps)
  smoothing, z_loss = float(train_config.label_smoothing), float(train_config.z_loss)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    grad_fn = jax.value_and_grad(
        lambda p, b, r: _sums(model, p, b, False, r, smoothing, z_loss), has_aux=True)

    def micro_step(carry, xs):
      index, micro = xs
      (loss, (count, correct)), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (grads, loss, count, correct)), None

    micro_batches = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
    zeros = (jax.tree.map(jnp.zeros_like, state.params), 0.0, 0.0, 0.0)
    (grads, loss, count, correct), _ = jax.lax.scan(micro_step, zeros, (jnp.arange(accum), micro_batches))
    if axis_name is not None:
      grads, loss, count, correct = jax.lax.psum((grads, loss, count, correct), axis_name)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss / denominator, 'accuracy': correct / denominator, 'tokens': count,
               'grad_norm': global_norm(grads), 'param_norm': global_norm(params),
               'learning_rate': schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, axis_name=None):
  """`eval_step(params, batch) -> summed metrics` (no label smoothing, ever)."""
  def eval_step(params, batch):
    loss, (count, correct) = _sums(model, params, batch, True, None, 0.0, 0.0)
    sums = {'loss': loss, 'tokens': count, 'correct': correct}
    return jax.lax.psum(sums, axis_name) if axis_name is not None else sums
  return eval_step
