"""Music tokens: the event vocabulary, the toy corpus, the chorales, MIDI / PNG output and the task."""

import struct
import sys

import numpy as np
import pytest

from experiments import music as music_experiment
from transformer.config import ConfigError
from transformer.data import music
from transformer.data.music import EventVocab, Note
from transformer.tasks.music import MusicTask
from transformer.tokens import EOS_ID


@pytest.fixture(scope='module')
def chorale_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='module')
def chorales(chorale_cache):
  return music.bach_pieces(cache_dir=chorale_cache, limit=2, verbose=False)


def test_round_trip_on_toy_pieces():
  vocab = EventVocab()
  for piece in music.toy_pieces(50, seed=3):
    ids = vocab.encode(piece)
    assert all(3 <= i < vocab.vocab_size for i in ids)
    assert vocab.decode(ids) == piece


def test_round_trip_normalizes_order_duplicates_and_long_notes():
  vocab = EventVocab(max_duration=8)
  notes = [Note(4, 1, 48, 2), Note(0, 0, 60, 40), Note(4, 1, 48, 3), Note(40, 0, 62, 1)]  # 40-step gap
  assert vocab.decode(vocab.encode(notes)) == [Note(0, 0, 60, 8), Note(4, 1, 48, 3), Note(40, 0, 62, 1)]
  with pytest.raises(ValueError, match='outside the vocabulary'):
    vocab.encode([Note(0, 7, 60, 1)])


def test_round_trip_on_chorales(chorales):
  vocab = EventVocab()
  assert len(chorales) == 2
  for piece in chorales:
    assert {n.voice for n in piece} == {0, 1, 2, 3}  # SATB
    assert vocab.decode(vocab.encode(piece)) == piece
  # Chorale 1 (BWV 269) starts with G4 / D4 / B3 / G2 crotchets.
  assert chorales[0][:4] == [Note(0, 0, 67, 4), Note(0, 1, 62, 4), Note(0, 2, 59, 4), Note(0, 3, 43, 4)]


def test_chorales_come_from_the_cache_without_music21(chorales, chorale_cache, monkeypatch):
  monkeypatch.setitem(sys.modules, 'music21', None)  # any import now fails
  assert music.bach_pieces(cache_dir=chorale_cache, limit=2) == chorales


def test_a_full_cache_serves_any_limit(chorales, tmp_path, monkeypatch):
  music._write_json_atomically(str(tmp_path / 'bach-spq4-dur32-v4.json'), {'pieces': chorales})
  monkeypatch.setitem(sys.modules, 'music21', None)
  assert music.bach_pieces(cache_dir=str(tmp_path), limit=1) == chorales[:1]
  assert music.bach_pieces(cache_dir=str(tmp_path)) == chorales
  assert [p.name for p in tmp_path.iterdir()] == ['bach-spq4-dur32-v4.json']  # no temporary left


def test_token_names_are_readable():
  vocab = EventVocab()
  ids = vocab.encode([Note(0, 1, 60, 4), Note(2, 1, 69, 2)]) + [EOS_ID, 5]
  assert vocab.describe(ids) == 'voice1 C4 dur4 shift2 A4 dur2 eos'
  assert [vocab.token_name(i) for i in (0, 1, 2)] == ['pad', 'bos', 'eos']
  assert vocab.token_name(vocab.pitch_start + 61 - 21) == 'C#4'


def test_malformed_ids_decode_to_the_notes_that_parse():
  vocab = EventVocab()
  pitch, dur, shift, voice = vocab.pitch_start + 60 - 21, vocab.dur_start + 3, vocab.shift_start + 1, vocab.voice_start
  ids = [dur, pitch, pitch + 2, dur, 0, 1, shift, voice + 2, pitch, voice, dur, 999, -4, pitch, dur, EOS_ID, pitch, dur]
  # dur without pitch: skipped; pitch then pitch: the first dropped; a pitch interrupted by a voice: dropped.
  assert vocab.decode(ids) == [Note(0, 0, 62, 4), Note(2, 0, 60, 4)]
  rng = np.random.default_rng(0)
  for _ in range(20):
    vocab.decode(rng.integers(-5, vocab.vocab_size + 5, 300))  # never raises


