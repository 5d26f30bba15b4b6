"""`config.train.init_from`: the step-0 parameters of a run, from a Hugging Face directory or one of our workdirs
(or its checkpoints/ folder). The model config must match the source's (a ConfigError names each differing key);
layout and regularisation keys (dtype, attention_impl, remat, scan_layers, dropout) may differ."""

import dataclasses
import os

import numpy as np

from transformer import layout
from transformer.config import ConfigError, ModelConfig
from transformer.interop import hf

# What a fine-tuning run may set apart from its source: how the same function is computed and regularised.
FREE_KEYS = ('dropout_rate', 'attention_dropout_rate', 'attention_impl', 'dtype', 'param_dtype', 'remat', 'scan_layers')


def unused_keys(cfg: ModelConfig) -> set:
  """config.model keys that change nothing in `cfg`'s model (another kind's, positions' or pattern's settings)."""
  unused = set()
  if cfg.kind == 'decoder_only':
    unused.add('num_encoder_layers')
  if cfg.positional != 'learned':
    unused.add('max_len')  # only a learned table has a length
  if cfg.positional != 'sinusoidal':
    unused.add('sinusoidal_layout')
  if cfg.positional != 'rope':
    unused |= {'rope_base', 'rope_scaling'}
  if cfg.positional != 'rope' or cfg.rope_scaling == 'none':
    unused |= {f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith('rope_') and '_' in f.name[5:]}
  if cfg.attention_pattern in ('dense', 'window'):
    unused |= {f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith('pattern_')}
  return unused


def mismatches(ours: ModelConfig, source: ModelConfig) -> list[tuple[str, object, object]]:
  """(key, our value, the source's value) for each config.model key that changes the function or the shapes."""
  free = set(FREE_KEYS) | (unused_keys(ours) & unused_keys(source))
  return [
    (f.name, getattr(ours, f.name), getattr(source, f.name))
    for f in dataclasses.fields(ModelConfig)
    if f.name not in free and getattr(ours, f.name) != getattr(source, f.name)
  ]


def check_match(ours: ModelConfig, source: ModelConfig, where: str) -> None:
  changes = mismatches(ours, source)
  if changes:
    lines = '\n'.join(f'  config.model.{key}={mine!r}: the source has {theirs!r}' for key, mine, theirs in changes)
    raise ConfigError(
      f'config.train.init_from={where} holds another model than config.model:\n{lines}\nSet these keys to the '
      "source's values (a Hugging Face directory's are `transformer.interop.hf.model_settings(dir)`)."
    )


def load(init_from: str, cfg: ModelConfig):
  """`(params, description)`: the parameters of `init_from` for a model of `cfg` (nested NumPy arrays in cfg's
  layer layout) and where they came from, for the log."""
  path = os.path.expanduser(init_from)
  if not os.path.isdir(path):
    raise ConfigError(f'config.train.init_from={init_from!r} is not a directory (a Hugging Face model or a workdir).')
  if hf.is_hf_directory(path):
    free = {key: getattr(cfg, key) for key in FREE_KEYS}
    source, params = hf.import_checkpoint(path, **free)
    check_match(cfg, source, path)
    return params, f'the Hugging Face {hf.read_config(path)["model_type"]} checkpoint in {path}'
  return _own(path, init_from, cfg)


def _own(path: str, init_from: str, cfg: ModelConfig):
  from transformer import checkpoint, models, setup, workdir

  workdir_path = path
  if os.path.basename(os.path.normpath(path)) == layout.CHECKPOINTS_DIR:
    workdir_path = os.path.dirname(os.path.normpath(path))
  saved = workdir.load_saved(workdir_path)
  if saved is None or 'model' not in saved or not os.path.isdir(layout.checkpoints_dir(workdir_path)):
    raise ConfigError(
      f'config.train.init_from={init_from!r} is neither a Hugging Face model directory (config.json with a '
      'model_type) nor a workdir of ours (config.json and checkpoints/).'
    )
  check_match(cfg, setup.resolve_model(saved['model']), init_from)
  with checkpoint.Checkpoints(layout.checkpoints_dir(workdir_path), async_save=False) as ckpts:
    params, step = ckpts.read_params()
  params = models.convert_layers(params, scanned=cfg.scan_layers)
  params = _as_numpy(params, cfg)
  return params, f'step {step} of {workdir_path}'


def _as_numpy(params, cfg):
  import jax

  return jax.tree.map(lambda x: np.asarray(x).astype(cfg.storage_dtype), params)


def place(params, running):
  """`params` (host arrays) laid out as the running parameters `running` are: sharded over the mesh (jit), or one
  copy per local device (pmap: a leading device axis); a shape that differs is a ConfigError."""
  import jax

  def put(x, target):
    x = np.asarray(x, target.dtype)
    if tuple(target.shape) != x.shape:
      if tuple(target.shape[1:]) != x.shape:
        raise ConfigError(f'config.train.init_from: a parameter is {x.shape}, the model has {target.shape}.')
      x = np.broadcast_to(x, target.shape)  # pmap's replicas
    return jax.make_array_from_callback(target.shape, target.sharding, lambda index: x[index])

  return jax.tree.map(put, params, running)
