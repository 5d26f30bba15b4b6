"""Attention variants: multi-head vs grouped-query vs multi-query (key/value heads), each with full or
sliding-window attention.

    python launch.py --config experiments/ablations/attention.py --mode sweep --workdir runs/attention
"""

from transformer.config import pick_variant
from transformer.experiment import sweep

# size -> (query heads, sliding window in tokens)
SIZES = {'tiny': (4, 64), 'small': (12, 256)}


def get_config(arg=None):
  size = pick_variant(arg, SIZES, 'tiny', 'experiments/ablations/attention.py')
  heads, window = SIZES[size]
  return sweep.sweep_config(
    base=f'experiments/text.py:{size}',
    # heads: multi-head, grouped (2 queries per key/value head), multi-query; window 0: full attention
    variants=sweep.product(num_kv_heads=[heads, heads // 2, 1], attention_window=[0, window]),
    seeds=(0, 1, 2),
    metric='eval/loss',
  )