def _is_sequence(melody, reps):
  """`melody` is one motif `reps` times: the same rhythm, each repeat starting higher (or lower)."""
  size = len(melody) // reps
  if size * reps != len(melody):
    return False
  parts = [melody[r * size : (r + 1) * size] for r in range(reps)]
  moves = np.diff([part[0].pitch for part in parts])
  same_rhythm = all([n.duration for n in part] == [n.duration for n in parts[0]] for part in parts)
  return same_rhythm and (np.all(moves > 0) or np.all(moves < 0))


def test_toy_corpus_is_deterministic_and_repeats_transposed_motifs():
  assert music.toy_pieces(5, seed=1) == music.toy_pieces(5, seed=1)
  assert music.toy_pieces(5, seed=1) != music.toy_pieces(5, seed=2)
  for piece in music.toy_pieces(100, seed=0):
    melody = [n for n in piece if n.voice == 0][:-1]  # without the final tonic
    assert any(_is_sequence(melody, reps) for reps in (3, 4, 5)), melody
    assert len({n.pitch % 12 for n in piece}) <= 7  # one key
  random_melody = [Note(i, 0, p, 1) for i, p in enumerate([60, 64, 62, 67, 65, 60, 59, 62, 64])]
  assert not any(_is_sequence(random_melody, reps) for reps in (3, 4, 5))


def test_windows_keep_every_note_and_start_like_pieces(chorales):
  vocab = EventVocab()
  piece = chorales[0]
  windows = vocab.windows(piece, 100)
  assert len(windows) > 5 and all(len(w) <= 100 for w in windows)
  assert all(vocab.token_name(w[0]).startswith('voice') for w in windows)
  assert sum(len(vocab.decode(w)) for w in windows) == len(piece)
  assert vocab.windows(piece, 10_000) == [vocab.encode(piece)]


def _read_midi(path):
  """Notes of a MIDI file as music21 reads them (notes across barlines are tied: merged back)."""
  import music21

  score = music21.converter.parse(str(path), quantizePost=False).stripTies()
  return sorted(
    Note(round(float(n.offset) * 4), voice, p.midi, round(float(n.quarterLength) * 4))
    for voice, part in enumerate(score.parts)
    for n in part.flatten().notes
    for p in n.pitches
  )


def test_midi_read_back_by_music21_equals_the_notes(tmp_path):
  import music21

  notes = [
    Note(0, 0, 72, 4),
    Note(0, 1, 48, 8),
    Note(4, 0, 74, 2),
    Note(6, 0, 76, 2),
    Note(8, 1, 43, 8),
    Note(8, 0, 77, 8),
    Note(12, 1, 41, 32),
    Note(20, 0, 79, 1),
  ]  # the 32 crosses barlines
  path = tmp_path / 'x.mid'
  music.write_midi(notes, str(path), seconds_per_step=0.25)
  assert _read_midi(path) == sorted(notes)
  tempo = music21.converter.parse(str(path)).flatten().getElementsByClass('MetronomeMark')[0]
  assert tempo.number == pytest.approx(60.0)  # a quarter = 4 steps of 0.25 s


def test_piano_roll_png(tmp_path):
  path = tmp_path / 'roll.png'
  music.piano_roll_png(music.toy_pieces(1, seed=0)[0], str(path), title='toy')
  header = path.read_bytes()[:24]
  assert header[:8] == b'\x89PNG\r\n\x1a\n'
  assert struct.unpack('>II', header[16:24]) == (1000, 400)
  assert path.stat().st_size > 5000


def _config(**data):
  config = music_experiment.get_config('toy')
  config.data.update(dict(num_pieces=40, num_eval_pieces=10, seq_len=64, sample_len=32, **data))
  return config


