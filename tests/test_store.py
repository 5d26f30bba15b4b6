"""The token store (transformer/data/store.py) and the streamed sources it is prepared from
(transformer/data/sources.py): read back, 1 vs 2 workers, refusals, byte ranges, Hugging Face streaming."""

import concurrent.futures
import json
import os
import pickle
import random
import subprocess
import sys

# Offline before `datasets` reads its settings: a test never reaches the network.
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'

import datasets  # noqa: E402
import hypothesis.strategies as st  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from transformer.config import ConfigError  # noqa: E402
from transformer.data import corpora, sources, store  # noqa: E402
from transformer.experiment import overrides  # noqa: E402
from transformer.tasks import text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 'the of and to in that he shall unto for his lord they be is him not them it with all thou was'.split()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  """Tokenizers, cached stores and the Arrow cache in the test's own folders, not the user's."""
  monkeypatch.setenv('TRANSFORMER_CACHE', str(tmp_path / 'transformer-cache'))
  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf-cache'))


def sentences(count: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + '.' for _ in range(count)]


def write_corpus(folder, count: int = 240) -> list[str]:
  """Two .jsonl files and a .txt file (with blank lines); returns their documents in order."""
  folder.mkdir(parents=True, exist_ok=True)
  docs = sentences(count)
  a, b, c = docs[: count // 3], docs[count // 3 : 2 * count // 3], docs[2 * count // 3 :]
  (folder / 'a.jsonl').write_text(''.join(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(a)))
  (folder / 'b.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n\n' for d in b))
  (folder / 'c.txt').write_text('\n'.join(c) + '\n')
  return docs


def config_for(folder, **data):
  config = overrides.load_config(os.path.join(ROOT, 'experiments', 'text.py'))
  config.data.update(
    dict(corpus='files', train_files=str(folder / '*'), vocab_size=80, shard_mb=2000 / 2**20, prepare_workers=1)
  )
  config.data.update(data)
  return config


def prepared(config, path) -> store.TokenStore:
  config.data.store = str(path)
  text.prepare_store(config)
  return text.open_store(config)


def test_reading_back_equals_encoding_each_document_in_corpus_order(tmp_path):
  docs = write_corpus(tmp_path / 'corpus')
  assert docs == corpora.read_documents_files(str(tmp_path / 'corpus' / '*'))
  tokens = prepared(config_for(tmp_path / 'corpus'), tmp_path / 'store')
  assert len(tokens.manifest['shards']) > 5  # a few KB per shard: files cut into several byte ranges
  assert len(tokens) == len(docs) == tokens.manifest['documents']
  for index, doc in enumerate(docs):
    record = tokens[index]
    assert record['targets'].dtype == 'int32'
    assert record['targets'].tolist() == tokens.tokenizer.encode(doc)
  again = pickle.loads(pickle.dumps(tokens))  # as grain's worker processes get it
  assert again[-1]['targets'].tolist() == tokens.tokenizer.encode(docs[-1])
  assert again.fingerprint == tokens.fingerprint
  with pytest.raises(IndexError):
    tokens[len(docs)]


def store_files(path) -> dict:
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
  write_corpus(tmp_path / 'corpus')
  one = prepared(config_for(tmp_path / 'corpus', prepare_workers=1), tmp_path / 'one')
  two = prepared(config_for(tmp_path / 'corpus', prepare_workers=2), tmp_path / 'two')
  assert one.fingerprint == two.fingerprint
  assert store_files(tmp_path / 'one') == store_files(tmp_path / 'two')


