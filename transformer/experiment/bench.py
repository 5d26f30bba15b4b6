"""`--mode bench`: time a config's train step (and optionally its decoding) on synthetic batches.

The train step runs through `parallel.Runner`, exactly as the training loop runs it (jit, shardings,
donated state). Steps are timed one by one after warm-up and the median is reported, because other
processes on a shared machine make single timings noisy. MFU divides analytic model FLOPs per second
by this machine's peak (`metrics.peak_flops_basis`, whose label the table and JSON show as the basis):
`config.train.peak_flops`, else the data-sheet figure of a known accelerator, else a matmul rate
measured in the same process (bfloat16 on an unknown accelerator, float32 on CPU).
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transformer import decoding, hlo_audit, metrics, models, parallel, platform, setup, summary, train
from transformer.config import ConfigError, ModelConfig, TrainConfig, section_settings
from transformer.experiment import profile
from transformer.tokens import EOS_ID

# `config.bench` (all optional): how long to measure and what else to measure.
DEFAULTS = dict(
  steps=5,  # timed train steps (median reported)
  warmup=2,  # untimed steps after the compiling one
  data_batches=20,  # input-pipeline batches timed when the config has a task (0: skip)
  decode=False,  # also time `decoding.generate` (cached) vs the uncached loop
  decode_batch=1,
  prompt_len=32,
  decode_len=256,
  decode_repeats=3,
  uncached=True,  # time the uncached loop too (slow: it recomputes the prefix every step)
  audit=False,  # also count the compiled step's collectives against the layout's analytic traffic
  profile=False,  # also trace the train step and print where its time goes, per op category (profile.py)
  profile_steps=2,
  profile_dir='',  # where the trace goes ('': a new temporary directory); TensorBoard's profiler reads it
  rounds=3,  # a sweep file's variants: rounds that time each variant in turn (bench_sweep.py)
)


def settings(config) -> dict:
  """`DEFAULTS` updated by `config.bench`; a misspelt key is an error naming the nearest one."""
  return section_settings(config, 'bench', DEFAULTS)


def default_bench_config(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**DEFAULTS, **overrides})


def seq_len_of(config) -> int:
  return int(config.data.seq_len) if 'data' in config and 'seq_len' in config.data else 64


def synthetic_batch(model_config: ModelConfig, batch_size: int, seq_len: int, seed: int = 0) -> dict:
  """Random non-padding tokens of the training shape (ids >= 3: no pad, BOS or EOS)."""
  rng = np.random.default_rng(seed)
  draw = lambda: rng.integers(3, model_config.vocab_size, (batch_size, seq_len)).astype(np.int32)
  batch = {'targets': draw()}
  if model_config.kind == 'encoder_decoder':
    batch['inputs'] = draw()
  return batch


class TrainBench:
  """A compiled train step of `config` with its state, ready to be timed step by step.

  Kept as an object so a comparison can alternate it with another implementation in one process.
  Synthetic batches need no task: the vocabulary is `config.model.vocab_size` (`setup.build` without one).
  """

  def __init__(self, config):
    built = setup.build(config, with_task=False)
    self.model_config, self.model, self.train_config = built.model_config, built.model, built.train_config
    self.runner = parallel.make_runner(self.train_config, self.model, built.optimizer, built.schedule)
    self.seq_len = seq_len_of(config)
    seed = self.train_config.seed
    self.batch = synthetic_batch(self.model_config, self.runner.local_batch_size(), self.seq_len, seed)
    self.state = self.runner.init_state(seed)
    jax.block_until_ready(self.state)
    self.params = summary.count_params(self.state.params)
    self.tokens_per_step = self.train_config.batch_size * self.seq_len
    self.compile_s = None
    self.last_loss = None

  def step(self) -> float:
    """One train step, waited for; returns its wall time in seconds. The first one compiles."""
    start = time.perf_counter()
    self.state, step_metrics = self.runner.train_step(self.state, self.batch)
    jax.block_until_ready(step_metrics)
    seconds = time.perf_counter() - start
    self.last_loss = float(step_metrics['loss'])
    if self.compile_s is None:
      self.compile_s = seconds
    return seconds

  def times(self, count: int) -> list[float]:
    return [self.step() for _ in range(count)]


def time_input_pipeline(config, batch_size: int, count: int) -> float | None:
  """Mean seconds of the task's `next(train_iter)`: what the loop waits for before each step.

  None when the config names no task that can be built here (e.g. a corpus that is not installed).
  """
  if count <= 0 or 'task' not in config:
    return None
  from transformer import tasks

  try:
    task = tasks.get_task(config)
  except (ConfigError, ImportError, OSError, ValueError):
    return None
  iterator = task.train_iter(batch_size)
  next(iterator)  # the first batch starts the pipeline (workers, buffers): not a steady-state cost
  start = time.perf_counter()
  for _ in range(count):
    next(iterator)
  return (time.perf_counter() - start) / count


def compile_train_step(model_config: ModelConfig, train_config: TrainConfig, batch_size: int, seq_len: int) -> dict:
  """Lowers and compiles the train step for abstract inputs (nothing allocated or run) and returns
  the seconds each took and XLA's compiled memory analysis: bytes of temporaries (activations kept
  for the backward pass, workspace), of arguments, and the peak."""
  built = setup.build_model(model_config, train_config)
  model, optimizer = built.model, built.optimizer
  step = train.make_train_step(model, optimizer, built.schedule, train_config)
  abstract_state = jax.eval_shape(lambda: train.init_state(model, optimizer, 0))
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), synthetic_batch(model_config, batch_size, seq_len)
  )
  start = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=0).lower(abstract_state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  stats = compiled.memory_analysis()
  return {
    'lower_s': lowered_at - start,
    'compile_s': compiled_at - lowered_at,
    'temp_bytes': int(stats.temp_size_in_bytes),
    'argument_bytes': int(stats.argument_size_in_bytes),
    'peak_bytes': int(getattr(stats, 'peak_memory_in_bytes', 0) or 0),
  }


def _layout(mesh) -> str:
  split = [axis for axis in parallel.MESH_AXES if mesh.shape[axis] > 1]
  return {(): 'single', ('data',): 'data', ('fsdp',): 'fsdp', ('tensor',): 'tensor'}.get(tuple(split), 'mixed')


def expected_collectives(runner, model_config: ModelConfig, batch_size: int, seq_len: int, accum: int) -> dict:
  """`hlo_audit.expected` for this runner's mesh and a decoder-only model; {} for other cases."""
  layout = _layout(runner.mesh)
  if model_config.kind != 'decoder_only' or layout not in ('data', 'fsdp', 'tensor'):
    return {}
  shardings = jax.tree.leaves(runner.state_shardings.params)
  leaves = jax.tree.leaves(runner.abstract_state().params)
  size = lambda leaf: leaf.size * leaf.dtype.itemsize
  param_bytes = sum(size(leaf) for leaf in leaves)
  uses = lambda sharding, axis: any(axis == a or (isinstance(a, tuple) and axis in a) for a in sharding.spec)
  if layout == 'fsdp':
    gathered = sum(size(leaf) for leaf, s in zip(leaves, shardings) if uses(s, 'fsdp'))
    return hlo_audit.expected('fsdp', param_bytes, gathered)
  if layout == 'data':
    return hlo_audit.expected('data', param_bytes)
  # Tensor: per layer, forward: attention output and FFN output; backward: the FFN input and the attention
  # input (XLA CPU reduces the q, k and v projections' gradients one by one, k and v only when 'tensor'
  # divides the kv heads; the TPU compiler reduces their sum once). A split vocabulary adds the lookup and
  # the logits' input gradient, which is float32 (in activation-sized units of the compute dtype).
  tensor, cfg = runner.mesh.shape['tensor'], model_config
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  attention_inputs = (1 + (2 if cfg.kv_heads % tensor == 0 else 0)) if platform.is_cpu() else 1
  per_layer = 3 + attention_inputs
  vocab = 1 + 4 / itemsize if cfg.vocab_size % tensor == 0 else 0
  reductions = per_layer * cfg.num_decoder_layers + vocab
  activation = batch_size // accum * seq_len * cfg.d_model * itemsize
  return hlo_audit.expected('tensor', param_bytes, activation_bytes=activation, reductions=reductions, accum=accum)


