"""`ModelConfig` and `TrainConfig`: the one description of a model and of its training, validated with
messages a user can act on.

`config.model` and `config.train` in an experiment file are `ConfigDict`s with exactly these fields
(`default_model_config()` and `default_train_config()` build them from the dataclasses, so the two never
drift apart). The engine converts each once (`setup.resolve`) and passes the typed object down.
"""

import dataclasses
import difflib
import math
from typing import Any

import ml_collections

from transformer.tokens import FIRST_FREE_ID

KINDS = ('encoder_decoder', 'decoder_only')
POSITIONAL = ('sinusoidal', 'learned', 'rope', 'alibi', 'none')
NORM_POSITIONS = ('post', 'pre')
NORM_TYPES = ('layernorm', 'rmsnorm')
ACTIVATIONS = ('relu', 'gelu', 'gelu_exact', 'silu', 'swiglu')  # gelu: tanh approximation (GPT-2's)
SINUSOIDAL_LAYOUTS = ('interleaved', 'split')
ROPE_SCALINGS = ('none', 'llama3')
ATTENTION_IMPLS = ('reference', 'xla', 'cudnn', 'splash', 'flash', 'auto')
ATTENTION_PATTERNS = ('dense', 'window', 'strided', 'fixed', 'bigbird')
REMAT = ('none', 'full', 'dots')
DTYPES = ('float32', 'bfloat16', 'float16')
OPTIMIZERS = ('adam', 'adamw')
PARALLELISM = ('jit', 'pmap')
LOGGERS = ('jsonl', 'tensorboard', 'wandb', 'mlflow')  # config.train.loggers: transformer/trackers.py
MESH_AXES = ('data', 'fsdp', 'tensor')


