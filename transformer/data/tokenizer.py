"""SentencePiece tokenizers, trained in memory on the training split and cached by content.

Ids follow the codebase: pad 0, bos 1, eos 2, unk 3. For translation the caller trains ONE shared
vocabulary on both sides' texts (as in the paper), which is what makes tied embeddings meaningful.

The cache file name holds a hash of the corpus and every setting, so a changed corpus or setting
trains a new model and an unchanged one loads in milliseconds. Files are written to a temporary
name and renamed: processes training the same model at once (hosts, parallel sweep variants) each
write a complete file, and a reader never sees half of one. Training is deterministic, so whichever
rename lands last, the file is the same.
"""

import hashlib
import io
import json
import logging
import os
import re
import time

import sentencepiece as spm

from transformer.config import ConfigError
from transformer.files import write_atomic
from transformer.tokens import BOS_ID, EOS_ID, PAD_ID

UNK_ID = 3
MODEL_TYPES = ('bpe', 'unigram', 'char', 'word')
DEFAULT_MAX_SENTENCES = 2_000_000  # beyond this, an evenly spaced subset trains the vocabulary
_CACHE_FORMAT = 2  # bump when the training recipe changes, so old cache files are not reused


def default_cache_dir() -> str:
  """`$TRANSFORMER_CACHE/tokenizers`, else `~/.cache/transformer-jax/tokenizers`."""
  root = os.environ.get('TRANSFORMER_CACHE') or os.path.join('~', '.cache', 'transformer-jax')
  return os.path.join(os.path.expanduser(root), 'tokenizers')


class Tokenizer:
  """A SentencePiece model with the codebase's special ids; picklable (for grain worker processes)."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
    ids = (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
      raise ConfigError(
        f'SentencePiece model {path or "(in memory)"} has pad/bos/eos/unk ids {ids}; this codebase '
        f'needs (0, 1, 2, 3): retrain it with pad_id=0 bos_id=1 eos_id=2 unk_id=3 '
        f'(train_tokenizer does).'
      )
    self.processor = processor
    self.path = path

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Piece ids of `text`, without BOS or EOS (the pipeline adds what the model needs)."""
    return self.processor.encode(text, out_type=int)

  def encode_batch(self, texts) -> list[list[int]]:
    return self.processor.encode(list(texts), out_type=int)

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS; PAD and BOS are dropped, ids outside the vocabulary (past it: a
    model whose vocab was rounded up; negative: e.g. an ignore-index fill) read as unknown."""
    pieces = []
    for token in ids:
      token = int(token)
      if token == EOS_ID:
        break
      if token in (PAD_ID, BOS_ID):
        continue
      pieces.append(token if 0 <= token < self.vocab_size else UNK_ID)
    return self.processor.decode(pieces)

  def decode_batch(self, rows) -> list[str]:
    return [self.decode(row) for row in rows]

  def id_to_piece(self, token: int) -> str:
    return self.processor.id_to_piece(int(token))

  def __getstate__(self):
    return {'model': self.processor.serialized_model_proto(), 'path': self.path}

  def __setstate__(self, state):
    self.__init__(spm.SentencePieceProcessor(model_proto=state['model']), state['path'])

  def __repr__(self):
    return f'Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})'


def load_tokenizer(path: str) -> Tokenizer:
  """A tokenizer from a `.model` file (one `train_tokenizer` wrote, or your own with ids 0/1/2/3)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ConfigError(
      f'Tokenizer model {path} does not exist: check the path, or leave it unset to train one on the training data.'
    )
  with open(path, 'rb') as f:
    proto = f.read()
  try:
    processor = spm.SentencePieceProcessor(model_proto=proto)
  except (RuntimeError, OSError) as e:
    raise ConfigError(f'{path} is not a SentencePiece model ({e}); delete it or point to a .model file.') from None
  return Tokenizer(processor, path)


