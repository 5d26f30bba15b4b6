"""Train state, loss, and the pure `train_step` / `eval_step` functions."""

import contextlib
import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from transformer import models, platform
from transformer.config import TrainConfig
from transformer.losses import cross_entropy  # noqa: F401 (also the name train.cross_entropy)
from transformer.tokens import PAD_ID


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, so it shards and checkpoints as a whole."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: checkpoints store it as a plain array


def init_state(model, optimizer, seed: int) -> TrainState:
  params = models.init_params(model, jax.random.key(seed))
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    rng=jax.random.key_data(jax.random.key(seed + 1)),
  )


def is_argmax(logits, targets):
  """`jnp.argmax(logits, -1) == targets` (the first maximum wins a tie) from plain reductions over the
  vocabulary: the target is the argmax iff its logit is the maximum and every earlier logit is below it.
  With the vocabulary split over devices these are all-reduces of [batch, length] (argmax all-gathers
  every shard's best), and XLA CPU runs them without writing a vocabulary-sized index array (2x faster)."""
  logits = logits.astype(jnp.float32)  # the loss's dtype, so XLA shares the max and the label's logit
  vocab = logits.shape[-1]
  best = jnp.max(logits, axis=-1)
  label = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  earlier = jnp.max(jnp.where(jnp.arange(vocab) < targets[..., None], logits, -jnp.inf), axis=-1)
  return (label == best) & (earlier < best)


def _apply(model, params, batch, deterministic, rng=None):
  """Logits for a batch dict: `targets` (+ `targets_segment_ids`, `targets_positions`) and, for the
  encoder-decoder, `inputs` (+ `inputs_segment_ids`, `inputs_positions`)."""
  segments = batch.get('targets_segment_ids')
  decoder_inputs = models.shift_right(batch['targets'], segments)
  rngs = {'dropout': rng} if rng is not None else {}
  if model.config.kind == 'encoder_decoder':
    return model.apply(
      {'params': params},
      batch['inputs'],
      decoder_inputs,
      inputs_positions=batch.get('inputs_positions'),
      inputs_segment_ids=batch.get('inputs_segment_ids'),
      decoder_positions=batch.get('targets_positions'),
      decoder_segment_ids=segments,
      deterministic=deterministic,
      rngs=rngs,
    )
  return model.apply(
    {'params': params},
    decoder_inputs,
    positions=batch.get('targets_positions'),
    segment_ids=segments,
    deterministic=deterministic,
    rngs=rngs,
  )


def token_weights(batch):
  """1 for real target tokens, 0 for padding."""
  segments = batch.get('targets_segment_ids')
  real = segments > 0 if segments is not None else batch['targets'] != PAD_ID
  return real.astype(jnp.float32)


def _sums(logits, batch, label_smoothing, z_loss):
  """(summed loss, (tokens, correct tokens)) of a batch's logits: what the train and eval steps add up."""
  weights = token_weights(batch)
  loss, count = cross_entropy(logits, batch['targets'], weights, label_smoothing, z_loss)
  correct = jnp.sum(is_argmax(logits, batch['targets']) * weights)
  return loss, (count, correct)


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def dropout_active(model_config) -> bool:
  return model_config.dropout_rate > 0 or model_config.attention_dropout_rate > 0


@dataclasses.dataclass(frozen=True)
class MeshLayout:
  """How a step jitted over `mesh` keeps its work split (built by `parallel.Runner`)."""

  mesh: Any  # a jax.sharding.Mesh
  batch_axes: tuple  # the mesh axes the batch dimension is split over
  rules: tuple = ()  # logical activation axis -> mesh axes, for `platform.activation_sharding`
  param_shardings: Any = None  # how the parameters are used: their FSDP shards gathered (ZeRO-3)

  @property
  def shards(self) -> int:
    return math.prod(self.mesh.shape[axis] for axis in self.batch_axes)

  def inner_rules(self):
    """The rules inside a vmap over batch slices, whose `spmd_axis_name` splits the batch instead."""
    return tuple((name, None if name == 'activation_batch' else axes) for name, axes in self.rules)


def sharding_context(layout: MeshLayout | None):
  """While tracing a step jitted over `layout.mesh`: bare PartitionSpecs and the model's logical
  activation constraints resolve against it. Without a layout (one device, pmap) it does nothing,
  so the model's constraints stay no-ops."""
  if layout is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh))
  stack.enter_context(platform.activation_sharding(layout.rules))
  return stack


