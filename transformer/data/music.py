"""Music as event tokens: notes, the event vocabulary, a generated toy corpus, the Bach chorales,
and MIDI / piano-roll output for listening to and looking at samples.

Time is quantized to steps (`steps_per_quarter`, default 4: sixteenth notes). A piece is a list of
`Note(onset, voice, pitch, duration)` sorted by onset, voice, pitch; it is encoded onset by onset:

    [shift k]  [voice v]  pitch  dur d   [voice v']  pitch  dur d' ...   shift k  ...

`shift` moves time forward (gaps longer than `max_shift` take several), `voice` is written only when
it changes, and every note is a pitch followed by its duration.
"""

import json
import os
import random
import time
from typing import NamedTuple

from transformer.config import ConfigError
from transformer.files import write_atomic
from transformer.tokens import EOS_ID, FIRST_FREE_ID

_PITCH_NAMES = ('C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#', 'B')


class Note(NamedTuple):
  onset: int  # steps from the start of the piece
  voice: int  # part index: 0 soprano / melody, upward to the bass
  pitch: int  # MIDI number, 60 = C4
  duration: int  # steps, >= 1


def pitch_name(pitch: int) -> str:
  return f'{_PITCH_NAMES[pitch % 12]}{pitch // 12 - 1}'


class EventVocab:
  """Ids from 3 upward: shift 1..max_shift, voice 0..num_voices-1, pitches, dur 1..max_duration."""

  def __init__(
    self,
    num_voices: int = 4,
    max_shift: int = 16,
    max_duration: int = 32,
    min_pitch: int = 21,
    max_pitch: int = 108,
    steps_per_quarter: int = 4,
  ):
    self.num_voices, self.max_shift, self.max_duration = num_voices, max_shift, max_duration
    self.min_pitch, self.max_pitch = min_pitch, max_pitch
    self.steps_per_quarter = steps_per_quarter
    self.shift_start = FIRST_FREE_ID
    self.voice_start = self.shift_start + max_shift
    self.pitch_start = self.voice_start + num_voices
    self.dur_start = self.pitch_start + (max_pitch - min_pitch + 1)
    self.vocab_size = self.dur_start + max_duration

  def normalize(self, notes) -> list[Note]:
    """What a round trip keeps: sorted, durations clipped to [1, max_duration], one note per
    (onset, voice, pitch). Out-of-range voices or pitches are a ValueError (they have no token)."""
    kept = {}
    for note in notes:
      onset, voice, pitch, duration = (int(x) for x in note)
      if not 0 <= voice < self.num_voices or not self.min_pitch <= pitch <= self.max_pitch or onset < 0:
        raise ValueError(
          f'{Note(onset, voice, pitch, duration)} is outside the vocabulary: voices '
          f'0..{self.num_voices - 1}, pitches {self.min_pitch}..{self.max_pitch}, onsets >= 0.'
        )
      duration = min(max(duration, 1), self.max_duration)
      key = (onset, voice, pitch)
      kept[key] = max(kept.get(key, 0), duration)
    return [Note(*key[:3], d) for key, d in sorted(kept.items())]

  def encode(self, notes) -> list[int]:
    return [token for group in self._encode_groups(self.normalize(notes)) for token in group]

  def _encode_groups(self, notes) -> list[list[int]]:
    """The ids of each onset of normalized `notes`: the shift to it, then its voices and notes."""
    groups, time_now, voice_now = [], 0, None
    for note in notes:
      if not groups or note.onset != time_now:
        groups.append([])
        gap = note.onset - time_now
        while gap > 0:
          step = min(gap, self.max_shift)
          groups[-1].append(self.shift_start + step - 1)
          gap -= step
        time_now = note.onset
      if note.voice != voice_now:
        groups[-1].append(self.voice_start + note.voice)
        voice_now = note.voice
      groups[-1] += [self.pitch_start + note.pitch - self.min_pitch, self.dur_start + note.duration - 1]
    return groups

  def decode(self, ids) -> list[Note]:
    """Notes of a (possibly malformed, generated) id sequence: stops at EOS, skips what does not
    parse (a pitch without a duration, a duration without a pitch, pad / bos / unknown ids)."""
    notes, time_now, voice, pitch = [], 0, 0, None
    for token in ids:
      token = int(token)
      if token == EOS_ID:
        break
      kind, value = self._kind(token)
      if kind == 'shift':
        time_now += value
      elif kind == 'voice':
        voice = value
      if kind == 'dur' and pitch is not None:
        notes.append(Note(time_now, voice, pitch, value))
      pitch = value if kind == 'pitch' else None
    return self.normalize(notes)

  def _kind(self, token: int):
    if self.shift_start <= token < self.voice_start:
      return 'shift', token - self.shift_start + 1
    if self.voice_start <= token < self.pitch_start:
      return 'voice', token - self.voice_start
    if self.pitch_start <= token < self.dur_start:
      return 'pitch', token - self.pitch_start + self.min_pitch
    if self.dur_start <= token < self.vocab_size:
      return 'dur', token - self.dur_start + 1
    return 'special', token

  def token_name(self, token: int) -> str:
    kind, value = self._kind(int(token))
    if kind == 'pitch':
      return pitch_name(value)
    if kind == 'special':
      return {0: 'pad', 1: 'bos', 2: 'eos'}.get(value, f'<{value}>')
    return f'{kind}{value}'

  def describe(self, ids) -> str:
    """'voice0 C4 dur4 shift4 ...' up to the first EOS (included)."""
    names = []
    for token in ids:
      names.append(self.token_name(token))
      if int(token) == EOS_ID:
        break
    return ' '.join(names)

  def windows(self, notes, max_tokens: int) -> list[list[int]]:
    """A piece cut at onsets into fragments of at most `max_tokens` ids, each encoded as if it were a
    piece from time 0 (so it names its voice and starts like a piece). No note is lost; only an onset
    longer than `max_tokens` by itself is truncated."""
    notes = self.normalize(notes)
    groups = self._encode_groups(notes)
    onsets = sorted({n.onset for n in notes})
    fragments, start = [], 0
    while start < len(groups):
      first = [n._replace(onset=0) for n in notes if n.onset == onsets[start]]
      ids, end = self._encode_groups(first)[0], start + 1  # no shift, voice named afresh
      # Later onsets encode as in the whole piece: the voice before them is the same.
      while end < len(groups) and len(ids) + len(groups[end]) <= max_tokens:
        ids, end = ids + groups[end], end + 1
      fragments.append(ids[:max_tokens])
      start = end
    return fragments


