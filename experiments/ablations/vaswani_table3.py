"""Table 3 of Vaswani et al. (2017), rows (A)-(E), on translation: each row one change to the base model.

    python launch.py --config experiments/ablations/vaswani_table3.py --mode sweep --workdir runs/table3
    python launch.py --config experiments/ablations/vaswani_table3.py:base --mode sweep ...  # the paper's scale

(A) heads at fixed compute (h x d_k = d_model), (B) smaller keys d_k, (C) depth N, width d_model and d_ff,
(D) dropout and label smoothing, (E) learned positions instead of sinusoids. At `tiny` scale the paper's
sizes shrink by d_model / 512 (and its depths to a 2-layer base), and its base takes the paper's P_drop 0.1 and
label smoothing 0.1 (translation `tiny` trains without dropout), so every row of (D) changes something.
"""

from transformer.config import pick_variant
from transformer.experiment import sweep

# scale -> (base experiment, d_model, heads, layers, d_ff, the N rows of (C))
SCALES = {
  'tiny': ('experiments/translation.py:tiny', 128, 4, 2, 512, (1, 4)),
  'base': ('experiments/translation.py:base', 512, 8, 6, 2048, (2, 4, 8)),
}


def get_config(arg=None):
  scale = pick_variant(arg, SCALES, 'tiny', 'experiments/ablations/vaswani_table3.py')
  base, d_model, heads, _, d_ff, depths = SCALES[scale]
  h = (1, 4, 16, 32)  # the paper's (h, d_k, d_v): (1, 512, 512) ... (32, 16, 16) at d_model 512
  rows = (
    sweep.variant('baseline')
    + sweep.group('A', sweep.zip_(num_heads=h, d_k=[d_model // k for k in h], d_v=[d_model // k for k in h]))
    + sweep.group('B', sweep.product(d_k=[d_model // heads // 4, d_model // heads // 2]))
    + sweep.group(
      'C',
      sweep.zip_(num_encoder_layers=depths, num_decoder_layers=depths)
      + sweep.product(d_model=[d_model // 2, d_model * 2])
      + sweep.product(d_ff=[d_ff // 2, d_ff * 2]),
    )
    + sweep.group('D', sweep.product(dropout_rate=[0.0, 0.2]) + sweep.product(label_smoothing=[0.0, 0.2]))
    + sweep.group('E', sweep.product(positional=['learned']))
  )
  paper = {'dropout_rate': 0.1, 'label_smoothing': 0.1}  # the paper's base model (Table 3, first row)
  return sweep.sweep_config(base=base, variants=rows, seeds=(0,), metric='eval/bleu', overrides=paper)
