"""The comparison's table rows and the line naming the machine (CPU, cores, library versions, settings)."""

import importlib.metadata
import os

HEADER = ('figure', 'ours', 'reference', 'ratio', 'goal', 'met?')
# Settings that change either side's speed; shown when set, so a reader sees any handicap.
SPEED_ENV = ('XLA_FLAGS', 'OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'MKL_NUM_THREADS', 'KMP_BLOCKTIME')


def row(figure, ours='', reference='', ratio='', goal='', met=''):
  return (figure, ours, reference, ratio, goal, met)


def yes(ok) -> str:
  return 'yes' if ok else 'NO'


def markdown(rows) -> str:
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
  lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines)


def cpu_model(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU as the kernel names it ('model name'), with its family, model and widest vector unit where the
  name alone leaves them out ('AMD EPYC' covered CPUs whose f32 GEMM rates differed 3x), or the platform's
  word for it where there is no such file."""
  fields = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  name = next((fields[key] for key in ('model name', 'Model', 'cpu model') if fields.get(key)), None)
  if name is None:
    import platform

    return platform.processor() or platform.machine() or 'unknown CPU'
  flags = fields.get('flags', '').split()
  vector = next((unit for flag, unit in (('avx512f', 'AVX-512'), ('avx2', 'AVX2')) if flag in flags), None)
  details = [f'family {fields["cpu family"]} model {fields["model"]}' if 'cpu family' in fields else None, vector]
  details = [detail for detail in details if detail]
  return f'{name} ({", ".join(details)})' if details else name


def version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine_line(gemm: dict, size: int, repeats: int) -> str:
  """One Markdown line: CPU, cores, each library's measured f32 GEMM rate, versions and speed settings.
  `gemm`: {'XLA': FLOP/s or why there is none, 'PyTorch': ...}."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  rates = [
    f'{name} {rate / 1e9:,.0f} GFLOP/s' if isinstance(rate, float) else f'{name}: {rate}' for name, rate in gemm.items()
  ]
  gemm_text = f'f32 GEMM {size}x{size} (best of {repeats}, each library in its own process): ' + ', '.join(rates)
  versions = ', '.join(f'{name} {version(name)}' for name in ('jax', 'torch', 'transformers') if version(name))
  settings = ', '.join(f'{key}={os.environ[key]!r}' for key in SPEED_ENV if os.environ.get(key))
  return (
    f'**Machine:** {cpu_model()}, {cores} cores; {gemm_text}; {versions}; '
    f'{"environment: " + settings if settings else "no thread or XLA settings in the environment"}.'
  )
