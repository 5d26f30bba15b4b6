"""`--mode compile`: a config's real steps compiled ahead of time for an accelerator this host does not have.

The train step is the one training runs (`parallel.JitRunner`: mesh rules, accumulation, remat, scanned
layers, the optimizer), built over the devices of `config.compile.target` (`accelerators`) with abstract
inputs: no weight is allocated and no corpus read. The eval step and greedy decoding (the KV cache at
`config.bench.decode_batch` rows) are compiled the same way. From each compiled program it reports, per chip:
memory against the chip's HBM, FLOPs beside the analytic count, collectives by kind beside the mesh's
analytic traffic, and a roofline lower bound on the step time (the upper bounds on tokens/s and MFU it
implies). What a compile cannot tell (real step time, input stalls, DCN contention): docs/scale.md.

    python launch.py --config experiments/text.py:1b --mode compile --config.compile.target=v5p-64
"""

import dataclasses
import json
import os
import re
import sys
import time
import warnings

import jax
import numpy as np

from transformer import accelerators, decoding, hlo_audit, metrics, parallel, platform, setup
from transformer.config import COMPILE_DEFAULTS, ConfigError, section_settings
from transformer.experiment import bench
from transformer.files import write_atomic

STEPS = ('train', 'eval', 'decode')
REPORT_FILE = 'compile.json'
_GIB = 2**30
_OOM = (
  re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm'),
  re.compile(r'required for [\w ]+ \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)'),
)
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def settings(config) -> dict:
  s = section_settings(config, 'compile', COMPILE_DEFAULTS)
  steps = tuple(step.strip() for step in str(s['steps']).split(',') if step.strip())
  unknown = [step for step in steps if step not in STEPS]
  if unknown or not steps:
    raise ConfigError(f'config.compile.steps={s["steps"]!r}: name some of {", ".join(STEPS)}, separated by commas.')
  return {**s, 'steps': steps, 'targets': tuple(t.strip() for t in str(s['target']).split(',') if t.strip())}


class OutOfMemory(Exception):
  """The TPU compiler refused a program larger than HBM: bytes needed and available, per chip."""

  def __init__(self, needed: float, available: float):
    super().__init__(f'needs {needed / _GIB:.2f} GiB of {available / _GIB:.2f} GiB')
    self.needed, self.available = needed, available


def _compile(lowered):
  """`lowered.compile()`, with the TPU compiler's out-of-memory refusal as `OutOfMemory`. A deviceless program
  cannot be loaded back from JAX's persistent cache: `run_compile` turns the cache off before its first
  compile; in a process that used it already (JAX decides once per process) the failed read is quiet."""
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', 'Error reading persistent compilation cache entry')
      return lowered.compile()
  except Exception as error:  # XlaRuntimeError: its type is private to jaxlib
    for pattern in _OOM:
      found = pattern.search(str(error))
      if found:
        value = lambda i: float(found.group(i)) * _UNITS[found.group(i + 1)]
        raise OutOfMemory(value(1), value(3)) from None
    raise


def leaf_bytes(tree) -> list[tuple[str, int, int, str]]:
  """(path, bytes per device, bytes whole, partition spec) of every array of a tree of ShapeDtypeStructs
  with shardings: what each chip holds of it."""
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    whole = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    name = '/'.join(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)
    rows.append((name, shard, whole, str(leaf.sharding.spec)))
  return rows


UNSHARDED_BYTES = 2**20


def unsharded(rows, mesh) -> list:
  """The parameters of at least 1 MiB that every chip holds whole although the mesh shards parameters
  (fsdp or tensor > 1): a logical axis without a rule, or a size its mesh axis does not divide."""
  if mesh.shape['fsdp'] * mesh.shape['tensor'] == 1:
    return []
  return [row for row in rows if row[1] == row[2] >= UNSHARDED_BYTES]


