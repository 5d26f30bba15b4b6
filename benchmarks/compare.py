"""The issue-15 comparison: our JAX train step and decoding against PyTorch eager, torch.compile and HF
transformers' GPT-2 `generate`, MFU against measured matmul rates, and our own compile time, memory, long
sequences, beam search and input pipeline. Prints the machine, then ONE markdown table (figure, ours,
reference, ratio, goal, met?).

Every comparison with another library runs each implementation in its own process (`worker.py`), at its
defaults (no thread or flag settings added on either side), in rounds: ours, torch eager, torch.compile,
ours, ... Each process warms up before it times; compile time is reported apart. Medians of the per-round
medians are compared. The ours-vs-ours sections (compile, memory, decode, beam, long, input) run in this
process (`inprocess.py`), after the others. `matmuls` shows both libraries' float32 matmul rates at the
model's own shapes (`matmul_shapes.py`): what the step's and the decoding loop's matmuls can reach. PyTorch
and transformers are optional (`pip install -e '.[bench]'`); without them their rows say so.

    python benchmarks/compare.py                           # everything
    python benchmarks/compare.py --only train,mfu --rounds 5
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # experiments/ and the modules beside this file

from table import machine_line, markdown, row, yes  # noqa: E402

WORKER = [sys.executable, os.path.join(HERE, 'worker.py')]
MISSING = 'torch not installed'
MISSING_HF = 'transformers not installed'
NO_LM1B = 'not run: no Flax examples/lm1b model is installed here (the Flax examples are no package)'
SUBPROCESS_SECTIONS = ('train', 'mfu', 'generate', 'matmuls')
SECTIONS = SUBPROCESS_SECTIONS + ('compile', 'memory', 'decode', 'beam', 'long', 'input')
# The issue's train and decode shape: the `lm` variant with GPT-2's choices (GELU, learned positions).
GPT2_LIKE = ('activation=gelu', 'positional=learned')
GEMM_SIZE, GEMM_REPEATS = 2048, 5
HAVE = {name: importlib.util.find_spec(name) is not None for name in ('torch', 'transformers')}


def run_worker(impl: str, worker_args: list[str]) -> dict:
  """One fresh process measuring `impl`; its JSON line, or {'error': its last stderr line}."""
  done = subprocess.run(WORKER + ['--impl', impl, *worker_args], cwd=ROOT, capture_output=True, text=True)
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    error = (done.stderr.strip().splitlines() or [f'exit code {done.returncode}'])[-1]
    return {'error': f'{impl} failed: {error[:160]}'}
  return json.loads(lines[-1])


def alternate(jobs: dict, rounds: int, run=run_worker) -> dict:
  """`jobs` {name: (impl, worker args)} run in turn, round after round: {name: [each round's result]}."""
  results = {name: [] for name in jobs}
  for index in range(rounds):
    for name, (impl, worker_args) in jobs.items():
      start = time.perf_counter()
      results[name].append(run(impl, worker_args))
      print(f'[round {index + 1}/{rounds} {name}: {time.perf_counter() - start:.0f} s]', file=sys.stderr, flush=True)
  return results


def combine(results: list[dict]) -> dict:
  """One implementation's rounds as one figure: the median of the rounds' medians (and of their compile
  times), the first round's compile time, the other keys of the first round; or the first error."""
  errors = [r['error'] for r in results if 'error' in r]
  if errors:
    return {'error': errors[0]}
  out = dict(results[0])
  if 'median_s' in out:
    out['median_s'] = statistics.median(r['median_s'] for r in results)
    out['compile_s'] = statistics.median(r['compile_s'] for r in results)
    out['first_compile_s'] = results[0]['compile_s']
  if 'flops_per_s' in out:
    out['flops_per_s'] = max(r['flops_per_s'] for r in results)  # the best matmul rate any round reached
  return out


def train_args(args) -> list[str]:
  sets = [f'--set={item}' for item in GPT2_LIKE]
  return ['--variant', args.variant, *sets, '--steps', str(args.steps), '--warmup', str(args.warmup)]


def measure_train(args, state, with_compile: bool) -> dict:
  """ours / torch / torch_compile alternated (once per run: the MFU section reuses the train section's)."""
  if 'train' not in state:
    jobs = {'ours': ('ours', train_args(args))}
    if HAVE['torch']:
      jobs['torch'] = ('torch', train_args(args))
      if with_compile:
        jobs['torch_compile'] = ('torch_compile', train_args(args))
    state['train'] = {name: combine(r) for name, r in alternate(jobs, args.rounds).items()}
    ours = state['train']['ours']
    if 'error' not in ours:
      state['step_s'] = ours['median_s']
  return state['train']


def tokens_per_sec(result: dict) -> float:
  return result['tokens'] / result['median_s']


def shape_of(args) -> str:
  from experiments import bench as bench_configs

  config = bench_configs.get_config(args.variant)
  m = config.model
  return (
    f'decoder LM d{m.d_model} L{m.num_decoder_layers} h{m.num_heads} d_ff {m.d_ff} V{m.vocab_size}, '
    f'{config.train.batch_size} x {config.data.seq_len}, f32, pre-LN, GELU, learned positions, tied'
  )


def train_section(args, state):
  """Train tokens/s: ours against PyTorch eager and torch.compile, each in its own processes."""
  measured = measure_train(args, state, with_compile=not args.no_torch_compile)
  ours = measured['ours']
  if 'error' in ours:
    return [row(f'train tokens/s ({shape_of(args)})', ours['error'])]
  mine = f'{tokens_per_sec(ours):,.0f}'
  rows = []
  eager = measured.get('torch')
  if eager is None:
    rows.append(row(f'train tokens/s vs PyTorch eager ({shape_of(args)})', mine, MISSING, '', '>= 1.0x', '?'))
  elif 'error' in eager:
    rows.append(row(f'train tokens/s vs PyTorch eager ({shape_of(args)})', mine, eager['error'], '', '>= 1.0x', '?'))
  else:
    ratio = tokens_per_sec(ours) / tokens_per_sec(eager)
    figure = (
      f'train tokens/s vs PyTorch eager ({shape_of(args)}; PyTorch: SDPA, {eager["optimizer"]} AdamW, '
      f'denormals flushed, {eager["threads"]} threads)'
    )
    rows.append(row(figure, mine, f'{tokens_per_sec(eager):,.0f}', f'{ratio:.2f}x', '>= 1.0x', yes(ratio >= 1.0)))
    equal = ours['params'] == eager['params']
    rows.append(
      row('parameters (ours = PyTorch)', f'{ours["params"]:,}', f'{eager["params"]:,}', '', 'equal', yes(equal))
    )
    ms = lambda r: f'{1000 * r["median_s"]:.0f} ms'
    rows.append(row("train step (median of the rounds' medians)", ms(ours), ms(eager)))
  compiled = measured.get('torch_compile')
  seconds = lambda r: f'{r["first_compile_s"]:.1f} s (median {r["compile_s"]:.1f} s)'
  if compiled is None:
    rows.append(row('compile time, first round (jit)', seconds(ours)))
  elif 'error' in compiled:
    rows.append(row('train tokens/s vs torch.compile', mine, compiled['error'], '', 'report'))
    rows.append(row('compile time, first round (jit)', seconds(ours)))
  else:
    ratio = tokens_per_sec(ours) / tokens_per_sec(compiled)
    compiled_rate = f'{tokens_per_sec(compiled):,.0f}'
    rows.append(row('train tokens/s vs torch.compile (inductor)', mine, compiled_rate, f'{ratio:.2f}x', 'report'))
    rows.append(row('compile time, first round (jit vs torch.compile)', seconds(ours), seconds(compiled), '', 'report'))
  rows.append(row('train tokens/s vs Flax lm1b TransformerLM (ReLU, sinusoidal)', mine, NO_LM1B, '', '>= 1.1x', '?'))
  return rows


def gemm_rates(args, state) -> dict:
  """{'XLA': FLOP/s, 'PyTorch': FLOP/s or why not}: the best of `GEMM_REPEATS` f32 matmuls, each library in
  its own processes, alternated for the run's rounds; measured once per run."""
  if 'gemm' not in state:
    gemm = ['--size', str(GEMM_SIZE), '--repeats', str(GEMM_REPEATS)]
    jobs = {'XLA': ('gemm_xla', gemm)}
    if HAVE['torch']:
      jobs['PyTorch'] = ('gemm_torch', gemm)
    results = {name: combine(r) for name, r in alternate(jobs, args.rounds).items()}
    state['gemm'] = {name: r.get('flops_per_s', r.get('error')) for name, r in results.items()}
    state['gemm'].setdefault('PyTorch', MISSING)
  return state['gemm']


def mfu_section(args, state):
  """Model FLOP/s of the train step over the f32 GEMM rate of XLA (ours) and of PyTorch (MKL)."""
  measured = measure_train(args, state, with_compile=False)
  gemm = gemm_rates(args, state)
  ours = measured['ours']
  if 'error' in ours or not isinstance(gemm['XLA'], float):
    return [row('MFU', ours.get('error') or gemm['XLA'])]
  flops = ours['flops_per_token'] * tokens_per_sec(ours)
  mfu = flops / gemm['XLA']
  basis = f'{GEMM_SIZE}^2 f32 GEMM'
  eager, torch_gemm = measured.get('torch'), gemm['PyTorch']
  reference = MISSING
  if eager is not None and 'error' not in eager and isinstance(torch_gemm, float):
    # The same function (equal parameters, tests/test_bench.py), so the same FLOPs per token.
    reference = f"PyTorch eager: {ours['flops_per_token'] * tokens_per_sec(eager) / torch_gemm:.2f} of PyTorch's"
  rows = [
    row(
      f"MFU: model FLOP/s / XLA's {basis} rate",
      f'{mfu:.2f}',
      reference,
      f'{flops / 1e9:.0f} GFLOP/s model',
      '>= 0.8',
      yes(mfu >= 0.8),
    )
  ]
  if isinstance(torch_gemm, float):
    rows.append(
      row(
        f'{basis} rate: XLA vs PyTorch',
        f'{gemm["XLA"] / 1e9:.0f} GFLOP/s',
        f'{torch_gemm / 1e9:.0f} GFLOP/s',
        f'{gemm["XLA"] / torch_gemm:.2f}x',
        'report',
      )
    )
    rows.append(row(f"MFU against PyTorch's {basis} rate", f'{flops / torch_gemm:.2f}', '', '', 'report'))
  return rows


def generate_section(args, state):
  """Cached greedy decoding, prompt 32 + 256 new tokens: ours against HF GPT-2 `generate`, own processes."""
  shape = ['--variant', args.variant, *(f'--set={item}' for item in GPT2_LIKE)]
  shape += ['--prompt_len', '32', '--decode_len', str(args.decode_len), '--repeats', str(args.decode_repeats)]
  jobs = {}
  for batch in (1, 8):
    jobs[f'ours {batch}'] = ('ours_decode', shape + ['--batch', str(batch)])
    if HAVE['torch'] and HAVE['transformers']:
      jobs[f'hf {batch}'] = ('hf_generate', shape + ['--batch', str(batch)])
  measured = {name: combine(r) for name, r in alternate(jobs, args.rounds).items()}
  missing = MISSING if not HAVE['torch'] else MISSING_HF
  rows = []
  for batch in (1, 8):
    ours, hf = measured[f'ours {batch}'], measured.get(f'hf {batch}', {'error': missing})
    figure = f'cached greedy decode tokens/s, batch {batch}, prompt 32 + {args.decode_len} new, vs HF GPT-2 `generate`'
    if 'error' in ours:
      rows.append(row(figure, ours['error']))
      continue
    mine = f'{tokens_per_sec(ours):,.0f}'
    if 'error' in hf:
      rows.append(row(figure, mine, hf['error'], '', '>= 2x', '?'))
      continue
    ratio = tokens_per_sec(ours) / tokens_per_sec(hf)
    rows.append(row(figure, mine, f'{tokens_per_sec(hf):,.0f}', f'{ratio:.2f}x', '>= 2x', yes(ratio >= 2)))
  compiles = [measured[f'ours {b}'].get('compile_s') for b in (1, 8)]
  if None not in compiles:
    rows.append(row('decode compile time, batch 1 / 8 (ours)', ' / '.join(f'{s:.1f} s' for s in compiles)))
  return rows


def matmuls_section(args, state):
  """XLA's and PyTorch's f32 matmul rates at the step's and the decoding loop's shapes (`matmul_shapes.py`),
  each library in its own processes, alternated; per shape the best round."""
  setting = ['--variant', args.variant, *(f'--set={item}' for item in GPT2_LIKE), '--repeats', str(GEMM_REPEATS)]
  jobs = {'XLA': ('shapes_xla', setting)}
  if HAVE['torch']:
    jobs['PyTorch'] = ('shapes_torch', setting)
  measured = alternate(jobs, args.rounds)
  best = {}
  for name, results in measured.items():
    errors = [r['error'] for r in results if 'error' in r]
    best[name] = errors[0] if errors else [max(rates) for rates in zip(*(r['rates'] for r in results))]
  if isinstance(best['XLA'], str):
    return [row("f32 matmul rates at the model's shapes", best['XLA'])]
  torch_rates = best.get('PyTorch', MISSING)
  rows = []
  for index, (name, m, k, n, layout) in enumerate(measured['XLA'][0]['shapes']):
    figure = f'f32 matmul rate, {name}: [{m} x {k}] x [{k} x {n}] ({layout}), XLA vs PyTorch'
    xla = best['XLA'][index]
    if isinstance(torch_rates, str):
      rows.append(row(figure, f'{xla / 1e9:.0f} GFLOP/s', torch_rates, '', 'report'))
      continue
    torch_rate = torch_rates[index]
    rows.append(
      row(figure, f'{xla / 1e9:.0f} GFLOP/s', f'{torch_rate / 1e9:.0f} GFLOP/s', f'{xla / torch_rate:.2f}x', 'report')
    )
  return rows


def in_process(name):
  def section(args, state):
    import inprocess  # imports JAX into this process: only after the subprocess sections

    return getattr(inprocess, f'{name}_section')(args, state)

  return section


SECTION_FUNCTIONS = {
  'train': train_section,
  'mfu': mfu_section,
  'generate': generate_section,
  'matmuls': matmuls_section,
  **{name: in_process(name) for name in SECTIONS if name not in SUBPROCESS_SECTIONS},
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', default=','.join(SECTIONS), help=f'comma-separated subset of {SECTIONS}')
  parser.add_argument('--rounds', type=int, default=3, help='alternation rounds (medians over them)')
  parser.add_argument('--steps', type=int, default=4, help='timed train steps per process (after warm-up)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed train steps per process after compiling')
  parser.add_argument('--decode_len', type=int, default=256, help='new tokens per decode (generate section)')
  parser.add_argument('--decode_repeats', type=int, default=3, help='timed decodes per process (generate)')
  parser.add_argument('--lengths', default='256,512,1024,2048,4096')
  parser.add_argument('--window', type=int, default=256)
  parser.add_argument('--decode_rounds', type=int, default=2, help='rounds of the (slow) uncached decode')
  parser.add_argument('--no_torch_compile', action='store_true')
  parser.add_argument('--variant', default='lm', help='experiments/bench.py variant for train, mfu, generate, input')
  args = parser.parse_args(argv)
  only = args.only.split(',')
  unknown = set(only) - set(SECTIONS)
  if unknown:
    parser.error(f'unknown sections {sorted(unknown)}; choose from {SECTIONS}')
  if args.rounds < 1 or args.steps < 1 or args.decode_repeats < 1:
    parser.error('--rounds, --steps and --decode_repeats must be >= 1')
  rows, state = [], {}
  start = time.perf_counter()
  for name in SECTIONS:
    if name in only:
      section_start = time.perf_counter()
      section_rows = SECTION_FUNCTIONS[name](args, state)
      rows += section_rows
      # Each section's rows as soon as they exist: a long run stopped early keeps what it measured.
      print(f'[{name}: {time.perf_counter() - section_start:.0f} s]', file=sys.stderr)
      print(markdown(section_rows), file=sys.stderr, flush=True)
  print(machine_line(gemm_rates(args, state), GEMM_SIZE, GEMM_REPEATS))
  print()
  print(
    f'<!-- python benchmarks/compare.py {" ".join(argv if argv is not None else sys.argv[1:])}; '
    f'{time.perf_counter() - start:.0f} s; {args.rounds} rounds; rows against PyTorch and HF: each in its own '
    'processes, medians of per-round medians; the other rows: ours against ours, in one process -->'
  )
  print(markdown(rows))


if __name__ == '__main__':
  main()
