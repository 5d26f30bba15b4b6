"""Property tests for head layouts: every valid (num_heads, num_kv_heads, d_k, d_v, d_model) builds with
the right parameter and output shapes and computes plain multi-head attention with each key/value head
repeated for its group (a numpy reference); every invalid one is one ConfigError naming what to change."""

import functools

import flax.linen as nn
import hypothesis.strategies as st
import jax
import numpy as np
from conftest import tiny
from hypothesis import HealthCheck, given, settings

from transformer import models
from transformer.attention import MultiHeadAttention
from transformer.config import ConfigError, ModelConfig

# Derandomized: CI runs exactly the examples a developer ran locally, never a new one nobody has seen.
settings.register_profile(
  'properties', derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile('properties')

B, T, S = 2, 3, 5


@st.composite
def head_layouts(draw):
  """A valid layout: kv heads divide heads; d_k/d_v 0 (the default) only when d_model divides evenly."""
  heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
  kv_heads = draw(st.sampled_from([0] + [k for k in range(1, heads + 1) if heads % k == 0]))
  d_model = draw(st.sampled_from([8, 12, 24]))
  explicit = d_model % heads != 0 or draw(st.booleans())
  d_k = draw(st.sampled_from([2, 4, 6])) if explicit else 0
  d_v = draw(st.sampled_from([1, 3, 4])) if explicit else 0
  return dict(num_heads=heads, num_kv_heads=kv_heads, d_model=d_model, d_k=d_k, d_v=d_v)


def _reference(params, x, y, mask, heads, kv_heads):
  """Plain multi-head attention in numpy: key/value weights repeated so head n reads kv head n // group."""
  group = heads // kv_heads
  wq, wk, wv, wo = (np.asarray(params[name]['kernel'], np.float64) for name in ('query', 'key', 'value', 'out'))
  wk, wv = np.repeat(wk, group, axis=1), np.repeat(wv, group, axis=1)
  q, k, v = np.einsum('btd,dnh->btnh', x, wq), np.einsum('bsd,dnh->bsnh', y, wk), np.einsum('bsd,dnh->bsnh', y, wv)
  logits = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('btnh,nhd->btd', np.einsum('bnts,bsnh->btnh', weights, v), wo)


@functools.lru_cache
def _apply(cfg):
  return jax.jit(lambda params, x, y, mask: MultiHeadAttention(cfg).apply({'params': params}, x, y, mask))


@settings(PROFILE, max_examples=12)
@given(layout=head_layouts())
def test_every_valid_layout_builds_with_the_right_shapes(layout):
  cfg = tiny(**layout)
  heads, kv = layout['num_heads'], layout['num_kv_heads'] or layout['num_heads']
  dk = layout['d_k'] or layout['d_model'] // heads
  dv = layout['d_v'] or layout['d_model'] // heads
  x, y = jax.ShapeDtypeStruct((B, T, cfg.d_model), np.float32), jax.ShapeDtypeStruct((B, S, cfg.d_model), np.float32)
  mask = jax.ShapeDtypeStruct((B, 1, T, S), bool)
  module = MultiHeadAttention(cfg)
  params = jax.eval_shape(lambda *args: nn.unbox(module.init(jax.random.key(0), *args)['params']), x, y, mask)
  shapes = {name: params[name]['kernel'].shape for name in params}
  d = cfg.d_model
  assert shapes == {'query': (d, heads, dk), 'key': (d, kv, dk), 'value': (d, kv, dv), 'out': (heads, dv, d)}
  out = jax.eval_shape(lambda p, *args: module.apply({'params': p}, *args), params, x, y, mask)
  assert out.shape == (B, T, d)
  # The whole model too (abstractly: shapes only, nothing compiled).
  model = models.build_model(tiny(kind='encoder_decoder', num_encoder_layers=1, num_decoder_layers=1, **layout))
  logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *models.dummy_inputs(model.config))[0])
  assert logits.shape == (1, 8, cfg.vocab_size)


@settings(PROFILE, max_examples=8)
@given(layout=head_layouts(), seed=st.integers(0, 2**16))
def test_grouped_heads_are_multi_head_attention_with_repeated_key_value_heads(layout, seed):
  cfg = tiny(**layout)
  rng = np.random.default_rng(seed)
  x, y = rng.standard_normal((B, T, cfg.d_model)), rng.standard_normal((B, S, cfg.d_model))
  mask = rng.random((B, 1, T, S)) < 0.7
  mask[..., 0] = True  # every query sees at least one key
  shapes = jax.eval_shape(lambda: MultiHeadAttention(cfg).init(jax.random.key(0), x, y, mask)['params'])
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), nn.unbox(shapes))
  out = _apply(cfg)(params, x.astype(np.float32), y.astype(np.float32), mask)
  expected = _reference(params, x, y, mask[:, 0, None].repeat(cfg.num_heads, 1), cfg.num_heads, cfg.kv_heads)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-4)


@settings(PROFILE, max_examples=80)
@given(
  heads=st.integers(-1, 9),
  kv_heads=st.integers(-1, 9),
  d_model=st.sampled_from([0, 8, 12, 30]),
  d_k=st.integers(-1, 5),
  d_v=st.integers(-1, 5),
  rope=st.booleans(),
)
def test_invalid_layouts_are_one_config_error_naming_what_to_change(heads, kv_heads, d_model, d_k, d_v, rope):
  layout = dict(num_heads=heads, num_kv_heads=kv_heads, d_model=d_model, d_k=d_k, d_v=d_v)
  positional = 'rope' if rope else 'sinusoidal'
  # The rules, stated independently of the code, and the keys each message must name.
  problems = []
  if heads <= 0 or d_model <= 0:
    problems.append({k for k in ('num_heads', 'd_model') if layout[k] <= 0})
  elif min(d_k, d_v, kv_heads) < 0:
    problems.append({k for k in ('d_k', 'd_v', 'num_kv_heads') if layout[k] < 0})
  elif (not d_k or not d_v) and d_model % heads:
    problems.append({'d_model', 'num_heads', 'd_k', 'd_v'})
  elif heads % (kv_heads or heads):
    problems.append({'num_kv_heads'})
  elif rope and (d_k or d_model // heads) % 2:
    problems.append({'d_k'})
  if not problems:
    assert ModelConfig(**layout, positional=positional).kv_heads == (kv_heads or heads)
    return
  try:
    ModelConfig(**layout, positional=positional)
  except ConfigError as error:
    message = str(error)
  else:
    raise AssertionError(f'{layout} {positional} was accepted')
  assert any(f'config.model.{key}' in message for key in problems[0]), message
