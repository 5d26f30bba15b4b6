"""Bad settings give one clear error; parameter counts match the paper and follow every override."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest
from conftest import tiny

from transformer import models, summary
from transformer.config import (
  ConfigError,
  MeshConfig,
  ModelConfig,
  TrainConfig,
  default_model_config,
  default_train_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import translation  # noqa: E402


@pytest.mark.parametrize(
  'overrides,message',
  [
    (dict(d_model=30, num_heads=4), 'config.model.d_model=30 is not divisible by config.model.num_heads=4'),
    (dict(num_heads=4, num_kv_heads=3), r'num_kv_heads=3: pick num_kv_heads among \[1, 2, 4\]'),
    (dict(positional='xpos'), "positional='xpos' is not one of: sinusoidal, learned, rope, alibi, none"),
    (dict(norm_type='batchnorm'), 'norm_type.*layernorm, rmsnorm'),
    (dict(norm_position='sandwich'), 'norm_position.*post, pre'),
    (dict(activation='tanh'), 'activation.*relu, gelu, gelu_exact, silu, swiglu'),
    (dict(attention_impl='pallas'), 'attention_impl.*reference, xla, cudnn, splash, flash, auto'),
    (dict(kind='encoder_only'), 'kind.*encoder_decoder, decoder_only'),
    (dict(dropout_rate=1.5), r'dropout_rate=1.5 must be in \[0, 1\)'),
    (dict(positional='rope', d_k=7), 'd_k=7 must be even'),
    (dict(num_heads=0), 'num_heads=0 must be a positive integer'),
  ],
)
def test_bad_settings_name_the_key_and_the_choices(overrides, message):
  with pytest.raises(ConfigError, match=message):
    tiny(**overrides)


def test_explicit_head_sizes_lift_the_divisibility_rule():
  cfg = tiny(d_model=30, num_heads=4, d_k=6, d_v=10)
  model = models.build_model(cfg)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))  # a shape claim: no numbers needed
  assert params['decoder']['stack']['layer_0']['self_attention']['value']['kernel'].shape == (30, 4, 10)


def test_unknown_key_suggests_the_nearest():
  config = default_model_config()
  config.unlock()
  config.num_head = 4
  with pytest.raises(ConfigError, match='Unknown key config.model.num_head. Did you mean config.model.num_heads?'):
    ModelConfig.from_config(config)


@pytest.mark.parametrize(
  'overrides,message',
  [
    (dict(rope_base=float('nan')), 'config.model.rope_base=nan must be a positive finite number'),
    (dict(rope_base=0.0), 'config.model.rope_base=0.0 must be a positive finite number'),
    (dict(norm_epsilon=-1e-6), 'config.model.norm_epsilon=-1e-06 must be a positive finite number'),
    (dict(norm_epsilon=float('inf')), 'config.model.norm_epsilon=inf must be a positive finite number'),
    (dict(vocab_size=3), 'config.model.vocab_size=3 leaves no id for tokens'),
  ],
)
def test_bad_model_numbers_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_config(overrides)
  assert ModelConfig.from_config({'vocab_size': 4, 'rope_base': 1.5, 'norm_epsilon': 1e-9}).vocab_size == 4


def test_wrong_type_names_the_expected_type():
  with pytest.raises(ConfigError, match="config.model.d_model='512' must be of type int"):
    ModelConfig.from_config({'d_model': '512'})
  assert ModelConfig.from_config({'dropout_rate': 0}).dropout_rate == 0.0  # ints are fine for floats


@pytest.mark.parametrize(
  'overrides,message',
  [
    (dict(lerning_rate=0.1), 'Unknown key config.train.lerning_rate. Did you mean config.train.learning_rate?'),
    (dict(mesh=dict(tensr=2)), 'Unknown key config.train.mesh.tensr. Did you mean config.train.mesh.tensor?'),
    (dict(batch_size='32'), "config.train.batch_size='32' must be of type int"),
    (dict(log_batch_digests=1), 'config.train.log_batch_digests=1 must be of type bool'),
    (dict(mesh=4), 'config.train.mesh=4 must be a mapping of data, fsdp, tensor'),
    (dict(optimizer='sgd'), "config.train.optimizer='sgd' is not one of: adam, adamw"),
    (dict(parallelism='tpu'), "config.train.parallelism='tpu' is not one of: jit, pmap"),
    (dict(grad_accum_steps=0), 'config.train.grad_accum_steps=0 must be a positive integer'),
    (dict(label_smoothing=1.0), r'config.train.label_smoothing=1.0 must be in \[0, 1\)'),
    (dict(grad_clip=-1.0), 'config.train.grad_clip=-1.0 must be a finite number >= 0'),
    (dict(learning_rate=float('inf')), 'config.train.learning_rate=inf must be a finite number >= 0'),
    (dict(weight_decay=float('nan')), 'config.train.weight_decay=nan must be a finite number >= 0'),
    (dict(mesh=dict(data=-1, fsdp=-1)), 'at most one may be -1'),
    (dict(mesh=dict(tensor=0)), 'config.train.mesh.tensor=0: each mesh axis must be a positive size'),
  ],
)
def test_bad_train_settings_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    default_train_config(**overrides)
  with pytest.raises(ConfigError, match=message):
    TrainConfig.from_config(overrides)


def test_train_config_round_trips_through_the_experiment_file_format():
  config = default_train_config(optimizer='adamw', learning_rate=1, mesh=dict(fsdp=2))
  assert config.mesh.to_dict() == dict(data=-1, fsdp=2, tensor=1)  # the nested mapping, defaults filled in
  typed = TrainConfig.from_config(config)
  assert typed == TrainConfig(optimizer='adamw', learning_rate=1.0, mesh=MeshConfig(fsdp=2))
  assert isinstance(typed.learning_rate, float)  # ints are fine for floats
  assert default_train_config(**dataclasses.asdict(typed)).to_dict() == config.to_dict()


def test_input_longer_than_learned_positions():
  model = models.build_model(tiny(positional='learned', max_len=8))
  params = models.init_params(model, jax.random.key(0))
  with pytest.raises(ConfigError, match='Input length 9 exceeds config.model.max_len=8'):
    model.apply({'params': params}, jax.numpy.ones((1, 9), jax.numpy.int32))
  with pytest.raises(ConfigError, match='max_len=8'):
    models.init_cache(model, 1, 16)  # a cache longer than the table is refused up front
  models.build_model(tiny(positional='rope', max_len=8)).apply(
    {'params': models.init_params(models.build_model(tiny(positional='rope', max_len=8)), jax.random.key(0))},
    jax.numpy.ones((1, 9), jax.numpy.int32),
  )  # other schemes have no table to overrun


def expected_count(cfg: ModelConfig) -> int:
  """Parameters by formula, independent of the model code."""
  d, h, kv = cfg.d_model, cfg.num_heads, cfg.kv_heads
  attention = d * h * cfg.head_dim_qk + d * kv * cfg.head_dim_qk + d * kv * cfg.head_dim_v + h * cfg.head_dim_v * d
  ffn = 3 * d * cfg.d_ff if cfg.activation == 'swiglu' else 2 * d * cfg.d_ff + cfg.d_ff + d
  norm = 2 * d if cfg.norm_type == 'layernorm' else d
  positions = cfg.max_len * d if cfg.positional == 'learned' else 0
  final_norm = norm if cfg.norm_position == 'pre' else 0
  decoder_layer = attention + ffn + 2 * norm
  total = cfg.num_decoder_layers * decoder_layer + positions + final_norm
  if cfg.kind == 'encoder_decoder':
    total += cfg.num_decoder_layers * (attention + norm)  # cross-attention
    total += cfg.num_encoder_layers * (attention + ffn + 2 * norm) + positions + final_norm
  embeddings = 1 if cfg.tie_embeddings else (3 if cfg.kind == 'encoder_decoder' else 2)
  return total + embeddings * cfg.vocab_size * d


def abstract_count(cfg: ModelConfig) -> int:
  model = models.build_model(cfg)
  return summary.count_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))


@pytest.mark.parametrize('variant,paper', [('base', 65e6), ('big', 213e6)])
def test_paper_parameter_counts(variant, paper):
  cfg = ModelConfig.from_config(translation.get_config(variant).model)
  count = abstract_count(cfg)
  assert count == expected_count(cfg)
  assert abs(count - paper) / paper < 0.05, count


@pytest.mark.parametrize(
  'overrides',
  [
    dict(d_k=32, d_v=96),
    dict(num_kv_heads=2),
    dict(num_encoder_layers=3, num_decoder_layers=1),
    dict(d_ff=1000, activation='swiglu'),
    dict(tie_embeddings=False, positional='learned'),
    dict(norm_position='pre', norm_type='rmsnorm'),
    dict(kind='decoder_only', tie_embeddings=False),
    dict(scan_layers=True),
  ],
)
def test_every_override_is_reflected_in_the_count(overrides):
  cfg = dataclasses.replace(ModelConfig.from_config(translation.get_config('tiny').model), **overrides)
  assert abstract_count(cfg) == expected_count(cfg)


def _launch(*args):
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_table_and_the_total_last():
  result = _launch(
    '--config',
    'experiments/translation.py:base',
    '--dry_run',
    '--config.model.d_k=32',
    '--config.model.num_decoder_layers=4',
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  cfg = ModelConfig.from_config(translation.get_config('base').model)
  cfg = dataclasses.replace(cfg, d_k=32, num_decoder_layers=4)
  assert lines[-1] == f'Total parameters: {expected_count(cfg):,} ({expected_count(cfg) / 1e6:.1f}M)'
  assert any(line.startswith('decoder/stack/layer_3/self_attention ') for line in lines)
  assert not any('layer_4' in line for line in lines if line.startswith('decoder'))


def test_bad_config_on_the_command_line_is_one_clear_message():
  result = _launch('--config', 'experiments/translation.py:tiny', '--dry_run', '--config.model.positional=xpos')
  assert result.returncode != 0
  assert "config.model.positional='xpos' is not one of" in result.stderr
  assert 'Traceback' not in result.stderr


def test_unknown_variant():
  with pytest.raises(
    ConfigError, match='Unknown variant .huge. of experiments/translation.py: choose one of base, big, tiny'
  ):
    translation.get_config('huge')


def test_a_model_key_added_since_a_run_started_resumes_at_its_default():
  """A workdir written before a knob existed (e.g. attention_bias, scale_embeddings) resumes when the new key
  holds its default (what the run computed); any other value is a change."""
  from transformer import workdir

  new = {'model': {'d_model': 64, 'attention_bias': False, 'scale_embeddings': True, 'rope_scaling': 'none'}}
  old = {'model': {'d_model': 64}}
  assert workdir.incompatible_changes(old, new) == []
  new['model']['attention_bias'] = True
  assert workdir.incompatible_changes(old, new) == [('model.attention_bias', '<absent>', True)]