def collective_seconds(found: list, target: accelerators.Target) -> float:
  """A lower bound on the time the collectives take: the bytes each device sends (a ring all-reduce sends
  2 (n-1)/n of its buffer, all-gather, reduce-scatter and all-to-all (n-1)/n, a permute all of it) over
  the device's whole one-way ICI or NVLink bandwidth, with no latency and no contention. A group larger than
  one slice or node also crosses the data-center network, where at best (reduced within the slice first)
  each device sends 1/(devices per slice) of it. A small group that crosses nodes counts at link speed."""
  seconds, chip, domain = 0.0, target.chip, target.link_domain
  for c in found:
    group = c.group or target.device_count
    share = (group - 1) / group if group > 1 else 1.0
    sent = c.runs * c.bytes * {'all-reduce': 2 * share, 'collective-permute': 1.0}.get(c.kind, share)
    across = sent / domain / chip.dcn_bandwidth.value if group > domain else 0.0
    seconds += max(sent / chip.link_bandwidth.value, across)
  return seconds


def program_report(
  compiled, target: accelerators.Target, model_flops: float, tokens: int, hbm_bytes: float = 0.0
) -> dict:
  """Memory, FLOPs, collectives and the roofline bound of one compiled program (per device). `hbm_bytes`: a
  floor on the bytes it reads from HBM where the compiler's own count says less (it sees a loop body once)."""
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  cost = compiled.cost_analysis() or {}
  found = hlo_audit.collectives(text)
  matmul_flops = hlo_audit.dot_flops(text)
  chip, devices = target.chip, target.device_count
  peak = chip.peak_flops.value
  # Floors where the compiled program hides work: fused kernels (cuDNN's attention) are no matmul in its text,
  # and the compiler's byte count sees a loop body once (XLA GPU gives none): the analytic FLOPs must be done,
  # and every argument read and every output written once.
  moved = memory.argument_size_in_bytes + memory.output_size_in_bytes
  bounds = {
    'compute_s': max(matmul_flops, model_flops / devices) / peak,
    'hbm_s': max(float(cost.get('bytes accessed', 0.0)), hbm_bytes, moved) / chip.hbm_bandwidth.value,
    'collectives_s': collective_seconds(found, target),
  }
  step_s = max(bounds.values())
  total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
  total += memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
  report = {
    'memory': {
      'arguments': int(memory.argument_size_in_bytes),
      'outputs_not_aliased': int(memory.output_size_in_bytes - memory.alias_size_in_bytes),
      'temporaries': int(memory.temp_size_in_bytes),
      'program': int(memory.generated_code_size_in_bytes),
      'total': int(total),
    },
    'hbm': chip.hbm.value,
    'fits': total <= chip.hbm.value,
    'matmul_flops': matmul_flops,
    'compiler_flops': float(cost.get('flops', 0.0)),
    'model_flops': model_flops / devices,
    'collectives': hlo_audit.summary(found),
    'bound': {**bounds, 'step_s': step_s},
  }
  if tokens and step_s > 0:
    report['tokens'] = tokens
    report['bound']['tokens_per_sec'] = tokens / step_s
    if model_flops:
      report['bound']['mfu'] = model_flops / (step_s * peak * devices)
  return report, text


def _oom_report(error: OutOfMemory) -> dict:
  return {'fits': False, 'memory': {'total': int(error.needed)}, 'hbm': error.available, 'refused': str(error)}


