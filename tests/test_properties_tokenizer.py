"""Property tests for the SentencePiece wrapper: round trips for any text the tokenizer can represent,
and special ids (PAD, BOS, EOS) never coming out of `encode`, on two small tokenizers trained once per
module on generated text."""

import random
import unicodedata

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from transformer.config import ConfigError
from transformer.data import tokenizer
from transformer.tokens import BOS_ID, EOS_ID, FIRST_FREE_ID, PAD_ID

# Derandomized: CI runs exactly the examples a developer ran locally, never a new one nobody has seen.
settings.register_profile(
  'properties', derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile('properties')

# Letters, accented and CJK characters, a compatibility ligature (NFKC: 'fi') and a full-width letter
# (NFKC: 'A'), markup that looks like special pieces, and whitespace.
WORDS = ['the', 'cat', 'été', 'naïve', '漢字', 'über', 'ﬁne', 'Ａb', '<s>', '</s>', '<pad>', '<unk>', 'x1', '!?']
SPACES = [' ', '  ', '\t', '\n', ' \t ']
ALPHABET = sorted(set(''.join(WORDS + SPACES)))


def _corpus():
  rng = random.Random(0)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(400)] + [ALPHABET_LINE]


ALPHABET_LINE = ''.join(c for c in ALPHABET if not c.isspace())  # every character seen in training


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('tokenizers'))
  return {
    # As the tasks train theirs: NFKC, whitespace runs collapsed.
    'default': tokenizer.train_tokenizer(_corpus(), 120, cache_dir=cache),
    'exact': tokenizer.train_tokenizer(_corpus(), 320, cache_dir=cache, normalization='identity', byte_fallback=True),
  }


texts = st.lists(st.sampled_from(WORDS + SPACES) | st.text(ALPHABET, max_size=6), max_size=12).map(''.join)


def _no_special_ids(ids):
  assert all(FIRST_FREE_ID <= i for i in ids), ids  # PAD, BOS and EOS come from the pipeline, never the text


@settings(PROFILE, max_examples=150)
@given(text=texts)
def test_default_round_trip_is_the_normalized_text(tokenizers, text):
  tok = tokenizers['default']
  ids = tok.encode(text)
  _no_special_ids(ids)
  assert tokenizer.UNK_ID not in ids  # every character was in the training text
  # nmt_nfkc: NFKC, then whitespace runs become one space and the ends are stripped.
  assert tok.decode(ids) == ' '.join(unicodedata.normalize('NFKC', text).split())


@settings(PROFILE, max_examples=150)
@given(text=st.text(st.characters(exclude_characters='\u2581', exclude_categories=['Cs'])) | texts)
def test_identity_with_byte_fallback_round_trips_any_text_exactly(tokenizers, text):
  """Any Unicode text, unseen characters included (as UTF-8 bytes), spaces kept as they are; except
  U+2581, SentencePiece's own whitespace mark, which reads back as a space."""
  tok = tokenizers['exact']
  ids = tok.encode(text)
  _no_special_ids(ids)
  assert tok.decode(ids) == text


@settings(PROFILE, max_examples=60)
@given(text=texts, tail=st.lists(st.integers(0, 119), max_size=5), noise=st.lists(st.integers(0, 40), max_size=4))
def test_decode_stops_at_eos_and_skips_pad_and_bos(tokenizers, text, tail, noise):
  tok = tokenizers['default']
  ids = tok.encode(text)
  noisy = list(ids)
  for place in noise:  # PAD and BOS anywhere before EOS change nothing
    noisy.insert(place % (len(noisy) + 1), PAD_ID if place % 2 else BOS_ID)
  assert tok.decode(noisy + [EOS_ID] + tail) == tok.decode(ids)


@settings(PROFILE, max_examples=60)
@given(ids=st.lists(st.integers(-(2**40), 2**40) | st.integers(-3, 130), max_size=10))
def test_decode_reads_any_id_outside_the_vocabulary_as_unknown(tokenizers, ids):
  """Model outputs past a rounded-up vocabulary, or a negative fill (-1, -100), never crash decoding."""
  tok = tokenizers['default']
  known = [i if 0 <= i < tok.vocab_size else tokenizer.UNK_ID for i in ids]
  assert tok.decode(ids) == tok.decode(known)


@settings(PROFILE, max_examples=40)
@given(
  texts=st.lists(st.text(max_size=30) | st.lists(st.sampled_from(WORDS), max_size=20).map(' '.join), max_size=6),
  vocab_size=st.integers(6, 40) | st.integers(-1, 300),
  model_type=st.sampled_from(tokenizer.MODEL_TYPES),
  byte_fallback=st.booleans(),
)
def test_training_on_any_corpus_gives_a_tokenizer_or_one_clear_error(
  tmp_path_factory, texts, vocab_size, model_type, byte_fallback
):
  """Empty, blank or tiny corpora and any vocabulary size: a tokenizer that encodes its own training text
  without special ids, or one ConfigError naming what to change (never SentencePiece's internal check)."""
  cache = str(tmp_path_factory.mktemp('corpus', numbered=True))
  try:
    tok = tokenizer.train_tokenizer(texts, vocab_size, model_type, cache, byte_fallback=byte_fallback)
  except ConfigError as error:
    message = str(error)
    assert 'INTERNAL' not in message and '.cc(' not in message, message
    assert 'vocab_size' in message or 'the training data is empty' in message, message
    return
  # bpe / unigram make exactly the pieces asked for (or refuse); char / word models have one piece per
  # distinct character / word, so the size asked for is their cap.
  assert tok.vocab_size == vocab_size if model_type in ('bpe', 'unigram') else tok.vocab_size <= vocab_size
  for text in texts:
    _no_special_ids(tok.encode(text))