def audit_train_step(config, single_dot_flops: int | None = None) -> dict:
  """The compiled train step (jit over the config's mesh, abstract inputs): its collectives per kind
  with their runs and bytes per step and device (`hlo_audit`), the layout's analytic expectation, and
  its per-device matmul FLOPs over those of the same step compiled for one device, divided by the
  device count (1.0: the work is split evenly, none repeated). `single_dot_flops` (the one-device step's,
  from an earlier audit of the same model and batch) saves compiling that step again."""
  built = setup.build(config, with_task=False)
  model_config, model, optimizer, schedule = built.model_config, built.model, built.optimizer, built.schedule
  train_config = built.train_config
  runner = parallel.make_runner(train_config, model, optimizer, schedule)
  batch_size, seq_len = train_config.batch_size, seq_len_of(config)
  batch = synthetic_batch(model_config, batch_size, seq_len)
  text = runner.lower_train_step(batch).compile().as_text()
  found = hlo_audit.collectives(text)
  if single_dot_flops is None:
    single = jax.jit(train.make_train_step(model, optimizer, schedule, train_config)).lower(
      jax.eval_shape(lambda: train.init_state(model, optimizer, 0)), batch
    )
    single_dot_flops = hlo_audit.dot_flops(single.compile().as_text())
  accum = train_config.grad_accum_steps
  return {
    'layout': _layout(runner.mesh),
    'mesh': dict(runner.mesh.shape),
    'collectives': hlo_audit.summary(found),
    'expected': expected_collectives(runner, model_config, batch_size, seq_len, accum),
    'dot_flops_ratio': hlo_audit.dot_flops(text) / (single_dot_flops / jax.device_count()),
    'single_dot_flops': single_dot_flops,
    'all_gathers': [(c.bytes, c.runs, c.op_name) for c in found if c.kind == 'all-gather'],
  }


