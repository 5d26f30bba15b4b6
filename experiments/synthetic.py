"""Synthetic copy / reverse tasks: check the whole engine in a minute on a CPU.

Variants: `copy` and `reverse` (encoder-decoder), `lm_copy` (decoder-only: `x EOS x EOS`).
    python launch.py --config experiments/synthetic.py:reverse --workdir runs/reverse
"""

import ml_collections

from transformer.config import (
  default_compile_config,
  default_export_config,
  default_model_config,
  default_train_config,
  pick_variant,
)

VARIANTS = ('copy', 'reverse', 'lm_copy')


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, 'reverse', 'experiments/synthetic.py')
  config = ml_collections.ConfigDict()
  config.task = 'copy' if variant == 'lm_copy' else variant
  config.variant = variant
  kind = 'decoder_only' if variant == 'lm_copy' else 'encoder_decoder'
  config.model = default_model_config(
    kind=kind,
    vocab_size=32,
    num_encoder_layers=2,
    num_decoder_layers=2,
    d_model=64,
    d_ff=256,
    num_heads=4,
    dropout_rate=0.0,
    max_len=64,
    positional='sinusoidal' if kind == 'encoder_decoder' else 'rope',
    norm_position='pre',
  )
  config.data = ml_collections.ConfigDict(
    dict(
      vocab_size=32,
      seq_len=32 if kind == 'encoder_decoder' else 40,
      min_len=4,
      max_len=16,
      num_train=100_000,
      num_eval=256,
    )
  )
  config.train = default_train_config(
    num_steps=600,
    batch_size=32,
    optimizer='adamw',
    learning_rate=3e-3,
    warmup_steps=100,
    weight_decay=0.01,
    label_smoothing=0.0,
    grad_clip=1.0,
    log_every=50,
    eval_every=200,
    checkpoint_every=200,
  )
  config.compile = default_compile_config()
  config.export = default_export_config()
  return config
