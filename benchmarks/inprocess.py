"""The comparison's sections that time ours against ours (compile time, memory, decoding with and without the
KV cache, beam search, long sequences, the input pipeline). They run in the comparing process itself: both
sides share whatever that process costs, and no other library is loaded in it.
"""

import statistics

import jax
from table import row, yes

from experiments import bench as bench_configs
from transformer import setup
from transformer.experiment import bench


def lm_config(variant, **model_overrides):
  config = bench_configs.get_config(variant)
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def _resolved(config):
  """(model config, train config) of an experiment config: the arguments `bench.compile_train_step` takes."""
  resolved = setup.resolve(config)
  return resolved.model_config, resolved.train_config


def compile_section(args, state):
  """Lower + compile seconds of the scanned train step, 12 vs 2 layers (alternating, medians)."""
  jax.config.update('jax_enable_compilation_cache', False)
  configs = {n: lm_config('lm', num_decoder_layers=n, scan_layers=True) for n in (2, 12)}
  seconds = {n: [] for n in configs}
  for _ in range(2):
    for n, config in configs.items():
      r = bench.compile_train_step(*_resolved(config), 8, 256)
      seconds[n].append(r['lower_s'] + r['compile_s'])
  s2, s12 = (statistics.median(seconds[n]) for n in (2, 12))
  unrolled = lm_config('lm', num_decoder_layers=12)
  r = bench.compile_train_step(*_resolved(unrolled), 8, 256)
  return [
    row(
      'compile, scan_layers: 12 vs 2 layers',
      f'{s12:.1f} s',
      f'{s2:.1f} s',
      f'{s12 / s2:.2f}x',
      '<= 1.5x',
      yes(s12 / s2 <= 1.5),
    ),
    row('compile, 12 layers unrolled (for scale)', f'{r["lower_s"] + r["compile_s"]:.1f} s', '', '', '', ''),
  ]


def memory_section(args, state):
  """XLA's compiled temporaries of the 12-layer train step, without vs with full remat."""
  out = {}
  for remat in ('none', 'full', 'dots'):
    config = lm_config('lm12', remat=remat)
    out[remat] = bench.compile_train_step(*_resolved(config), 8, 256)
  mib = lambda b: f'{b / 2**20:,.0f} MiB'
  ratio = out['none']['temp_bytes'] / out['full']['temp_bytes']
  return [
    row(
      'temp memory, 12 layers: remat=full vs no remat',
      mib(out['full']['temp_bytes']),
      mib(out['none']['temp_bytes']),
      f'{ratio:.2f}x less',
      '>= 2x less',
      yes(ratio >= 2),
    ),
    row(
      'temp memory, remat=dots',
      mib(out['dots']['temp_bytes']),
      mib(out['none']['temp_bytes']),
      f'{out["none"]["temp_bytes"] / out["dots"]["temp_bytes"]:.2f}x less',
      'report',
      '',
    ),
  ]


def long_section(args, state):
  """Step time from seq 256 to 4096 (2 layers, batch 1): full vs sliding-window attention."""
  lengths = [int(x) for x in args.lengths.split(',')]
  window = args.window
  times = {}
  for length in lengths:
    for w in (0, window):
      config = lm_config('long', num_decoder_layers=2, attention_window=w)
      config.data.seq_len = length
      b = bench.TrainBench(config)
      b.times(2)
      times[length, w] = statistics.median(b.times(args.steps))
      del b
  rows = []
  for length in lengths:
    full, local = times[length, 0], times[length, window]
    rows.append(
      row(
        f'step at seq {length}: window {window} vs full (2 layers, batch 1)',
        f'{1000 * local:.0f} ms',
        f'{1000 * full:.0f} ms',
        f'{full / local:.2f}x',
        'report',
        '',
      )
    )
  first, last = lengths[0], lengths[-1]
  growth = times[last, window] / times[first, window]
  linear = last / first
  rows.append(
    row(
      f'window step growth, seq {first} -> {last}',
      f'{growth:.1f}x',
      f'{times[last, 0] / times[first, 0]:.1f}x (full)',
      f'linear = {linear:.0f}x',
      'linear',
      yes(growth <= 1.5 * linear),
    )
  )
  return rows


def input_section(args, state):
  """The synthetic task's `next(train_iter)` time against the train step (lm shape)."""
  config = lm_config(args.variant)
  data_s = bench.time_input_pipeline(config, int(config.train.batch_size), 50)
  step_s = state.get('step_s')
  if step_s is None:
    b = bench.TrainBench(config)
    b.times(2)
    step_s = statistics.median(b.times(args.steps))
  frac = data_s / step_s
  return [
    row(
      'input pipeline wait per step (synthetic copy task, lm shape)',
      f'{1000 * data_s:.2f} ms',
      f'{1000 * step_s:.0f} ms step',
      f'{frac:.2%}',
      '< 5%',
      yes(frac < 0.05),
    )
  ]


def decode_section(args, state):
  """Greedy decoding of 256 tokens after a 32-token prompt (lm shape): cached loop vs uncached."""
  model_config = setup.resolve(lm_config(args.variant)).model_config
  rows = []
  for batch in (1, 8):
    times = bench.decode_times(model_config, batch=batch, prompt_len=32, decode_len=256, rounds=args.decode_rounds)
    speedup = times['uncached'] / times['cached']
    tokens = batch * 256
    rows.append(
      row(
        f'greedy decode tokens/s, batch {batch}: KV cache vs uncached (lm shape)',
        f'{tokens / times["cached"]:,.0f}',
        f'{tokens / times["uncached"]:,.0f}',
        f'{speedup:.1f}x',
        '>= 10x',
        yes(speedup >= 10),
      )
    )
  return rows


def beam_section(args, state):
  """Beam 4 vs greedy on the translation `tiny` shape, both forced to the same output length."""
  model_config = setup.resolve(lm_config('translation')).model_config
  rows = []
  for batch in (1, 8):
    times = bench.decode_times(
      model_config, batch=batch, prompt_len=32, decode_len=64, rounds=args.rounds, methods=('cached', 'beam')
    )
    ratio = times['beam'] / times['cached']
    rows.append(
      row(
        f'beam 4 vs greedy time, batch {batch}, 64 tokens (translation tiny)',
        f'{1000 * times["beam"]:.0f} ms',
        f'{1000 * times["cached"]:.0f} ms',
        f'{ratio:.2f}x',
        '<= 5x',
        yes(ratio <= 5),
      )
    )
  return rows
