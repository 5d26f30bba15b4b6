"""Property tests for decoding on random small models and prompts: greedy equals a full forward pass per
token cut at each row's limit, sampled and beam outputs are well formed (no more tokens than the row's
limit, PAD only and always after the first EOS), a beam of one is greedy search.

Every example draws new weights (numpy, no init compile) for one fixed model and fixed shapes, so each
decoding loop compiles once for the whole test.
"""

import functools

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from conftest import tiny
from hypothesis import HealthCheck, given, settings

from transformer import decoding, models
from transformer.config import ConfigError
from transformer.tokens import EOS_ID, FIRST_FREE_ID, PAD_ID

# Derandomized: CI runs exactly the examples a developer ran locally, never a new one nobody has seen.
settings.register_profile(
  'properties', derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile('properties')

BATCH, WIDTH, MAX_LEN, VOCAB = 3, 4, 6, 37


@functools.lru_cache
def _model(kind):
  # 'decoder_only-window': sliding-window attention with RoPE; the uncached reference's 11-token buffer is
  # long enough for the blocked local kernel, while the cache uses the dense mask on cached positions.
  extra = dict(attention_window=2, positional='rope') if kind.endswith('-window') else {}
  model = models.build_model(tiny(kind=kind.split('-')[0], num_encoder_layers=1, num_decoder_layers=1, **extra))
  shapes = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0))
  return model, shapes


def _params(kind, seed, eos_boost):
  """Random weights; `eos_boost` scales EOS's (tied) embedding so that some rows end early."""
  model, shapes = _model(kind)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  table = 'shared_embedding' if kind == 'encoder_decoder' else 'embedding'
  params[table]['embedding'][EOS_ID] *= eos_boost
  return model, params


@st.composite
def right_padded(draw, min_length=0):
  """`[BATCH, WIDTH]` token rows of random lengths, right-padded with PAD."""
  rows = np.zeros((BATCH, WIDTH), np.int32)
  for row in rows:
    n = draw(st.integers(min_length, WIDTH))
    row[:n] = draw(st.lists(st.integers(FIRST_FREE_ID, VOCAB - 1), min_size=n, max_size=n))
  return rows


def _data(kind, tokens):
  return dict(inputs=tokens) if kind == 'encoder_decoder' else dict(prompts=tokens)


limits = st.lists(st.integers(1, MAX_LEN), min_size=BATCH, max_size=BATCH).map(np.array)


def _check_well_formed(row, limit):
  """At most `limit` real tokens; PAD nowhere before the first EOS and everywhere after it."""
  eos = np.flatnonzero(row == EOS_ID)
  end = eos[0] + 1 if len(eos) else limit
  assert end <= limit, (row, limit)
  assert (row[:end] != PAD_ID).all() and (row[end:] == PAD_ID).all(), row


def _cut(row, limit):
  """A row of the unlimited reference as it must look under `limit`."""
  out = np.zeros_like(row)
  out[:limit] = row[:limit]
  return out


@settings(PROFILE, max_examples=15)
@given(
  kind=st.sampled_from(['decoder_only', 'encoder_decoder', 'decoder_only-window']),
  seed=st.integers(0, 2**16),
  eos_boost=st.sampled_from([1.0, 4.0]),
  data=st.data(),
  lengths=limits,
)
def test_greedy_equals_a_forward_pass_per_token_cut_at_each_limit(kind, seed, eos_boost, data, lengths):
  model, params = _params(kind, seed, eos_boost)
  # An encoder-decoder needs a source token per row; a decoder-only prompt may be empty (BOS alone).
  tokens = data.draw(right_padded(min_length=1 if kind == 'encoder_decoder' else 0))
  greedy = np.asarray(decoding.generate(model, params, max_len=MAX_LEN, lengths=lengths, **_data(kind, tokens)))
  reference = np.asarray(decoding.greedy_uncached(model, params, max_len=MAX_LEN, **_data(kind, tokens)))
  assert greedy.shape == (BATCH, MAX_LEN) and greedy.dtype == np.int32
  for row, ref, limit in zip(greedy, reference, lengths):
    _check_well_formed(row, limit)
    np.testing.assert_array_equal(row, _cut(ref, limit))


