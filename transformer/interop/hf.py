"""Hugging Face checkpoint directories (`config.json` + `*.safetensors`, sharded or not) in and out.

`import_checkpoint(directory)` -> `(ModelConfig, params)` for the families `FAMILIES` maps (GPT-2, Llama, Marian);
`export_checkpoint(model_config, params, directory)` writes what `transformers` loads with no custom code
(`AutoModelForCausalLM` / `AutoModelForSeq2SeqLM`). Tensors are read with `safetensors`' NumPy API (never pickle:
a `pytorch_model.bin` is refused). What config.model cannot express, or Hugging Face cannot, is one ConfigError
naming the setting."""

import json
import os
import shutil

import numpy as np

from transformer.config import ConfigError, ModelConfig
from transformer.interop import gpt2, llama, marian

FAMILIES = {family.MODEL_TYPE: family for family in (gpt2, llama, marian)}
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_FILE = 'tokenizer.model'  # a SentencePiece model, when the run had one
# Our token conventions (transformer/tokens.py), written into an exported config.json.
_TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def is_hf_directory(directory: str) -> bool:
  """A Hugging Face model directory: a config.json with a `model_type`."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return 'model_type' in json.load(f)


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f'{directory} has no {CONFIG_FILE}: not a Hugging Face model directory.')
  with open(path) as f:
    return json.load(f)


def family_of(hf: dict):
  model_type = hf.get('model_type')
  if model_type not in FAMILIES:
    raise ConfigError(
      f'Hugging Face model_type={model_type!r} is not imported: the families config.model expresses are '
      f'{", ".join(FAMILIES)}.'
    )
  return FAMILIES[model_type]


def model_settings(directory: str) -> dict:
  """config.model's settings for the checkpoint in `directory` (architecture and dropout rates)."""
  hf = read_config(directory)
  return family_of(hf).model_config(hf)


def read_tensors(directory: str) -> dict:
  """Every tensor of the directory's safetensors files (the index's shards, or model.safetensors, or every
  *.safetensors file) as NumPy arrays."""
  from safetensors import safe_open

  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  elif os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
    files = [WEIGHTS_FILE]
  else:
    files = sorted(name for name in os.listdir(directory) if name.endswith('.safetensors'))
  if not files:
    pickled = [name for name in os.listdir(directory) if name.endswith(('.bin', '.pt', '.pth'))]
    hint = f' ({", ".join(pickled)} is pickle, which is never loaded: save it with safe_serialization=True)'
    raise ConfigError(f'{directory} has no *.safetensors file{hint if pickled else ""}.')
  tensors = {}
  for name in files:
    with safe_open(os.path.join(directory, name), framework='np') as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def import_checkpoint(directory: str, **overrides):
  """`(ModelConfig, params)` of the Hugging Face checkpoint in `directory`: params a nested dict of NumPy arrays
  in `param_dtype`, unrolled or stacked as `scan_layers` says. `overrides` set config.model keys the checkpoint
  does not fix (dtype, attention_impl, scan_layers, dropout, ...)."""
  from flax import traverse_util

  from transformer import models

  hf = read_config(directory)
  family = family_of(hf)
  cfg = ModelConfig.from_config({**family.model_config(hf), **overrides})
  tensors = read_tensors(directory)
  flat = family.params_from_hf(tensors, cfg)
  if tensors:
    raise ConfigError(
      f'The Hugging Face {family.MODEL_TYPE} checkpoint in {directory} has tensors config.model has no place for: '
      f'{", ".join(sorted(tensors)[:5])}{" ..." if len(tensors) > 5 else ""}.'
    )
  check_shapes(cfg, flat, f'the Hugging Face checkpoint in {directory}')
  dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != 'bfloat16' else cfg.storage_dtype
  params = traverse_util.unflatten_dict({k: np.asarray(v, dtype) for k, v in flat.items()}, sep='/')
  return cfg, (models.stack_layers(params) if cfg.scan_layers else params)


def check_shapes(cfg: ModelConfig, flat: dict, what: str) -> None:
  """A ConfigError when `flat` (unrolled `a/b/c` parameters) is not exactly the parameter set of `cfg`'s model."""
  expected = expected_shapes(cfg)
  missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  wrong = [k for k in expected if k in flat and tuple(np.shape(flat[k])) != expected[k]]
  if missing or extra or wrong:
    detail = '; '.join(
      part
      for part in (
        f'missing {", ".join(missing[:3])}' if missing else '',
        f'unexpected {", ".join(extra[:3])}' if extra else '',
        ', '.join(f'{k} is {tuple(np.shape(flat[k]))}, the model has {expected[k]}' for k in wrong[:3]),
      )
      if part
    )
    raise ConfigError(f'The parameters of {what} do not fit config.model: {detail}.')


def expected_shapes(cfg: ModelConfig) -> dict:
  import dataclasses

  import jax
  from flax import traverse_util

  from transformer import models

  unrolled = dataclasses.replace(cfg, scan_layers=False, remat='none')
  model = models.build_model(unrolled)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), length=1))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}


def family_for(cfg: ModelConfig):
  """The Hugging Face family that expresses `cfg`; a setting none does is a ConfigError naming it."""
  if cfg.attention_window:
    raise ConfigError(
      f'config.model.attention_window={cfg.attention_window} has no Hugging Face equivalent among '
      f'{", ".join(FAMILIES)} (full attention only): export needs attention_window=0.'
    )
  if cfg.attention_pattern != 'dense':
    raise ConfigError(
      f'config.model.attention_pattern={cfg.attention_pattern!r} (block-sparse) has no Hugging Face equivalent '
      f'among {", ".join(FAMILIES)}: export needs attention_pattern=dense.'
    )
  if cfg.kind == 'encoder_decoder':
    return marian
  if cfg.norm_position == 'post':
    raise ConfigError(
      'config.model.norm_position=post in a decoder-only model has no Hugging Face equivalent (GPT-2 and Llama '
      'are pre-norm): export needs norm_position=pre.'
    )
  if cfg.positional == 'learned':
    return gpt2
  if cfg.positional == 'rope':
    return llama
  raise ConfigError(
    f'config.model.positional={cfg.positional!r} in a decoder-only model has no Hugging Face equivalent among '
    f'{", ".join(FAMILIES)}: export needs learned (GPT-2) or rope (Llama).'
  )


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json `export_checkpoint` writes for `cfg`."""
  family = family_for(cfg)
  config = family.hf_config(cfg)
  config.update(_TOKEN_IDS, torch_dtype='float32', dtype='float32')
  if family is marian:
    config.update(decoder_start_token_id=_TOKEN_IDS['bos_token_id'], forced_eos_token_id=None)
  return config


def export_checkpoint(cfg: ModelConfig, params, directory: str, tokenizer: str | None = None) -> str:
  """Writes `params` (our nested parameters, unrolled or scanned) as a Hugging Face directory: config.json
  and model.safetensors (float32), and `tokenizer` (a SentencePiece .model) as tokenizer.model when given."""
  from flax import traverse_util
  from safetensors.numpy import save_file

  from transformer import models

  config = hf_config(cfg)  # first: a config Hugging Face cannot express writes nothing
  flat = traverse_util.flatten_dict(models.unstack_layers(params), sep='/')
  flat = {k: np.asarray(v) for k, v in flat.items()}
  check_shapes(cfg, flat, 'the checkpoint')
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in family_for(cfg).params_to_hf(flat, cfg).items()}
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={'format': 'pt'})
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2)
  if tokenizer:
    shutil.copyfile(tokenizer, os.path.join(directory, TOKENIZER_FILE))
  return directory