def measure_train(config, bench_settings: dict | None = None) -> dict:
  """The train-step figures of `config`: the JSON that `--mode bench` prints, without decoding."""
  s = bench_settings or settings(config)
  bench = TrainBench(config)
  bench.step()  # compiles
  bench.times(int(s['warmup']))
  times = bench.times(max(int(s['steps']), 1))
  step_s = statistics.median(times)
  peak, mfu_basis = metrics.peak_flops_basis(bench.train_config.peak_flops)
  peak *= jax.device_count()
  flops_per_token = metrics.flops_per_token(bench.model_config, bench.seq_len)
  tokens_per_sec = bench.tokens_per_step / step_s
  result = {
    'tokens_per_sec': tokens_per_sec,
    'step_ms': 1000 * step_s,
    'step_ms_min': 1000 * min(times),
    'mfu': tokens_per_sec * flops_per_token / peak,
    'mfu_basis': mfu_basis,
    'compile_s': max(bench.compile_s - step_s, 0.0),
    'params': bench.params,
    'model_tflops_per_step': flops_per_token * bench.tokens_per_step / 1e12,
    'peak_gflops': peak / 1e9,
    'batch_size': bench.train_config.batch_size,
    'seq_len': bench.seq_len,
    'steps': len(times),
    'devices': jax.device_count(),
    'backend': platform.target(),
    'loss': bench.last_loss,
  }
  if s['profile']:
    result['profile'] = profile.profile_train(bench, int(s['profile_steps']), str(s['profile_dir']))
  data_s = time_input_pipeline(config, bench.runner.local_batch_size(), int(s['data_batches']))
  if data_s is not None:
    result['data_ms'] = 1000 * data_s
    result['data_wait_frac'] = data_s / step_s
  return result


def run_bench(config) -> dict:
  """`--mode bench`: prints a short table, then (last line) the figures as JSON; returns them."""
  # Compile times are part of the result: a persistent-cache hit would report a load, not a compile.
  jax.config.update('jax_enable_compilation_cache', False)
  s = settings(config)
  result = measure_train(config, s)
  if s['decode']:
    result.update(measure_decode(config, s))
  if s['audit']:
    audit = audit_train_step(config)
    print(f'collectives per step and device ({audit["layout"]} layout, mesh {audit["mesh"]}):')
    print(hlo_audit.format_table(audit['collectives'], audit['expected']))
    result['collective_bytes'] = sum(row['bytes'] for row in audit['collectives'].values())
    if audit['expected']:
      result['collective_bytes_expected'] = sum(audit['expected'].values())
    result['dot_flops_ratio'] = audit['dot_flops_ratio']
  if 'profile' in result:
    print(profile.format_breakdown(result['profile'], result['step_ms']))
  print(format_table({k: v for k, v in result.items() if k != 'profile'}))
  print(json.dumps(result), flush=True)
  return result


_UNITS = {
  'tokens_per_sec': ('train tokens/s', '{:,.0f}'),
  'step_ms': ('step (median)', '{:.1f} ms'),
  'step_ms_min': ('step (fastest)', '{:.1f} ms'),
  'mfu': ('MFU', '{:.1%}'),
  'compile_s': ('compile', '{:.2f} s'),
  'params': ('parameters', '{:,}'),
  'peak_gflops': ('peak (per run)', '{:,.1f} GFLOP/s'),
  'data_ms': ('input batch', '{:.2f} ms'),
  'data_wait_frac': ('input / step', '{:.2%}'),
}


