"""`--mode bench` on a sweep file (bench_sweep.py): the KV cache's exact size, the variants' configs against
the sweep's runs, the rounds' order and medians, and a real two-variant comparison through `run.run`.
Nothing asserts a timing."""

import json
import os
import textwrap

import jax
import pytest
from absl import flags as absl_flags
from conftest import tiny
from ml_collections import config_flags

from transformer import models, setup, summary
from transformer.config import ConfigError, flatten
from transformer.experiment import bench_sweep, overrides, run, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_kv_cache_bytes_count_keys_values_positions_segments_and_index(scan_layers):
  batch, layers, head_dim, length = 3, 2, 8, 32  # tiny(): d_model 32 over 4 heads, max_len 32
  kv = {}
  for kv_heads in (4, 2, 1):
    cache = bench_sweep.kv_cache_bytes(tiny(num_kv_heads=kv_heads, scan_layers=scan_layers), batch)
    # Per layer a float32 key and value [batch, length, kv_heads, head_dim]; once for the stack the int32
    # positions and segment ids [batch, length] of every slot, and the int32 write index.
    assert cache['kv'] == layers * 2 * kv_heads * head_dim * batch * length * 4
    assert cache['other'] == 2 * batch * length * 4 + 4
    assert cache['total'] == cache['kv'] + cache['other']
    assert cache['per_token'] == cache['total'] / (batch * length)
    kv[kv_heads] = cache['kv']
  assert kv[2] * 2 == kv[4] and kv[1] * 2 == kv[2]


def _run_process_config(command: list[str]):
  """The config a sweep run's process gets: its command line parsed by config_flags, as the process does."""
  argv = command[command.index('-m') + 1 :]
  flag_values = absl_flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'the run config', flag_values=flag_values, sys_argv=argv)
  absl_flags.DEFINE_string('workdir', None, 'the run folder', flag_values=flag_values)
  flag_values(argv)
  return holder.value


def _settings(config):
  """What a run trains with: the sweep file's own sweep.* and bench.* sections configure other processes."""
  flat = flatten(config.copy_and_resolve_references())
  return {path: value for path, value in flat.items() if not path.startswith(('sweep.', 'bench.'))}


def test_variant_configs_are_the_sweep_runs_configs():
  """The gqa sweep with a command-line override: each variant's config is what its run's process parses from
  its command line (seed 0), and the base file with the sweep's, the variant's and the command line's values."""
  gqa = overrides.load_config(os.path.join(ROOT, 'experiments/ablations/gqa.py'))
  overrides.set_value(gqa, 'model.d_ff', 256)  # as config_flags applies --config.model.d_ff=256
  flags = ('--config.model.d_ff=256', '--config.bench.rounds=2')  # text.py has no bench section: not for the runs
  configs = bench_sweep.variant_configs(gqa, flags)
  assert [name for name, _ in configs] == [f'num_kv_heads={h}' for h in (8, 4, 2, 1)]
  seed0 = {r.variant: r for r in sweep.plan(gqa, str(ROOT), flags[:1]) if r.seed == 0}
  for (name, got), kv_heads in zip(configs, (8, 4, 2, 1)):
    assert _settings(got) == _settings(_run_process_config(seed0[name].command)), name
    expected = overrides.load_config(os.path.join(ROOT, 'experiments/text.py:short'))
    for path, value in [('model.num_heads', 8), ('model.num_kv_heads', kv_heads), ('model.d_ff', 256)]:
      overrides.set_value(expected, path, value)
    expected.train.seed = 0
    assert _settings(got) == _settings(expected), name
  with pytest.raises(ConfigError, match='which the sweep varies'):
    bench_sweep.variant_configs(gqa, ('--config.model.num_kv_heads=2',))


class _Fake:
  def __init__(self, name, step_times, log):
    self.name, self.step_times, self.log = name, list(step_times), log

  def time_round(self):
    self.log.append(self.name)
    step = self.step_times.pop(0)
    return {'step_s': step, 'decode_s': 10 * step}


def test_measure_rounds_alternates_and_takes_medians_over_rounds():
  log = []
  benches = [_Fake('a', [3.0, 1.0, 2.0], log), _Fake('b', [5.0, 9.0, 4.0], log)]
  medians = bench_sweep.measure_rounds(benches, rounds=3)
  assert log == ['a', 'b', 'a', 'b', 'a', 'b']
  assert medians == {'a': {'step_s': 2.0, 'decode_s': 20.0}, 'b': {'step_s': 5.0, 'decode_s': 50.0}}