def test_the_bible_store_has_the_tokenizer_trained_on_the_whole_training_split(tmp_path):
  config = overrides.load_config(os.path.join(ROOT, 'experiments', 'text.py') + ':tiny')
  tokens = text.open_store(config)  # built in the cache on first use
  path = text.store_path(config.data)
  assert os.path.dirname(path) == str(tmp_path / 'transformer-cache' / 'stores')
  assert sorted(os.listdir(os.path.dirname(path))) == sorted([os.path.basename(path), os.path.basename(path) + '.lock'])
  docs = corpora.bible_documents('k', 'train', 'chapter')
  today = text.common.build_tokenizer(config.data, docs, 'bible-k')  # what the task trained before the store
  assert tokens.tokenizer.processor.serialized_model_proto() == today.processor.serialized_model_proto()
  assert len(tokens) == len(docs)
  for index in (0, 1, len(docs) // 2, len(docs) - 1):
    assert tokens[index]['targets'].tolist() == today.encode(docs[index])
  assert text.open_store(config).fingerprint == tokens.fingerprint  # opened, not built again


def refusal(config) -> str:
  with pytest.raises(ConfigError) as error:
    text.open_store(config)
  return str(error.value)


def test_opening_refuses_missing_unfinished_mismatched_and_damaged_stores(tmp_path):
  write_corpus(tmp_path / 'corpus')
  config = config_for(tmp_path / 'corpus', store=str(tmp_path / 'nowhere'))
  assert refusal(config).startswith(f'There is no token store at {tmp_path / "nowhere"}: run --mode prepare')

  prepared(config, tmp_path / 'store')
  config.data.vocab_size = 150
  assert refusal(config) == (
    f'The token store {tmp_path / "store"} was prepared with config.data.vocab_size=80, but the config has 150: '
    "set config.data.vocab_size back, or set config.data.store to a store prepared with these settings ('' builds "
    'one in the cache).'
  )
  config.data.vocab_size, config.data.tokenizer = 80, 'unigram'
  assert "prepared with config.data.tokenizer='bpe', but the config has 'unigram'" in refusal(config)
  config.data.tokenizer = 'bpe'
  with open(tmp_path / 'corpus' / 'c.txt', 'a') as f:  # the corpus changed since: its size names it
    f.write('one more document\n')
  message = refusal(config)
  assert "prepared with config.data.train_files[2]={'bytes': " in message
  assert str(tmp_path / 'corpus' / 'c.txt') in message

  prepared(config, tmp_path / 'store2')
  size = json.loads((tmp_path / 'store2' / 'manifest.json').read_text())['shards'][1]['bytes']['tokens']
  with open(tmp_path / 'store2' / 'shard-00001.tokens', 'r+b') as f:
    f.truncate(10)
  assert refusal(config) == (
    f'The token store {tmp_path / "store2"} is damaged: shard-00001.tokens has 10 bytes, the manifest says {size} '
    'bytes. Prepare it again: delete the folder and run --mode prepare.'
  )
  os.remove(tmp_path / 'store2' / 'manifest.json')  # as if prepare were killed before its last write
  assert refusal(config) == (
    f'The token store {tmp_path / "store2"} is unfinished: prepare was interrupted: run the same --mode prepare '
    'again to finish it.'
  )


def test_a_prepare_into_an_unfinished_store_of_other_settings_is_refused(tmp_path):
  write_corpus(tmp_path / 'corpus')
  config = config_for(tmp_path / 'corpus')
  prepared(config, tmp_path / 'store')
  os.remove(tmp_path / 'store' / 'manifest.json')
  config.data.vocab_size = 150
  with pytest.raises(ConfigError, match='holds an unfinished store of other settings'):
    text.prepare_store(config)


def lines_strategy():
  line = st.one_of(
    st.just(''),
    st.just('   '),
    st.text(alphabet=st.sampled_from('ab é€\t'), min_size=1, max_size=12),
  )
  return st.lists(line, max_size=25)


@settings(max_examples=60, deadline=None)
@given(
  lines=lines_strategy(), ending=st.sampled_from(['\n', '\r\n']), last=st.booleans(), shard_bytes=st.integers(1, 90)
)
def test_byte_ranges_of_a_file_give_its_documents_once_in_order(tmp_path_factory, lines, ending, last, shard_bytes):
  folder = tmp_path_factory.mktemp('ranges')
  for extension in ('.txt', '.jsonl'):
    path = str(folder / f'docs{extension}')
    if extension == '.txt':
      content = ending.join(lines) + (ending if last else '')
    else:
      content = ending.join(json.dumps({'text': line}) if line.strip() else line for line in lines)
      content += ending if last else ''
    with open(path, 'w', encoding='utf-8', newline='') as f:
      f.write(content)
    ranges = sources.file_ranges([path], shard_bytes)
    assert ranges[0].start == 0 and ranges[-1].stop == os.path.getsize(path)
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
    got = [doc for shard in ranges for doc in sources.documents(shard)]
    expected = [line.strip() for line in lines if line.strip()]
    assert got == expected
    if expected:
      assert got == corpora.read_documents(path)
    assert sum(size for shard in ranges for _, size in shard.read()) <= os.path.getsize(path)


@pytest.mark.parametrize(
  'extension,bad,error',
  [
    ('.jsonl', '{"text": "a"', 'not valid JSON'),
    ('.jsonl', '{"body": "a"}', "no key 'text'"),
    ('.jsonl', '{"text": " "}', "'text' is empty"),
    ('.txt', b'caf\xe9', 'not UTF-8'),
  ],
)
def test_a_bad_line_in_a_byte_range_is_named_by_file_and_line_as_read_documents_names_it(
  tmp_path, extension, bad, error
):
  path = tmp_path / f'docs{extension}'
  good = [json.dumps({'text': doc}) if extension == '.jsonl' else doc for doc in sentences(40)]
  lines = [line.encode() for line in good[:29]] + [bad if isinstance(bad, bytes) else bad.encode()]
  path.write_bytes(b'\n'.join(lines + [line.encode() for line in good[29:]]) + b'\n')
  with pytest.raises(ConfigError) as expected:
    corpora.read_documents(str(path))
  assert f'{path}, line 30: {error}' in str(expected.value)
  ranges = sources.file_ranges([str(path)], 300)
  assert len(ranges) > 3
  with pytest.raises(ConfigError) as got:
    for shard in ranges:
      list(sources.documents(shard))
  assert str(got.value) == str(expected.value)


def test_a_file_without_documents_or_of_another_type_is_refused_naming_it(tmp_path):
  write_corpus(tmp_path / 'corpus')
  (tmp_path / 'corpus' / 'd.txt').write_text('\n   \n\n' * 400)  # several ranges, all blank
  with pytest.raises(ConfigError) as error:
    prepared(config_for(tmp_path / 'corpus'), tmp_path / 'store')
  assert str(error.value) == corpora.no_documents_message(str(tmp_path / 'corpus' / 'd.txt'))
  (tmp_path / 'corpus' / 'd.txt').unlink()
  (tmp_path / 'corpus' / 'e.csv').write_text('text\nhello\n')
  with pytest.raises(ConfigError, match=r"e\.csv: unknown file type '\.csv'; use \.txt or \.jsonl"):
    prepared(config_for(tmp_path / 'corpus'), tmp_path / 'store')


def test_hugging_face_streaming_from_local_parquet_and_jsonl_gives_the_files_documents(tmp_path):
  docs = write_corpus(tmp_path / 'corpus')
  thirds = [docs[: len(docs) // 3], docs[len(docs) // 3 : 2 * len(docs) // 3], docs[2 * len(docs) // 3 :]]
  (tmp_path / 'parquet').mkdir()
  (tmp_path / 'jsonl').mkdir()
  for index, part in enumerate(thirds):
    pd.DataFrame({'text': part + [None, ' '], 'id': range(len(part) + 2)}).to_parquet(
      tmp_path / 'parquet' / f'train-{index}.parquet'
    )
    (tmp_path / 'jsonl' / f'train-{index}.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in part))
  for folder in ('parquet', 'jsonl'):
    shards = sources.hf_shards(str(tmp_path / folder), None, 'train')
    assert len(shards) == 3  # one store shard per dataset shard (here: per file)
    assert [doc for shard in shards for doc in sources.documents(shard)] == docs

  files = prepared(config_for(tmp_path / 'corpus'), tmp_path / 'files-store')
  hf = prepared(
    config_for(tmp_path / 'corpus', corpus='hf', train_files='', dataset=str(tmp_path / 'parquet')),
    tmp_path / 'hf-store',
  )
  assert len(hf.manifest['shards']) == 3
  assert hf.tokenizer.processor.serialized_model_proto() == files.tokenizer.processor.serialized_model_proto()
  assert [hf[i]['targets'].tolist() for i in range(len(hf))] == [files[i]['targets'].tolist() for i in range(len(docs))]

  # The eval split is streamed too; a split the folder lacks is one ConfigError naming the key to set.
  data = config_for(tmp_path / 'corpus', corpus='hf', train_files='', dataset=str(tmp_path / 'jsonl')).data
  with pytest.raises(ConfigError, match=r"has no split 'validation' \(.*\)\. Set config.data.dataset_eval_split"):
    text.eval_documents(data)
  (tmp_path / 'jsonl' / 'validation.jsonl').write_text(json.dumps({'text': ' held out '}) + '\n')
  assert text.eval_documents(data) == ['held out']


def test_a_missing_hugging_face_column_is_one_config_error(tmp_path):
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'train.jsonl').write_text(json.dumps({'body': 'a document'}) + '\n')
  with pytest.raises(ConfigError, match=r"has no column 'text'; its columns: body\."):
    list(sources.documents(sources.hf_shards(str(tmp_path / 'docs'), None, 'train')[0]))


def test_the_prepare_workers_modules_do_not_import_jax():
  code = 'import sys; import transformer.data.store, transformer.data.sources; assert "jax" not in sys.modules'
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


def test_the_text_task_trains_from_the_store_built_once_in_the_cache_by_concurrent_builders(tmp_path):
  docs = write_corpus(tmp_path / 'corpus')
  (tmp_path / 'eval.txt').write_text('held out words of the lord.\n')
  config = config_for(tmp_path / 'corpus', eval_files=str(tmp_path / 'eval.txt'), seq_len=16)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two builders of the same store at once
    built = list(pool.map(lambda _: text.open_store(config).fingerprint, range(2)))
  assert built[0] == built[1]
  path = text.store_path(config.data)
  assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path), os.path.basename(path) + '.lock']
  task = text.TextTask(config)
  assert isinstance(task.train_examples, store.TokenStore) and task.train_examples.fingerprint == built[0]
  assert (
    task.tokenizer.processor.serialized_model_proto()
    == task.train_examples.tokenizer.processor.serialized_model_proto()
  )
  windows = pickle.loads(pickle.dumps(task.examples_of))(task.train_examples[0])  # picklable, for grain's workers
  ids = task.tokenizer.encode(docs[0]) + [2]
  assert [w['targets'].tolist() for w in windows] == [ids[i : i + 16] for i in range(0, len(ids), 16)]