def test_task_builds_packed_train_and_padded_eval_batches():
  task = MusicTask(_config())
  assert task.vocab_size == EventVocab().vocab_size
  assert task.num_train_windows >= 40
  batch = next(task.train_iter(4))
  assert set(batch) == {'targets', 'targets_segment_ids', 'targets_positions'}
  assert all(v.shape == (4, 64) and v.dtype == np.int32 for v in batch.values())
  assert (batch['targets'] == EOS_ID).sum() >= 4  # several pieces per row
  eval_batches = list(task.eval_batches(4))
  assert len(eval_batches) == -(-task.num_eval_windows // 4)
  assert set(eval_batches[0]) == {'targets'} and eval_batches[0]['targets'].shape == (4, 64)
  eval_notes = sum(len(task.vocab.decode(row)) for b in eval_batches for row in b['targets'])
  assert eval_notes == sum(len(p) for p in music.toy_pieces(10, seed=0 + 1_000_003)) == task.eval_notes


def test_task_bits_per_note():
  task = MusicTask(_config())
  metrics = task.eval_metrics(None, {'eval/loss': 0.5, 'eval/tokens': 1000})
  assert metrics['eval/bits_per_note'] == pytest.approx(500 / np.log(2) / task.eval_notes)


def test_task_errors_say_what_to_change(monkeypatch, tmp_path):
  with pytest.raises(ConfigError, match="corpus='mozart' is not one of toy, bach"):
    MusicTask(_config(corpus='mozart'))
  monkeypatch.setitem(sys.modules, 'music21', None)
  with pytest.raises(ConfigError, match='pip install music21'):
    MusicTask(_config(corpus='bach', cache_dir=str(tmp_path), limit=2))


def test_bach_holds_out_every_tenth_chorale(monkeypatch):
  pieces = [[Note(0, 0, 60 + i, 4)] for i in range(25)]
  monkeypatch.setattr(music, 'bach_pieces', lambda cache_dir=None, limit=None: pieces[:limit])
  task = MusicTask(_config(corpus='bach'))
  assert [task.vocab.decode(ex['targets'])[0].pitch - 60 for ex in task.eval_examples] == [0, 10, 20]
  assert task.num_train_windows == 22
  with pytest.raises(ConfigError, match='eval_every_nth=1 must be at least 2'):
    MusicTask(_config(corpus='bach', eval_every_nth=1))


class FakeGenerator:
  """Returns fixed rows, as `Predictor.generate` would: EOS included, 0 after it."""

  step = 7

  def __init__(self, rows):
    self.rows, self.calls = np.asarray(rows, np.int32), []

  def generate(self, **kwargs):
    self.calls.append(kwargs)
    return self.rows


def test_samples_decode_and_write_midi_and_png(tmp_path):
  task = MusicTask(_config())
  vocab = task.vocab
  piece = music.toy_pieces(1, seed=5)[0]
  good = (vocab.encode(piece) + [EOS_ID] + [0] * 200)[:200]
  bad = list(np.random.default_rng(1).integers(3, vocab.vocab_size, 200))
  generator = FakeGenerator([good, bad])
  samples = task.samples(generator, 2, workdir=str(tmp_path))
  call = generator.calls[0]
  assert call['prompts'].shape == (2, 0) and call['method'] == 'sample' and call['max_len'] == 32
  assert samples[0]['notes'] == len(piece) and samples[0]['ended']
  assert samples[0]['events'].startswith(vocab.describe(good)[:40])
  assert not samples[1]['ended'] and samples[1]['tokens'] == 200
  for i in range(2):
    assert (tmp_path / 'samples' / f'step_7_{i}.png').stat().st_size > 1000
  assert _read_midi(tmp_path / 'samples' / 'step_7_0.mid') == piece
  assert task.samples(generator, 2) and not (tmp_path / 'samples' / 'step_7_2.mid').exists()


def test_experiment_variants():
  for variant in ('toy', 'bach'):
    config = music_experiment.get_config(variant)
    assert config.task == 'music' and config.data.corpus == variant and config.model.kind == 'decoder_only'
  with pytest.raises(ConfigError, match='choose one of toy, bach'):
    music_experiment.get_config('jazz')
