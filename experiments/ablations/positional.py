"""Position information in a decoder-only language model: sinusoidal, learned, RoPE, ALiBi or none.

python launch.py --config experiments/ablations/positional.py --mode sweep --workdir runs/positional
python launch.py --config experiments/ablations/positional.py:small ...   # on experiments/text.py:small
"""

from transformer.config import pick_variant
from transformer.experiment import sweep


def get_config(arg=None):
  size = pick_variant(arg, ('tiny', 'small'), 'tiny', 'experiments/ablations/positional.py')
  return sweep.sweep_config(
    base=f'experiments/text.py:{size}',
    variants=sweep.product(positional=['sinusoidal', 'learned', 'rope', 'alibi', 'none']),
    seeds=(0, 1, 2),
    metric='eval/loss',
  )
