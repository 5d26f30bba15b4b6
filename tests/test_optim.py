"""Optimizer numerics: weight decay follows what a parameter is, in either layer layout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny

from transformer import models, optim
from transformer.config import TrainConfig


def _leaf_name(path):
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]


def _second_update(optimizer, params):
  """The updates of AdamW's second step (the first has warmup's lr 0) with zero gradients: pure decay.
  Compiled as one program: op by op, the tree's hundreds of small ops took half a minute to dispatch."""

  def second(params):
    zero = jax.tree.map(jnp.zeros_like, params)
    _, state = optimizer.update(zero, optimizer.init(params), params)
    return optimizer.update(zero, state, params)[0]

  return jax.jit(second)(params)


def test_weight_decay_on_kernels_and_embeddings_only_in_both_layouts():
  # LayerNorm (scale and bias), ReLU FFN (biases), a learned position table, untied embeddings.
  cfg = tiny(
    kind='encoder_decoder', positional='learned', tie_embeddings=False, norm_type='layernorm', activation='relu'
  )
  train = TrainConfig(
    optimizer='adamw', weight_decay=0.5, learning_rate=0.1, warmup_steps=1, num_steps=10, grad_clip=1.0
  )
  optimizer = optim.make_optimizer(train, cfg.d_model)
  lr = float(optim.learning_rate_schedule(train, cfg.d_model)(1))
  params = jax.jit(lambda key: models.init_params(models.build_model(cfg), key))(jax.random.key(0))
  updates = _second_update(optimizer, params)

  names = set()

  def check(path, update, param):
    name = _leaf_name(path)
    names.add(name)
    if name in ('kernel', 'embedding'):  # shrunk by lr * weight_decay
      np.testing.assert_allclose(update, -lr * 0.5 * param, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
      assert np.abs(update).max() > 0
    else:  # norm scales and biases never move
      np.testing.assert_array_equal(update, 0, err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, updates, params)
  assert names == {'kernel', 'embedding', 'scale', 'bias'}
  assert 'position_embedding' in params['encoder']['embedder']

  # Scanned, norms and biases are stacked into matrices: still never decayed, and every update is
  # exactly the unrolled one, stacked.
  scanned = _second_update(optimizer, models.stack_layers(params))
  layer = scanned['decoder']['stack']['layers']
  assert layer['ffn_norm']['scale'].ndim == 2 and layer['ffn']['wi']['bias'].ndim == 2
  np.testing.assert_array_equal(layer['ffn_norm']['scale'], 0)
  assert jax.tree.structure(scanned) == jax.tree.structure(models.stack_layers(updates))
  jax.tree.map(np.testing.assert_array_equal, scanned, models.stack_layers(updates))


def test_decay_mask_reads_through_logical_axis_boxes():
  # parallel.state_shardings initialises the optimizer from boxed (nn.Partitioned) params.
  model = models.build_model(dataclasses.replace(tiny(), scan_layers=True))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *models.dummy_inputs(model.config))['params'])
  mask = optim.decay_mask(boxed)
  layer = mask['decoder']['stack']['layers']
  assert jax.tree.leaves(layer['ffn']['wi']['kernel']) == [True]
  assert jax.tree.leaves(layer['ffn']['wi']['bias']) == [False]
  assert jax.tree.leaves(layer['ffn_norm']) == [False, False]
  assert jax.tree.leaves(mask['embedding']) == [True]
