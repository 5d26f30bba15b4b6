"""`--mode bench`, the memory analysis, and the PyTorch reference used by benchmarks/compare.py.
Nothing here asserts a timing: only that the figures exist, are sane, and measure the right model."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import PEAK_FLOPS, tiny

from transformer import decoding, metrics, models, setup, summary
from transformer.config import ConfigError
from transformer.experiment import bench
from transformer.tokens import EOS_ID, PAD_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import compare  # noqa: E402

from experiments import bench as bench_configs  # noqa: E402

REQUIRED = ('tokens_per_sec', 'step_ms', 'mfu', 'compile_s', 'params')


def _tiny_config(**bench_overrides):
  config = bench_configs.get_config('tiny')
  config.bench.update(dict(steps=2, warmup=1, data_batches=2, **bench_overrides))
  return config


def test_bench_mode_prints_a_table_then_json(capsys):
  config = _tiny_config()
  bench.run_bench(config)
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])
  assert any(line.startswith('train tokens/s') for line in lines[:-1])
  for key in REQUIRED:
    assert key in result and result[key] >= 0, key
  assert result['tokens_per_sec'] > 0 and result['step_ms'] > 0 and 0 < result['mfu'] < 1
  model = models.build_model(setup.resolve(config).model_config)
  assert result['params'] == summary.count_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
  assert result['seq_len'] == config.data.seq_len and result['batch_size'] == config.train.batch_size
  assert 0 < result['data_wait_frac'] and np.isfinite(result['loss'])
  # On CPU the peak is a measured float32 rate: the table says so beside MFU, and the JSON carries it.
  assert result['mfu_basis'] == 'measured f32 matmul (cpu)'
  assert any(line.startswith('MFU') and line.endswith('(against measured f32 matmul (cpu))') for line in lines)


def test_bench_decode_figures(capsys):
  config = _tiny_config(decode=True, decode_len=6, prompt_len=3, decode_repeats=1)
  config.train.peak_flops = PEAK_FLOPS  # no matmul timed for MFU: the test above covers the measured basis
  result = bench.run_bench(config)
  assert result['decode_tokens_per_sec'] > 0 and result['uncached_tokens_per_sec'] > 0
  assert result['decode_speedup'] > 0


def test_never_eos_forces_full_length_decodes():
  model_config = setup.resolve(bench_configs.get_config('tiny')).model_config
  model, params, source = bench._decode_setup(model_config, batch=2, prompt_len=3)
  out = decoding.generate(model, params, max_len=12, **source)
  assert (np.asarray(out) != EOS_ID).all() and (np.asarray(out) != PAD_ID).all()


def test_unknown_bench_key_names_the_nearest():
  config = _tiny_config()
  config.bench.unlock()
  config.bench.step = 3
  with pytest.raises(ConfigError, match='config.bench.steps'):
    bench.settings(config)


def test_memory_analysis_sees_remat():
  # Layers scanned: XLA's CPU buffer assignment keeps unrolled rematerialised layers' temporaries
  # about as large as without remat (README, Performance).
  train_config = setup.resolve(bench_configs.get_config('tiny')).train_config
  temps = {}
  for remat in ('none', 'full'):
    stats = bench.compile_train_step(
      tiny(num_decoder_layers=4, remat=remat, scan_layers=True), train_config, batch_size=4, seq_len=32
    )
    assert stats['temp_bytes'] > 0 and stats['argument_bytes'] > 0 and stats['compile_s'] > 0
    temps[remat] = stats['temp_bytes']
  assert temps['full'] < temps['none']


# A stand-in for benchmarks/worker.py: logs its --impl, then prints the figures its table gives for this round.
FAKE_WORKER = """
import json, os, sys
impl = sys.argv[sys.argv.index('--impl') + 1]
with open(os.environ['FAKE_LOG'], 'a+') as log:
  log.seek(0)
  round = log.read().split().count(impl)
  log.write(impl + '\\n')
