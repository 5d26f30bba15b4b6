"""Where and which normalisation: post-norm (the 2017 paper) vs pre-norm, LayerNorm vs RMSNorm.

python launch.py --config experiments/ablations/norm.py --mode sweep --workdir runs/norm
"""

from transformer.config import pick_variant
from transformer.experiment import sweep


def get_config(arg=None):
  size = pick_variant(arg, ('tiny', 'small'), 'tiny', 'experiments/ablations/norm.py')
  return sweep.sweep_config(
    base=f'experiments/text.py:{size}',
    variants=sweep.product(norm_position=['post', 'pre'], norm_type=['layernorm', 'rmsnorm']),
    seeds=(0, 1, 2),
    metric='eval/loss',
  )
