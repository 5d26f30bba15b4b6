"""Decoding: the cached loops against the uncached oracle, beam search invariants and scores, sampling."""

import contextlib
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from transformer import cached_attention, decoding, hlo_audit, models
from transformer.config import ConfigError
from transformer.tokens import BOS_ID, EOS_ID, PAD_ID

EOS, PAD = EOS_ID, PAD_ID
KINDS = ['decoder_only', 'encoder_decoder']
ROW_LENGTHS = [6, 5, 4, 3, 2, 0, 6, 3]  # prompt (decoder-only) or source lengths, one row empty
# 8 rows, and 4 x 8 in beam search: the cached steps multiply kernel first (matmuls.kernel_first_matmuls, 2-32
# rows), the full forward passes of the references `x @ kernel`.
MAX_LEN = 10
BEAM_MAX_LEN, ALPHA = 8, 0.6
BEAM_LIMITS = np.array([8, 3, 5, 8, 2, 8, 6, 1])  # per-row limits on generated tokens
# (seed, factor): scaling EOS's (tied) embedding makes these random models end some rows at once, some
# after a few steps and run others to the limit: the EOS paths are really taken (tests check that).
EOS_SETUP = {'decoder_only': (2, 3.0), 'encoder_decoder': (1, 8.0)}


@functools.lru_cache
def _setup(kind):
  model = models.build_model(tiny(kind=kind, num_encoder_layers=1, num_decoder_layers=1))  # fast compiles
  seed, factor = EOS_SETUP[kind]
  params = models.init_params(model, jax.random.key(seed))
  table = 'shared_embedding' if kind == 'encoder_decoder' else 'embedding'
  params[table] = {'embedding': params[table]['embedding'].at[EOS].multiply(factor)}
  tokens = jax.random.randint(jax.random.key(3), (len(ROW_LENGTHS), 6), 3, 37)
  tokens = jnp.where(jnp.arange(6) < jnp.array(ROW_LENGTHS)[:, None], tokens, PAD)
  data = dict(inputs=tokens) if kind == 'encoder_decoder' else dict(prompts=tokens)
  return model, params, data


@functools.lru_cache
def _greedy(kind):
  model, params, data = _setup(kind)
  return np.asarray(decoding.generate(model, params, max_len=MAX_LEN, **data))


def _eos_steps(tokens):
  """Per row: the step of the first EOS, or -1."""
  tokens = np.asarray(tokens)
  return np.where((tokens == EOS).any(-1), (tokens == EOS).argmax(-1), -1)


def _check_well_formed(tokens, limits):
  """At most one EOS, real tokens before it, PAD after; no EOS means the row ran to its limit."""
  tokens = np.asarray(tokens)
  for row, limit in zip(tokens.reshape(-1, tokens.shape[-1]), np.broadcast_to(limits, tokens.shape[:-1]).ravel()):
    eos = np.flatnonzero(row == EOS)
    end = eos[0] + 1 if len(eos) else limit
    assert len(eos) <= 1 and end <= limit, row
    assert (row[:end] != PAD).all() and (row[end:] == PAD).all(), row


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_with_cache_equals_uncached(kind):
  model, params, data = _setup(kind)
  cached = _greedy(kind)
  np.testing.assert_array_equal(cached, decoding.greedy_uncached(model, params, max_len=MAX_LEN, **data))
  steps = _eos_steps(cached)
  assert (steps > 0).any() and (steps == -1).any(), steps  # rows that stop early, late and never
  _check_well_formed(cached, MAX_LEN)


