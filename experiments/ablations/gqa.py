"""Grouped- and multi-query attention (Shazeer 2019; Ainslie et al. 2023): 8 query heads sharing 8, 4, 2 or
1 key/value heads. Quality should degrade mildly while the KV cache shrinks in proportion.

python launch.py --config experiments/ablations/gqa.py --mode sweep --workdir runs/gqa
python launch.py --config experiments/ablations/gqa.py --mode bench --workdir runs/gqa   # KV cache, decode tok/s
"""

import ml_collections

from transformer.experiment import sweep

HEADS = 8


def get_config(arg=None):
  del arg
  config = sweep.sweep_config(
    base='experiments/text.py:short',
    variants=sweep.product(num_kv_heads=[HEADS, HEADS // 2, HEADS // 4, 1]),
    overrides={'num_heads': HEADS},
    seeds=(0, 1, 2),
    metric='eval/loss',
  )
  # `--mode bench` on this file: cache bytes and cached greedy decoding per variant, in alternating rounds
  config.bench = ml_collections.ConfigDict(dict(rounds=3, decode_batch=1, prompt_len=32, decode_len=256))
  return config