medians = {'ours': [0.5, 0.3, 0.4], 'torch': [0.8, 0.2, 0.9], 'torch_compile': [1.0, 1.0, 0.1]}
if impl.startswith('gemm'):
  out = {'flops_per_s': [1e9, 4e9, 2e9][round] * (1 if impl == 'gemm_xla' else 2)}
elif impl in medians:
  out = {'median_s': medians[impl][round], 'compile_s': 10.0 - round, 'tokens': 100, 'params': 7,
         'flops_per_token': 1e6, 'optimizer': 'fused', 'threads': 2}
else:  # decoding: ours twice as fast as HF at batch 1 (16 tokens), slower at batch 8 (128 tokens)
  batch = int(sys.argv[sys.argv.index('--batch') + 1])
  seconds = {('ours_decode', 1): 1.0, ('hf_generate', 1): 2.0, ('ours_decode', 8): 4.0, ('hf_generate', 8): 2.0}
  out = {'median_s': seconds[impl, batch], 'compile_s': 3.0, 'tokens': 16 * batch}
print('noise before the JSON line')
print(json.dumps({'impl': impl, **out}))
"""


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
  """compare.py's worker replaced by FAKE_WORKER; returns a function reading the order the impls ran in."""
  script, log = tmp_path / 'fake_worker.py', tmp_path / 'log'
  script.write_text(FAKE_WORKER)
  monkeypatch.setattr(compare, 'WORKER', [sys.executable, str(script)])
  monkeypatch.setenv('FAKE_LOG', str(log))
  return lambda: log.read_text().split() if log.exists() else []


def test_compare_alternates_processes_and_compares_medians_of_round_medians(fake_worker, monkeypatch, capsys):
  monkeypatch.setitem(compare.HAVE, 'torch', True)
  monkeypatch.setitem(compare.HAVE, 'transformers', True)
  compare.main(['--only', 'train,mfu,generate', '--variant', 'tiny', '--rounds', '3'])
  table = capsys.readouterr().out
  train = ['ours', 'torch', 'torch_compile'] * 3
  gemm = ['gemm_xla', 'gemm_torch'] * 3
  assert fake_worker() == train + gemm + ['ours_decode', 'hf_generate'] * 6
  # ours: median(0.5, 0.3, 0.4) = 0.4 s -> 250 tokens/s; eager: median(0.8, 0.2, 0.9) = 0.8 s -> 125;
  # torch.compile: median(1.0, 1.0, 0.1) = 1.0 s -> 100. Compile: the first round's 10 s, median 9 s.
  assert '| 250 | 125 | 2.00x | >= 1.0x | yes |' in table
  assert '| 250 | 100 | 2.50x | report |' in table
  assert '| 10.0 s (median 9.0 s) | 10.0 s (median 9.0 s) |' in table
  assert '| parameters (ours = PyTorch) | 7 | 7 |  | equal | yes |' in table
  # GEMM: the best round, XLA 4 GFLOP/s, PyTorch 8; MFU = 1e6 FLOPs/token * 250 tokens/s / 4e9 = 0.06 (0.03
  # against PyTorch's rate); PyTorch eager's 1e6 * 125 / 8e9 = 0.02.
  assert "| 0.06 | PyTorch eager: 0.02 of PyTorch's | 0 GFLOP/s model | >= 0.8 | NO |" in table
  assert '| 4 GFLOP/s | 8 GFLOP/s | 0.50x | report |' in table and '| 0.03 |' in table
  assert 'XLA 4 GFLOP/s, PyTorch 8 GFLOP/s' in table.split('|')[0]  # the machine line, above the table
  # Decode: batch 1, 16 / 1 s against 16 / 2 s; batch 8, 128 / 4 s against 128 / 2 s.
  assert '| 16 | 8 | 2.00x | >= 2x | yes |' in table and '| 32 | 64 | 0.50x | >= 2x | NO |' in table
  assert compare.NO_LM1B in table


