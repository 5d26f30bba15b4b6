"""Music-token language modelling with a decoder-only Transformer; samples become MIDI files.

Variants: `toy` (generated motifs in sequence; learns on a 2-core CPU in a few minutes) and `bach`
(the 371 chorales bundled with music21; the first run parses them, about a minute, then caches).
    python launch.py --config experiments/music.py:toy --workdir runs/music-toy
    python launch.py --config experiments/music.py:bach --workdir runs/music-bach
    python launch.py --config experiments/music.py:toy --workdir runs/music-toy --mode decode
"""

import ml_collections

from transformer.config import (
  default_compile_config,
  default_export_config,
  default_model_config,
  default_train_config,
  pick_variant,
)

VARIANTS = ('toy', 'bach')


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, 'toy', 'experiments/music.py')
  toy = variant == 'toy'
  config = ml_collections.ConfigDict()
  config.task = 'music'
  config.variant = variant
  config.data = ml_collections.ConfigDict(
    dict(
      corpus=variant,  # 'toy' (generated) or 'bach' (music21's chorales)
      seq_len=256,  # events per training row; longer pieces are cut at onsets
      pack=True,  # several pieces per row (segment-masked)
      streams=0,  # per-row packing streams (0: one per row); the process count must divide it
      overlong='truncate',  # never happens: pieces are windowed to seq_len first
      num_pieces=20_000,  # toy: training pieces (from train.seed)
      num_eval_pieces=200,  # toy: held-out pieces (another seed)
      limit=0,  # bach: parse only the first N chorales (0: all 371)
      eval_every_nth=10,  # bach: chorales 0, 10, 20, ... are held out
      cache_dir='',  # bach: parsed notes ('' = $TRANSFORMER_CACHE/music or ~/.cache/...)
      sample_len=256,  # events generated per sample
      temperature=1.0,
      top_k=0,
      top_p=0.95,
      seconds_per_step=0.125,  # MIDI tempo: a sixteenth note = 0.125 s (120 quarter notes / min)
    )
  )
  config.model = default_model_config(
    kind='decoder_only',
    vocab_size=143,
    num_decoder_layers=3 if toy else 6,
    d_model=128 if toy else 256,
    d_ff=512 if toy else 1024,
    num_heads=4 if toy else 8,
    dropout_rate=0.0 if toy else 0.1,
    positional='rope',
    norm_position='pre',
    max_len=256,
  )
  if toy:
    config.train = default_train_config(
      num_steps=400,
      batch_size=16,
      optimizer='adamw',
      learning_rate=2e-3,
      warmup_steps=50,
      weight_decay=0.01,
      label_smoothing=0.0,
      grad_clip=1.0,
      log_every=50,
      eval_every=100,
      checkpoint_every=200,
    )
  else:
    config.train = default_train_config(
      num_steps=20_000,
      batch_size=32,
      optimizer='adamw',
      learning_rate=1e-3,
      warmup_steps=500,
      weight_decay=0.05,
      label_smoothing=0.0,
      grad_clip=1.0,
      log_every=100,
      eval_every=1000,
      checkpoint_every=1000,
    )
  config.compile = default_compile_config()
  config.export = default_export_config()
  return config
