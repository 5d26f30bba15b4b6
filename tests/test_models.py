"""Model-level numerics: cached decoding, causality, packing, kernels, scan/remat, dtypes."""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny

from transformer import models, optim
from transformer.tokens import PAD_ID

VOCAB = 37


def _tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 2, VOCAB)


def _setup(cfg, seed=0):
  model = models.build_model(cfg)
  return model, models.init_params(model, jax.random.key(seed))


def _apply(model, variables, *args, **kwargs):
  # Jitted: eager, each of the model's ops compiles on its own, which costs more than one program.
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, dict))}
  static = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if k not in arrays))
  return _jitted(model, static)(variables, *args, **arrays)


@functools.cache
def _jitted(model, static):
  return jax.jit(functools.partial(model.apply, **dict(static)))


def _forward(model, params, source, target, **kwargs):
  if model.config.kind == 'encoder_decoder':
    return _apply(model, {'params': params}, source, target, **kwargs)
  return _apply(model, {'params': params}, target, **kwargs)


def _decode_incrementally(model, params, source, target, prefill):
  """Logits from a multi-token prefill, then one token per step, through the KV cache."""
  batch, length = target.shape
  cache = models.init_cache(model, batch, length, source.shape[1])
  if model.config.kind == 'encoder_decoder':
    segments = (source != PAD_ID).astype(jnp.int32)
    encoded = _apply(model, {'params': params}, source, segment_ids=segments, method='encode')
    step = lambda cache, tokens: _apply(
      model,
      {'params': params, 'cache': cache},
      encoded,
      segments,
      tokens,
      decode=True,
      method='decode',
      mutable=['cache'],
    )
  else:
    step = lambda cache, tokens: _apply(
      model, {'params': params, 'cache': cache}, tokens, decode=True, mutable=['cache']
    )
  logits, variables = step(cache, target[:, :prefill])
  outputs = [logits]
  for t in range(prefill, length):
    logits, variables = step(variables['cache'], target[:, t : t + 1])
    outputs.append(logits)
  return jnp.concatenate(outputs, axis=1)