_SWEEP_FILE = """
from transformer.experiment import sweep


def get_config(arg=None):
  return sweep.sweep_config(base={base!r}, variants=sweep.product(num_kv_heads=[4, 2]))
"""


def _tiny_sweep(tmp_path):
  path = tmp_path / 'kv.py'
  path.write_text(textwrap.dedent(_SWEEP_FILE.format(base=os.path.join(ROOT, 'experiments/bench.py:tiny'))))
  return overrides.load_config(str(path))


@pytest.mark.slow(22)
def test_bench_of_a_sweep_compares_its_variants_in_alternating_rounds(tmp_path, capsys, monkeypatch):
  config = _tiny_sweep(tmp_path)
  config.bench.update(dict(steps=1, warmup=0, decode_len=4, prompt_len=3, decode_repeats=1, rounds=2))
  events = []
  for method in ('warm_up', 'time_round'):
    original = getattr(bench_sweep.VariantBench, method)
    record = lambda self, original=original, method=method: events.append((method, self.name)) or original(self)
    monkeypatch.setattr(bench_sweep.VariantBench, method, record)
  workdir = str(tmp_path / 'runs')
  result = run.run(config, 'bench', workdir, ('--config.bench.rounds=2',))

  a, b = 'num_kv_heads=4', 'num_kv_heads=2'
  assert events == [('warm_up', a), ('warm_up', b)] + [('time_round', a), ('time_round', b)] * 2
  lines = capsys.readouterr().out.strip().splitlines()
  assert json.loads(lines[-1]) == result
  table = '\n'.join(lines[:-1])
  assert table.count(f'| {a} |') == 1 and table.count(f'| {b} |') == 1
  assert open(os.path.join(workdir, 'bench.md')).read() == table + '\n'
  assert json.loads(open(os.path.join(workdir, 'bench.json')).read()) == result

  rows = {row['variant']: row for row in result['variants']}
  assert list(rows) == [a, b]
  # experiments/bench.py:tiny: 2 layers, head size 32 / 4 = 8, max_len 64, one decode row, float32.
  other = 2 * 64 * 4 + 4
  assert rows[a]['kv_cache_bytes'] == 2 * 2 * 4 * 8 * 64 * 4 + other
  assert rows[b]['kv_cache_bytes'] == 2 * 2 * 2 * 8 * 64 * 4 + other
  assert rows[b]['cache_ratio'] == rows[b]['kv_cache_bytes'] / rows[a]['kv_cache_bytes']
  assert rows[a]['cache_ratio'] == rows[a]['decode_ratio'] == rows[a]['train_ratio'] == 1.0
  for name, kv_heads in ((a, 4), (b, 2)):
    base = overrides.load_config(os.path.join(ROOT, 'experiments/bench.py:tiny'))
    base.model.num_kv_heads = kv_heads
    model = models.build_model(setup.resolve(base).model_config)
    params = jax.eval_shape(lambda model=model: models.init_params(model, jax.random.key(0)))
    assert rows[name]['params'] == summary.count_params(params)
    for key in ('decode_tokens_per_sec', 'train_tokens_per_sec', 'step_ms', 'decode_ms_per_step'):
      assert rows[name][key] > 0, (name, key)
  assert rows[b]['decode_ratio'] == rows[b]['decode_tokens_per_sec'] / rows[a]['decode_tokens_per_sec']
  assert result['settings'] == {'rounds': 2, 'steps': 1, 'decode_batch': 1, 'prompt_len': 3, 'decode_len': 4}


@pytest.mark.parametrize(
  'setting, message',
  [
    (dict(rounds=0), r'config.bench.rounds=0 must be >= 1'),
    (dict(audit=True), 'config.bench.audit applies to one config'),
  ],
)
def test_bench_of_a_sweep_refuses_settings_it_cannot_honour(tmp_path, setting, message):
  config = _tiny_sweep(tmp_path)
  config.bench.update(setting)
  with pytest.raises(ConfigError, match=message):
    run.run(config, 'bench', str(tmp_path / 'runs'))
  assert not os.path.exists(tmp_path / 'runs')
