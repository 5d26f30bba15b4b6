"""Benchmark shapes (issue 6), timed with `--mode bench` and compared with PyTorch by
`benchmarks/compare.py`. Every variant is also a real, trainable config (the synthetic copy task as a
language model), so the input pipeline is timed with the same shapes.

Variants:
  lm          decoder-only LM: d_model 512, 6 layers, 8 heads, d_ff 2048, vocab 8192, seq 256, batch 8
  lm12        the same with 12 layers, layers scanned (compile time, memory)
  lm2         the same with 2 layers, layers scanned (the compile-time baseline of lm12)
  long        lm at seq 4096, batch 1 (override data.seq_len; model.attention_window=256 for local)
  translation the translation `tiny` shape (encoder-decoder), for greedy vs beam decoding
  tiny        a seconds-to-compile model for tests

    python launch.py --config experiments/bench.py:lm --mode bench
    python launch.py --config experiments/bench.py:lm --mode bench --config.bench.decode=True
"""

import ml_collections

from transformer.config import (
  default_compile_config,
  default_export_config,
  default_model_config,
  default_train_config,
  pick_variant,
)
from transformer.experiment.bench import default_bench_config

_LM = dict(
  kind='decoder_only',
  vocab_size=8192,
  num_decoder_layers=6,
  d_model=512,
  d_ff=2048,
  num_heads=8,
  dropout_rate=0.0,
  positional='sinusoidal',
  norm_position='pre',
  norm_type='layernorm',
  activation='relu',
  tie_embeddings=True,
  max_len=4096,
  dtype='auto',  # float32 on the CPU, bfloat16 on accelerators (--mode compile builds the TPU step)
)
VARIANTS = {
  'lm': (_LM, 256, 8),
  'lm12': ({**_LM, 'num_decoder_layers': 12, 'scan_layers': True}, 256, 8),
  'lm2': ({**_LM, 'num_decoder_layers': 2, 'scan_layers': True}, 256, 8),
  'long': (_LM, 4096, 1),
  'translation': (
    dict(
      kind='encoder_decoder',
      vocab_size=8000,
      num_encoder_layers=2,
      num_decoder_layers=2,
      d_model=128,
      d_ff=512,
      num_heads=4,
      dropout_rate=0.0,
      max_len=256,
      positional='sinusoidal',
      norm_position='post',
      dtype='auto',
    ),
    64,
    8,
  ),
  'tiny': (
    dict(
      kind='decoder_only',
      vocab_size=64,
      num_decoder_layers=2,
      d_model=32,
      d_ff=64,
      num_heads=4,
      dropout_rate=0.0,
      max_len=64,
      norm_position='pre',
      dtype='auto',
    ),
    16,
    4,
  ),
}


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, 'lm', 'experiments/bench.py')
  model, seq_len, batch_size = VARIANTS[variant]
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.model = default_model_config(**model)
  # The synthetic copy task at the model's vocabulary: decoder-only rows are `x EOS x EOS`, so the
  # longest copy fills the row.
  config.task = 'copy'
  half = (seq_len - 2) // 2
  config.data = ml_collections.ConfigDict(
    dict(
      vocab_size=model['vocab_size'],
      seq_len=seq_len,
      min_len=max(half // 2, 1),
      max_len=half if model['kind'] == 'decoder_only' else seq_len - 1,
      num_train=100_000,
      num_eval=64,
    )
  )
  config.train = default_train_config(
    num_steps=100,
    batch_size=batch_size,
    optimizer='adamw',
    learning_rate=3e-4,
    warmup_steps=10,
    weight_decay=0.1,
    label_smoothing=0.0,
    grad_clip=1.0,
    log_every=10,
    eval_every=100,
    checkpoint_every=100,
  )
  config.bench = default_bench_config()
  config.compile = default_compile_config()
  config.export = default_export_config()
  return config
