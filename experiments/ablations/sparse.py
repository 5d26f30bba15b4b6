"""Sparse attention patterns (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"; Zaheer
et al. 2020, BigBird): dense causal attention against a sliding window, strided, fixed and BigBird block
patterns, on 512-token windows where they differ. The claim: sparse patterns match dense quality at a
fraction of the attention cost.

Every variant trains the same model for the same steps on the same batches; the patterns keep 34-44% of
the causal attention's key blocks at 512 tokens (`patterns.Pattern.density`, in the results' notes), in
16-token blocks (32 per window).

    python launch.py --config experiments/ablations/sparse.py --mode sweep --workdir runs/sparse
    python launch.py --config experiments/ablations/sparse.py --mode bench --workdir runs/sparse   # step times
"""

from transformer.experiment import sweep

LENGTH, BLOCK = 512, 16

VARIANTS = (
  sweep.variant('dense', attention_pattern='dense')
  + sweep.variant('window', attention_pattern='window', attention_window=128)  # density 0.44
  + sweep.variant('strided', attention_pattern='strided', pattern_stride=4)  # 0.44
  + sweep.variant('fixed', attention_pattern='fixed', pattern_stride=6, pattern_summary=1)  # 0.34
  + sweep.variant('bigbird', attention_pattern='bigbird', pattern_local=3, pattern_global=1, pattern_random=3)  # 0.34
  # The control: a model that sees 32 tokens back. If it matches dense too, the task does not need far keys.
  + sweep.variant('window32', attention_pattern='window', attention_window=32)  # 0.12
)


def get_config(arg=None):
  del arg
  return sweep.sweep_config(
    base='experiments/text.py:short',
    variants=list(VARIANTS),
    # 4 windows of 512 tokens per step: 2,048 tokens, twice `short`'s 16 x 64.
    overrides={'seq_len': LENGTH, 'max_len': LENGTH, 'batch_size': 4, 'pattern_block': BLOCK},
    seeds=(0, 1, 2),
    parallel=2,
    metric='eval/loss',
  )