class ConfigError(ValueError):
  """A bad setting: the message names the key and what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters; names follow Vaswani et al. (2017) where the paper has one."""

  kind: str = 'encoder_decoder'
  vocab_size: int = 37000
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  d_model: int = 512
  d_ff: int = 2048
  num_heads: int = 8
  d_k: int = 0  # 0: d_model // num_heads
  d_v: int = 0  # 0: d_model // num_heads
  num_kv_heads: int = 0  # 0: num_heads; fewer gives grouped-query, 1 multi-query attention
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  positional: str = 'sinusoidal'
  sinusoidal_layout: str = 'interleaved'  # the paper's sin/cos pairs; 'split': all sines, then all cosines (Marian)
  scale_embeddings: bool = True  # token embeddings times sqrt(d_model) (paper, 3.4); GPT-2 and Llama do not scale
  attention_bias: bool = False  # biases on the query/key/value/output projections (GPT-2, Marian)
  norm_position: str = 'post'
  norm_type: str = 'layernorm'
  norm_epsilon: float = 1e-6
  activation: str = 'relu'
  tie_embeddings: bool = True
  attention_window: int = 0  # 0: full attention; k: each query sees the k latest keys (itself included)
  attention_impl: str = 'auto'
  # Block-sparse self-attention (transformer/patterns.py): `window` is attention_window's sliding window;
  # strided / fixed / bigbird cut rows into blocks of pattern_block tokens and keep some block pairs.
  attention_pattern: str = 'dense'
  pattern_block: int = 64
  pattern_stride: int = 4  # strided / fixed: blocks per stride (Child et al.'s l = stride * block)
  pattern_summary: int = 1  # fixed: summary blocks per chunk (their c = summary * block)
  pattern_local: int = 3  # bigbird: window blocks (odd: the query's block in the middle)
  pattern_global: int = 2  # bigbird: global blocks at the start of the row
  pattern_random: int = 3  # bigbird: random key blocks per query block, a fixed draw per layer
  rope_base: float = 10000.0
  # 'llama3': Llama 3.1's frequency scaling for long contexts (transformer/layers.py rope_frequencies)
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  max_len: int = 512
  dtype: str = 'auto'  # compute; auto: bfloat16 on GPU/TPU, float32 on CPU
  param_dtype: str = 'float32'  # storage
  remat: str = 'none'
  scan_layers: bool = False

  def __post_init__(self):
    _choice('kind', self.kind, KINDS)
    _choice('positional', self.positional, POSITIONAL)
    _choice('norm_position', self.norm_position, NORM_POSITIONS)
    _choice('norm_type', self.norm_type, NORM_TYPES)
    _choice('activation', self.activation, ACTIVATIONS)
    _choice('sinusoidal_layout', self.sinusoidal_layout, SINUSOIDAL_LAYOUTS)
    _choice('rope_scaling', self.rope_scaling, ROPE_SCALINGS)
    _choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _choice('attention_pattern', self.attention_pattern, ATTENTION_PATTERNS)
    _choice('remat', self.remat, REMAT)
    _choice('dtype', self.dtype, DTYPES + ('auto',))
    _choice('param_dtype', self.param_dtype, DTYPES)
    for key in ('vocab_size', 'd_model', 'd_ff', 'num_heads', 'max_len', 'num_decoder_layers', 'rope_original_max_len'):
      _positive(key, getattr(self, key))
    if self.kind == 'encoder_decoder':
      _positive('num_encoder_layers', self.num_encoder_layers)
    for key in ('d_k', 'd_v', 'num_kv_heads', 'attention_window'):
      if getattr(self, key) < 0:
        raise ConfigError(f'config.model.{key}={getattr(self, key)} must be >= 0 (0 means the default).')
    for key in ('dropout_rate', 'attention_dropout_rate'):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ConfigError(f'config.model.{key}={getattr(self, key)} must be in [0, 1).')
    # NaN fails every comparison, so check finiteness too
    for key in ('rope_base', 'norm_epsilon', 'rope_scaling_factor', 'rope_low_freq_factor', 'rope_high_freq_factor'):
      if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
        raise ConfigError(f'config.model.{key}={getattr(self, key)} must be a positive finite number.')
    if self.vocab_size <= FIRST_FREE_ID:
      raise ConfigError(
        f'config.model.vocab_size={self.vocab_size} leaves no id for tokens: ids 0-{FIRST_FREE_ID - 1} are '
        f'PAD, BOS and EOS, so it must be > {FIRST_FREE_ID}.'
      )
    if (not self.d_k or not self.d_v) and self.d_model % self.num_heads:
      raise ConfigError(
        f'config.model.d_model={self.d_model} is not divisible by config.model.num_heads='
        f'{self.num_heads}: change one of them, or set config.model.d_k and config.model.d_v.'
      )
    if self.num_heads % self.kv_heads:
      raise ConfigError(
        f'config.model.num_heads={self.num_heads} is not divisible by config.model.num_kv_heads='
        f'{self.num_kv_heads}: pick num_kv_heads among {_divisors(self.num_heads)}.'
      )
    self._check_pattern()
    if self.rope_scaling == 'llama3' and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ConfigError(
        f'config.model.rope_high_freq_factor={self.rope_high_freq_factor} must be > '
        f'config.model.rope_low_freq_factor={self.rope_low_freq_factor} (rope_scaling=llama3).'
      )
    if self.positional == 'rope' and self.head_dim_qk % 2:
      raise ConfigError(f'positional=rope rotates pairs of features: config.model.d_k={self.head_dim_qk} must be even.')

  def _check_pattern(self):
    pattern, window = self.attention_pattern, self.attention_window
    if pattern == 'window' and not window:
      raise ConfigError('attention_pattern=window needs config.model.attention_window > 0 (its width in tokens).')
    if pattern in ('strided', 'fixed', 'bigbird') and window:
      raise ConfigError(
        f'attention_pattern={pattern} has its own local blocks: set config.model.attention_window=0 '
        '(or attention_pattern=window for a sliding window).'
      )
    for key in ('pattern_block', 'pattern_stride', 'pattern_summary', 'pattern_local'):
      _positive(key, getattr(self, key))
    for key in ('pattern_global', 'pattern_random'):
      if getattr(self, key) < 0:
        raise ConfigError(f'config.model.{key}={getattr(self, key)} must be >= 0.')
    if self.pattern_summary > self.pattern_stride:
      raise ConfigError(
        f'config.model.pattern_summary={self.pattern_summary} must be <= pattern_stride={self.pattern_stride} '
        '(the summary blocks lie inside each chunk of pattern_stride blocks).'
      )
    if pattern == 'bigbird' and self.pattern_random and self.scan_layers:
      raise ConfigError(
        'attention_pattern=bigbird draws its random blocks per layer, and a scanned stack runs one layer '
        'program for all: set config.model.scan_layers=False or config.model.pattern_random=0.'
      )

  @property
  def head_dim_qk(self) -> int:
    return self.d_k or self.d_model // self.num_heads

  @property
  def head_dim_v(self) -> int:
    return self.d_v or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def compute_dtype(self):
    import jax.numpy as jnp  # here, not at the top: reading configs (sweep planning, --mode status) needs no JAX

    from transformer import platform

    if self.dtype == 'auto':  # CPUs compute bfloat16 matmuls slowly in XLA; accelerators twice as fast
      return jnp.dtype(jnp.float32 if platform.is_cpu() else jnp.bfloat16)
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self):
    import jax.numpy as jnp

    return jnp.dtype(self.param_dtype)

  @classmethod
  def from_config(cls, config: Any) -> 'ModelConfig':
    """From a `ConfigDict` or mapping; unknown keys are an error naming the nearest valid key."""
    return _from_mapping(cls, config, 'config.model')