# Each positional kind once: alone, positions only decide how a cached step finds its place, so each kind
# rides on a case that varies something else (a case per kind alone took as long and covered no more).
# The default block (post-norm, LayerNorm, ReLU, tied) runs in all but the fifth.
DECODE_CASES = [
  dict(positional='none'),
  dict(positional='rope', num_kv_heads=2),  # grouped-query
  dict(positional='alibi', num_kv_heads=1),  # multi-query
  dict(positional='rope', attention_window=3),  # sliding window
  dict(
    positional='sinusoidal',
    d_k=6,
    d_v=10,
    norm_position='pre',
    norm_type='rmsnorm',
    activation='swiglu',
    tie_embeddings=False,
  ),
  dict(positional='learned', scan_layers=True, attention_impl='xla'),
]


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
@pytest.mark.parametrize('case', DECODE_CASES, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_cached_decoding_equals_full_forward(kind, case):
  model, params = _setup(tiny(kind=kind, **case))
  source = _tokens((2, 7), seed=1).at[0, 5:].set(PAD_ID)  # a padded source row
  target = _tokens((2, 9), seed=2)
  full = _forward(model, params, source, target)
  incremental = _decode_incrementally(model, params, source, target, prefill=4)
  assert incremental.shape == full.shape == (2, 9, VOCAB)
  np.testing.assert_allclose(incremental, full, atol=2e-5, rtol=1e-5)


def test_cache_is_really_used():
  """Decoding a step on an emptied cache gives different logits: the cache carries the prefix."""
  model, params = _setup(tiny(positional='rope'))
  target = _tokens((1, 6))
  full = _forward(model, params, None, target)
  cache = models.init_cache(model, 1, 6)
  alone, _ = _apply(
    model, {'params': params, 'cache': cache}, target[:, 5:], positions=jnp.array([[5]]), decode=True, mutable=['cache']
  )
  assert not np.allclose(alone[:, 0], full[:, 5], atol=1e-3)


# Positions are per token: only a mask or an attention bias can let a later token in. Every kind in the
# decoder-only model; the encoder-decoder's decoder (the same masks) with a bias (ALiBi) and without.
@pytest.mark.parametrize(
  'kind,positional',
  [('decoder_only', p) for p in ('sinusoidal', 'rope', 'alibi')] + [('encoder_decoder', p) for p in ('rope', 'alibi')],
)
def test_causality(kind, positional):
  model, params = _setup(tiny(kind=kind, positional=positional, attention_window=0))
  source, target = _tokens((2, 6), seed=1), _tokens((2, 8), seed=2)
  logits = _forward(model, params, source, target)
  for t in (0, 3, 6):
    changed = target.at[:, t + 1 :].set(_tokens((2, 8 - t - 1), seed=10 + t))
    np.testing.assert_allclose(_forward(model, params, source, changed)[:, : t + 1], logits[:, : t + 1], atol=1e-6)
  # Control: the change does show at later positions.
  assert not np.allclose(_forward(model, params, source, target.at[:, 4].set(3))[:, 4:], logits[:, 4:])


def test_padded_source_positions_never_change_outputs():
  model, params = _setup(tiny(kind='encoder_decoder', positional='rope'))
  source, target = _tokens((2, 7), seed=1), _tokens((2, 5), seed=2)
  segments = jnp.array([[1] * 4 + [0] * 3, [1] * 7])
  run = lambda src: _apply(model, {'params': params}, src, target, inputs_segment_ids=segments)
  reference = run(source)
  garbage = source.at[0, 4:].set(_tokens((3,), seed=5))
  np.testing.assert_allclose(run(garbage), reference, atol=1e-6)
  np.testing.assert_allclose(run(source.at[0, 4:].set(PAD_ID)), reference, atol=1e-6)
  assert not np.allclose(run(source.at[0, 2].set(5))[0], reference[0])  # a real token does matter


def test_padded_target_positions_never_change_real_logits():
  model, params = _setup(tiny(positional='alibi'))
  target = _tokens((1, 8))
  segments = jnp.array([[1] * 5 + [0] * 3])
  run = lambda tokens: _apply(model, {'params': params}, tokens, segment_ids=segments)
  np.testing.assert_allclose(run(target.at[0, 5:].set(9))[:, :5], run(target)[:, :5], atol=1e-6)


def _pack(a, b, length):
  """Two sequences in one row: tokens, segment ids 1/2 (0 = padding), per-segment positions."""
  pad = length - a.shape[1] - b.shape[1]
  tokens = jnp.concatenate([a, b, jnp.zeros((1, pad), jnp.int32)], axis=1)
  segments = jnp.array([[1] * a.shape[1] + [2] * b.shape[1] + [0] * pad])
  positions = jnp.array([list(range(a.shape[1])) + list(range(b.shape[1])) + [0] * pad])
  return tokens, segments, positions


# Every positional kind restarts its positions per segment in the decoder-only model. The encoder-decoder
# adds the non-causal encoder's and the cross-attention's segment masks: with a table lookup (learned looks
# positions up as sinusoidal does; none has none), with RoPE, and with ALiBi's two-sided bias.
@pytest.mark.parametrize(
  'kind,positional',
  [('decoder_only', p) for p in ('sinusoidal', 'learned', 'rope', 'alibi', 'none')]
  + [('encoder_decoder', p) for p in ('sinusoidal', 'rope', 'alibi')],
)
def test_packed_equals_unpacked(kind, positional):
  model, params = _setup(tiny(kind=kind, positional=positional, attention_window=4))
  src_a, src_b = _tokens((1, 5), seed=1), _tokens((1, 3), seed=2)
  tgt_a, tgt_b = _tokens((1, 4), seed=3), _tokens((1, 6), seed=4)
  tgt, tgt_seg, tgt_pos = _pack(tgt_a, tgt_b, 12)
  if kind == 'encoder_decoder':
    src, src_seg, src_pos = _pack(src_a, src_b, 10)
    packed = _apply(
      model,
      {'params': params},
      src,
      tgt,
      inputs_positions=src_pos,
      inputs_segment_ids=src_seg,
      decoder_positions=tgt_pos,
      decoder_segment_ids=tgt_seg,
    )
    alone_a = _forward(model, params, src_a, tgt_a)
    alone_b = _forward(model, params, src_b, tgt_b)
  else:
    packed = _apply(model, {'params': params}, tgt, positions=tgt_pos, segment_ids=tgt_seg)
    alone_a, alone_b = (_forward(model, params, None, t) for t in (tgt_a, tgt_b))
  np.testing.assert_allclose(packed[:, :4], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed[:, 4:10], alone_b, atol=1e-5)


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
def test_attention_implementations_agree_in_the_model(kind):
  source = _tokens((2, 7), seed=1).at[1, 4:].set(PAD_ID)
  target = _tokens((2, 8), seed=2)
  outputs = []
  for impl in ('reference', 'xla', 'auto'):
    model, params = _setup(
      tiny(kind=kind, attention_impl=impl, positional='alibi', num_kv_heads=2, attention_window=5, d_v=12)
    )
    outputs.append(_forward(model, params, source, target))
  np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)
  np.testing.assert_allclose(outputs[2], outputs[0], atol=1e-5)