def _subsample(texts: list[str], max_sentences: int) -> list[str]:
  """At most `max_sentences` texts, evenly spaced through the corpus (deterministic, no RNG)."""
  if len(texts) <= max_sentences:
    return texts
  return [texts[i * len(texts) // max_sentences] for i in range(max_sentences)]


def _fingerprint(texts: list[str], settings: dict) -> str:
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  for text in texts:
    data = text.encode('utf-8')
    digest.update(b'%d:' % len(data))  # length prefix: ['ab', 'c'] and ['a', 'bc'] differ
    digest.update(data)
  return digest.hexdigest()[:16]


def _rephrase(error: RuntimeError, vocab_size: int, num_texts: int) -> ConfigError:
  message = str(error)
  too_high = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', message)
  if too_high:
    return ConfigError(
      f'vocab_size={vocab_size} is too large for this corpus ({num_texts} sentences): '
      f'SentencePiece can make at most {too_high.group(2)} pieces from it. Lower the '
      f'vocabulary size or train on more text.'
    )
  too_low = re.search(r'smaller than required_chars\. (\d+) vs (\d+)', message)
  if too_low:
    return ConfigError(
      f'vocab_size={vocab_size} is too small: the corpus needs {too_low.group(2)} pieces '
      f'just for its characters and the 4 special ids. Raise the vocabulary size above '
      f'{too_low.group(2)} or lower character_coverage.'
    )
  if re.search(r'model_trainer\.cc\(\d+\) \[\(vocab_size\) >= \(0\)\]', message):  # char / word, byte_fallback
    return ConfigError(
      f'vocab_size={vocab_size} is too small: byte_fallback takes 256 pieces and the special ids 4 before any '
      f'character or word. Raise the vocabulary size above 260 or set byte_fallback=False.'
    )
  return ConfigError(f'SentencePiece could not train a {vocab_size}-piece tokenizer: {message}')


def train_tokenizer(
  texts,
  vocab_size: int,
  model_type: str = 'bpe',
  cache_dir: str | None = None,
  name: str = 'corpus',
  character_coverage: float = 1.0,
  max_sentences: int = DEFAULT_MAX_SENTENCES,
  normalization: str = 'nmt_nfkc',
  byte_fallback: bool = False,
) -> Tokenizer:
  """Trains a SentencePiece model on `texts` (or loads the cached one trained on the same texts
  with the same settings) and returns it.

  `texts`: any iterable of strings, e.g. both sides of the training pairs for a shared vocabulary.
  `normalization`: SentencePiece's rule ('nmt_nfkc' default, 'identity' keeps text byte-exact).
  `byte_fallback`: spell unseen characters as UTF-8 bytes instead of unk (needs 256 more pieces).
  """
  if model_type not in MODEL_TYPES:
    raise ConfigError(f'Tokenizer model_type={model_type!r} is unknown: use one of {", ".join(MODEL_TYPES)}.')
  if vocab_size <= UNK_ID:
    raise ConfigError(f'vocab_size={vocab_size} leaves no room for pieces after the 4 special ids.')
  texts = _subsample([text for text in texts if text and not text.isspace()], max_sentences)
  if not texts:
    raise ConfigError(f'No text to train the {name!r} tokenizer on: the training data is empty.')
  settings = dict(
    format=_CACHE_FORMAT,
    sentencepiece=spm.__version__,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=character_coverage,
    normalization=normalization,
    byte_fallback=byte_fallback,
  )
  cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
  safe_name = re.sub(r'[^\w.-]+', '_', name)
  digest = _fingerprint(texts, settings)
  path = os.path.join(cache_dir, f'{safe_name}-{model_type}-{vocab_size}-{digest}.model')
  if os.path.isfile(path):
    return load_tokenizer(path)

  start = time.perf_counter()
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      normalization_rule_name=normalization,
      # 'identity' promises byte-exact text: SentencePiece would still collapse runs of spaces and drop
      # leading and trailing ones.
      remove_extra_whitespaces=normalization != 'identity',
      byte_fallback=byte_fallback,
      pad_id=PAD_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      # SentencePiece silently drops sentences longer than this (default 4192 bytes): keep them all.
      max_sentence_length=max(4192, max(len(text.encode('utf-8')) for text in texts) + 1),
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise _rephrase(e, vocab_size, len(texts)) from None
  logging.info(
    'Trained %d-piece %s tokenizer %r on %d texts in %.1f s',
    vocab_size,
    model_type,
    name,
    len(texts),
    time.perf_counter() - start,
  )

  tokenizer = Tokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()), path)
  try:
    write_atomic(path, model.getvalue())  # readers see no file or the whole file
  except OSError as e:  # an unwritable cache costs a retrain next time, not this run
    logging.warning(
      'Could not cache the tokenizer in %s (%s); set $TRANSFORMER_CACHE to a writable folder to reuse it.', cache_dir, e
    )
    tokenizer.path = None
  return tokenizer
