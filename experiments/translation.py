"""Translation with the paper's encoder-decoder (Vaswani et al., 2017).

Variants: `tiny` (CPU-sized), `base` and `big` (the paper's Table 3 rows "base" and "big").
    python launch.py --config experiments/translation.py:base --dry_run
"""

import ml_collections

from transformer.config import default_model_config, default_train_config, pick_variant

# Hyperparameters the paper states (sections 5.3, 5.4 and Table 3).
_PAPER = dict(kind='encoder_decoder', vocab_size=37000, num_encoder_layers=6, num_decoder_layers=6,
              positional='sinusoidal', norm_position='post', norm_type='layernorm', activation='relu',
              tie_embeddings=True, attention_dropout_rate=0.0)
VARIANTS = {
    'base': dict(d_model=512, d_ff=2048, num_heads=8, dropout_rate=0.1),
    'big': dict(d_model=1024, d_ff=4096, num_heads=16, dropout_rate=0.3),
    'tiny': dict(vocab_size=8000, num_encoder_layers=2, num_decoder_layers=2, d_model=128, d_ff=512,
                 num_heads=4, dropout_rate=0.1, max_len=256),
}


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, 'tiny', 'experiments/translation.py')
  config = ml_collections.ConfigDict()
  config.task = 'translation'
  config.variant = variant
  config.model = default_model_config(**{**_PAPER, **VARIANTS[variant]})

  config.data = ml_collections.ConfigDict()
  config.data.seq_len = 256 if variant == 'tiny' else 512

  # The paper's optimizer (5.3): Adam, beta2 0.98, eps 1e-9, rsqrt schedule with 4000 warmup steps.
  config.train = default_train_config(
      optimizer='adam', warmup_steps=4000, label_smoothing=0.1,
      num_steps={'base': 100_000, 'big': 300_000}.get(variant, 2_000))
  return config