def test_compare_without_torch_says_so_and_keeps_the_in_process_rows(fake_worker, monkeypatch, capsys):
  monkeypatch.setitem(compare.HAVE, 'torch', False)
  monkeypatch.setitem(compare.HAVE, 'transformers', False)
  compare.main(['--only', 'train,mfu,generate,input', '--variant', 'tiny', '--rounds', '1', '--steps', '1'])
  table = capsys.readouterr().out
  assert fake_worker() == ['ours', 'gemm_xla', 'ours_decode', 'ours_decode']  # no torch process started
  assert f'| 200 | {compare.MISSING} |  | >= 1.0x | ? |' in table  # 100 tokens / 0.5 s
  assert (
    f'| 0.20 | {compare.MISSING} |' in table
  )  # 1e6 FLOPs per token * 200 tokens/s / 1e9 and f'PyTorch: {compare.MISSING}' in table
  assert f'| 16 | {compare.MISSING} |  | >= 2x | ? |' in table
  assert '| figure | ours |' in table and '< 5%' in table  # the in-process input section still runs


def test_compare_reports_a_failed_worker(fake_worker, monkeypatch, capsys):
  monkeypatch.setattr(compare, 'WORKER', [sys.executable, '-c', 'import sys; sys.exit("no such model")'])
  compare.main(['--only', 'train', '--variant', 'tiny', '--rounds', '1', '--no_torch_compile'])
  assert '| ours failed: no such model |' in capsys.readouterr().out


@pytest.mark.slow(8)
def test_worker_measures_ours_in_its_own_process():
  import subprocess

  command = [sys.executable, os.path.join(ROOT, 'benchmarks', 'worker.py'), '--impl', 'ours', '--variant', 'tiny']
  command += ['--set', 'positional=learned', '--steps', '2', '--warmup', '1']
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  config = bench_configs.get_config('tiny')
  config.model.positional = 'learned'
  model_config = setup.resolve(config).model_config
  model = models.build_model(model_config)
  params = summary.count_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
  assert result['impl'] == 'ours' and result['params'] == params  # the learned table counted: the override took
  assert result['tokens'] == config.train.batch_size * config.data.seq_len
  assert len(result['seconds']) == 2 and result['median_s'] == np.median(result['seconds'])
  assert result['compile_s'] > 0 and np.isfinite(result['loss'])
  assert result['flops_per_token'] == metrics.flops_per_token(model_config, config.data.seq_len)


def test_worker_refuses_an_unknown_model_key():
  import worker

  with pytest.raises(SystemExit, match='--set .activaton=gelu.: give model_key=value with a key of config.model'):
    worker.main(['--impl', 'ours', '--variant', 'tiny', '--set', 'activaton=gelu'])


def test_machine_line_names_the_cpu(tmp_path):
  import table

  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n')
  assert table.cpu_model(str(cpuinfo)) == 'Intel(R) Xeon(R) Platinum 8488C'
  # One name covers CPU generations whose GEMM rates differ 3x: family, model and vector unit tell them apart.
  cpuinfo.write_text('cpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n')
  assert table.cpu_model(str(cpuinfo)) == 'AMD EPYC (family 26 model 2, AVX-512)'
  line = table.machine_line({'XLA': 3.0e11, 'PyTorch': 'torch not installed'}, 2048, 5)
  assert 'XLA 300 GFLOP/s, PyTorch: torch not installed' in line and '2048x2048 (best of 5' in line


@pytest.fixture(autouse=True)
def _denormals_kept():
  """benchmarks/torch_reference.py and hf_reference.py flush denormals process-wide when imported (for their
  timings); later tests in this xdist worker must not inherit that (hypothesis refuses to draw floats then)."""
  yield
  if 'torch' in sys.modules:
    sys.modules['torch'].set_flush_denormal(False)


def _torch_reference():
  pytest.importorskip('torch')
  import torch_reference

  return torch_reference


