"""What a run shows its reader: parameter tables, one line per eval, and the summary when training ends."""

import math
import os

import jax

from transformer import layout


def param_rows(params, depth: int = 4):
  """(module path, shapes, count) per module, paths cut to `depth` names; leaves may be abstract."""
  rows = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [str(getattr(k, 'key', k)) for k in path]
    cut = min(depth, len(names) - 1)
    module, rest = '/'.join(names[:cut]), '/'.join(names[cut:])
    shapes, count = rows.get(module, ([], 0))
    rows[module] = (shapes + [f'{rest}{list(leaf.shape)}'], count + math.prod(leaf.shape))
  return [(module, ' '.join(shapes), count) for module, (shapes, count) in rows.items()]


def count_params(params) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def param_table(params, depth: int = 4) -> str:
  """A table of `param_rows`; its last line is the total."""
  rows = param_rows(params, depth)
  width = max(len(module) for module, _, _ in rows)
  lines = [f'{"module":<{width}}  {"params":>12}  shapes']
  lines += [f'{module:<{width}}  {count:>12,}  {shapes}' for module, shapes, count in rows]
  total = count_params(params)
  lines.append(f'Total parameters: {total:,} ({total / 1e6:.1f}M)')
  return '\n'.join(lines)


# How the eval line shows a metric (by its name after 'eval/'; 'loss@256' as 'loss'), in this order; others
# follow as '{:.4g}'. Token counts and perplexity (exp of the loss) stay in metrics.jsonl: they add width, not news.
_EVAL_FORMATS = {
  'loss': '{:.3g}',
  'accuracy': '{:.1%}',
  'exact_match': '{:.1%}',
  'bleu': '{:.1f}',
  'chrf': '{:.1f}',
  'bits_per_byte': '{:.3f}',
  'bits_per_note': '{:.3f}',
}
_EVAL_HIDDEN = ('tokens', 'perplexity', 'notes')


def eval_metrics_text(results: dict) -> str:
  """'loss 3.49  loss@128 3.61  accuracy 33.9%  bleu 5.1' from `{'eval/loss': ..., ...}`. A metric that has no
  value (None: a length the model cannot take) shows as 'n/a', and `eval/notes`, saying why, ends the line."""
  values = {k.removeprefix('eval/'): v for k, v in results.items() if k.startswith('eval/')}
  base = lambda name: name.split('@')[0]  # 'loss@256' is shown as a loss
  order = list(_EVAL_FORMATS)
  names = sorted(
    (n for n in values if base(n) not in _EVAL_HIDDEN),
    key=lambda n: order.index(base(n)) if base(n) in order else len(order),  # stable: lengths keep their order
  )
  shown = lambda n: 'n/a' if values[n] is None else _EVAL_FORMATS.get(base(n), '{:.4g}').format(values[n])
  text = '  '.join(f'{name} {shown(name)}' for name in names)
  return f'{text}  ({values["notes"]})' if values.get('notes') else text


def eval_line(step: int, results: dict) -> str:
  """The line the loop prints after each eval: 'eval step 500: loss 3.49  accuracy 33.9%  bleu 5.1'."""
  return f'eval step {step}: {eval_metrics_text(results)}'


def run_summary(workdir: str, step: int, num_steps: int, evals: list[dict], tensorboard: bool) -> str:
  """What the loop prints when training ends: the best eval (lowest eval loss; `evals` are metrics.jsonl
  rows with 'step'), and where the samples, TensorBoard events, metrics and checkpoints are."""
  done = (
    f'Training finished: step {step} of {num_steps}.'
    if step >= num_steps
    else f'Training stopped at step {step} of {num_steps}.'
  )
  lines = [done]
  scored = [row for row in evals if 'eval/loss' in row]
  if scored:
    best = min(scored, key=lambda row: (row['eval/loss'], row['step']))
    lines.append(f'Best eval (lowest loss) at step {best["step"]}: {eval_metrics_text(best)}')
  where = [('metrics', layout.metrics_file(workdir))]
  for name in (layout.SAMPLES_FILE, layout.SAMPLES_DIR):
    if os.path.exists(os.path.join(workdir, name)):
      where.append(('samples', os.path.join(workdir, name)))
  if tensorboard:
    where.append(('TensorBoard', f'tensorboard --logdir {workdir}'))
  where.append(('checkpoints', layout.checkpoints_dir(workdir)))
  width = max(len(label) for label, _ in where)
  lines += [f'  {label:<{width}}  {path}' for label, path in where]
  return '\n'.join(lines)
