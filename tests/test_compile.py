"""`--mode compile`: the real steps compiled for TPU slices through libtpu, on this CPU host (no TPU).

Without libtpu these tests skip, except under CI=true, where they fail (the test extra installs it).
"""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from transformer import accelerators, metrics, parallel, platform, setup
from transformer.config import ConfigError, default_compile_config
from transformer.experiment import aot, bench, sweep
from transformer.experiment.run import MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import bench as bench_experiments  # noqa: E402

_REASON = accelerators.parse('v5e-8').unavailable()
if _REASON and os.environ.get('CI') == 'true':
  raise RuntimeError(f'CI=true: {_REASON} (the test extra installs libtpu)')
pytestmark = pytest.mark.skipif(bool(_REASON), reason=_REASON or '')


def small(mesh=(8, 1, 1), remat='none', batch=16, seq_len=128, **model):
  """experiments/bench.py:tiny widened so that every parameter divides 8 ways."""
  config = bench_experiments.get_config('tiny')
  # XLA's dense attention: these tests count its matmuls and its [T, T] temporaries (splash hides both in
  # its kernel; tests/test_splash.py compiles that).
  model = dict(dict(d_model=64, d_ff=256, num_heads=4, vocab_size=512, attention_impl='xla'), **model)
  config.model.update(max_len=seq_len, remat=remat, **model)
  config.train.batch_size, config.data.seq_len = batch, seq_len
  config.train.mesh.data, config.train.mesh.fsdp, config.train.mesh.tensor = mesh
  return config


def train_report(config, target='v5e-8', workdir=None):
  return aot.compile_config(config, accelerators.parse(target), ('train',), workdir)


def test_the_tpu_step_is_built_for_the_tpu_and_the_cpu_step_for_the_cpu():
  """The same config lowered for a TPU slice from this CPU host computes in bfloat16 with none of the CPU's
  own matmul layouts (their optimization barriers, in training and in the decoding loop's kernel-first products)
  but the row products every backend gets; lowered for this host's CPU it computes in float32 and keeps them.
  (On the TPU the logits' float32 gradient meets the bfloat16 table: no matmul there has only float32 operands.)"""
  config = bench_experiments.get_config('lm')
  config.model.num_decoder_layers = 2
  # XLA's attention: splash's backward sums o * do by a float32 dot of its own (tests/test_splash.py).
  config.model.attention_impl = 'xla'
  config.bench.decode_batch = 8  # kernel-first products are for 2-32 rows
  built = setup.build(config, with_task=False)
  batch = bench.synthetic_batch(built.model_config, 8, 256)

  def programs(devices):
    runner = parallel.JitRunner(built.train_config, built.model, built.optimizer, built.schedule, devices=devices)
    return runner.lower_train_step(batch).as_text(), aot.lower_decode(config, built.model, runner).as_text()

  tpu_train, tpu_decode = programs(accelerators.parse('v5e-8').devices())
  cpu_train, cpu_decode = programs(jax.devices()[:1])
  operands = lambda text: set(
    re.findall(r'stablehlo.dot_general .*?: \(tensor<[\dx]+x(\w+)>, tensor<[\dx]+x(\w+)>', text)
  )
  assert {'bf16'} <= {t for pair in operands(tpu_train) for t in pair} and ('f32', 'f32') not in operands(tpu_train)
  assert operands(cpu_train) == {('f32', 'f32')}
  assert 'optimization_barrier' not in tpu_train and 'optimization_barrier' not in tpu_decode
  assert 'optimization_barrier' in cpu_train and 'optimization_barrier' in cpu_decode
  # Every backend multiplies rows (`matmuls`): the FFN's first product is `[tokens, d]` on the CPU and, under
  # the TPU step's vmap over 8 batch shards, `[8, 256, d]` (as written, `8x1x256`, it cost gpt2_medium 4.5 GiB).
  ffn = lambda text, rows, dtype: re.search(
    rf'stablehlo.dot_general .*?: \(tensor<{rows}x512x{dtype}>, tensor<512x2048x{dtype}>\)', text
  )
  assert ffn(tpu_train, '8x256', 'bf16') and not ffn(tpu_train, '8x1x256', 'bf16')
  assert ffn(cpu_train, '2048', 'f32')
  assert platform.target() == 'cpu'  # nothing leaks out of the TPU trace


