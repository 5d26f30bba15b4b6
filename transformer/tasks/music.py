"""Music-token language modelling (decoder-only): pieces as note events, sampled pieces as MIDI files
and piano rolls.

Corpora (`config.data.corpus`): `toy`, generated motifs repeated in sequence (a held-out set from
another seed), or `bach`, the chorales bundled with music21 (every `eval_every_nth` chorale held out).
Pieces longer than `seq_len` are cut at onsets into windows that each start like a piece.
"""

import os

import numpy as np
from absl import logging

from transformer import layout
from transformer.config import ConfigError
from transformer.data import music
from transformer.tasks import common
from transformer.tokens import EOS_ID

CORPORA = ('toy', 'bach')


def load_pieces(data, seed: int):
  """(train, eval) lists of pieces of the chosen corpus."""
  corpus = common.check_choice('corpus', data.corpus, CORPORA)
  if corpus == 'toy':
    return (
      music.toy_pieces(int(data.num_pieces), seed),
      music.toy_pieces(int(data.num_eval_pieces), seed + common.EVAL_SEED_OFFSET),
    )
  every = int(data.get('eval_every_nth', 10))
  if every < 2:
    raise ConfigError(f'config.data.eval_every_nth={every} must be at least 2 (1 leaves nothing to train on).')
  pieces = music.bach_pieces(cache_dir=data.get('cache_dir') or None, limit=int(data.get('limit', 0)) or None)
  return ([p for i, p in enumerate(pieces) if i % every], [p for i, p in enumerate(pieces) if not i % every])


class MusicTask(common.TokenizedTask):
  def __init__(self, config):
    data = config.data
    self.vocab = music.EventVocab()
    self.vocab_size = self.vocab.vocab_size
    seq_len = int(data.seq_len)
    if seq_len < 8:
      raise ConfigError(f'config.data.seq_len={seq_len} is too short for music events: use at least 8.')
    train_pieces, eval_pieces = load_pieces(data, int(config.train.seed))
    train, eval_ = self._windows(train_pieces, seq_len), self._windows(eval_pieces, seq_len)
    logging.info(
      'Music corpus %s: %d train pieces -> %d windows, %d eval pieces -> %d windows.',
      data.corpus,
      len(train_pieces),
      len(train),
      len(eval_pieces),
      len(eval_),
    )
    self.num_train_windows, self.num_eval_windows = len(train), len(eval_)
    self.eval_pieces = eval_pieces  # config.train.eval_lengths cuts them anew
    super().__init__(config, train, eval_)
    # Bits per note compare across event encodings, as bits per byte do across tokenizers.
    self.eval_notes = sum(len(self.vocab.decode(ex['targets'])) for ex in eval_)
    self.sample_len = int(data.get('sample_len', seq_len))
    self.sampling = {
      key: data.get(key, default) for key, default in (('temperature', 1.0), ('top_k', 0), ('top_p', 0.95))
    }
    self.seconds_per_step = float(data.get('seconds_per_step', 0.125))

  def _windows(self, pieces, seq_len):
    """Each piece's windows of at most `seq_len - 1` events, each + EOS."""
    return [{'targets': common.with_eos(ids)} for piece in pieces for ids in self.vocab.windows(piece, seq_len - 1)]

  def cut_eval(self, length: int) -> list[dict]:
    """The eval pieces cut into windows of `length` events (EOS included), exactly as training's (`_windows`)."""
    return self._windows(self.eval_pieces, length)

  def eval_metrics(self, predictor, losses: dict) -> dict:
    """Bits per note of the eval set (from the loop's loss; no decoding)."""
    del predictor
    if 'eval/loss' not in losses or 'eval/tokens' not in losses or not self.eval_notes:
      return {}
    return {'eval/bits_per_note': common.bits_per_unit(losses, self.eval_notes)}

  def generate(self, predictor, num: int):
    """`num` sampled id rows, each from BOS alone (a prompt of width 0)."""
    prompts = np.zeros((num, 0), np.int32)
    return np.asarray(predictor.generate(prompts=prompts, max_len=self.sample_len, method='sample', **self.sampling))

  def samples(self, predictor, num: int, workdir: str | None = None) -> list[dict]:
    """`num` sampled pieces: their first events, note counts, and with `workdir` a MIDI file and a
    piano roll each in `workdir/samples/step_<step>_<i>.{mid,png}`."""
    rows = self.generate(predictor, num)
    out = []
    for i, row in enumerate(rows):
      notes = self.vocab.decode(row)
      events = self.vocab.describe(row).split()
      sample = {
        'events': ' '.join(events[:48]) + (' ...' if len(events) > 48 else ''),
        'notes': len(notes),
        'tokens': len(events),
        'ended': bool((row == EOS_ID).any()),
      }
      if workdir:
        folder = os.path.join(workdir, layout.SAMPLES_DIR)
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f'step_{int(getattr(predictor, "step", 0))}_{i}')
        music.write_midi(notes, stem + '.mid', self.seconds_per_step)
        music.piano_roll_png(notes, stem + '.png', title=f'sample {i} at step {getattr(predictor, "step", 0)}')
        sample['midi'] = stem + '.mid'
      out.append(sample)
    return out