def format_table(result: dict) -> str:
  rows = []
  for key, value in result.items():
    if key == 'mfu_basis':  # shown beside MFU, where it qualifies the figure
      continue
    label, fmt = _UNITS.get(key, (key, '{}'))
    if isinstance(value, float) and key not in _UNITS:
      fmt = '{:.4g}'
    text = fmt.format(value)
    if key == 'mfu' and 'mfu_basis' in result:
      text += f'  (against {result["mfu_basis"]})'
    rows.append((label, text))
  width = max(len(label) for label, _ in rows)
  return '\n'.join(f'{label:<{width}}  {text}' for label, text in rows)


def never_eos(params, vocab_size: int):
  """`params` with the EOS row of every embedding table zeroed: EOS then scores exactly 0, far below the
  best of thousands of random logits, so every decode of random weights runs to its full length and
  the methods compared do the same number of steps."""

  def fix(path, leaf):
    named = str(getattr(path[-1], 'key', '')) == 'embedding'
    return leaf.at[EOS_ID].set(0) if named and leaf.ndim == 2 and leaf.shape[0] == vocab_size else leaf

  return jax.tree_util.tree_map_with_path(fix, params)


def _decode_setup(model_config: ModelConfig, batch: int, prompt_len: int, seed: int = 0):
  model = models.build_model(model_config)
  params = never_eos(jax.jit(lambda: models.init_params(model, jax.random.key(seed)))(), model_config.vocab_size)
  tokens = jnp.asarray(synthetic_batch(model_config, batch, prompt_len, seed)['targets'])
  source = dict(inputs=tokens) if model_config.kind == 'encoder_decoder' else dict(prompts=tokens)
  return model, params, source


def timed(fn) -> float:
  """Seconds `fn()` takes, its result waited for."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def decode_calls(
  model_config: ModelConfig, *, batch: int, prompt_len: int, decode_len: int, methods=('cached',), beam_size: int = 4
) -> dict:
  """{method: a function that decodes `decode_len` tokens after `batch` random prompts of `prompt_len` tokens
  with random weights (seed 0, EOS never chosen) and returns the output}, for the methods of `decode_times`."""
  model, params, source = _decode_setup(model_config, batch, prompt_len)
  calls = {
    'cached': lambda: decoding.generate(model, params, max_len=decode_len, **source),
    'uncached': lambda: decoding.greedy_uncached(model, params, max_len=decode_len, **source),
    'beam': lambda: decoding.beam_search(model, params, beam_size=beam_size, max_len=decode_len, **source),
  }
  return {name: calls[name] for name in methods}


def decode_times(
  model_config: ModelConfig,
  *,
  batch: int,
  prompt_len: int,
  decode_len: int,
  rounds: int,
  methods=('cached', 'uncached'),
  beam_size: int = 4,
) -> dict:
  """Median seconds to decode `decode_len` tokens per method, alternating methods round by round.

  cached: `decoding.generate` (one jitted loop, KV cache); uncached: `decoding.greedy_uncached`
  (a forward pass over the whole prefix per token); beam: `decoding.beam_search`. Each is called once
  untimed first (compilation).
  """
  calls = decode_calls(
    model_config, batch=batch, prompt_len=prompt_len, decode_len=decode_len, methods=methods, beam_size=beam_size
  )
  for name in methods:
    calls[name]()
  times = {name: [] for name in methods}
  for _ in range(max(rounds, 1)):
    for name in methods:
      times[name].append(timed(calls[name]))
  return {name: statistics.median(t) for name, t in times.items()}


def measure_decode(config, bench_settings: dict) -> dict:
  """`--mode bench` with `config.bench.decode`: greedy tokens/s of `decoding.generate`, and (with
  `config.bench.uncached`) of the uncached loop and the speed-up."""
  s = bench_settings
  model_config = setup.resolve(config).model_config
  methods = ('cached', 'uncached') if s['uncached'] else ('cached',)
  batch, length = int(s['decode_batch']), int(s['decode_len'])
  times = decode_times(
    model_config,
    batch=batch,
    prompt_len=int(s['prompt_len']),
    decode_len=length,
    rounds=int(s['decode_repeats']),
    methods=methods,
  )
  result = {
    'decode_tokens_per_sec': batch * length / times['cached'],
    'decode_ms_per_step': 1000 * times['cached'] / length,
  }
  if 'uncached' in times:
    result['uncached_tokens_per_sec'] = batch * length / times['uncached']
    result['decode_speedup'] = times['uncached'] / times['cached']
  return result
