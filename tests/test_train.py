"""Loss, optimizer and train-step numerics on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer import metrics, models, optim, train
from transformer.config import TrainConfig


def test_smoothed_loss_minimum_is_zero():
  vocab, eps = 11, 0.1
  targets = jnp.array([[3, 7, 1]])
  smoothed = jnp.where(jax.nn.one_hot(targets, vocab) > 0, 1 - eps, eps / (vocab - 1))
  loss, count = train.cross_entropy(jnp.log(smoothed), targets, jnp.ones((1, 3)), label_smoothing=eps)
  assert count == 3 and abs(float(loss)) < 1e-5
  # Any other prediction costs more, an over-confident one included.
  for logits in (
    jnp.log(smoothed) + 0.3 * jax.random.normal(jax.random.key(0), smoothed.shape),
    50.0 * jax.nn.one_hot(targets, vocab),
  ):
    assert float(train.cross_entropy(logits, targets, jnp.ones((1, 3)), label_smoothing=eps)[0]) > 1e-3
  # Without smoothing a confident correct prediction costs ~0, and the loss is the plain NLL.
  logits = jax.random.normal(jax.random.key(1), (1, 3, vocab))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).sum()
  np.testing.assert_allclose(train.cross_entropy(logits, targets, jnp.ones((1, 3)))[0], nll, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 9), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_accuracy_is_argmax_with_its_tie_break(vocab, levels, seed):
  """`is_argmax` equals `argmax == targets`, the first maximum winning a tie. Few distinct logit values
  make ties common (levels=1: every logit equal, as a zero-initialised output layer gives), and half the
  targets are a maximum, so a version that counted any maximum, or the last one, fails."""
  rng = np.random.default_rng(seed)
  logits = rng.integers(0, levels, (4, 6, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (4, 6))
  tied = np.stack([rng.choice(np.flatnonzero(row == row.max())) for row in logits.reshape(-1, vocab)])
  targets = np.where(rng.random((4, 6)) < 0.5, tied.reshape(4, 6), targets)
  expected = np.argmax(logits, -1) == targets
  np.testing.assert_array_equal(train.is_argmax(jnp.asarray(logits), jnp.asarray(targets)), expected)


def test_z_loss_adds_log_z_squared():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 9))
  targets, weights = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4))
  base = train.cross_entropy(logits, targets, weights)[0]
  with_z = train.cross_entropy(logits, targets, weights, z_loss=1e-2)[0]
  np.testing.assert_allclose(with_z - base, 1e-2 * jnp.sum(jax.nn.logsumexp(logits, -1) ** 2), rtol=1e-5)


def _setup(kind='decoder_only', **train_overrides):
  cfg = tiny(kind=kind)
  model = models.build_model(cfg)
  train_cfg = TrainConfig(optimizer='adamw', learning_rate=1e-2, warmup_steps=2, num_steps=50, **train_overrides)
  optimizer = optim.make_optimizer(train_cfg, cfg.d_model)
  schedule = optim.learning_rate_schedule(train_cfg, cfg.d_model)
  return model, optimizer, schedule, train_cfg


def _batch(kind, rows=8, length=10, seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, 37, (rows, length)).astype(np.int32)
  targets[1, 6:] = 0  # some padding
  batch = {'targets': targets}
  if kind == 'encoder_decoder':
    inputs = rng.integers(3, 37, (rows, length - 2)).astype(np.int32)
    inputs[2, 5:] = 0
    batch['inputs'] = inputs
  return batch


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
def test_grad_accumulation_equals_the_large_batch(kind):
  results = []
  for accum in (1, 4):
    model, optimizer, schedule, train_cfg = _setup(kind, grad_accum_steps=accum)
    state = train.init_state(model, optimizer, seed=0)
    state, step_metrics = jax.jit(train.make_train_step(model, optimizer, schedule, train_cfg))(state, _batch(kind))
    results.append((state.params, step_metrics))
  (params_1, metrics_1), (params_4, metrics_4) = results
  np.testing.assert_allclose(metrics_4['loss'], metrics_1['loss'], rtol=1e-6)
  assert metrics_4['tokens'] == metrics_1['tokens'] == 8 * 10 - 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_4, params_1)


def test_loss_and_gradients_ignore_extra_padding():
  model, optimizer, schedule, train_cfg = _setup('encoder_decoder')
  state = train.init_state(model, optimizer, seed=0)
  step = jax.jit(train.make_train_step(model, optimizer, schedule, train_cfg))
  batch = _batch('encoder_decoder')
  padded = {k: np.pad(v, ((0, 8), (0, 5))) for k, v in batch.items()}  # more rows and columns of padding
  (a, ma), (b, mb) = step(state, batch), step(state, padded)
  np.testing.assert_allclose(mb['loss'], ma['loss'], rtol=1e-6)
  np.testing.assert_allclose(mb['grad_norm'], ma['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)


def test_tiny_model_overfits_one_batch():
  model, optimizer, schedule, train_cfg = _setup('encoder_decoder', label_smoothing=0.0)
  state = train.init_state(model, optimizer, seed=0)
  step = jax.jit(train.make_train_step(model, optimizer, schedule, train_cfg))
  batch = _batch('encoder_decoder')
  batch['targets'] = batch['inputs'][:, :8].copy()  # copy the source: fully determined by the input
  batch['targets'][batch['targets'] == 0] = 0
  for _ in range(150):
    state, step_metrics = step(state, batch)
  assert float(step_metrics['loss']) < 0.05 and float(step_metrics['accuracy']) == 1.0


def test_paper_schedule_and_weight_decay_mask():
  cfg = TrainConfig(optimizer='adam', warmup_steps=4000, learning_rate=1.0)
  schedule = optim.learning_rate_schedule(cfg, 512)
  for step in (1, 100, 4000, 10000):  # optax counts from 0: count = step - 1
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
    np.testing.assert_allclose(schedule(step - 1), expected, rtol=1e-6)
  params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}, 'norm': {'scale': jnp.ones(3)}}
  assert optim.decay_mask(params) == {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False}}
  cfg = TrainConfig(optimizer='adamw', weight_decay=0.5, learning_rate=0.1, warmup_steps=1)
  optimizer = optim.make_optimizer(cfg, 8)
  zero = jax.tree.map(jnp.zeros_like, params)
  _, opt_state = optimizer.update(zero, optimizer.init(params), params)  # step 0 of warmup: lr 0
  updates, _ = optimizer.update(zero, opt_state, params)
  assert float(jnp.abs(updates['dense']['bias']).max()) == 0.0 and float(updates['norm']['scale'].max()) == 0.0
  assert float(jnp.abs(updates['dense']['kernel']).min()) > 0.0  # decayed


def test_flops_per_token_counts_every_matmul():
  cfg = tiny(positional='none', num_kv_heads=2, d_v=12)
  model = models.build_model(cfg)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  matmul_weights = sum(np.prod(p.shape) for p in jax.tree.leaves(params) if len(p.shape) >= 2)
  attention_per_key = 2 * cfg.num_heads * (cfg.head_dim_qk + cfg.head_dim_v) * cfg.num_decoder_layers
  # One token attends to one key (itself); 6 = (forward 2 + backward 4) per weight.
  assert metrics.flops_per_token(cfg, 1) == pytest.approx(6 * matmul_weights + 3 * attention_per_key)
  # Causal: on average (T + 1) / 2 keys; a window caps them.
  assert metrics.flops_per_token(cfg, 9) - metrics.flops_per_token(cfg, 1) == pytest.approx(3 * attention_per_key * 4)
