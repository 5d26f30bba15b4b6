"""Block-sparse patterns: their definitions against the papers', every kernel against the dense masked
reference (outputs and gradients), causality through gradients, work proportional to the non-empty blocks,
and decoding against the full forward pass."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from hypothesis import HealthCheck, given, settings

from transformer import attention, block_attention, cached_attention, hlo_audit, layers, models, patterns
from transformer.block_attention import SelfMask
from transformer.config import ConfigError

PROFILE = settings(derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BATCH, HEADS, SIZE, LENGTH, BLOCK = 2, 4, 8, 27, 4  # 27 tokens: 7 blocks, the last one short


def _pattern(kind, causal, **overrides):
  values = dict(stride=3, summary=1, local=3, global_blocks=1, random=2)
  values.update(overrides)
  return patterns.Pattern(kind, BLOCK, causal, **values)


PATTERNS = [(kind, causal) for kind in patterns.KINDS for causal in (True, False)]


# --- the definitions


@pytest.mark.parametrize('causal', [True, False])
def test_strided_and_fixed_are_child_et_als_at_one_token_per_block(causal):
  """With 1-token blocks the tables are Child et al.'s sets, (l = stride, c = summary):
  strided A = {j : |i - j| < l} | {j : (i - j) mod l = 0}, fixed A = {j : floor(j/l) = floor(i/l)} |
  {j : j mod l in {l - c, ..., l - 1}}, both with j <= i when causal."""
  n, stride, summary = 23, 5, 2
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  past = (j <= i) if causal else np.ones((n, n), bool)
  strided = patterns.Pattern('strided', 1, causal, stride=stride).table(n, n)
  np.testing.assert_array_equal(strided, ((np.abs(i - j) < stride) | ((i - j) % stride == 0)) & past)
  fixed = patterns.Pattern('fixed', 1, causal, stride=stride, summary=summary).table(n, n)
  expected = ((j // stride) == (i // stride)) | (j % stride >= stride - summary)
  np.testing.assert_array_equal(fixed, expected & past)


@pytest.mark.parametrize('causal', [True, False])
def test_bigbird_has_its_window_global_and_random_blocks(causal):
  n, local, glob, random = 16, 3, 2, 3
  pattern = patterns.Pattern('bigbird', 8, causal, local=local, global_blocks=glob, random=random, seed=5)
  table = pattern.table(n, n, layer=1)
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  past = (j <= i) if causal else np.ones((n, n), bool)
  base = ((np.abs(i - j) <= local // 2) | (j < glob) | (False if causal else i < glob)) & past
  assert (table >= base).all()  # the window and the global blocks
  extra = (table & ~base).sum(axis=1)
  candidates = (~base & past & (j >= glob)).sum(axis=1)
  np.testing.assert_array_equal(extra, np.minimum(random, candidates))  # exactly `random` where they fit
  # One draw per layer, the same every time it is asked for.
  np.testing.assert_array_equal(table, pattern.table(n, n, layer=1))
  assert (table != pattern.table(n, n, layer=2)).any()
  assert not patterns.Pattern('strided', 8, causal).depends_on_layer


def test_user_errors_name_the_setting():
  with pytest.raises(ConfigError, match='attention_window > 0'):
    tiny(attention_pattern='window')
  with pytest.raises(ConfigError, match='attention_window=0'):
    tiny(attention_pattern='strided', attention_window=4)
  with pytest.raises(ConfigError, match='scan_layers=False'):
    tiny(attention_pattern='bigbird', scan_layers=True)
  tiny(attention_pattern='bigbird', scan_layers=True, pattern_random=0)  # no draw: one program serves
  with pytest.raises(ConfigError, match='pattern_summary'):
    tiny(attention_pattern='fixed', pattern_summary=5, pattern_stride=4)
  with pytest.raises(ConfigError, match='is not one of: dense, window, strided'):
    tiny(attention_pattern='stride')


# --- kernels against the dense reference


def _packed(rng, length):
  """Row 0 one sequence, row 1 two packed ones then padding: positions restart per segment."""
  cut, end = int(rng.integers(3, length - 6)), int(rng.integers(length - 4, length + 1))
  segments = np.array([[1] * length, [1] * cut + [2] * (end - cut) + [0] * (length - end)], np.int32)
  positions = np.array([np.arange(length), np.r_[np.arange(cut), np.arange(end - cut), np.zeros(length - end)]])
  return jnp.asarray(positions, jnp.int32), jnp.asarray(segments)


def _qkv(seed, kv_heads, length=LENGTH, d_v=SIZE + 2):
  keys = jax.random.split(jax.random.key(seed), 4)
  query = jax.random.normal(keys[0], (BATCH, length, HEADS, SIZE))
  key = jax.random.normal(keys[1], (BATCH, length, kv_heads, SIZE))
  value = jax.random.normal(keys[2], (BATCH, length, kv_heads, d_v))
  return query, key, value, jax.random.normal(keys[3], (BATCH, length, HEADS, d_v))


@functools.partial(jax.jit, static_argnames=('pattern', 'layer', 'alibi', 'impl'))
def _blocked_and_dense(query, key, value, cotangent, positions, segments, *, pattern, layer, alibi, impl):
  mask = SelfMask(positions, positions, segments, segments, causal=pattern.causal, pattern=pattern, alibi=alibi)
  mask = mask.for_layer(layer)
  bias = layers.alibi_bias(positions, positions, HEADS) if alibi else None
  results = []
  for fn in (
    lambda q, k, v: mask.attend(q, k, v, bias, impl=impl),
    lambda q, k, v: attention.dot_product_attention(q, k, v, mask.dense(), bias),
  ):
    out, vjp = jax.vjp(fn, query, key, value)
    results.append((out, vjp(cotangent)))
  return results


@settings(PROFILE, max_examples=14)
@given(
  case=st.sampled_from(PATTERNS),
  kv_heads=st.sampled_from([1, 2, 4]),
  alibi=st.booleans(),
  layer=st.integers(0, 2),
  seed=st.integers(0, 2**16),
)
def test_block_path_equals_the_dense_masked_reference(case, kv_heads, alibi, layer, seed):
  """Outputs of real tokens and all gradients, packed rows, odd length, grouped heads, Dk != Dv, ALiBi."""
  pattern = _pattern(*case)
  positions, segments = _packed(np.random.default_rng(seed), LENGTH)
  query, key, value, cotangent = _qkv(seed, kv_heads)
  cotangent *= (segments > 0)[:, :, None, None]  # padding queries carry no loss, as in training
  args = (query, key, value, cotangent, positions, segments)
  (blocked, blocked_grads), (dense, dense_grads) = _blocked_and_dense(
    *args, pattern=pattern, layer=layer, alibi=alibi, impl='reference'
  )
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-6)
  for ours, ref in zip(blocked_grads, dense_grads):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', patterns.KINDS)
def test_xla_kernel_takes_the_same_mask(kind):
  pattern = _pattern(kind, True)
  positions, segments = _packed(np.random.default_rng(0), LENGTH)
  query, key, value, cotangent = _qkv(0, 2, d_v=SIZE)
  results = _blocked_and_dense(
    query, key, value, cotangent, positions, segments, pattern=pattern, layer=1, alibi=False, impl='xla'
  )
  (xla, xla_grads), (dense, dense_grads) = results
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(xla)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), xla_grads, dense_grads)


@functools.partial(jax.jit, static_argnames=('size', 'table_bytes', 'count', 'causal'))
def _random_table_attention(query, key, value, positions, segments, *, size, table_bytes, count, causal):
  table = np.frombuffer(table_bytes, bool).reshape(count, count)
  mask = SelfMask(positions, positions, segments, segments, causal=causal)
  blocked = block_attention.block_attention(query, key, value, mask, size, table)
  index = np.arange(query.shape[1]) // size
  dense_mask = mask.dense() & jnp.asarray(table[index[:, None], index[None, :]])[None, None]
  return blocked, attention.dot_product_attention(query, key, value, dense_mask)


@settings(PROFILE, max_examples=12)
@given(
  size=st.integers(1, 6),
  length=st.integers(2, 20),
  causal=st.booleans(),
  seed=st.integers(0, 2**16),
  data=st.data(),
)
def test_any_block_table_equals_its_dense_mask(size, length, causal, seed, data):
  """Any table, diagonal kept (a query with no key at all would average the null block's padding, where
  the dense kernel averages the row: both meaningless, so real queries always see themselves)."""
  count = -(-length // size)
  table = np.array(data.draw(st.lists(st.booleans(), min_size=count * count, max_size=count * count)))
  table = table.reshape(count, count) | np.eye(count, dtype=bool)
  positions, segments = _packed(np.random.default_rng(seed), max(length, 10))
  positions, segments = positions[:, :length], segments[:, :length]
  query, key, value, _ = _qkv(seed, 2, length)
  blocked, dense = _random_table_attention(
    query, key, value, positions, segments, size=size, table_bytes=table.tobytes(), count=count, causal=causal
  )
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', patterns.KINDS)
def test_causal_patterns_never_see_the_future_through_gradients(kind):
  """d out[t] / d value[s] is non-zero exactly where the dense mask lets query t see key s: never for
  s > t, and for every allowed s (the pattern is not merely causal, it is the pattern)."""
  pattern = _pattern(kind, True)
  length = 18
  positions = jnp.broadcast_to(jnp.arange(length), (1, length))
  segments = jnp.ones((1, length), jnp.int32)
  mask = SelfMask(positions, positions, segments, segments, causal=True, pattern=pattern).for_layer(1)
  query, key, value, _ = (x[:1, :length] for x in _qkv(3, 2, length=length))
  fn = lambda v: mask.attend(query, key, v, impl='reference')
  jacobian = jax.jacrev(fn)(value)  # [1, T, N, Dv, 1, S, K, Dv]
  reaches = np.asarray(jnp.abs(jacobian).sum(axis=(0, 2, 3, 4, 6, 7)) > 0)  # [T, S]
  np.testing.assert_array_equal(reaches, np.asarray(mask.dense()[0, 0]))
  assert not np.triu(reaches, 1).any()


def test_work_is_the_non_empty_blocks():
  """The compiled block path multiplies exactly the blocks its groups gather: for a window-plus-global
  pattern, whose rows all have the same count, the non-empty blocks and no more."""
  count, length = 16, 16 * BLOCK
  pattern = patterns.Pattern('bigbird', BLOCK, True, local=3, global_blocks=1, random=0)
  table = pattern.table(count, count)
  positions = jnp.broadcast_to(jnp.arange(length), (1, length))
  segments = jnp.ones((1, length), jnp.int32)
  mask = SelfMask(positions, positions, segments, segments, causal=True, pattern=pattern)
  query = jnp.zeros((1, length, HEADS, SIZE))
  fn = jax.jit(lambda q: mask.attend(q, q, q, impl='reference'))
  flops = hlo_audit.dot_flops(fn.lower(query).compile().as_text())
  padded = sum(rows.size * cols.shape[1] for rows, cols in block_attention._groups(table))
  per_block = 2 * 2 * BLOCK * BLOCK * SIZE * HEADS  # q k^T and weights v
  assert flops == padded * per_block
  assert padded <= table.sum() + count  # rows padded by at most one block here
  assert table.sum() < np.tril(np.ones_like(table)).sum() / 2  # a fraction of the causal blocks


# --- whole models: block path, dense path, decoding


def _model(kind='decoder_only', **overrides):
  values = dict(
    kind=kind, max_len=64, pattern_block=4, pattern_stride=2, pattern_global=1, pattern_random=1, num_kv_heads=2
  )
  values.update(overrides)
  return models.build_model(tiny(**values))


@pytest.mark.parametrize(
  'kind, pattern, positional',
  [('decoder_only', 'bigbird', 'rope'), ('decoder_only', 'fixed', 'alibi'), ('encoder_decoder', 'strided', 'rope')],
)
def test_model_block_path_equals_dense_path(monkeypatch, kind, pattern, positional):
  model = _model(kind, attention_pattern=pattern, positional=positional)
  params = models.init_params(model, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(0), (2, 30), 3, 37).at[1, 25:].set(0)
  args = (tokens, tokens) if kind == 'encoder_decoder' else (tokens,)
  loss = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, *args)))
  blocked = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(SelfMask, 'blocks', lambda self: None)
  dense = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(blocked[0], dense[0], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  jax.tree.map(close, blocked[1], dense[1])


@pytest.mark.parametrize('pattern, cache_block', [('strided', 4), ('fixed', 8), ('bigbird', 8)])
def test_decoding_equals_the_forward_pass_at_every_position(monkeypatch, pattern, cache_block):
  """Feeding a sequence one token at a time through the cache (blocks of one or two pattern blocks, the
  latter masked within, with per-layer random blocks) gives the forward pass's logits at every position."""
  monkeypatch.setattr(cached_attention, 'BLOCK', cache_block)
  model = _model(attention_pattern=pattern, num_decoder_layers=2)
  params = models.init_params(model, jax.random.key(1))
  length = 22
  tokens = jax.random.randint(jax.random.key(2), (2, length), 3, 37)
  forward = model.apply({'params': params}, tokens)
  cache = models.init_cache(model, 2, length)

  @jax.jit
  def step(cache, token):
    logits, state = model.apply({'params': params, 'cache': cache}, token, decode=True, mutable=['cache'])
    return state['cache'], logits[:, 0]

  steps = []
  for t in range(length):
    cache, logits = step(cache, tokens[:, t : t + 1])
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, axis=1), forward, rtol=1e-5, atol=1e-5)


