"""What the compiled greedy-decoding loop does with the KV cache: the loop's copies and in-place updates of
cache-shaped arrays, and the program's memory, for the cache in blocks (`cached_attention.BLOCK` slots) and as
one block. Compiles for a TPU slice through libtpu (no TPU needed) or for this CPU; no step runs.

    python benchmarks/decode_cache_layout.py --target v5e-8
    python benchmarks/decode_cache_layout.py --target cpu --batch 1
"""

import argparse
import os
import re
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from experiments import bench as bench_experiments  # noqa: E402
from transformer import accelerators, cached_attention, hlo_audit, parallel, setup  # noqa: E402
from transformer.experiment import aot  # noqa: E402

_OP = re.compile(r'= (\w+)\[([\d,]*)\]\{[^}]*\} (copy|dynamic-update-slice)\(')


def loop_ops(config, devices, block: int):
  """(temporary MiB, Counter of (op, dtype, shape) inside the compiled decoding loop's computations)."""
  cached_attention.BLOCK = block  # read while tracing: a new trace for each
  jax.clear_caches()
  built = setup.build(config, with_task=False)
  runner = parallel.JitRunner(built.train_config, built.model, built.optimizer, built.schedule, devices=devices)
  compiled = aot.lower_decode(config, built.model, runner).compile()
  hlo = compiled.as_text()
  computations, _ = hlo_audit.split(hlo)
  found = Counter(
    (m.group(3), m.group(1), m.group(2))
    for name in hlo_audit.loop_computations(hlo)
    for m in map(_OP.search, computations[name])
    if m
  )
  return compiled.memory_analysis().temp_size_in_bytes / 2**20, found


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='lm', help='a variant of experiments/bench.py')
  parser.add_argument('--target', default='v5e-8', help="a TPU slice ('v5e-8') or 'cpu'")
  parser.add_argument('--batch', type=int, default=8, help='decoding rows (config.bench.decode_batch)')
  args = parser.parse_args()
  config = bench_experiments.get_config(args.config)
  config.bench.decode_batch = args.batch
  devices = jax.devices()[:1] if args.target == 'cpu' else accelerators.parse(args.target).devices()
  slots = config.bench.prompt_len + config.bench.decode_len
  print(f'{args.config}, {args.target}, batch {args.batch}, {slots} cache slots per layer')
  for block, label in ((cached_attention.BLOCK, 'blocks'), (slots, 'one block')):
    temp, found = loop_ops(config, devices, block)
    print(f'\n{label} of {min(block, slots)} slots: temporaries {temp:.2f} MiB; in the loop:')
    for (op, dtype, shape), count in sorted(found.items(), key=lambda item: -item[1]):
      print(f'  {count:3d} x {op} {dtype}[{shape}]')


if __name__ == '__main__':
  main()