def test_prompts_of_different_lengths_decode_as_if_alone():
  model, params, data = _setup('decoder_only')
  batched = _greedy('decoder_only')
  for row in (3, 5):  # prompt lengths 3 and 0 (BOS only), without any padding
    alone = decoding.generate(
      model, params, prompts=data['prompts'][row : row + 1, : ROW_LENGTHS[row]], max_len=MAX_LEN
    )
    np.testing.assert_array_equal(alone[0], batched[row])
  # Beam search: each row as in a batch of copies of itself (the same shapes: no new compile).
  tokens, scores = _beam('decoder_only')
  for row in (0, 3, 5):
    alone_tokens, alone_scores = decoding.beam_search(
      model,
      params,
      prompts=jnp.repeat(data['prompts'][row : row + 1], len(ROW_LENGTHS), axis=0),
      max_len=BEAM_MAX_LEN,
      lengths=BEAM_LIMITS[[row] * len(ROW_LENGTHS)],
    )
    np.testing.assert_array_equal(alone_tokens[0], tokens[row])
    np.testing.assert_allclose(alone_scores[0], scores[row], rtol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_beam_of_one_without_length_penalty_is_greedy(kind):
  # With alpha = 0 a finished hypothesis can never be beaten by its alive rival, as in greedy.
  model, params, data = _setup(kind)
  tokens, _ = decoding.beam_search(model, params, beam_size=1, alpha=0.0, max_len=MAX_LEN, **data)
  np.testing.assert_array_equal(tokens[:, 0], _greedy(kind))


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(model, params, *args):
  return jax.nn.log_softmax(model.apply({'params': params}, *args))


def _sequence_log_probs(model, params, data, tokens):
  """Sum of the model's log-probs of each `[B, beam, T]` hypothesis, by one full forward pass."""
  batch, beams, length = tokens.shape
  if model.config.kind == 'encoder_decoder':
    prefix = np.zeros((batch, 0), np.int32)
    inputs = jnp.repeat(data['inputs'], beams, axis=0)
  else:
    prefix = np.asarray(data['prompts'])
  prompt_lengths = (prefix != PAD).sum(1)
  rows = np.zeros((batch, beams, 1 + prefix.shape[1] + length), np.int32)
  for b in range(batch):  # contiguous: BOS, the row's prompt, the hypothesis
    n = prompt_lengths[b]
    rows[b, :, 0] = BOS_ID
    rows[b, :, 1 : 1 + n] = prefix[b, :n]
    rows[b, :, 1 + n : 1 + n + length] = tokens[b]
  rows = rows.reshape(batch * beams, -1)
  args = (inputs, rows) if model.config.kind == 'encoder_decoder' else (rows,)
  log_probs = np.asarray(_log_probs(model, params, *args)).reshape(batch, beams, rows.shape[1], -1)
  total = np.zeros((batch, beams))
  for b in range(batch):
    for k in range(beams):
      for t in range(length):
        if tokens[b, k, t] != PAD:  # the log-prob at the token before predicts it
          total[b, k] += log_probs[b, k, prompt_lengths[b] + t, tokens[b, k, t]]
  return total


@functools.lru_cache
def _beam(kind):
  model, params, data = _setup(kind)
  tokens, scores = decoding.beam_search(
    model, params, beam_size=4, alpha=ALPHA, max_len=BEAM_MAX_LEN, lengths=BEAM_LIMITS, **data
  )
  return np.asarray(tokens), np.asarray(scores)


@pytest.mark.parametrize('kind', KINDS)
def test_beam_search_limits_eos_and_scores(kind):
  model, params, data = _setup(kind)
  max_len, alpha, limits = BEAM_MAX_LEN, ALPHA, BEAM_LIMITS
  tokens, scores = _beam(kind)
  assert tokens.shape == (8, 4, max_len) and scores.shape == (8, 4)
  _check_well_formed(tokens, limits[:, None])
  ended = (tokens == EOS).any(-1)
  lengths = (tokens != PAD).sum(-1)
  # Not vacuous: hypotheses that end with EOS, and ones cut at a per-row limit below max_len and at max_len.
  assert ended.any() and (~ended & (lengths == limits[:, None]) & (limits[:, None] < max_len)).any()
  assert (~ended & (lengths == max_len)).any()
  assert (np.diff(scores, axis=1) <= 0).all() and np.isfinite(scores).all()
  expected = _sequence_log_probs(model, params, data, tokens) / decoding.length_penalty(lengths, alpha)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_sampling_filters_and_rng():
  model, params, data = _setup('decoder_only')
  greedy = _greedy('decoder_only')
  sample = functools.partial(decoding.generate, model, params, max_len=MAX_LEN, method='sample', **data)
  key = jax.random.key(7)
  np.testing.assert_array_equal(sample(rng=key, top_k=1), greedy)
  np.testing.assert_array_equal(sample(rng=key, top_p=1e-6), greedy)
  np.testing.assert_array_equal(sample(rng=key, temperature=1e-4), greedy)
  np.testing.assert_array_equal(sample(rng=key, temperature=0.0), greedy)
  first, again, other = sample(rng=key), sample(rng=key), sample(rng=jax.random.key(8))
  np.testing.assert_array_equal(first, again)
  assert (np.asarray(first) != np.asarray(other)).any() and (np.asarray(first) != greedy).any()
  _check_well_formed(first, MAX_LEN)
  assert ((_eos_steps(first) > 0) & (_eos_steps(first) < MAX_LEN - 1)).any()  # sampled EOS mid-way


def test_generate_respects_per_row_lengths():
  model, params, data = _setup('encoder_decoder')
  limits = np.array([1, 2, 3, 4, 10, 10, 2, 3])
  tokens = np.asarray(decoding.generate(model, params, max_len=MAX_LEN, lengths=limits, **data))
  full = _greedy('encoder_decoder')
  for row, limit in enumerate(limits):  # the same tokens, cut at the limit (or at EOS before it)
    np.testing.assert_array_equal(tokens[row, :limit], full[row, :limit])
    assert (tokens[row, limit:] == PAD).all()
  assert ((full != PAD).sum(1) > limits).sum() >= 3  # rows that really had more to say were cut


def test_compiled_loops_are_reused():
  model, params, data = _setup('decoder_only')
  _greedy('decoder_only')
  _beam('decoder_only')
  sizes = decoding._generate._cache_size(), decoding._beam_search._cache_size()
  shifted = {'prompts': (data['prompts'] + 1) * (data['prompts'] != PAD)}
  decoding.generate(model, params, max_len=MAX_LEN, **shifted)
  decoding.beam_search(model, params, max_len=BEAM_MAX_LEN, lengths=BEAM_LIMITS[::-1], alpha=0.3, **shifted)
  assert (decoding._generate._cache_size(), decoding._beam_search._cache_size()) == sizes


def _count_dot_generals(jaxpr):
  return str(jaxpr).count('dot_general')  # the text includes nested jaxprs


def test_cross_attention_keys_values_are_cached():
  """Steps after the first pass no `encoded`: the same logits as the full forward pass, less work."""
  model, params, data = _setup('encoder_decoder')
  source = data['inputs'][:3]
  target = jax.random.randint(jax.random.key(4), (3, 5), 3, 37)
  segments = (source != PAD).astype(jnp.int32)
  encoded = model.apply({'params': params}, source, segment_ids=segments, method='encode')
  step = jax.jit(
    lambda cache, tokens, encoded=None, segments=None: model.apply(
      {'params': params, 'cache': cache}, encoded, segments, tokens, decode=True, method='decode', mutable=['cache']
    )
  )
  logits, state = step(models.init_cache(model, 3, 5, source.shape[1]), target[:, :2], encoded, segments)
  outputs = [logits]
  for t in range(2, 5):
    logits, state = step(state['cache'], target[:, t : t + 1])
    outputs.append(logits)
  full = jnp.exp(_log_probs(model, params, source, target))
  np.testing.assert_allclose(jax.nn.softmax(jnp.concatenate(outputs, axis=1)), full, atol=1e-6)
  # Per layer, a step with `encoded` projects the source to keys and values: two matmuls more.
  with_source = jax.make_jaxpr(lambda c: step(c, target[:, :1], encoded, segments))(state['cache'])
  cached = jax.make_jaxpr(lambda c: step(c, target[:, :1]))(state['cache'])
  layers = model.config.num_decoder_layers
  assert _count_dot_generals(with_source) - _count_dot_generals(cached) == 2 * layers


def test_user_errors():
  model, params, data = _setup('decoder_only')
  enc_dec, enc_params, enc_data = _setup('encoder_decoder')
  cases = [
    lambda: decoding.generate(model, params, max_len=4, method='sample', **data),  # no rng
    lambda: decoding.generate(model, params, max_len=4, method='beam', **data),
    lambda: decoding.generate(enc_dec, enc_params, max_len=4, prompts=data['prompts']),
    lambda: decoding.generate(model, params, max_len=4, inputs=data['prompts']),
    lambda: decoding.beam_search(model, params, max_len=4, lengths=[5] * 8, **data),
    lambda: decoding.beam_search(model, params, max_len=4, alpha=-1.0, **data),
    lambda: decoding.generate(models.build_model(tiny(positional='learned')), params, max_len=30, **data),
  ]
  for case in cases:
    with pytest.raises(ConfigError):
      case()


def test_beam_search_reorders_a_scanned_cache():
  """A `scan_layers` model decodes with its layers unrolled (its parameters unstacked): the same beams."""
  model, params, data = _setup('decoder_only')
  scanned = models.build_model(dataclasses.replace(model.config, scan_layers=True))
  tokens, scores = decoding.beam_search(
    scanned, models.stack_layers(params), beam_size=4, alpha=ALPHA, max_len=BEAM_MAX_LEN, lengths=BEAM_LIMITS, **data
  )
  np.testing.assert_array_equal(tokens, _beam('decoder_only')[0])
  np.testing.assert_allclose(scores, _beam('decoder_only')[1], rtol=1e-5)


def _reference_beam_search(model, params, data, beams, alpha, max_len, limits):
  """Beam search spelled out, with full forward passes and no early stopping: every row runs to its limit."""
  prefix = np.zeros((len(limits), 0), np.int32) if 'inputs' in data else np.asarray(data['prompts'])
  prompt_lengths = (prefix != PAD).sum(1)
  alive = [[((), 0.0)] for _ in limits]  # per row: (tokens, log-prob)
  finished = [[] for _ in limits]  # per row: (score, tokens)
  for t in range(max_len):
    rows = np.zeros((len(limits), beams, 1 + prefix.shape[1] + max_len), np.int32)
    for b, hyps in enumerate(alive):
      for k, (seq, _) in enumerate(hyps):
        n = prompt_lengths[b]
        rows[b, k, : 1 + n + len(seq)] = (BOS_ID,) + tuple(prefix[b, :n]) + seq
    rows = rows.reshape(len(limits) * beams, -1)
    args = (jnp.repeat(data['inputs'], beams, axis=0), rows) if 'inputs' in data else (rows,)
    log_probs = np.asarray(_log_probs(model, params, *args)).reshape(len(limits), beams, rows.shape[1], -1)
    for b, limit in enumerate(limits):
      if t >= limit:
        continue
      candidates = [
        (logp + log_probs[b, k, prompt_lengths[b] + t, v], seq + (v,))
        for k, (seq, logp) in enumerate(alive[b])
        for v in range(log_probs.shape[-1])
        if v != PAD
      ]
      candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beams]
      for rank, (logp, seq) in enumerate(candidates):
        if rank < beams and (seq[-1] == EOS or t + 1 == limit):
          finished[b].append((logp / ((5 + t + 1) / 6) ** alpha, seq))
      alive[b] = [(seq, logp) for logp, seq in candidates if seq[-1] != EOS][:beams]
  tokens = np.zeros((len(limits), beams, max_len), np.int32)
  scores = np.zeros((len(limits), beams))
  for b, hyps in enumerate(finished):
    for k, (score, seq) in enumerate(sorted(hyps, key=lambda h: -h[0])[:beams]):
      tokens[b, k, : len(seq)], scores[b, k] = seq, score
  return tokens, scores