# --- The toy corpus: motifs repeated in sequence, which a small model can learn to continue. ---

_MAJOR, _MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)


def _degree_pitch(tonic: int, scale, degree: int) -> int:
  return tonic + 12 * (degree // 7) + scale[degree % 7]


def toy_piece(rng: random.Random) -> list[Note]:
  """A motif (a scale run, an arpeggio or a random walk, with a rhythm) repeated 3-5 times, each
  repeat moved by the same number of scale steps, ending on the tonic; a bass holds the root of each
  repeat. Key (major/minor, any tonic) and tempo (the length of a beat in steps) are random."""
  tonic, scale = rng.randint(55, 66), rng.choice((_MAJOR, _MINOR))
  beat = rng.choice((1, 2, 4))
  length = rng.randint(3, 6)
  kind = rng.choice(('scale', 'arpeggio', 'walk'))
  if kind == 'scale':
    degrees = list(range(length)) if rng.random() < 0.5 else list(range(length - 1, -1, -1))
  elif kind == 'arpeggio':
    degrees = [(0, 2, 4, 7, 9, 11)[i] for i in range(length)]
  else:
    degrees = [0]
    for _ in range(length - 1):
      degrees.append(degrees[-1] + rng.choice((-2, -1, 1, 2)))
  rhythm = [beat * rng.choice((1, 1, 2)) for _ in range(length)]
  step = rng.choice((-2, -1, 1, 2))
  repeats = rng.randint(3, 5)
  with_bass = rng.random() < 0.7
  notes, onset = [], 0
  for r in range(repeats):
    shift = step * r
    if with_bass:
      notes.append(Note(onset, 1, _degree_pitch(tonic - 12, scale, shift), min(sum(rhythm), 32)))
    for degree, duration in zip(degrees, rhythm):
      notes.append(Note(onset, 0, _degree_pitch(tonic, scale, degree + shift), duration))
      onset += duration
  notes.append(Note(onset, 0, tonic, 4 * beat))
  if with_bass:
    notes.append(Note(onset, 1, tonic - 12, 4 * beat))
  return sorted(notes)


def toy_pieces(num: int, seed: int) -> list[list[Note]]:
  """`num` toy pieces, the same for the same seed (no numpy global state, no packages)."""
  return [toy_piece(random.Random(f'{seed}-{i}')) for i in range(num)]


# --- The Bach chorales bundled with music21. ---

NUM_CHORALES = 371


def cache_dir_default() -> str:
  root = os.environ.get('TRANSFORMER_CACHE') or os.path.join('~', '.cache', 'transformer-jax')
  return os.path.join(os.path.expanduser(root), 'music')


def _import_music21():
  try:
    import music21  # noqa: F401  (large; loaded only for the chorales and tests)
  except ImportError as e:
    raise ConfigError(
      f'config.data.corpus=bach needs music21 ({e}): pip install music21, or use --config.data.corpus=toy.'
    ) from None
  return music21


def parse_chorale(score, steps_per_quarter: int = 4, max_duration: int = 32, num_voices: int = 4):
  """Notes of a music21 score: voice = part index (first `num_voices` parts), ties merged, onsets and
  durations rounded to steps; grace notes (no duration) dropped."""
  notes = []
  for voice, part in enumerate(list(score.parts)[:num_voices]):
    for element in part.flatten().stripTies().notes:
      duration = round(float(element.quarterLength) * steps_per_quarter)
      if duration <= 0:
        continue
      onset = round(float(element.offset) * steps_per_quarter)
      for p in element.pitches:
        notes.append(Note(onset, voice, int(p.midi), min(duration, max_duration)))
  return sorted(set(notes))


def bach_pieces(
  cache_dir: str | None = None,
  limit: int | None = None,
  steps_per_quarter: int = 4,
  max_duration: int = 32,
  num_voices: int = 4,
  verbose: bool = True,
) -> list[list[Note]]:
  """The Bach chorales (Riemenschneider order) as notes; the first `limit` only when given.

  Parsing all 371 takes about a minute, so the notes are cached as JSON (written atomically) in
  `cache_dir`, by default `$TRANSFORMER_CACHE/music` or `~/.cache/transformer-jax/music`, under a
  name holding the settings: other settings parse again.
  """
  settings = f'bach-spq{steps_per_quarter}-dur{max_duration}-v{num_voices}'
  folder = cache_dir or cache_dir_default()
  path = os.path.join(folder, f'{settings}-n{limit}.json' if limit else f'{settings}.json')
  for cached in (os.path.join(folder, f'{settings}.json'), path):  # all chorales hold any first N
    if os.path.exists(cached):
      with open(cached) as f:
        return [[Note(*n) for n in piece] for piece in json.load(f)['pieces'][: limit or None]]
  music21 = _import_music21()
  from music21.corpus import chorales

  names = list(chorales.Iterator(returnType='filename'))[: limit or None]
  pieces, start = [], time.time()
  for i, name in enumerate(names):
    pieces.append(parse_chorale(music21.corpus.parse(name), steps_per_quarter, max_duration, num_voices))
    if verbose and ((i + 1) % 25 == 0 or i + 1 == len(names)):
      print(f'Parsed {i + 1}/{len(names)} Bach chorales ({time.time() - start:.0f} s).', flush=True)
  _write_json_atomically(path, {'names': names, 'pieces': [[list(n) for n in p] for p in pieces]})
  return pieces


def _write_json_atomically(path: str, value) -> None:
  """A reader sees the old file or the whole new one, never half of it; an unwritable cache only
  costs the next run another parse."""
  try:
    write_atomic(path, json.dumps(value))
  except OSError as e:
    print(f'Could not cache the chorales in {path} ({e}); set $TRANSFORMER_CACHE to a writable folder.')


# --- Output: MIDI files and piano rolls. ---

_TICKS_PER_QUARTER = 480


def _varlen(value: int) -> bytes:
  """MIDI variable-length quantity: 7 bits per byte, high bit set on all but the last."""
  out = [value & 0x7F]
  value >>= 7
  while value:
    out.append(0x80 | (value & 0x7F))
    value >>= 7
  return bytes(reversed(out))


def _chunk(kind: bytes, data: bytes) -> bytes:
  return kind + len(data).to_bytes(4, 'big') + data


def midi_bytes(notes, seconds_per_step: float, steps_per_quarter: int = 4) -> bytes:
  """A format-1 standard MIDI file: a tempo track, then one track (and channel) per voice."""
  ticks_per_step = _TICKS_PER_QUARTER // steps_per_quarter
  tempo = round(seconds_per_step * steps_per_quarter * 1e6)  # microseconds per quarter note
  tracks = [_varlen(0) + b'\xff\x51\x03' + tempo.to_bytes(3, 'big') + _varlen(0) + b'\xff\x2f\x00']
  for voice in sorted({n.voice for n in notes}):
    channel = voice if voice < 9 else voice + 1  # channel 10 (index 9) is drums
    events = []  # (tick, 0 for off / 1 for on so offs come first at equal ticks, pitch)
    for n in notes:
      if n.voice == voice:
        events += [(n.onset * ticks_per_step, 1, n.pitch), ((n.onset + n.duration) * ticks_per_step, 0, n.pitch)]
    data, last = bytearray(), 0
    for tick, on, pitch in sorted(events):
      data += _varlen(tick - last) + bytes([(0x90 if on else 0x80) | channel, pitch, 80 if on else 0])
      last = tick
    tracks.append(bytes(data) + _varlen(0) + b'\xff\x2f\x00')
  header = _chunk(
    b'MThd', (1).to_bytes(2, 'big') + len(tracks).to_bytes(2, 'big') + _TICKS_PER_QUARTER.to_bytes(2, 'big')
  )
  return header + b''.join(_chunk(b'MTrk', track) for track in tracks)


def write_midi(notes, path: str, seconds_per_step: float = 0.125, steps_per_quarter: int = 4) -> None:
  with open(path, 'wb') as f:
    f.write(midi_bytes(notes, seconds_per_step, steps_per_quarter))


def piano_roll_png(notes, path: str, title: str | None = None, size=(10, 4), dpi: int = 100) -> None:
  """Time on x, pitch on y, one colour per voice; `size` inches at `dpi` (default 1000 x 400 px)."""
  import matplotlib

  matplotlib.use('Agg')  # files only, no display
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=size, dpi=dpi)
  colours = plt.get_cmap('tab10')
  for voice in sorted({n.voice for n in notes}):
    mine = [n for n in notes if n.voice == voice]
    for n in mine:
      ax.broken_barh([(n.onset, n.duration)], (n.pitch - 0.4, 0.8), color=colours(voice % 10))
    ax.plot([], [], color=colours(voice % 10), linewidth=6, label=f'voice {voice}')
  if notes:
    ax.set_xlim(0, max(n.onset + n.duration for n in notes))
    ax.set_ylim(min(n.pitch for n in notes) - 2, max(n.pitch for n in notes) + 2)
    ax.legend(loc='upper right', fontsize='small')
  ax.set_xlabel('time (steps)')
  ax.set_ylabel('MIDI pitch (60 = C4)')
  ax.yaxis.get_major_locator().set_params(integer=True)
  if title:
    ax.set_title(title)
  fig.savefig(path)
  plt.close(fig)