def make_train_step(
  model, optimizer, schedule, train_config: TrainConfig, axis_name=None, layout: MeshLayout | None = None
):
  """A pure `train_step(state, batch) -> (state, metrics)`.

  Gradients are of the *summed* loss, divided once by the number of real tokens in the whole batch
  (psum'd over `axis_name` under pmap): the update is the same for any device count, any split into
  `grad_accum_steps` micro-batches, and any amount of padding. Dropout is drawn per example, from
  `fold_in(step key, the row's index in the global batch)`, so it does not depend on the layout either.

  Under `layout` (jit over a mesh) every micro-batch stays split over the batch axes, activations
  follow the layout's logical rules, and each batch shard keeps its own partial gradient until the
  last micro-batch, so gradients are reduced across devices once per step.
  """
  accum = train_config.grad_accum_steps
  smoothing, z_loss = train_config.label_smoothing, train_config.z_loss
  per_row = dropout_active(model.config)
  # On a mesh each batch shard's gradient is computed apart (vmap over shards) and summed after the
  # last micro-batch: one reduction across devices per step, not one per micro-batch (nor one per use
  # of a tied embedding). The price: each device holds a whole partial gradient while accumulating.
  per_shard = layout is not None and layout.shards > 1 and layout.param_shardings is not None
  if per_shard:  # [shards, *parameter]: split over the batch axes, then like the parameter in use
    shard_shardings = jax.tree.map(
      lambda s: jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(layout.batch_axes, *s.spec)),
      layout.param_shardings,
    )

  def loss_fn(params, batch, row_ids, step_key, row_axes):
    if layout is not None and layout.param_shardings is not None:
      params = jax.tree.map(jax.lax.with_sharding_constraint, params, layout.param_shardings)
    if per_row:
      # One key per example: the masks are the same whatever the batch layout (devices,
      # micro-batches). The model sees one-row batches; `row_axes` split the mapped rows on a mesh.
      def one_row(row, key):
        with platform.activation_sharding(layout.inner_rules() if layout else ()):
          return _apply(model, params, jax.tree.map(lambda x: x[None], row), False, key)[0]

      keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(row_ids)
      logits = jax.vmap(one_row, spmd_axis_name=row_axes)(batch, keys)
    else:
      logits = _apply(model, params, batch, False)
    return _sums(logits, batch, smoothing, z_loss)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def split(x):
    # Micro-batch m holds rows i * accum + m: each device's contiguous block of rows splits into
    # accum equal parts locally, so no micro-batch moves between devices.
    return jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0)

  def micro_grads(params, micro_batch, micro_ids, step_key):
    if per_shard:
      # vmap over the batch shards (one per device along the batch axes): gradients [shards, ...].
      def shard_grads(batch, ids):
        with platform.activation_sharding(layout.inner_rules()):
          (loss, (count, correct)), grads = grad_fn(params, batch, ids, step_key, None)
        return grads, loss, count, correct

      by_shard = lambda x: x.reshape((layout.shards, -1) + x.shape[1:])
      return jax.vmap(shard_grads, spmd_axis_name=layout.batch_axes)(
        jax.tree.map(by_shard, micro_batch), by_shard(micro_ids)
      )
    row_axes = None
    if layout is not None:
      row_axes = layout.batch_axes
      micro_batch = jax.lax.with_sharding_constraint(micro_batch, jax.sharding.PartitionSpec(row_axes))
    (loss, (count, correct)), grads = grad_fn(params, micro_batch, micro_ids, step_key, row_axes)
    return grads, loss, count, correct

  def train_step(state, batch):
    with sharding_context(layout):
      return _train_step(state, batch)

  def _train_step(state, batch):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rows = jax.tree.leaves(batch)[0].shape[0]
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    if axis_name is not None:  # pmap: global rows, ordered like the devices (process-major)
      row_ids += jax.lax.axis_index(axis_name) * rows

    def micro_step(carry, micro):
      sums = jax.tree.map(jnp.add, carry, micro_grads(state.params, *micro, step_key))
      if per_shard:  # keep each shard's partial gradient on its own devices
        sums = (jax.tree.map(jax.lax.with_sharding_constraint, sums[0], shard_shardings),) + sums[1:]
      return sums, None

    micro_batches = (jax.tree.map(split, batch), split(row_ids))
    # The carry: micro_grads' output shapes, written out (jax.eval_shape of it would trace the model once more,
    # about a second for a tiny one): gradients like the parameters, then the float32 sums of loss, tokens and
    # correct tokens; each with a leading [shards] axis when per shard. A wrong guess fails scan's type check.
    lead = (layout.shards,) if per_shard else ()
    zeros = (
      jax.tree.map(lambda p: jnp.zeros(lead + p.shape, p.dtype), state.params),
      *(jnp.zeros(lead, jnp.float32) for _ in range(3)),
    )
    (grads, loss, count, correct), _ = jax.lax.scan(micro_step, zeros, micro_batches)
    if per_shard:
      grads, loss, count, correct = jax.tree.map(lambda x: jnp.sum(x, axis=0), (grads, loss, count, correct))
    if axis_name is not None:
      grads, loss, count, correct = jax.lax.psum((grads, loss, count, correct), axis_name)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      'loss': loss / denominator,
      'accuracy': correct / denominator,
      'tokens': count,
      'grad_norm': global_norm(grads),
      'param_norm': global_norm(params),
      'learning_rate': schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, axis_name=None, layout: MeshLayout | None = None):
  """`eval_step(params, batch) -> summed metrics` (no label smoothing, ever)."""

  def eval_step(params, batch):
    with sharding_context(layout):
      if layout is not None and layout.param_shardings is not None:
        params = jax.tree.map(jax.lax.with_sharding_constraint, params, layout.param_shardings)
      loss, (count, correct) = _sums(_apply(model, params, batch, True), batch, 0.0, 0.0)
    sums = {'loss': loss, 'tokens': count, 'correct': correct}
    return jax.lax.psum(sums, axis_name) if axis_name is not None else sums

  return eval_step
