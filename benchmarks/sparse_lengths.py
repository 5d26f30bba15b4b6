"""Train-step time per token against length, for each attention pattern: `--mode bench` of
`experiments/bench.py:long` (the `lm` shape, batch 1) at T = 1k to 16k tokens, each (pattern, T) in its own
process, the patterns alternated within each length.

Window and BigBird keep a fixed number of keys per query (256 tokens; 3 local + 1 global + 2 random blocks of
64), so their time per token should stay flat; strided and fixed use Child et al.'s stride l = sqrt(T)
(rounded to blocks), so each query sees about 2 sqrt(T) keys and their time per token grows as sqrt(T);
dense grows as T.

    python benchmarks/sparse_lengths.py                       # all lengths and patterns (about 40 min here)
    python benchmarks/sparse_lengths.py --lengths 1024 2048 --patterns dense bigbird
"""

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transformer import patterns  # noqa: E402
from transformer.config import ModelConfig  # noqa: E402

BLOCK, WINDOW = 64, 256
PATTERNS = ('dense', 'window', 'strided', 'fixed', 'bigbird')


def overrides(pattern: str, length: int) -> dict:
  """The model settings of `pattern` at `length` tokens."""
  stride = max(1, round(math.sqrt(length / BLOCK)))
  return {
    'dense': {},
    'window': dict(attention_pattern='window', attention_window=WINDOW),
    'strided': dict(attention_pattern='strided', pattern_stride=stride),
    'fixed': dict(attention_pattern='fixed', pattern_stride=stride, pattern_summary=1),
    'bigbird': dict(attention_pattern='bigbird', pattern_local=3, pattern_global=1, pattern_random=2),
  }[pattern]


def keys_per_query(pattern: str, length: int) -> float:
  """The mean number of keys a query attends to (causal)."""
  settings = overrides(pattern, length)
  if pattern == 'dense':
    return (length + 1) / 2
  if pattern == 'window':
    return sum(min(i + 1, WINDOW) for i in range(length)) / length
  block_pattern = patterns.from_config(ModelConfig(pattern_block=BLOCK, **settings), causal=True)
  return block_pattern.density(length) * (length + 1) / 2


def bench(pattern: str, length: int, steps: int) -> dict:
  flags = [f'--config.model.{key}={value}' for key, value in overrides(pattern, length).items()]
  command = [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config',
    'experiments/bench.py:long',
    '--mode',
    'bench',
    f'--config.data.seq_len={length}',
    f'--config.model.max_len={length}',
    f'--config.model.pattern_block={BLOCK}',
    f'--config.bench.steps={steps}',
    '--config.bench.warmup=1',
    '--config.bench.data_batches=0',
    *flags,
  ]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  if done.returncode:
    lines = done.stderr.strip().splitlines() or [f'exit {done.returncode}']
    errors = [line for line in lines if 'Error' in line]  # libtpu may log after the exception
    return {'error': (errors or lines)[-1][:120]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lengths', type=int, nargs='+', default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument('--patterns', nargs='+', default=list(PATTERNS), choices=PATTERNS)
  parser.add_argument('--steps', type=int, default=3)
  # Dense attention's scores are quadratic: at 8k tokens its step needs about 20 GB here (6 layers of 8 heads'
  # [T, T] float32 logits and weights, 10/16 of them by causal blocks), at 16k about 80 GB.
  parser.add_argument('--dense-max', type=int, default=4096, help='longest T for dense (memory)')
  parser.add_argument('--out', default='', help='also write the JSON results here')
  args = parser.parse_args()
  results = {}
  for length in args.lengths:
    for pattern in args.patterns:
      if pattern == 'dense' and length > args.dense_max:
        results[(pattern, length)] = {'error': 'not run (memory)'}
        continue
      result = bench(pattern, length, args.steps)
      results[(pattern, length)] = result
      print(json.dumps(dict(pattern=pattern, length=length, **result)), flush=True)
  first = args.lengths[0]
  print(f'\n| pattern | {" | ".join(f"T = {t}" for t in args.lengths)} | {args.lengths[-1]} vs {first} |')
  print('|---|' + '---:|' * (len(args.lengths) + 1))
  for pattern in args.patterns:
    cells, per_token = [], {}
    for length in args.lengths:
      result = results[(pattern, length)]
      if 'step_ms' in result:
        per_token[length] = result['step_ms'] * 1000 / length
        cells.append(f'{per_token[length]:.1f} us ({keys_per_query(pattern, length):,.0f} keys)')
      else:
        cells.append(result.get('error', 'failed'))
    ratio = per_token[args.lengths[-1]] / per_token[first] if {first, args.lengths[-1]} <= per_token.keys() else None
    print(f'| {pattern} | {" | ".join(cells)} | {"" if ratio is None else f"{ratio:.2f}x"} |')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump([dict(pattern=p, length=t, **r) for (p, t), r in results.items()], f, indent=1)


if __name__ == '__main__':
  main()
