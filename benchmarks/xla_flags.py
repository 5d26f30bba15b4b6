"""Does an XLA CPU flag speed up the train step? Runs `--mode bench` in one subprocess per flag set
(XLA reads its flags once, at start-up), alternating the sets round by round, and prints a markdown
table of median step time, the matmul rate the same process measured, and the ratio to the baseline.

    python benchmarks/xla_flags.py --rounds 2 --config experiments/bench.py:lm
    python benchmarks/xla_flags.py --flag=--xla_cpu_use_onednn=true --flag='--xla_cpu_experimental_ynn_fusion_type='
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = (
  '--xla_cpu_use_onednn=true',
  '--xla_cpu_use_xnnpack=true',
  '--xla_cpu_enable_fast_math=true',
  '--xla_cpu_enable_custom_matmul_tiling=true',
  '--xla_cpu_experimental_ynn_fusion_type=',  # matmuls by Eigen instead of YNNPACK
)


def bench_once(config: str, flags: str, steps: int) -> dict:
  env = {**os.environ, 'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} {flags}'.strip()}
  command = [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config',
    config,
    '--mode',
    'bench',
    f'--config.bench.steps={steps}',
    '--config.bench.data_batches=0',
  ]
  done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
  if done.returncode:
    return {'error': (done.stderr.strip().splitlines() or ['failed'])[-1][:120]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/bench.py:lm')
  # One set per --flag=...: with `=` argparse takes a value that itself starts with '--'.
  parser.add_argument('--flag', action='append', dest='flags', help='an XLA_FLAGS set to compare (repeat)')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--steps', type=int, default=4)
  args = parser.parse_args(argv)
  sets = [''] + (args.flags or list(CANDIDATES))
  runs = {flags: [] for flags in sets}
  for _ in range(args.rounds):
    for flags in sets:
      runs[flags].append(bench_once(args.config, flags, args.steps))
  print('| XLA_FLAGS | step (median) | matmul rate | MFU | step vs baseline |')
  print('|---|---|---|---|---|')
  base = None
  for flags in sets:
    good = [r for r in runs[flags] if 'error' not in r]
    if not good:
      print(f'| `{flags or "(none)"}` | {runs[flags][0]["error"]} | | | |')
      continue
    step = statistics.median(r['step_ms'] for r in good)
    base = base or step
    print(
      f'| `{flags or "(none)"}` | {step:.0f} ms | {statistics.median(r["peak_gflops"] for r in good):.0f} GFLOP/s '
      f'| {statistics.median(r["mfu"] for r in good):.2f} | {base / step:.2f}x |'
    )


if __name__ == '__main__':
  main()