def _expand_kv_heads(params, group):
  """Parameters of plain multi-head attention equal to grouped ones: each key/value head repeated for
  the `group` query heads that share it (query head n uses key/value head n // group)."""
  if isinstance(params, dict):
    return {
      k: {'kernel': jnp.repeat(v['kernel'], group, axis=1)} if k in ('key', 'value') else _expand_kv_heads(v, group)
      for k, v in params.items()
    }
  return params


def test_kv_heads_equal_to_heads_is_plain_multi_head():
  default_model, params = _setup(tiny(num_kv_heads=0))
  explicit_model = models.build_model(tiny(num_kv_heads=4))
  target = _tokens((2, 8))
  default = _forward(default_model, params, None, target)
  assert params['decoder']['stack']['layer_0']['self_attention']['key']['kernel'].shape == (32, 4, 8)  # 4 kv heads
  np.testing.assert_array_equal(default, _forward(explicit_model, params, None, target))
  # Grouped heads against an independently built expectation: multi-head attention whose key/value
  # heads are copies, query head n reading key/value head n // group.
  for kv_heads in (2, 1):
    grouped_model, grouped = _setup(tiny(num_kv_heads=kv_heads), seed=1)
    expected = _forward(default_model, _expand_kv_heads(grouped, 4 // kv_heads), None, target)
    np.testing.assert_allclose(_forward(grouped_model, grouped, None, target), expected, rtol=1e-5, atol=1e-5)
  # Control: multi-query attention (one key/value head) on the same weights is a different model.
  mqa_model = models.build_model(tiny(num_kv_heads=1))
  sliced = jax.tree_util.tree_map_with_path(lambda path, x: x[:, :1] if path[-2].key in ('key', 'value') else x, params)
  assert not np.allclose(_forward(mqa_model, sliced, None, target), default, atol=1e-3)


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
def test_window_at_least_the_length_is_full_attention(kind):
  source, target = _tokens((2, 6), seed=1), _tokens((2, 8), seed=2)
  full_model, params = _setup(tiny(kind=kind, attention_window=0))
  window_model = models.build_model(tiny(kind=kind, attention_window=8))
  short_model = models.build_model(tiny(kind=kind, attention_window=2))
  full = _forward(full_model, params, source, target)
  np.testing.assert_array_equal(_forward(window_model, params, source, target), full)
  assert not np.allclose(_forward(short_model, params, source, target), full)


def _loss_and_grads(model, params, source, target):
  weights = jax.random.normal(jax.random.key(7), target.shape + (VOCAB,))
  loss = lambda p: jnp.sum(_forward(model, p, source, target) * weights)
  return jax.jit(jax.value_and_grad(loss))(params)


@functools.lru_cache
def _unrolled_loss_and_grads(kind):
  model, params = _setup(tiny(kind=kind, norm_position='pre', positional='rope'))
  return params, _loss_and_grads(model, params, *_SCAN_INPUTS)


_SCAN_INPUTS = (_tokens((2, 6), seed=1), _tokens((2, 8), seed=2))


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
@pytest.mark.parametrize(
  'layout',
  [dict(scan_layers=True), dict(remat='full'), dict(remat='dots'), dict(scan_layers=True, remat='full')],
  ids=str,
)
def test_scan_and_remat_change_no_number(kind, layout):
  params, (loss, grads) = _unrolled_loss_and_grads(kind)
  base_cfg = dict(kind=kind, norm_position='pre', positional='rope')
  other = models.build_model(tiny(**base_cfg, **layout))
  convert = models.stack_layers if layout.get('scan_layers') else (lambda tree: tree)
  other_params = convert(params)
  expected = jax.eval_shape(lambda: models.init_params(other, jax.random.key(0)))
  assert jax.tree.map(jnp.shape, other_params) == jax.tree.map(lambda s: s.shape, expected)
  other_loss, other_grads = _loss_and_grads(other, other_params, *_SCAN_INPUTS)
  np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), other_grads, convert(grads))


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
def test_scan_layers_keeps_the_seeds_weights(kind):
  cfg = tiny(kind=kind, remat='full')
  unrolled_model, unrolled = _setup(cfg)
  scanned_model, scanned = _setup(dataclasses.replace(cfg, scan_layers=True))
  jax.tree.map(np.testing.assert_array_equal, scanned, models.stack_layers(unrolled))
  np.testing.assert_allclose(
    _forward(scanned_model, scanned, *_SCAN_INPUTS),
    _forward(unrolled_model, unrolled, *_SCAN_INPUTS),
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
def test_dropout_is_the_same_scanned_and_unrolled(kind):
  cfg = tiny(kind=kind, dropout_rate=0.1, attention_dropout_rate=0.1, remat='full')
  weights = jax.random.normal(jax.random.key(7), _SCAN_INPUTS[1].shape + (VOCAB,))
  unrolled_model, params = _setup(cfg)

  def train(model, params):
    def loss(p):
      logits = _forward(model, p, *_SCAN_INPUTS, deterministic=False, rngs={'dropout': jax.random.key(3)})
      return jnp.sum(logits * weights), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads

  logits, grads = train(unrolled_model, params)
  scanned_model = models.build_model(dataclasses.replace(cfg, scan_layers=True))
  scanned_logits, scanned_grads = train(scanned_model, models.stack_layers(params))
  assert not np.allclose(logits, _forward(unrolled_model, params, *_SCAN_INPUTS), atol=1e-2)  # dropout on
  np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-6)
  # A gradient sums hundreds of terms: its float32 error scales with the leaf's largest entry (a
  # different dropout mask moves gradients by about 10% of it).
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
    scanned_grads,
    models.stack_layers(grads),
  )


