"""Warm-up and layer-norm position (Xiong et al., ICML 2020): post-LN trains badly or diverges without a
learning-rate warm-up, pre-LN trains either way. A 2 x 2 sweep, 3 seeds, LayerNorm as in the paper, at the
base's peak learning rate (3e-3, AdamW, clipping 1.0).

python launch.py --config experiments/ablations/warmup_norm.py --mode sweep --workdir runs/warmup_norm
"""

from transformer.experiment import sweep


def get_config(arg=None):
  del arg
  return sweep.sweep_config(
    base='experiments/text.py:short',
    variants=sweep.product(norm_position=['post', 'pre'], warmup_steps=[0, 50]),
    overrides={'norm_type': 'layernorm'},
    seeds=(0, 1, 2),
    metric='eval/loss',
  )