@pytest.mark.parametrize('fsdp', [1, 2, 4, 8])
def test_parameters_and_optimizer_state_per_chip_are_the_total_over_fsdp(fsdp):
  """What the compiled step allocates per chip for its arguments (state and batch) is the parameters and
  Adam's two moments divided by the FSDP axis: nothing left whole on every chip. (d_model 1024: every
  shard at least 128 wide, the TPU's lane tile, below which the compiler pads arrays.)"""
  report = train_report(small(mesh=(8 // fsdp, fsdp, 1), d_model=1024, num_heads=8))
  total = report['params_total']
  assert abs(report['params_per_device'] - total / fsdp) <= 0.01 * total / fsdp
  assert abs(report['opt_state_per_device'] - 2 * total / fsdp) <= 0.01 * 2 * total / fsdp
  batch_bytes = 16 * 128 * 4 // (8 // fsdp * fsdp)
  arguments = report['steps']['train']['memory']['arguments'] - batch_bytes
  assert abs(arguments - 3 * total / fsdp) <= 0.01 * 3 * total / fsdp


def test_remat_lowers_the_temporaries():
  """8 scanned layers: saving only the matmuls' outputs ('dots') keeps less than saving everything, and
  recomputing each layer ('full') keeps only the layers' inputs."""
  temporaries = {
    remat: train_report(small(seq_len=512, batch=32, remat=remat, num_decoder_layers=8, scan_layers=True))['steps'][
      'train'
    ]['memory']['temporaries']
    for remat in ('none', 'dots', 'full')
  }
  assert temporaries['full'] < temporaries['dots'] < 0.1 * temporaries['none']


@pytest.mark.parametrize(('target', 'mesh'), [('v5e-8', (8, 1, 1)), ('v4-8', (4, 1, 1)), ('v5e-4', (1, 1, 4))])
def test_collectives_equal_the_layouts_analytic_traffic(target, mesh):
  """Data parallel: one all-reduce of every gradient; tensor parallel: the activations' all-reduces (the TPU
  compiler reduces q, k and v's input gradients together), within 5%."""
  program = train_report(small(mesh=mesh), target)['steps']['train']
  expected = program['expected_collectives']
  assert set(expected) == set(program['collectives']) == {'all-reduce'}
  assert program['collectives']['all-reduce']['bytes'] == pytest.approx(expected['all-reduce'], rel=0.05)


def test_fsdp_reduces_the_whole_gradient_once_and_gathers_bfloat16_weights(tmp_path):
  """FSDP on the TPU: one reduction of the whole float32 gradient per step (docs/scale.md: the floor it sets);
  every all-gather is of a weight already cast to bfloat16."""
  program = train_report(small(mesh=(1, 8, 1)), workdir=tmp_path)['steps']['train']
  assert program['collectives']['all-reduce']['bytes'] == pytest.approx(
    program['expected_collectives']['all-reduce'], rel=0.01
  )
  gathered = re.findall(r'= (\w+)\[[\d,]*\][^ ]* all-gather(?:-start)?\(', (tmp_path / 'train.hlo.txt').read_text())
  assert len(gathered) > 10 and set(gathered) == {'bf16'}


def test_flops_count_loops_by_their_trips_and_match_the_analytic_count():
  """A scanned model's step does the unrolled one's matmuls (the TPU compiler's own count sees the loop
  body once), and they are `metrics.flops_per_token`'s count plus the causal mask's hidden scores."""
  unrolled = train_report(small())['steps']['train']
  scanned = train_report(small(scan_layers=True, num_decoder_layers=4))['steps']['train']
  unrolled4 = train_report(small(num_decoder_layers=4))['steps']['train']
  assert scanned['matmul_flops'] == unrolled4['matmul_flops']
  assert scanned['compiler_flops'] < 0.8 * unrolled4['compiler_flops']
  # The analytic count's causal attention sees (T + 1) / 2 keys per query; the program computes every
  # score of the T x T matrix and masks half: 3 passes x layers x 2 h (d_k + d_v) x the hidden keys.
  for program, layers in ((unrolled, 2), (unrolled4, 4)):
    masked = 3 * layers * 2 * 4 * (16 + 16) * (128 - 129 / 2) * 16 * 128 / 8
    assert program['matmul_flops'] == program['model_flops'] + masked


def test_the_roofline_bound_uses_the_chips_figures():
  """Data parallel on v5e-8: the gradient's ring all-reduce sends 2 x 7/8 of the float32 gradient at 200 GB/s
  (half the 400 GB/s bidirectional ICI), the matmuls run at 197 TFLOP/s, and the MFU bound is the model's
  analytic FLOPs over 8 chips' peak for that long."""
  config = small()
  report = train_report(config)
  program = report['steps']['train']
  bound = program['bound']
  assert bound['collectives_s'] == pytest.approx(2 * report['params_total'] * 7 / 8 / 200e9, rel=0.001)
  assert bound['compute_s'] == pytest.approx(program['matmul_flops'] / 197e12)
  assert bound['step_s'] == max(bound['compute_s'], bound['hbm_s'], bound['collectives_s'])
  model_flops = metrics.flops_per_token(setup.resolve(config).model_config, 128) * 16 * 128
  assert bound['mfu'] == pytest.approx(model_flops / (bound['step_s'] * 197e12 * 8))
  assert bound['tokens_per_sec'] == pytest.approx(16 * 128 / bound['step_s'])


def test_an_oversized_batch_fails_with_both_figures_and_exit_code_1(tmp_path):
  """The compiler's refusal (temporaries beyond HBM) is one line with both figures, exit code 1, no traceback;
  compile.json is written all the same."""
  command = [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config',
    os.path.join(ROOT, 'experiments/bench.py:tiny'),
    '--mode',
    'compile',
    '--workdir',
    str(tmp_path),
    '--config.compile.target=v5e-4',
    '--config.compile.steps=train',
    '--config.model.d_model=512',
    '--config.model.d_ff=8192',
    '--config.model.max_len=4096',
    '--config.data.seq_len=4096',
    '--config.train.batch_size=256',
    '--config.model.attention_impl=xla',
  ]
  done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert done.returncode == 1, done.stderr[-2000:]
  last = done.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r'tiny on v5e-4 does not fit: needs [\d,.]+ GiB of 15\.75 GiB per chip', last), last
  assert 'Traceback' not in done.stderr
  assert (tmp_path / 'compile.json').exists()


def test_every_step_compiles_and_the_hlo_texts_are_written(tmp_path):
  report = aot.compile_config(bench_experiments.get_config('translation'), accelerators.parse('v4-8'), workdir=tmp_path)
  assert set(report['steps']) == {'train', 'eval', 'decode'} and report['fits']
  assert report['chip']['hbm']['value'] == 30.75 * 2**30 and 'libtpu' in report['chip']['hbm']['source']
  for step in ('train', 'eval', 'decode'):
    assert 'HloModule' in (tmp_path / f'{step}.hlo.txt').read_text()
  assert 'bfloat16' == report['compute_dtype']


@pytest.mark.slow(20)
def test_mesh_search_ranks_the_meshes_that_fit_by_their_bound():
  rows = aot.search_meshes(small(batch=8), accelerators.parse('v5e-4'))
  meshes = {row['mesh'] for row in rows}
  assert meshes == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)}
  assert len(rows) == 12  # remat none and full for each
  fitting = [row['step_s'] for row in rows if row['fits']]
  assert fitting == sorted(fitting) and len(fitting) == 12