@flax.struct.dataclass
class _State:  # TrainState-like: a struct dataclass holding params and an optax state
  step: jax.Array
  params: dict
  opt_state: tuple


def test_convert_layers_between_layouts():
  cfg = tiny(kind='encoder_decoder')
  _, params = _setup(cfg)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1, mask=optim.decay_mask))
  grads = jax.tree.map(lambda p: jnp.cos(p) + 1.0, params)  # non-zero, different in every layer

  def state(params, grads):  # one real step, so that mu and nu hold per-layer values
    _, opt_state = optimizer.update(grads, optimizer.init(params), params)
    return _State(step=jnp.ones((), jnp.int32), params=params, opt_state=opt_state)

  unrolled = state(params, grads)
  scanned = state(models.stack_layers(params), models.stack_layers(grads))
  assert 'layers' in scanned.opt_state[1][0].mu['encoder']['stack']  # ScaleByAdamState, scanned

  for source, target, to_scanned in ((unrolled, scanned, True), (scanned, unrolled, False)):
    converted = models.convert_layers(source, scanned=to_scanned)
    assert jax.tree.structure(converted) == jax.tree.structure(target)
    jax.tree.map(np.testing.assert_array_equal, converted, target)
    assert jax.tree.structure(models.convert_layers(target, to_scanned)) == jax.tree.structure(target)
  jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(models.stack_layers(params)), params)
  # Abstract trees (a checkpoint's restore target) convert under eval_shape.
  abstract = jax.eval_shape(lambda s: models.convert_layers(s, scanned=False), scanned)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), unrolled)
  # Layers in numeric order, not string order (layer_10 after layer_9).
  many = {f'layer_{i}': {'kernel': jnp.full((2,), i)} for i in range(12)}
  assert models.stack_layers(many)['layers']['kernel'][:, 0].tolist() == list(range(12))
  assert models.unstack_layers(models.stack_layers(many)).keys() == many.keys()


def test_dropout_is_active_only_in_training():
  model, params = _setup(
    tiny(kind='encoder_decoder', dropout_rate=0.3, attention_dropout_rate=0.2, attention_impl='auto')
  )
  source, target = _tokens((2, 6), seed=1), _tokens((2, 8), seed=2)
  train = lambda seed: _apply(
    model, {'params': params}, source, target, deterministic=False, rngs={'dropout': jax.random.key(seed)}
  )
  eval_logits = _forward(model, params, source, target)
  np.testing.assert_array_equal(_forward(model, params, source, target), eval_logits)
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  assert not np.allclose(train(0), eval_logits)