def test_each_layer_draws_its_own_random_blocks(monkeypatch):
  asked = []
  table = patterns.Pattern.table
  monkeypatch.setattr(patterns.Pattern, 'table', lambda self, *a, **k: asked.append(a[2]) or table(self, *a, **k))
  model = _model(attention_pattern='bigbird', num_decoder_layers=3)
  jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  assert sorted(set(asked)) == [0, 1, 2]


@pytest.mark.parametrize('kind', patterns.KINDS)
def test_a_decoding_step_reads_only_the_cache_blocks_the_pattern_allows(kind):
  """NaN in every cache block the step's query may not see (by the pattern) changes nothing: they are
  not read; and the result equals dense attention over the clean cache."""
  pattern = _pattern(kind, True)
  slots, filled = 8 * BLOCK, 7 * BLOCK - 1
  rng = np.random.default_rng(1)
  key = jnp.asarray(rng.standard_normal((1, slots, 2, SIZE)), jnp.float32)
  value = jnp.asarray(rng.standard_normal((1, slots, 2, SIZE)), jnp.float32)
  query = jnp.asarray(rng.standard_normal((1, 1, HEADS, SIZE)), jnp.float32)
  kv_pos = jnp.arange(slots)[None]
  kv_seg = (jnp.arange(slots) < filled).astype(jnp.int32)[None]
  q_pos, q_seg = kv_pos[:, filled - 1 : filled], kv_seg[:, filled - 1 : filled]
  mask = cached_attention.CacheMask(q_pos, kv_pos, q_seg, kv_seg, jnp.int32(filled), pattern=pattern)
  mask = mask.for_layer(1)
  row = pattern.table(8, 8, layer=1)[(filled - 1) // BLOCK]
  assert 0 < row.sum() < (filled - 1) // BLOCK + 1  # the step skips some written blocks
  hidden = jnp.repeat(~jnp.asarray(row), BLOCK)[None, :, None, None]
  poison = lambda x: jnp.where(hidden, jnp.nan, x)
  split = lambda x, axis, perm: cached_attention.split(x.transpose(perm), axis, BLOCK)
  keys = split(poison(key), cached_attention.KEY_AXIS, (0, 2, 3, 1))
  values = split(poison(value), cached_attention.VALUE_AXIS, (0, 2, 1, 3))
  out = jax.jit(cached_attention.cached_attention)(query, keys, values, mask)
  dense_mask = SelfMask(q_pos, kv_pos, q_seg, kv_seg, q_offset=filled - 1, pattern=pattern).for_layer(1).dense()
  dense = attention.dot_product_attention(query, key, value, dense_mask)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-6)