def _copy_into_torch_reference(reference, params, model_config):
  import torch

  t = lambda x: torch.from_numpy(np.asarray(x).copy())
  stack = params['decoder']['stack']
  with torch.no_grad():
    reference.embedding.copy_(t(params['embedding']['embedding']))
    if model_config.positional == 'learned':
      reference.positions.copy_(t(params['decoder']['embedder']['position_embedding']['embedding']))
    for i, block in enumerate(reference.blocks):
      layer = stack[f'layer_{i}']
      attention = layer['self_attention']
      d = model_config.d_model
      qkv = [attention[name]['kernel'].reshape(d, -1) for name in ('query', 'key', 'value')]
      block.qkv.weight.copy_(t(np.concatenate(qkv, axis=1).T))
      block.out.weight.copy_(t(attention['out']['kernel'].reshape(-1, d).T))
      for name, norm in (('self_attention_norm', block.attention_norm), ('ffn_norm', block.ffn_norm)):
        norm.weight.copy_(t(layer[name]['scale']))
        norm.bias.copy_(t(layer[name]['bias']))
      for name in ('wi', 'wo'):
        getattr(block, name).weight.copy_(t(layer['ffn'][name]['kernel'].T))
        getattr(block, name).bias.copy_(t(layer['ffn'][name]['bias']))
    reference.final_norm.weight.copy_(t(stack['final_norm']['scale']))
    reference.final_norm.bias.copy_(t(stack['final_norm']['bias']))


def _resolved_model_config(variant, **model_overrides):
  config = bench_configs.get_config(variant)
  config.model.update(model_overrides)
  return setup.resolve(config).model_config


GPT2_LIKE = dict(activation='gelu', positional='learned')  # compare.GPT2_LIKE, the train and decode shape


@pytest.mark.parametrize('variant', ['tiny', 'lm', 'lm12'])
@pytest.mark.parametrize('positions', [{}, GPT2_LIKE], ids=['sinusoidal', 'learned'])
def test_torch_reference_has_our_parameter_count(variant, positions):
  torch_reference = _torch_reference()
  model_config = _resolved_model_config(variant, **positions)
  model = models.build_model(model_config)
  ours = summary.count_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
  assert torch_reference.count_params(torch_reference.TorchLM(model_config)) == ours


@pytest.mark.parametrize('positions', [{}, GPT2_LIKE], ids=['sinusoidal', 'learned'])
def test_torch_reference_computes_our_logits(positions):
  """Our parameters copied into the PyTorch model give our logits: it is the same function."""
  torch_reference = _torch_reference()
  import torch

  model_config = _resolved_model_config('tiny', **positions)
  model = models.build_model(model_config)
  params = models.init_params(model, jax.random.key(0))
  reference = torch_reference.TorchLM(model_config)
  _copy_into_torch_reference(reference, params, model_config)
  tokens = np.random.default_rng(0).integers(3, model_config.vocab_size, (2, 12)).astype(np.int32)
  ours = model.apply({'params': params}, tokens)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(tokens).long()).numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=2e-4, rtol=2e-4)


def test_torch_reference_refuses_what_it_does_not_mirror():
  torch_reference = _torch_reference()
  with pytest.raises(ValueError, match='needs model.positional sinusoidal or learned, not .rope.'):
    torch_reference.TorchLM(_resolved_model_config('tiny', positional='rope'))


def _hf_reference():
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import hf_reference

  return hf_reference


