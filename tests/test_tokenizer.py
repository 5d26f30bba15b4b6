"""SentencePiece tokenizer: ids, round trips on real verses, the content-addressed cache, errors."""

import os
import pickle

import pytest
import sentencepiece as spm

from transformer.config import ConfigError
from transformer.data import corpora
from transformer.data import tokenizer as tok
from transformer.tokens import BOS_ID, EOS_ID, PAD_ID


@pytest.fixture(scope='module')
def texts():
  """Both sides of the first 1,500 English-French training pairs: a shared vocabulary, as for
  translation. (Genesis and Exodus: they hold every character John uses.)"""
  return [text for pair in corpora.bible_pairs('k', 'l', 'train')[:1500] for text in pair]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tokenizers'))


@pytest.fixture(scope='module')
def bpe(texts, cache):
  return tok.train_tokenizer(texts, 400, cache_dir=cache, name='k-l')


def test_special_ids(bpe):
  assert (PAD_ID, BOS_ID, EOS_ID, tok.UNK_ID) == (0, 1, 2, 3)
  assert [bpe.id_to_piece(i) for i in range(4)] == ['<pad>', '<s>', '</s>', '<unk>']
  assert bpe.vocab_size == 400
  assert bpe.encode('ψ')[-1] == tok.UNK_ID  # a character the corpus never saw
  assert BOS_ID not in bpe.encode('In the beginning') and EOS_ID not in bpe.encode('In the beginning')


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_round_trip_on_held_out_verses(texts, cache, model_type):
  tokenizer = tok.train_tokenizer(texts, 400, model_type=model_type, cache_dir=cache, name='k-l')
  verses = [text for pair in corpora.bible_pairs('k', 'l', 'test') for text in pair]
  assert any('é' in v for v in verses) and any('?' in v for v in verses)  # accents and punctuation
  assert [tokenizer.decode(tokenizer.encode(v)) for v in verses] == verses
  assert tokenizer.encode_batch(verses[:5]) == [tokenizer.encode(v) for v in verses[:5]]


def test_decode_stops_at_eos_and_skips_pad_and_bos(bpe):
  text = 'Jésus lui dit: Je suis le chemin, la vérité, et la vie.'
  ids = bpe.encode(text)
  assert bpe.decode([BOS_ID] + ids + [EOS_ID] + ids + [PAD_ID, PAD_ID]) == text
  assert bpe.decode([PAD_ID] + ids[:3] + [PAD_ID] + ids[3:]) == text
  assert bpe.decode_batch([ids + [EOS_ID, 7], [EOS_ID] + ids]) == [text, '']
  # Ids past the vocabulary (a model vocab rounded up) read as unk.
  assert bpe.decode(ids + [bpe.vocab_size + 5]) == bpe.decode(ids + [tok.UNK_ID]) != text


def test_cache_hit_loads_without_training(texts, cache, bpe, monkeypatch):
  mtime = os.stat(bpe.path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError('trained again instead of loading the cache')

  monkeypatch.setattr(spm.SentencePieceTrainer, 'train', no_training)
  again = tok.train_tokenizer(iter(texts), 400, cache_dir=cache, name='k-l')  # an iterator works too
  assert again.path == bpe.path and os.stat(again.path).st_mtime_ns == mtime
  sample = texts[:50]
  assert again.encode_batch(sample) == bpe.encode_batch(sample)
  assert os.path.basename(bpe.path).startswith('k-l-bpe-400-') and bpe.path.endswith('.model')
  assert not [name for name in os.listdir(cache) if name.endswith('.tmp')]  # temp files renamed


def test_other_settings_or_corpus_give_other_files(texts, cache, bpe):
  variants = [
    tok.train_tokenizer(texts, 300, cache_dir=cache, name='k-l'),
    tok.train_tokenizer(texts, 400, cache_dir=cache, name='k-l', character_coverage=0.9995),
    tok.train_tokenizer(texts[:-1], 400, cache_dir=cache, name='k-l'),
  ]
  paths = {bpe.path} | {variant.path for variant in variants}
  assert len(paths) == 4 and all(os.path.isfile(p) for p in paths)
  assert variants[0].vocab_size == 300


def test_training_is_deterministic(texts, bpe, tmp_path):
  fresh = tok.train_tokenizer(texts, 400, cache_dir=str(tmp_path), name='k-l')
  with open(fresh.path, 'rb') as a, open(bpe.path, 'rb') as b:
    assert a.read() == b.read()  # hosts training separately agree


def test_vocab_too_large_or_small(tmp_path):
  few = ['a small corpus', 'with few words', 'and fewer pieces'] * 5
  with pytest.raises(ConfigError, match=r'vocab_size=5000 is too large .* at most \d+ pieces'):
    tok.train_tokenizer(few, 5000, cache_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=r'vocab_size=10 is too small: the corpus needs \d+ pieces'):
    tok.train_tokenizer(few, 10, cache_dir=str(tmp_path))
  with pytest.raises(ConfigError, match='No text to train'):
    tok.train_tokenizer(['', ' '], 100, cache_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="model_type='wordpiece' is unknown"):
    tok.train_tokenizer(few, 100, model_type='wordpiece', cache_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_load_tokenizer(bpe, tmp_path):
  loaded = tok.load_tokenizer(bpe.path)
  assert loaded.encode('Au commencement') == bpe.encode('Au commencement')
  with pytest.raises(ConfigError, match=r'nothere\.model does not exist'):
    tok.load_tokenizer(str(tmp_path / 'nothere.model'))
  (tmp_path / 'junk.model').write_bytes(b'not a model')
  with pytest.raises(ConfigError, match=r'junk\.model is not a SentencePiece model'):
    tok.load_tokenizer(str(tmp_path / 'junk.model'))
  # A model trained with SentencePiece's own default ids (unk 0, no pad) would shift every token.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(['some text here', 'and more text'] * 5),
    model_prefix=str(tmp_path / 'default'),
    vocab_size=20,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  with pytest.raises(ConfigError, match=r'default\.model has pad/bos/eos/unk ids \(-1, 1, 2, 0\)'):
    tok.load_tokenizer(str(tmp_path / 'default.model'))


def test_pickle_and_default_cache_dir(bpe, monkeypatch, tmp_path):
  copy = pickle.loads(pickle.dumps(bpe))  # grain worker processes receive the tokenizer this way
  assert copy.path == bpe.path and copy.encode('Dieu dit') == bpe.encode('Dieu dit')
  monkeypatch.setenv('TRANSFORMER_CACHE', str(tmp_path))
  assert tok.default_cache_dir() == os.path.join(str(tmp_path), 'tokenizers')
  monkeypatch.delenv('TRANSFORMER_CACHE')
  assert tok.default_cache_dir() == os.path.expanduser('~/.cache/transformer-jax/tokenizers')