def compile_config(config, target: accelerators.Target, steps=STEPS, workdir: str | None = None) -> dict:
  """Compiles `steps` of `config` for `target`; returns the report (and writes each program's HLO text
  to `workdir` when given). A program the compiler refuses for its memory is reported as not fitting."""
  built = setup.build(config, with_task=False)
  model_config, train_config = built.model_config, built.train_config
  devices = target.devices()
  start = time.perf_counter()
  runner = parallel.JitRunner(
    train_config, built.model, built.optimizer, built.schedule, devices=devices, slices=target.slices
  )
  seq_len = bench.seq_len_of(config)
  batch = bench.synthetic_batch(model_config, train_config.batch_size, seq_len)
  tokens = train_config.batch_size * seq_len
  state = runner.abstract_state()
  per_leaf = leaf_bytes(state.params)
  report = {
    'target': target.label,
    'chip': chip_figures(target.chip),
    'devices': target.device_count,
    'mesh': dict(runner.mesh.shape),
    'remat': model_config.remat,
    'batch_size': train_config.batch_size,
    'seq_len': seq_len,
    'params_per_device': sum(row[1] for row in per_leaf),
    'params_total': sum(row[2] for row in per_leaf),
    'opt_state_per_device': sum(row[1] for row in leaf_bytes(state.opt_state)),
    'largest_param_shards': sorted(per_leaf, key=lambda row: -row[1])[:5],
    'unsharded_params': unsharded(per_leaf, runner.mesh),
    'steps': {},
  }
  model_flops = metrics.flops_per_token(model_config, seq_len) * tokens
  with platform.building_for(runner.mesh):
    report['compute_dtype'] = str(model_config.compute_dtype)
    weights = report['params_per_device'] * model_config.compute_dtype.itemsize / model_config.storage_dtype.itemsize
    expected = bench.expected_collectives(
      runner, model_config, train_config.batch_size, seq_len, train_config.grad_accum_steps
    )
  lowerings = {
    'train': lambda: runner.lower_train_step(batch),
    'eval': lambda: runner.lower_eval_step(batch),
    'decode': lambda: lower_decode(config, built.model, runner),
  }
  flops = {'train': model_flops, 'eval': model_flops / 3, 'decode': 0.0}
  decode = bench.settings(config)
  generated = {'decode': int(decode['decode_batch']) * int(decode['decode_len'])}
  # Each generated token reads every weight a chip holds, in the compute dtype: the floor of decoding's HBM
  # traffic (the KV cache comes on top). A row of a few tokens is no matmul to the TPU compiler (it
  # multiplies and reduces), so decoding's compute bound counts only what stayed a matmul.
  floors = {'decode': int(decode['decode_len']) * weights}
  for step in steps:
    try:
      program, text = program_report(
        _compile(lowerings[step]()), target, flops[step], generated.get(step, tokens), floors.get(step, 0.0)
      )
    except OutOfMemory as error:
      program, text = _oom_report(error), None
    if step == 'train' and expected:
      program['expected_collectives'] = expected
    report['steps'][step] = program
    if workdir and text:
      write_atomic(os.path.join(workdir, f'{step}.hlo.txt'), text)
  report['fits'] = all(program['fits'] for program in report['steps'].values())
  report['compile_s'] = time.perf_counter() - start
  return report


def lower_decode(config, model, runner):
  """`decoding.generate`'s greedy loop (the KV cache included) lowered over the runner's mesh for
  `config.bench.decode_batch` prompts of `prompt_len` tokens and `decode_len` new ones: the parameters
  sharded as training shards them, the prompts over the batch axes where they divide."""
  s = bench.settings(config)
  rows, prompt_len = int(s['decode_batch']), int(s['prompt_len'])
  mesh = runner.mesh
  shards = parallel.BATCH_AXES if rows % runner.shards == 0 else None
  rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shards))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = runner.abstract_state().params
  tokens = jax.ShapeDtypeStruct((rows, prompt_len), np.int32, sharding=rows_sharding)
  lengths = jax.ShapeDtypeStruct((rows,), np.int32, sharding=rows_sharding)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  temperature = jax.ShapeDtypeStruct((), np.float32, sharding=replicated)
  encoder = model.config.kind == 'encoder_decoder'
  with platform.building_for(mesh):
    return decoding.lower_generate(
      model,
      params,
      tokens if encoder else None,
      None if encoder else tokens,
      lengths,
      rng,
      temperature,
      max_len=int(s['decode_len']),
    )


def chip_figures(chip: accelerators.Chip) -> dict:
  """The chip's figures with their sources, for compile.json."""
  figures = {f.name: getattr(chip, f.name) for f in dataclasses.fields(chip)}
  figures['peak_flops'] = chip.peak_flops
  return {
    name: dataclasses.asdict(value) if isinstance(value, accelerators.Figure) else value
    for name, value in figures.items()
  }


def _gib(count: float) -> str:
  return f'{count / _GIB:,.2f} GiB'