def test_the_prefill_attends_by_the_forward_pass_kernels(monkeypatch):
  """The first decoding call (BOS and prompts) goes through the self-attention mask's kernels (here its
  blocks), not the cache's step attention, and gives the forward pass's logits."""
  from transformer import decoding

  model = _model(attention_pattern='strided', num_decoder_layers=2)
  params = models.init_params(model, jax.random.key(1))
  prompts = jax.random.randint(jax.random.key(2), (2, 15), 3, 37).at[1, 9:].set(0)
  calls = {'blocks': 0, 'cache': 0}
  blocks, cached = block_attention.block_attention, cached_attention.cached_attention
  monkeypatch.setattr(block_attention, 'block_attention', lambda *a: calls.update(blocks=1) or blocks(*a))
  monkeypatch.setattr(cached_attention, 'cached_attention', lambda *a: calls.update(cache=1) or cached(*a))
  _, first, _ = decoding._prefill(model, params, None, prompts, 2, 4)
  assert calls == {'blocks': 1, 'cache': 0}
  tokens = jnp.concatenate([jnp.ones((2, 1), jnp.int32), prompts], axis=1)  # BOS first
  forward = model.apply({'params': params}, tokens)
  lengths = jnp.array([15, 9])
  np.testing.assert_allclose(first, forward[jnp.arange(2), lengths], rtol=1e-5, atol=1e-5)