@pytest.mark.parametrize('kind', KINDS)
def test_beam_search_equals_a_plain_reference(kind):
  """Early stopping, the per-row limits and the cache reordering change nothing the plain algorithm finds."""
  model, params, data = _setup(kind)
  tokens, scores = _reference_beam_search(model, params, data, 4, ALPHA, BEAM_MAX_LEN, BEAM_LIMITS)
  np.testing.assert_array_equal(_beam(kind)[0], tokens)
  np.testing.assert_allclose(_beam(kind)[1], scores, rtol=1e-4, atol=1e-4)


def test_beam_search_stops_early_with_the_same_result():
  """Rows whose greedy output ends with EOS: every row is done before the limit, and the loop stops."""
  model, params, data = _setup('encoder_decoder')
  rows = np.resize(np.flatnonzero(_eos_steps(_greedy('encoder_decoder')) >= 0), len(ROW_LENGTHS))
  data, limits = {'inputs': data['inputs'][rows]}, np.full(len(ROW_LENGTHS), BEAM_MAX_LEN)
  tokens, scores, steps = decoding._beam_search(
    model, params, data['inputs'], None, jnp.asarray(limits), jnp.float32(ALPHA), beam_size=4, max_len=BEAM_MAX_LEN
  )
  assert steps < BEAM_MAX_LEN
  expected_tokens, expected_scores = _reference_beam_search(model, params, data, 4, ALPHA, BEAM_MAX_LEN, limits)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def _decoding(dense: bool, block: int):
  """Decoding with blocked step attention (`block` slots per block) or, `dense`, as before it: every step
  attending over the whole cache and beams reordering all of it. The loops are traced anew (the functions
  under the module's jit), so these settings hold whatever was compiled before."""
  static = {
    '_generate': ('model', 'max_len', 'sample', 'top_k', 'top_p'),
    '_beam_search': ('model', 'beam_size', 'max_len'),
  }
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cached_attention, 'DENSE_REFERENCE', dense)
    patch.setattr(cached_attention, 'BLOCK', block)
    for name, names in static.items():
      patch.setattr(decoding, name, jax.jit(getattr(decoding, name).__wrapped__, static_argnames=names))
    yield


