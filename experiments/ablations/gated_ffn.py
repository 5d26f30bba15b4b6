"""Gated feed-forward layers (Shazeer 2020, "GLU Variants Improve Transformer"): SwiGLU against ReLU and
GELU at an equal parameter count. SwiGLU has three d_model x d_ff matrices where the others have two, so
its d_ff is 2/3 of theirs (341 against 512: 130,944 against 131,072 weights per layer).

python launch.py --config experiments/ablations/gated_ffn.py --mode sweep --workdir runs/gated_ffn
"""

from transformer.experiment import sweep

D_FF = 512  # the base's (experiments/text.py:short)


def get_config(arg=None):
  del arg
  return sweep.sweep_config(
    base='experiments/text.py:short',
    variants=sweep.zip_(activation=['relu', 'gelu', 'swiglu'], d_ff=[D_FF, D_FF, D_FF * 2 // 3]),
    seeds=(0, 1, 2),
    metric='eval/loss',
  )