def format_report(report: dict) -> str:
  """The per-chip table of one config on one target."""
  chip = report['chip']
  lines = [
    f'{report["target"]}: {report["devices"]} x {chip["device_kind"]}, mesh {report["mesh"]}, '
    f'computing in {report["compute_dtype"]}, batch {report["batch_size"]} x {report["seq_len"]}, '
    f'remat {report["remat"]}',
    f'  parameters     {_gib(report["params_per_device"])} per chip ({_gib(report["params_total"])} in all)',
    f'  optimizer      {_gib(report["opt_state_per_device"])} per chip',
    '  largest parameter shards per chip: '
    + ', '.join(f'{path} {size / 2**20:,.1f} MiB {spec}' for path, size, _, spec in report['largest_param_shards']),
  ]
  for path, size, _, spec in report['unsharded_params']:
    lines.append(f'  warning: {path} ({size / 2**20:,.1f} MiB) is whole on every chip ({spec}): nothing shards it')
  for step, program in report['steps'].items():
    memory = program['memory']
    verdict = 'fits' if program['fits'] else f'does not fit: needs {_gib(memory["total"])} of {_gib(program["hbm"])}'
    if 'refused' in program:
      lines.append(f'  {step:<6} refused by the compiler: {verdict}')
      continue
    lines.append(
      f'  {step:<6} temporaries {_gib(memory["temporaries"])}, total {_gib(memory["total"])} of '
      f'{_gib(program["hbm"])} HBM: {verdict}'
    )
    if program['model_flops']:
      lines.append(
        f'         FLOPs per chip: {program["matmul_flops"] / 1e9:,.1f} G in matmuls (compiled, every loop trip), '
        f'{program["model_flops"] / 1e9:,.1f} G analytic, {program["compiler_flops"] / 1e9:,.1f} G by the '
        "compiler's cost analysis (a loop body once)"
      )
    expected = program.get('expected_collectives', {})
    for kind, row in program['collectives'].items():
      want = expected.get(kind)
      beside = f' (analytic {want / 1e6:,.1f} MB, ratio {row["bytes"] / want:.3f})' if want else ''
      lines.append(f'         {kind}: {row["count"]} per step, {row["bytes"] / 1e6:,.1f} MB per chip{beside}')
    bound = program['bound']
    what = 'step' if step != 'decode' else f'decoding {program["tokens"]:,} tokens (every weight read per token)'
    text = (
      f'         {what} >= {bound["step_s"] * 1e3:,.2f} ms (compute {bound["compute_s"] * 1e3:,.2f}, '
      f'HBM {bound["hbm_s"] * 1e3:,.2f}, collectives {bound["collectives_s"] * 1e3:,.2f})'
    )
    if 'tokens_per_sec' in bound:  # the MFU bound comes with it, where the program has model FLOPs
      mfu = f', MFU <= {bound["mfu"]:.1%}' if 'mfu' in bound else ''
      text += f'; tokens/s <= {bound["tokens_per_sec"]:,.0f}{mfu} (bounds)'
    lines.append(text)
  return '\n'.join(lines)