# Each: grouped or multi-query heads with ALiBi and a window, RoPE and scanned layers, cross-attention;
# sampling once (its steps are greedy's, only the pick differs).
BLOCKED_CASES = {
  'gqa-alibi-window': ('decoder_only', dict(num_kv_heads=2, positional='alibi', attention_window=3), True),
  'mqa-rope-scanned': (
    'decoder_only',
    dict(num_kv_heads=1, positional='rope', scan_layers=True, num_decoder_layers=2),
    False,
  ),
  'encoder_decoder-gqa-rope': ('encoder_decoder', dict(num_kv_heads=2, positional='rope'), False),
}


@pytest.mark.parametrize('kind, case, sample', BLOCKED_CASES.values(), ids=BLOCKED_CASES.keys())
def test_blocked_step_attention_decodes_as_the_dense_one(kind, case, sample):
  """Greedy, sampled and beam outputs and every step's logits equal those of dense attention over the whole
  cache, with prompts (sources) of different lengths and a cache of 16 (10) slots in blocks of 3 (the last
  one moved back to end at the cache's end)."""
  data = _setup(kind)[2]
  model = models.build_model(tiny(**{'kind': kind, 'num_encoder_layers': 1, 'num_decoder_layers': 1, **case}))
  params = models.init_params(model, jax.random.key(0))
  run = lambda fn, **kw: jax.tree.map(np.asarray, fn(model, params, max_len=MAX_LEN, **data, **kw))
  calls = dict(
    greedy=lambda: run(decoding.generate),
    sample=lambda: run(decoding.generate, method='sample', rng=jax.random.key(7), temperature=1.5) if sample else 0,
    beam=lambda: run(decoding.beam_search, beam_size=3, lengths=BEAM_LIMITS + 2),
    logits=lambda: _step_logits(model, params, data),
  )
  outputs = {}
  for dense in (False, True):
    with _decoding(dense, block=3):
      outputs[dense] = {name: call() for name, call in calls.items()}
  new, old = outputs[False], outputs[True]
  for name in ('greedy', 'sample'):
    np.testing.assert_array_equal(new[name], old[name])
  np.testing.assert_array_equal(new['beam'][0], old['beam'][0])
  np.testing.assert_allclose(new['beam'][1], old['beam'][1], rtol=1e-5)
  # Near-zero logits: their error is float32's at the scale of the row (up to about 25), not at theirs.
  np.testing.assert_allclose(new['logits'], old['logits'], rtol=1e-5, atol=1e-6 * np.abs(old['logits']).max())
  assert (_eos_steps(new['greedy']) == -1).any()  # rows that run to the end, through every block
  assert not sample or (new['sample'] != new['greedy']).any()


