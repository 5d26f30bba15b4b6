"""The findings' sweeps (experiments/ablations/): each plan's variants differ where the paper's comparison
says and nowhere else, every variant's model builds, and a few steps of one variant run. (Every ablation
file's plan and overrides are also checked by tests/test_sweep.py.)"""

import functools
import math
import os

import jax
import pytest
from conftest import PEAK_FLOPS

from transformer import models, setup, summary
from transformer.config import flatten
from transformer.experiment import overrides, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
  return overrides.load_config(os.path.join(ROOT, 'experiments', 'ablations', f'{name}.py'))


def variant_configs(config) -> dict:
  return {v['name']: sweep.variant_config(config, v) for v in config.sweep.variants}


def differences(config, variant) -> dict:
  """The settings (outside `sweep`) where a variant's config differs from the sweep's base."""
  base = {k: v for k, v in flatten(config.to_dict()).items() if not k.startswith('sweep.')}
  mine = flatten(variant.to_dict())
  return {k: mine[k] for k in base if mine[k] != base[k]}


@functools.cache
def built(name: str) -> dict:
  """Each variant's parameter shapes (abstract: nothing allocated), built once for all tests."""
  shapes = {}
  for variant_name, variant in variant_configs(load(name)).items():
    model = models.build_model(setup.resolve(variant).model_config)
    shapes[variant_name] = jax.eval_shape(lambda model=model: models.init_params(model, jax.random.key(0)))
  return shapes


def layer_params(params) -> dict:
  return {name: summary.count_params(tree) for name, tree in params['decoder']['stack']['layer_0'].items()}


def test_warmup_norm_is_a_2x2_of_norm_position_and_warmup_with_layernorm():
  config = load('warmup_norm')
  variants = variant_configs(config)
  combos = {(c.model.norm_position, c.train.warmup_steps) for c in variants.values()}
  assert combos == {('post', 0), ('post', 50), ('pre', 0), ('pre', 50)}
  assert {c.model.norm_type for c in variants.values()} == {'layernorm'}
  assert config.sweep.seeds == (0, 1, 2)
  for name, variant in variants.items():
    assert set(differences(config, variant)) <= {'model.norm_position', 'train.warmup_steps'}, name


def test_gated_ffn_variants_have_equal_feed_forward_parameters():
  config = load('gated_ffn')
  variants = variant_configs(config)
  assert [c.model.activation for c in variants.values()] == ['relu', 'gelu', 'swiglu']
  ffn = {}
  for name, variant in variants.items():
    assert set(differences(config, variant)) <= {'model.activation', 'model.d_ff'}, name
    ffn[variant.model.activation] = layer_params(built('gated_ffn')[name])['ffn']
  # Two matrices at d_ff 512 with their biases; SwiGLU's three at 341 (no biases): 0.6% fewer.
  assert ffn['relu'] == ffn['gelu'] == 2 * 128 * 512 + 512 + 128
  assert ffn['swiglu'] == 3 * 128 * 341


def test_gqa_varies_only_the_key_value_heads_of_eight_query_heads():
  config = load('gqa')
  variants = variant_configs(config)
  kv = {}
  for name, variant in variants.items():
    model_config = setup.resolve(variant).model_config
    assert model_config.num_heads == 8 and set(differences(config, variant)) <= {'model.num_kv_heads'}, name
    kv[model_config.kv_heads] = layer_params(built('gqa')[name])['self_attention']
  assert sorted(kv) == [1, 2, 4, 8]
  d_model, head_dim = 128, 16
  # Query and output projections stay; the key and value projections shrink with the kv heads.
  for heads, count in kv.items():
    assert count == 2 * d_model * 8 * head_dim + 2 * d_model * heads * head_dim


# How many different parameter counts each sweep's variants have: pre-LN adds a final norm and warm-up
# changes nothing, ReLU and GELU share theirs, and each key/value head count has its own.
DISTINCT_SIZES = {'warmup_norm': 2, 'gated_ffn': 2, 'gqa': 4}


@pytest.mark.parametrize('name', sorted(DISTINCT_SIZES))
def test_every_variant_builds(name):
  sizes = {summary.count_params(params) for params in built(name).values()}
  assert len(sizes) == DISTINCT_SIZES[name]


def test_length_evaluates_every_position_kind_at_one_to_eight_times_the_training_length():
  config = load('length')
  variants = variant_configs(config)
  assert [c.model.positional for c in variants.values()] == ['sinusoidal', 'learned', 'rope', 'alibi']
  for name, variant in variants.items():
    assert set(differences(config, variant)) <= {'model.positional'}, name  # rope is the base's
    assert (variant.data.seq_len, variant.model.max_len) == (64, 64), name
    assert tuple(variant.train.eval_lengths) == (64, 128, 256, 512), name
  assert tuple(config.sweep.report) == tuple(f'eval/loss@{n}' for n in (64, 128, 256, 512))


def test_a_few_steps_of_the_alibi_variant_log_a_loss_at_every_length(tmp_path):
  from transformer import loop

  config = load('length')
  alibi = next(c for c in variant_configs(config).values() if c.model.positional == 'alibi')
  del alibi.sweep  # the run's own config, as its process would get it
  alibi.train.update(num_steps=2, eval_every=2, checkpoint_every=2, peak_flops=PEAK_FLOPS)
  # Its settings at a smaller width and depth: five evals of the whole dev book cost minutes at d_model 128.
  alibi.model.update(d_model=32, d_ff=64, num_decoder_layers=1)
  metrics = loop.train_and_evaluate(alibi, str(tmp_path))
  losses = [metrics[f'eval/loss@{n}'] for n in (64, 128, 256, 512)]
  assert losses[0] == pytest.approx(metrics['eval/loss'], rel=1e-6)  # the training length is the ordinary eval
  assert all(math.isfinite(loss) for loss in losses) and len(set(losses)) == 4
  # Every length covers the same tokens: the eval documents, cut differently.
  assert len({metrics[f'eval/tokens@{n}'] for n in (64, 128, 256, 512)}) == 1


def test_sparse_varies_only_the_attention_pattern_at_the_documented_densities():
  """Every variant trains the same model (one parameter count) on 512-token windows; only the pattern
  changes, keeping the share of causal key blocks that sparse.py and docs/findings.md state."""
  from transformer import patterns

  config = load('sparse')
  kept = {}
  for name, variant in variant_configs(config).items():
    assert all(key.startswith('model.') and 'pattern' in key or 'window' in key for key in differences(config, variant))
    model_config = setup.resolve(variant).model_config
    assert variant.data.seq_len == 512 and model_config.max_len == 512
    pattern = patterns.from_config(model_config, causal=True)
    if pattern is not None:
      kept[name] = round(pattern.density(512), 2)
    elif model_config.attention_window:
      window = model_config.attention_window
      kept[name] = round(sum(min(i + 1, window) for i in range(512)) / (512 * 513 / 2), 2)
    else:
      kept[name] = 1.0
  assert kept == {'dense': 1.0, 'window': 0.44, 'strided': 0.44, 'fixed': 0.34, 'bigbird': 0.34, 'window32': 0.12}