def default_model_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model` with every field at its default, then `overrides` (validated)."""
  return ml_collections.ConfigDict(dataclasses.asdict(ModelConfig.from_config(overrides)))


def _from_mapping(cls, config: Any, prefix: str):
  """`cls` (a config dataclass) from a `ConfigDict` or mapping: missing keys take their defaults, an unknown
  key is an error naming the nearest valid one, a value of the wrong type names the expected type, and a
  field that is itself a config dataclass (`TrainConfig.mesh`) is read the same way from a nested mapping."""
  values = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in values:
    if key not in fields:
      hint = did_you_mean(key, fields, show=f'{prefix}.{{}}'.format, sentence=True)
      raise ConfigError(f'Unknown key {prefix}.{key}.{hint} Valid keys: {", ".join(fields)}.')
  for key, value in values.items():
    expected = fields[key].type
    if dataclasses.is_dataclass(expected):
      if isinstance(value, expected):
        continue
      if not hasattr(value, 'keys'):
        raise ConfigError(f'{prefix}.{key}={value!r} must be a mapping of {", ".join(expected.__dataclass_fields__)}.')
      values[key] = _from_mapping(expected, value, f'{prefix}.{key}')
    elif expected is float and isinstance(value, int) and not isinstance(value, bool):
      values[key] = float(value)
    elif expected is tuple:  # config.json holds tuples as lists; the dataclass checks the items and says how
      values[key] = tuple(value) if isinstance(value, list) else value
    elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
      raise ConfigError(f'{prefix}.{key}={value!r} must be of type {expected.__name__}.')
  return cls(**values)


# `config.compile` (`--mode compile`, transformer/experiment/aot.py): every experiment file has the section,
# so that `--config.compile.target=...` overrides it.
COMPILE_DEFAULTS = dict(
  target='v5e-8',  # one name, or several separated by commas ('v5e-8,v5p-8,v6e-8')
  slices=1,  # TPU multislice: 'data' spans the slices
  mesh_search=False,  # try every data x fsdp x tensor factorisation of the target, remat on and off
  steps='train,eval,decode',  # which programs to compile
)


def default_compile_config(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**COMPILE_DEFAULTS, **overrides})


# `config.export` (`--mode export`, transformer/interop/export.py): the latest checkpoint in another format.
EXPORT_DEFAULTS = dict(format='hf')  # 'hf': a Hugging Face directory (config.json + model.safetensors)


def default_export_config(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**EXPORT_DEFAULTS, **overrides})


def section_settings(config, section: str, defaults: dict) -> dict:
  """`defaults` updated by `config.<section>` (e.g. `config.bench`); a misspelt key is an error naming the
  nearest one."""
  given = dict(config[section]) if section in config else {}
  for key in given:
    if key not in defaults:
      hint = did_you_mean(key, defaults, show=f'config.{section}.{{}}'.format, sentence=True)
      raise ConfigError(f'Unknown key config.{section}.{key}.{hint} Valid keys: {", ".join(defaults)}.')
  return {**defaults, **given}


def _choice(key, value, choices, prefix='config.model'):
  if value not in choices:
    raise ConfigError(f'{prefix}.{key}={value!r} is not one of: {", ".join(choices)}.')


def _positive(key, value, prefix='config.model'):
  if value <= 0:
    raise ConfigError(f'{prefix}.{key}={value} must be a positive integer.')


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.train.mesh`: devices along each axis of the ('data', 'fsdp', 'tensor') mesh (jit only).
  One axis may be -1: all devices the others leave. Whether the sizes fit the devices is checked when
  the mesh is made (`parallel.make_mesh`), where the device count is known."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    if sum(size == -1 for size in sizes.values()) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
      given = ', '.join(f'config.train.mesh.{axis}={size}' for axis, size in sizes.items())
      raise ConfigError(
        f'{given}: each mesh axis must be a positive size, and at most one may be -1 (all remaining devices).'
      )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training engine's settings. The checks that need the devices (the batch against its shards, the
  mesh against the device count) are the runner's (`parallel.make_runner`)."""

  num_steps: int = 1000
  batch_size: int = 32  # global, in sequences
  optimizer: str = 'adam'  # 'adam': the paper's rsqrt warmup; 'adamw': warmup + cosine
  learning_rate: float = 1.0  # adam: multiplies the paper's schedule; adamw: the peak rate
  warmup_steps: int = 4000
  weight_decay: float = 0.0  # adamw only; never on norms and biases
  label_smoothing: float = 0.1
  z_loss: float = 0.0  # coefficient of log(Z)^2 (PaLM); 0 disables
  grad_clip: float = 0.0  # global-norm clipping; 0 disables
  grad_accum_steps: int = 1  # micro-batches per step, accumulated inside the jitted step
  seed: int = 0
  parallelism: str = 'jit'  # 'jit': sharded over the mesh; 'pmap': classic data parallelism
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  log_every: int = 50
  eval_every: int = 500
  eval_lengths: tuple = ()  # at every eval, also the loss on the eval set cut into windows of each length
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  num_samples: int = 3  # eval examples decoded and logged at every eval (0: none)
  decode_examples: int = 32  # --mode decode: eval examples decoded into the workdir
  peak_flops: float = 0.0  # per device, for MFU; 0: the platform's table, measured on CPU
  log_batch_digests: bool = False  # each process logs a hash of every row it feeds (workdir/batches/)
  init_from: str = ''  # a Hugging Face directory or a workdir/checkpoint of ours: the step-0 parameters (fine-tuning)
  loggers: tuple = ('jsonl', 'tensorboard')  # where metrics go: also 'wandb', 'mlflow' (docs/training.md#loggers)

  def __post_init__(self):
    prefix = 'config.train'
    _choice('optimizer', self.optimizer, OPTIMIZERS, prefix)
    _choice('parallelism', self.parallelism, PARALLELISM, prefix)
    for key in ('num_steps', 'batch_size', 'grad_accum_steps', 'log_every', 'eval_every', 'checkpoint_every'):
      _positive(key, getattr(self, key), prefix)
    for key in ('warmup_steps', 'keep_checkpoints', 'num_samples', 'decode_examples'):
      if getattr(self, key) < 0:
        raise ConfigError(f'{prefix}.{key}={getattr(self, key)} must be >= 0.')
    for key in ('learning_rate', 'weight_decay', 'z_loss', 'grad_clip', 'peak_flops'):
      if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
        raise ConfigError(
          f'{prefix}.{key}={getattr(self, key)} must be a finite number >= 0 (0 disables where that applies).'
        )
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f'{prefix}.label_smoothing={self.label_smoothing} must be in [0, 1).')
    lengths = self.eval_lengths
    if not isinstance(lengths, tuple) or not all(type(n) is int and n > 0 for n in lengths):
      raise ConfigError(
        f'{prefix}.eval_lengths={lengths!r} must be a tuple of positive whole numbers of tokens, e.g. '
        f"--{prefix}.eval_lengths='(64,128,256)' (or () for none)."
      )
    if len(set(lengths)) < len(lengths):
      raise ConfigError(f'{prefix}.eval_lengths={lengths!r} names a length twice: list each length once.')
    self._check_loggers()

  def _check_loggers(self):
    loggers = self.loggers
    if isinstance(loggers, str) or not all(isinstance(name, str) for name in loggers):
      raise ConfigError(f"config.train.loggers={loggers!r} must be a tuple of names, e.g. ('jsonl', 'wandb').")
    for name in loggers:
      if name not in LOGGERS:
        hint = did_you_mean(name, LOGGERS)
        raise ConfigError(f'config.train.loggers: unknown logger {name!r}{hint}; choose from {", ".join(LOGGERS)}.')
    if 'jsonl' not in loggers:
      raise ConfigError(
        f"config.train.loggers={loggers!r} must keep 'jsonl': metrics.jsonl is the run's record, which the "
        'run summary, sweep results and --mode status read.'
      )

  @classmethod
  def from_config(cls, config: Any) -> 'TrainConfig':
    """From a `ConfigDict` or mapping (`mesh` a nested one); unknown keys are an error naming the nearest."""
    return _from_mapping(cls, config, 'config.train')


