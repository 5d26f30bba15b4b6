"""`--mode bench`, the memory analysis, and the PyTorch reference used by benchmarks/compare.py.
Nothing here asserts a timing: only that the figures exist, are sane, and measure the right model."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import tiny

from transformer import decoding, models, setup, summary
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
  result = bench.run_bench(_tiny_config(decode=True, decode_len=6, prompt_len=3, decode_repeats=1))
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


def test_compare_reports_missing_torch(monkeypatch, capsys):
  monkeypatch.setattr(compare, 'torch_reference', None)
  compare.main(['--only', 'train,input', '--variant', 'tiny', '--rounds', '1', '--steps', '1'])
  table = capsys.readouterr().out
  assert compare.MISSING in table and '| figure | ours |' in table and '< 5%' in table


def _torch_reference():
  pytest.importorskip('torch')
  import torch_reference

  return torch_reference


@pytest.mark.parametrize('variant', ['tiny', 'lm', 'lm12'])
def test_torch_reference_has_our_parameter_count(variant):
  torch_reference = _torch_reference()
  model_config = setup.resolve(bench_configs.get_config(variant)).model_config
  model = models.build_model(model_config)
  ours = summary.count_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
  assert torch_reference.count_params(torch_reference.TorchLM(model_config)) == ours


def test_torch_reference_computes_our_logits():
  """Our parameters copied into the PyTorch model give our logits: it is the same function."""
  torch_reference = _torch_reference()
  import torch

  model_config = setup.resolve(bench_configs.get_config('tiny')).model_config
  model = models.build_model(model_config)
  params = models.init_params(model, jax.random.key(0))
  reference = torch_reference.TorchLM(model_config)
  t = lambda x: torch.from_numpy(np.asarray(x).copy())
  stack = params['decoder']['stack']
  with torch.no_grad():
    reference.embedding.copy_(t(params['embedding']['embedding']))
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
  tokens = np.random.default_rng(0).integers(3, model_config.vocab_size, (2, 12)).astype(np.int32)
  ours = model.apply({'params': params}, tokens)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(tokens).long()).numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=2e-4, rtol=2e-4)


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
  from transformer import attention

  batch, length, heads, kv_heads, size, window = 2, 23, 4, 2, 8, 5
  keys = jax.random.split(jax.random.key(0), 3)
  query = jax.random.normal(keys[0], (batch, length, heads, size))
  key = jax.random.normal(keys[1], (batch, length, kv_heads, size))
  value = jax.random.normal(keys[2], (batch, length, kv_heads, size + 2))
  # Row 0: one sequence; row 1: three packed segments (positions restart), then padding.
  segments = np.array([[1] * length, [1] * 7 + [2] * 9 + [3] * 4 + [0] * 3])
  positions = np.array([np.arange(length), np.r_[np.arange(7), np.arange(9), np.arange(4), np.arange(3)]])
  mask = attention.LocalMask(positions, positions, segments, segments, window=window, causal=causal)
  local = attention.local_attention(query, key, value, mask, impl=impl)
  dense = attention.dot_product_attention(query, key, value, mask.dense(), impl=impl)
  np.testing.assert_allclose(local, dense, atol=1e-5, rtol=1e-5)


def test_windowed_model_uses_local_attention_and_matches_dense(monkeypatch):
  from transformer import attention, train

  config = tiny(attention_window=4, max_len=64)
  model = models.build_model(config)
  params = models.init_params(model, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (2, 21)).astype(np.int32)
  tokens[1, 15:] = 0
  batch = {'targets': tokens}
  loss = lambda p: train._sums(model, p, batch, True, None, 0.0, 0.0)[0]
  calls = []
  blocked = attention.local_attention
  monkeypatch.setattr(attention, 'local_attention', lambda *a, **k: calls.append(1) or blocked(*a, **k))
  local_loss, local_grads = jax.value_and_grad(loss)(params)
  assert calls  # the windowed model took the blocked kernel
  monkeypatch.setattr(
    attention,
    'local_attention',
    lambda q, k, v, mask, **kw: attention.dot_product_attention(q, k, v, mask.dense(), **kw),
  )
  dense_loss, dense_grads = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(local_loss, dense_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), local_grads, dense_grads)