@pytest.mark.slow(11)
def test_gpt2_reference_computes_our_logits_and_greedy_tokens():
  """GPT-2 with our parameters (zero attention biases) computes our function: equal logits, and greedy
  `generate` writes the tokens ours writes. It has 4 d_model parameters per layer more (those biases)."""
  hf_reference = _hf_reference()
  import torch

  model_config = _resolved_model_config('tiny', **GPT2_LIKE)
  model, params, source = bench._decode_setup(model_config, batch=2, prompt_len=5)
  gpt2 = hf_reference.build(model_config)
  hf_reference.copy_ours(gpt2, jax.tree.map(np.asarray, params), model_config)
  prompts = np.array(source['prompts'])  # a writable copy for torch.from_numpy
  ours = model.apply({'params': params}, prompts)
  with torch.no_grad():
    theirs = gpt2(torch.from_numpy(prompts).long()).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-5, rtol=1e-5)
  extra = 4 * model_config.d_model * model_config.num_decoder_layers
  assert hf_reference.count_params(gpt2) == summary.count_params(params) + extra
  generated = decoding.generate(model, params, max_len=10, **source)
  bench_hf = hf_reference.GenerateBench(model_config, batch=2, prompt_len=5, decode_len=10)
  bench_hf.model, bench_hf.prompts = gpt2, torch.from_numpy(prompts).long()
  np.testing.assert_array_equal(bench_hf.call()[:, 5:].numpy(), np.asarray(generated))


def test_gpt2_reference_refuses_sinusoidal_positions():
  hf_reference = _hf_reference()
  with pytest.raises(ValueError, match="GPT-2 reference needs model.positional='learned', not 'sinusoidal'"):
    hf_reference.build(_resolved_model_config('tiny', activation='gelu'))
  import worker

  with pytest.raises(SystemExit, match="^hf_generate: the GPT-2 reference needs model.positional='learned'"):
    worker.main(['--impl', 'hf_generate', '--variant', 'tiny', '--set', 'activation=gelu'])


def test_torch_reference_trains():
  torch_reference = _torch_reference()
  config = bench_configs.get_config('tiny')
  model_config = setup.resolve(config).model_config
  reference = torch_reference.TorchTrainBench(
    model_config, setup.resolve(config).train_config, batch_size=4, seq_len=16
  )
  reference.times(3)
  assert np.isfinite(reference.last_loss) and torch_reference.measure_matmul_flops(64, 2) > 0


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_local_attention_equals_the_dense_window_mask(causal, impl):
  from transformer import attention, block_attention

  batch, length, heads, kv_heads, size, window = 2, 23, 4, 2, 8, 5
  keys = jax.random.split(jax.random.key(0), 3)
  query = jax.random.normal(keys[0], (batch, length, heads, size))
  key = jax.random.normal(keys[1], (batch, length, kv_heads, size))
  value = jax.random.normal(keys[2], (batch, length, kv_heads, size + 2))
  # Row 0: one sequence; row 1: three packed segments (positions restart), then padding.
  segments = np.array([[1] * length, [1] * 7 + [2] * 9 + [3] * 4 + [0] * 3])
  positions = np.array([np.arange(length), np.r_[np.arange(7), np.arange(9), np.arange(4), np.arange(3)]])
  mask = block_attention.SelfMask(positions, positions, segments, segments, window=window, causal=causal)
  local = block_attention.block_attention(query, key, value, mask, *mask.blocks())
  dense = attention.dot_product_attention(query, key, value, mask.dense(), impl=impl)
  np.testing.assert_allclose(local, dense, atol=1e-5, rtol=1e-5)


def test_windowed_model_uses_local_attention_and_matches_dense(monkeypatch):
  from transformer import block_attention, train

  config = tiny(attention_window=4, max_len=64)
  model = models.build_model(config)
  params = models.init_params(model, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (2, 21)).astype(np.int32)
  tokens[1, 15:] = 0
  batch = {'targets': tokens}
  loss = lambda p: train._sums(train._apply(model, p, batch, True), batch, 0.0, 0.0)[0]
  calls = []
  blocked = block_attention.block_attention
  monkeypatch.setattr(block_attention, 'block_attention', lambda *a, **k: calls.append(1) or blocked(*a, **k))
  local_loss, local_grads = jax.jit(jax.value_and_grad(loss))(params)
  assert calls  # the windowed model took the blocked kernel
  monkeypatch.setattr(block_attention.SelfMask, 'blocks', lambda self: None)
  dense_loss, dense_grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(local_loss, dense_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), local_grads, dense_grads)
