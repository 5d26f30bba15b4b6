"""Length extrapolation (Press et al., ALiBi, ICLR 2022): a decoder-only LM trained on 64-token windows,
evaluated on windows of 64, 128, 256 and 512 tokens. ALiBi's per-token loss should stay about flat,
sinusoidal positions degrade sharply, RoPE in between; learned positions have no embedding past
max_len = 64, so their longer lengths are n/a (with a note in the results), not a crash.

python launch.py --config experiments/ablations/length.py --mode sweep --workdir runs/length
"""

from transformer.experiment import sweep

TRAIN_LENGTH = 64  # experiments/text.py:short's seq_len
LENGTHS = tuple(TRAIN_LENGTH * k for k in (1, 2, 4, 8))


def get_config(arg=None):
  del arg
  return sweep.sweep_config(
    base='experiments/text.py:short',
    variants=sweep.product(positional=['sinusoidal', 'learned', 'rope', 'alibi']),
    overrides={'max_len': TRAIN_LENGTH, 'eval_lengths': LENGTHS},
    seeds=(0, 1, 2),
    metric='eval/loss',
    report=tuple(f'eval/loss@{length}' for length in LENGTHS),
  )
