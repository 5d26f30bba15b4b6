"""Measures ONE implementation in this (fresh) process and prints one JSON line; `compare.py` starts one per
implementation and round, so no implementation shares a process, threads or caches with another.

    python benchmarks/worker.py --impl ours --variant lm --set activation=gelu --set positional=learned
    python benchmarks/worker.py --impl hf_generate --variant lm --set activation=gelu --set positional=learned --batch 8
    python benchmarks/worker.py --impl gemm_torch --size 2048

Train (`ours`, `torch`, `torch_compile`): the first step compiles, `--warmup` more steps run untimed, then
`--steps` are timed one by one. Decode (`ours_decode`, `hf_generate`): one untimed call, then `--repeats`
timed calls. GEMM (`gemm_xla`, `gemm_torch`): the best of `--repeats` float32 `size x size` matmuls; at the
model's shapes (`shapes_xla`, `shapes_torch`, `matmul_shapes.py`): the best of `--repeats` for each shape.
The JSON: `impl`, `seconds` (each timed step or call), `median_s`, `compile_s` (first call minus the median),
and per kind `tokens` (per step or call), `params`, `flops_per_token`, `flops_per_s`, or `shapes` and their `rates`.
Each side runs at its defaults: XLA's flags and PyTorch's threads as the environment leaves them.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # experiments/ and the references beside this file

IMPLS = (
  'ours',
  'torch',
  'torch_compile',
  'ours_decode',
  'hf_generate',
  'gemm_xla',
  'gemm_torch',
  'shapes_xla',
  'shapes_torch',
)


def parse_value(text: str):
  """'gelu' -> 'gelu', '4' -> 4, '0.5' -> 0.5, 'true' -> True: the types `--config.model.x=v` takes."""
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def experiment_config(variant: str, overrides: list[str]):
  """`experiments/bench.py:<variant>` with `key=value` model overrides, resolved (no JAX work done)."""
  from experiments import bench as bench_configs
  from transformer import setup

  config = bench_configs.get_config(variant)
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep or key not in config.model:
      raise SystemExit(f'--set {item!r}: give model_key=value with a key of config.model, e.g. activation=gelu')
    config.model[key] = parse_value(value)
  return config, setup.resolve(config)


def summarise(seconds: list[float], first: float) -> dict:
  median = statistics.median(seconds)
  return {'seconds': seconds, 'median_s': median, 'compile_s': max(first - median, 0.0)}


def train_ours(args) -> dict:
  import jax

  from transformer import metrics
  from transformer.experiment import bench

  jax.config.update('jax_enable_compilation_cache', False)  # as `--mode bench`: compile_s is a real compile
  config, _ = experiment_config(args.variant, args.set)
  b = bench.TrainBench(config)
  first = b.step()
  b.times(args.warmup)
  result = summarise(b.times(args.steps), first)
  flops = metrics.flops_per_token(b.model_config, b.seq_len)
  return {**result, 'tokens': b.tokens_per_step, 'params': b.params, 'flops_per_token': flops, 'loss': b.last_loss}


def train_torch(args, compile: bool) -> dict:
  import torch_reference

  config, resolved = experiment_config(args.variant, args.set)
  batch = int(resolved.train_config.batch_size)
  seq_len = int(config.data.seq_len)
  b = torch_reference.TorchTrainBench(resolved.model_config, resolved.train_config, batch, seq_len, compile=compile)
  first = b.step()
  b.times(args.warmup)
  result = summarise(b.times(args.steps), first)
  extra = {'optimizer': b.optimizer_kind, 'threads': torch_reference.torch.get_num_threads()}
  return {**result, 'tokens': batch * seq_len, 'params': b.params, 'loss': b.last_loss, **extra}


def decode_ours(args) -> dict:
  from transformer.experiment import bench

  _, resolved = experiment_config(args.variant, args.set)
  call = bench.decode_calls(
    resolved.model_config, batch=args.batch, prompt_len=args.prompt_len, decode_len=args.decode_len
  )['cached']
  first = bench.timed(call)
  return {**summarise([bench.timed(call) for _ in range(args.repeats)], first), 'tokens': args.batch * args.decode_len}


def decode_hf(args) -> dict:
  import hf_reference

  _, resolved = experiment_config(args.variant, args.set)
  b = hf_reference.GenerateBench(resolved.model_config, args.batch, args.prompt_len, args.decode_len)
  first = b.timed()
  result = summarise([b.timed() for _ in range(args.repeats)], first)
  return {**result, 'tokens': b.tokens, 'params': hf_reference.count_params(b.model)}


def gemm(args, library: str) -> dict:
  if library == 'xla':
    from transformer import metrics

    rate = metrics.measure_matmul_flops(size=args.size, repeats=args.repeats)
  else:
    import torch_reference

    rate = torch_reference.measure_matmul_flops(size=args.size, repeats=args.repeats)
  return {'flops_per_s': rate, 'size': args.size}


def matmul_shapes(args, library: str) -> dict:
  import matmul_shapes

  config, resolved = experiment_config(args.variant, args.set)
  tokens = int(resolved.train_config.batch_size) * int(config.data.seq_len)
  rate = matmul_shapes.xla_rate if library == 'xla' else matmul_shapes.torch_rate
  found = matmul_shapes.shapes(resolved.model_config, tokens)
  return {'shapes': found, 'rates': [rate(m, k, n, layout, args.repeats) for _, m, k, n, layout in found]}


def measure(args) -> dict:
  runs = {
    'ours': lambda: train_ours(args),
    'torch': lambda: train_torch(args, compile=False),
    'torch_compile': lambda: train_torch(args, compile=True),
    'ours_decode': lambda: decode_ours(args),
    'hf_generate': lambda: decode_hf(args),
    'gemm_xla': lambda: gemm(args, 'xla'),
    'gemm_torch': lambda: gemm(args, 'torch'),
    'shapes_xla': lambda: matmul_shapes(args, 'xla'),
    'shapes_torch': lambda: matmul_shapes(args, 'torch'),
  }
  start = time.perf_counter()
  result = runs[args.impl]()
  return {'impl': args.impl, **result, 'wall_s': time.perf_counter() - start}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--impl', required=True, choices=IMPLS)
  parser.add_argument('--variant', default='lm', help='experiments/bench.py variant (model and batch shape)')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='a config.model override')
  parser.add_argument('--steps', type=int, default=4, help='timed train steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed train steps after the compiling one')
  parser.add_argument('--batch', type=int, default=1, help='decode batch')
  parser.add_argument('--prompt_len', type=int, default=32)
  parser.add_argument('--decode_len', type=int, default=256, help='new tokens per decode')
  parser.add_argument('--repeats', type=int, default=3, help='timed decode calls, or matmuls (best kept)')
  parser.add_argument('--size', type=int, default=2048, help='GEMM size')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
    parser.error('--steps and --repeats must be >= 1 and --warmup >= 0')
  try:
    result = measure(args)
  except ValueError as error:  # a shape a reference cannot mirror (check_supported): one line, no traceback
    raise SystemExit(f'{args.impl}: {error}') from None
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