def default_train_config(**overrides) -> ml_collections.ConfigDict:
  """`config.train` with every field at its default, then `overrides` (validated: a misspelt key is refused)."""
  return ml_collections.ConfigDict(dataclasses.asdict(TrainConfig.from_config(overrides)))


def nearest(name: str, choices) -> str | None:
  """The choice closest to a misspelt `name`, for "did you mean" hints; None when nothing is close."""
  near = difflib.get_close_matches(name, list(choices), n=1)
  return near[0] if near else None


def did_you_mean(name: str, choices, show=repr, sentence: bool = False) -> str:
  """The hint for a misspelt `name`: " (did you mean 'x'?)", or with `sentence` " Did you mean x?";
  '' when no choice is close. `show` renders the nearest choice (default: quoted)."""
  near = nearest(name, choices)
  if near is None:
    return ''
  return f' Did you mean {show(near)}?' if sentence else f' (did you mean {show(near)}?)'


def flatten(tree, prefix: str = '') -> dict:
  """A nested dict or ConfigDict as one level: {'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key in tree.keys():
    value = tree[key]
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def pick_variant(arg, variants, default: str, file: str) -> str:
  """The variant an experiment file's `get_config(arg)` was asked for; an unknown one names the valid ones."""
  variant = arg or default
  if variant not in variants:
    raise ConfigError(f'Unknown variant {variant!r} of {file}: choose one of {", ".join(variants)}.')
  return variant