def test_compute_dtype_separate_from_param_dtype():
  model, params = _setup(tiny(dtype='bfloat16', param_dtype='float32', attention_impl='auto'))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  target = _tokens((2, 8))
  logits = _forward(model, params, None, target)
  assert logits.dtype == jnp.float32  # the softmax and loss always see float32 logits
  reference = _forward(*_setup(tiny()), None, target)
  # bfloat16 keeps 8 significant bits: each rounding moves a value by at most 2^-8 of itself, and the
  # few roundings per layer that reach the logits do not compound much (norms rescale): the error stays
  # within a few 2^-8 of the logits' scale (measured: 1.8 * 2^-8 * max|logits|).
  tolerance = 3 * 2.0**-8 * np.abs(reference).max()
  np.testing.assert_allclose(logits, reference, rtol=0, atol=tolerance)
  # Control: a real error (one layer norm's scale 2% off, in float32) exceeds it (atol=0.1 did not).
  wrong = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 1.02 if 'layer_1' in str(path) and 'ffn_norm' in str(path) else x, params
  )
  assert np.abs(_forward(models.build_model(tiny()), wrong, None, target) - reference).max() > tolerance
  assert tiny().compute_dtype == jnp.float32  # dtype='auto' on a CPU
  _, half = _setup(tiny(param_dtype='bfloat16'))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(half))


def test_tied_embeddings_share_one_matrix():
  _, tied = _setup(tiny(kind='encoder_decoder', tie_embeddings=True))
  _, untied = _setup(tiny(kind='encoder_decoder', tie_embeddings=False))
  assert 'shared_embedding' in tied and 'output_embedding' not in tied['decoder']
  assert {'source_embedding', 'target_embedding'} <= set(untied)
  assert 'output_embedding' in untied['decoder']


@pytest.mark.parametrize('kind', ['decoder_only', 'encoder_decoder'])
@pytest.mark.parametrize('tie', [True, False])
def test_logits_are_the_final_hidden_state_times_the_output_matrix(kind, tie):
  """Logits == (the decoder stack's output) @ E^T, by hand, with E the shared input embedding when tied
  and the separate output embedding when not; and only that matrix makes the logits."""
  model, params = _setup(tiny(kind=kind, tie_embeddings=tie))
  source, target = _tokens((2, 6), seed=1), _tokens((2, 8), seed=2)
  logits, captured = _forward(model, params, source, target, capture_intermediates=True, mutable=['intermediates'])
  hidden = captured['intermediates']['decoder']['stack']['__call__'][0]
  inputs = params['embedding'] if kind == 'decoder_only' else params['shared_embedding' if tie else 'target_embedding']
  output = inputs if tie else params['decoder']['output_embedding']
  np.testing.assert_allclose(logits, hidden @ output['embedding'].T, rtol=1e-5, atol=1e-5)
  if not tie:  # a distinct parameter: the input embedding's transpose would give other logits
    assert not np.allclose(logits, hidden @ inputs['embedding'].T, atol=1e-3)
  # Perturbing row v of the output matrix (by a random vector: a constant one is orthogonal to the
  # zero-mean output of a LayerNorm) where no token v is an input changes logit v only.
  v = int(jnp.setdiff1d(jnp.arange(2, VOCAB), jnp.concatenate([source.ravel(), target.ravel()]))[0])
  bumped = jax.tree.map(lambda x: x, params)
  if tie:
    path = ('embedding',) if kind == 'decoder_only' else ('shared_embedding',)
  else:
    path = ('decoder', 'output_embedding')
  node = bumped
  for name in path[:-1]:
    node[name] = dict(node[name])
    node = node[name]
  node[path[-1]] = {'embedding': output['embedding'].at[v].add(jax.random.normal(jax.random.key(5), (32,)))}
  changed = _forward(model, bumped, source, target)
  assert not np.allclose(changed[..., v], logits[..., v], atol=1e-3)
  np.testing.assert_allclose(np.delete(changed, v, axis=-1), np.delete(logits, v, axis=-1), atol=1e-6)


def test_shift_right_respects_segments():
  targets = jnp.array([[5, 6, 7, 8, 9, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 0]])
  assert models.shift_right(targets, segments).tolist() == [[1, 5, 6, 1, 8, 0]]
  assert models.shift_right(targets).tolist() == [[1, 5, 6, 7, 8, 0]]