@pytest.mark.parametrize('batch', [1, 8])
def test_decoding_steps_read_the_cache_blocks_in_place(batch):
  """In the compiled greedy loop no key or value block of the cache is copied, sliced or transposed: each
  step writes its slot into the blocks and the matmuls read them where they lie. Slicing one cache array
  made XLA CPU copy every block it read (26% of a batch-8 step); keys `[B, K, S, D]` made it transpose each
  key block at batch 1. (Beam search gathers its blocks' rows at every step: new arrays by design.)"""
  model = models.build_model(tiny(num_kv_heads=2))
  params = models.init_params(model, jax.random.key(0))
  prompts = jnp.full((batch, 3), 5, jnp.int32)
  lengths = jnp.full((batch,), 8, jnp.int32)
  with _decoding(dense=False, block=4):
    cache = jax.eval_shape(lambda: models.init_cache(model, batch, 1 + 3 + 8 - 1))  # 11 slots: 4, 4, 3
    generate = decoding._generate.lower(
      model, params, None, prompts, lengths, jax.random.key(0), 1.0, max_len=8, sample=False, top_k=0, top_p=1.0
    )
    hlo = generate.compile().as_text()
  paths = jax.tree_util.tree_flatten_with_path(cache)[0]
  blocks = {leaf.shape for path, leaf in paths if isinstance(path[-1], jax.tree_util.SequenceKey)}
  assert {shape[2:] for shape in blocks} == {(8, 4), (8, 3), (4, 8), (3, 8)}, blocks  # keys slots-last
  computations, _ = hlo_audit.split(hlo)
  copied = []
  for computation in hlo_audit.loop_computations(hlo):
    for line in computations[computation]:
      match = re.search(r'= f32\[([\d,]+)\]\S* (copy|transpose|slice|dynamic-slice)\(', line)
      if match and tuple(int(d) for d in match.group(1).split(',')) in blocks:
        copied.append(line.strip()[:120])
  assert not copied


