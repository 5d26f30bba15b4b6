"""Parameter tables: where a model's parameters are, and how many."""

import math

import jax


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