@pytest.mark.parametrize(
  ('name', 'message'),
  [
    ('v9x-8', 'is not a known accelerator'),
    ('v4-7', 'names count TensorCores, two per chip'),
    ('v5e-3', 'has no slice of 3 chips'),
  ],
)
def test_a_target_that_does_not_exist_is_one_clear_error(name, message):
  with pytest.raises(ConfigError, match=message):
    accelerators.parse(name).devices()


def test_names_count_chips_or_cores_as_cloud_tpu_names_them():
  assert [accelerators.parse(n).device_count for n in ('v4-8', 'v5p-128', 'v5e-16', 'v6e-256')] == [4, 64, 16, 256]
  assert accelerators.parse('v5e-16', slices=2).device_count == 32
  assert len(accelerators.parse('v5p-16', slices=2).devices()) == 16
  assert 'compile' in MODES


def test_two_slices_put_the_data_axis_across_them():
  devices = accelerators.parse('v5e-4', slices=2).devices()
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tensor=1), devices, slices=2)
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  with pytest.raises(ConfigError, match='multiple of 2'):
    parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=8, tensor=1), devices, slices=2)


@pytest.mark.slow(35)
def test_a_sweep_compiles_every_variant_on_every_target_and_says_what_does_not_fit(tmp_path, capsys):
  """A sweep file on two targets: one table of variants x targets; the variant too big for v5e's 15.75 GiB
  fits v5p's 95.74 GiB, and the run exits 1 naming it."""
  config = sweep.sweep_config(
    base='experiments/bench.py:tiny',
    variants=sweep.variant('small', **{'train.batch_size': 8}) + sweep.variant('huge', **{'train.batch_size': 768}),
    overrides={'model.d_model': 512, 'model.d_ff': 8192, 'model.max_len': 2048, 'data.seq_len': 2048},
  )
  config.compile = default_compile_config(target='v5e-4,v5p-8', steps='train')
  with pytest.raises(SystemExit) as stop:
    aot.run_compile(config, str(tmp_path))
  rows = json.loads((tmp_path / 'compile.json').read_text())['rows']
  assert [(r['variant'], r['target'], r['fits']) for r in rows] == [
    ('small', 'v5e-4', True),
    ('small', 'v5p-8', True),
    ('huge', 'v5e-4', False),
    ('huge', 'v5p-8', True),
  ]
  assert re.fullmatch(r'huge on v5e-4 does not fit: needs [\d,.]+ GiB of 15\.75 GiB per chip', str(stop.value.code))
  table = capsys.readouterr().out
  assert '| huge | v5e-4 | no |' in table and '| huge | v5p-8 | yes |' in table


def test_the_kernel_a_config_names_is_checked_against_the_target_not_the_host():
  """Building the step for a slice traces everything under its mesh, the abstract init included: an explicit
  GPU kernel compiled for a TPU is refused as that, not as 'built for: cpu' (which also refused it for a GPU)."""
  config = small(attention_impl='cudnn')
  with pytest.raises(ConfigError, match=r'needs a GPU \(the step is built for: tpu\)'):
    train_report(config)