def _step_logits(model, params, data):
  """The prefill's logits and those of MAX_LEN - 1 steps fed fixed tokens, `[steps, B, V]`."""

  @jax.jit
  def run(params, inputs, prompts, tokens):
    cache, logits, step = decoding._prefill(model, params, inputs, prompts, len(ROW_LENGTHS), MAX_LEN)
    turn = lambda cache, fed_i: step(cache, *fed_i)[::-1]
    _, later = jax.lax.scan(turn, cache, (tokens, jnp.arange(MAX_LEN - 1)))
    return jnp.concatenate([logits[None], later])

  tokens = jax.random.randint(jax.random.key(5), (MAX_LEN - 1, len(ROW_LENGTHS)), 3, 37)
  return np.asarray(run(params, data.get('inputs'), data.get('prompts'), tokens))


@settings(derandomize=True, deadline=None, database=None, max_examples=40)
@given(
  hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=2, max_side=7),
    elements=st.sampled_from([-np.inf, -1.0, 0.0, 2.0, np.inf, np.nan]),
  )
)
def test_argmax_picks_numpys_first_maximum(scores):
  """Few distinct values force ties (the first maximum wins), all -inf rows and NaN (the first NaN wins)."""
  np.testing.assert_array_equal(jax.jit(decoding.argmax)(scores), np.argmax(scores, axis=-1))
