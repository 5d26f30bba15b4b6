"""Optimizers and learning-rate schedules from a `TrainConfig` (its fields are checked there)."""

import jax
import jax.numpy as jnp
import optax

from transformer.config import TrainConfig


def learning_rate_schedule(train: TrainConfig, d_model: int):
  """`adam`: the paper's lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), times `learning_rate`.
  `adamw`: linear warmup to `learning_rate`, then cosine decay to 10% of it at `num_steps`."""
  warmup = max(int(train.warmup_steps), 1)
  if train.optimizer == 'adam':

    def schedule(count):
      step = jnp.maximum(count + 1, 1).astype(jnp.float32)  # optax counts from 0, the paper from 1
      return train.learning_rate * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup**-1.5)

    return schedule
  return optax.warmup_cosine_decay_schedule(
    0.0, train.learning_rate, warmup, max(int(train.num_steps), warmup + 1), train.learning_rate * 0.1
  )


# Decayed by what a parameter is (its leaf name), not its rank: `scan_layers` stacks norm scales and
# biases into matrices, and they must stay undecayed.
DECAYED = ('kernel', 'embedding')  # weight matrices; token and learned-position tables


def decay_mask(params):
  """True for weight matrices and embedding tables; never for norm scales or biases."""

  def decayed(path, _):
    # The last dict key is the leaf's name; flax boxes (nn.Partitioned) add attribute keys after it.
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in DECAYED

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(train: TrainConfig, d_model: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train, d_model)
  if train.optimizer == 'adam':  # the paper's betas and epsilon (5.3)
    optimizer = optax.adam(schedule, b1=0.9, b2=0.98, eps=1e-9)
  else:
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=train.weight_decay, mask=decay_mask)
  if train.grad_clip > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(train.grad_clip), optimizer)
  return optimizer