def mesh_candidates(devices: int, model_config, slices: int = 1):
  """Every (data, fsdp, tensor) of `devices` whose tensor axis divides the heads, data a multiple of `slices`."""
  for tensor in range(1, devices + 1):
    if devices % tensor or model_config.num_heads % tensor:
      continue
    for fsdp in range(1, devices // tensor + 1):
      if (devices // tensor) % fsdp == 0 and (devices // tensor // fsdp) % slices == 0:
        yield devices // tensor // fsdp, fsdp, tensor


def search_meshes(config, target: accelerators.Target) -> list[dict]:
  """The train step compiled for every mesh of `mesh_candidates` with remat none and full; the ones that fit
  ranked by their step-time bound, then the ones that do not."""
  model_config = setup.resolve(config).model_config
  rows = []
  for data, fsdp, tensor in mesh_candidates(target.device_count, model_config, target.slices):
    for remat in ('none', 'full'):
      variant = config.copy_and_resolve_references()
      variant.train.mesh.data, variant.train.mesh.fsdp, variant.train.mesh.tensor = data, fsdp, tensor
      variant.model.remat = remat
      try:
        program = compile_config(variant, target, steps=('train',))['steps']['train']
      except ConfigError as error:  # e.g. the batch does not divide this mesh's batch shards
        rows.append({'mesh': (data, fsdp, tensor), 'remat': remat, 'fits': False, 'error': str(error)})
        continue
      rows.append(
        {
          'mesh': (data, fsdp, tensor),
          'remat': remat,
          'fits': program['fits'],
          'hbm_per_chip': program['memory']['total'],
          'step_s': program.get('bound', {}).get('step_s'),
        }
      )
  return sorted(rows, key=lambda row: (not row['fits'], row.get('step_s') or float('inf')))


def format_search(rows: list[dict], target: str) -> str:
  lines = [
    f'meshes for {target} (data, fsdp, tensor), fitting ones fastest first:',
    '| mesh | remat | fits | HBM per chip | step >= |',
    '|---|---|---|---|---|',
  ]
  for row in rows:
    if 'error' in row:
      lines.append(f'| {row["mesh"]} | {row["remat"]} | no | | {row["error"][:80]} |')
      continue
    step = f'{row["step_s"] * 1e3:,.2f} ms' if row.get('step_s') else ''
    lines.append(
      f'| {row["mesh"]} | {row["remat"]} | {"yes" if row["fits"] else "no"} | {_gib(row["hbm_per_chip"])} | {step} |'
    )
  return '\n'.join(lines)


def summary_row(name: str, report: dict) -> dict:
  train = report['steps'].get('train', next(iter(report['steps'].values())))
  return {
    'variant': name,
    'target': report['target'],
    'fits': report['fits'],
    'hbm_per_chip': max(program['memory']['total'] for program in report['steps'].values()),
    'hbm': train['hbm'],
    'step_s': train.get('bound', {}).get('step_s'),
    'mfu_bound': train.get('bound', {}).get('mfu'),
  }


def format_rows(rows: list[dict]) -> str:
  """Variants x targets as one Markdown table."""
  lines = ['| variant | target | fits | HBM per chip (of) | train step >= | MFU <= |', '|---|---|---|---|---|---|']
  for row in rows:
    step = f'{row["step_s"] * 1e3:,.1f} ms' if row['step_s'] else ''
    mfu = f'{row["mfu_bound"]:.0%}' if row['mfu_bound'] else ''
    lines.append(
      f'| {row["variant"]} | {row["target"]} | {"yes" if row["fits"] else "no"} | '
      f'{_gib(row["hbm_per_chip"])} ({_gib(row["hbm"])}) | {step} | {mfu} |'
    )
  return '\n'.join(lines)


def run_compile(config, workdir: str, overrides=()) -> dict:
  """`--mode compile`: prints the report of every variant (a sweep file's, else the config's own) on every
  target, writes compile.json and the HLO texts under `workdir`, and exits 1 when something does not fit."""
  jax.config.update('jax_enable_compilation_cache', False)  # see _compile
  s = settings(config)
  if 'sweep' in config:
    from transformer.experiment import bench_sweep

    variants = bench_sweep.variant_configs(config, overrides)
  else:
    variants = [('', config)]
  targets = [accelerators.parse(name, int(s['slices'])) for name in s['targets']]
  for target in targets:
    reason = target.unavailable()
    if reason:
      raise ConfigError(f'--mode compile for {target.name}: {reason}.')
  result = {'reports': [], 'rows': []}
  for name, variant in variants:
    for target in targets:
      folder = os.path.join(workdir, 'compile', *(p for p in (name, target.label.replace(' ', '')) if p))
      report = compile_config(variant, target, s['steps'], folder)
      report['variant'] = name
      print(('' if not name else f'[{name}] ') + format_report(report), flush=True)
      if s['mesh_search']:
        report['mesh_search'] = search_meshes(variant, target)
        print(format_search(report['mesh_search'], target.label), flush=True)
      result['reports'].append(report)
      result['rows'].append(summary_row(name or config.get('variant', ''), report))
  if len(result['rows']) > 1:
    print(format_rows(result['rows']), flush=True)
  write_atomic(os.path.join(workdir, REPORT_FILE), json.dumps(result, indent=1, default=str))
  missing = [row for row in result['rows'] if not row['fits']]
  if missing:
    sys.exit(
      '\n'.join(
        f'{row["variant"] or "config"} on {row["target"]} does not fit: needs {_gib(row["hbm_per_chip"])} of '
        f'{_gib(row["hbm"])} per chip'
        for row in missing
      )
    )
  return result