@settings(PROFILE, max_examples=10)
@given(
  seed=st.integers(0, 2**16),
  eos_boost=st.sampled_from([1.0, 4.0]),
  prompts=right_padded(),
  lengths=limits,
  rng_seed=st.integers(0, 2**16),
)
def test_sampled_and_beam_outputs_are_well_formed_and_a_beam_of_one_is_greedy(
  seed, eos_boost, prompts, lengths, rng_seed
):
  model, params = _params('decoder_only', seed, eos_boost)
  kwargs = dict(prompts=prompts, max_len=MAX_LEN, lengths=lengths)
  sampled = np.asarray(decoding.generate(model, params, method='sample', rng=jax.random.key(rng_seed), **kwargs))
  for row, limit in zip(sampled, lengths):
    _check_well_formed(row, limit)
  greedy = np.asarray(decoding.generate(model, params, **kwargs))
  one, _ = decoding.beam_search(model, params, beam_size=1, alpha=0.0, **kwargs)
  np.testing.assert_array_equal(np.asarray(one)[:, 0], greedy)
  beams, scores = decoding.beam_search(model, params, beam_size=3, **kwargs)
  beams, scores = np.asarray(beams), np.asarray(scores)
  assert beams.shape == (BATCH, 3, MAX_LEN)
  for row_beams, row_scores, limit in zip(beams, scores, lengths):
    assert (np.diff(row_scores) <= 0).all(), row_scores  # best first
    for row in row_beams:
      _check_well_formed(row, limit)


@settings(PROFILE, max_examples=10)
@given(prompts=right_padded(min_length=2), row=st.integers(0, BATCH - 1), hole=st.integers(0, WIDTH - 2))
def test_a_prompt_with_padding_before_a_token_is_refused(prompts, row, hole):
  """Prompts are right-padded: a PAD before a real token would silently shift the row's positions."""
  model, params = _params('decoder_only', 0, 1.0)
  prompts[row, hole], prompts[row, -1] = PAD_ID, FIRST_FREE_ID
  with pytest.raises(ConfigError, match=f'row {row} .*right-padded'):
    decoding.generate(model, params, prompts=prompts, max_len=MAX_LEN)


@settings(PROFILE, max_examples=10)
@given(
  kind=st.sampled_from(['decoder_only', 'encoder_decoder']),
  tokens=right_padded(min_length=1),
  place=st.tuples(st.integers(0, BATCH - 1), st.integers(0, WIDTH - 1)),
  bad=st.sampled_from([-1, VOCAB, VOCAB + 100]),
)
def test_token_ids_outside_the_vocabulary_are_refused(kind, tokens, place, bad):
  """The embedding lookup would clamp them: the model would silently read other tokens."""
  model, params = _params(kind, 0, 1.0)
  tokens[place[0], : place[1] + 1] = np.maximum(tokens[place[0], : place[1] + 1], FIRST_FREE_ID)  # stay right-padded
  tokens[place] = bad
  with pytest.raises(ConfigError, match=rf'\[{place[0]}, {place[1]}\] = {bad} is not a token id'):
    decoding.generate(model, params, max_len=MAX_LEN, **_data(kind, tokens))


@settings(PROFILE, max_examples=40)
@given(
  temperature=st.floats(allow_nan=True) | st.sampled_from([0.0, 0.7, 1.0]),
  top_k=st.integers(-2, 50) | st.floats(-1, 5),
  top_p=st.floats(allow_nan=True) | st.sampled_from([0.5, 1.0]),
  alpha=st.floats(allow_nan=True) | st.sampled_from([0.0, 0.6]),
)
def test_sampling_and_beam_options_are_checked_before_anything_runs(temperature, top_k, top_p, alpha):
  """NaN or infinite temperatures and penalties, fractional top_k: one ConfigError, not NaN scores or a
  silently rounded option. Valid options get past the check: the next error is the deliberate bad token."""
  model, params = _params('decoder_only', 0, 1.0)
  bad_prompt = np.full((1, 1), VOCAB)  # past the vocabulary: refused right after the options are checked
  valid = np.isfinite(temperature) and temperature >= 0 and top_k >= 0 and top_k == int(top_k) and 0 < top_p <= 1
  sample = dict(method='sample', rng=jax.random.key(0), temperature=temperature, top_k=top_k, top_p=top_p)
  with pytest.raises(ConfigError, match='is not a token id' if valid else 'Sampling needs'):
    decoding.generate(model, params, prompts=bad_prompt, max_len=MAX_LEN, **sample)
  valid = np.isfinite(alpha) and alpha >= 0
  with pytest.raises(ConfigError, match='is not a token id' if valid else 'alpha=.* must be finite'):
    decoding.beam_search(model, params, prompts=bad_prompt, max_len=MAX_LEN, alpha=alpha)
