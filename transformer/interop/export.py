"""`--mode export`: a workdir's latest checkpoint in another library's format (`config.export.format`):
`hf` writes `<workdir>/export/hf/` (config.json + model.safetensors, and the run's SentencePiece model as
tokenizer.model when it has one), which `transformers` loads with no custom code."""

import os

from transformer import layout
from transformer.config import EXPORT_DEFAULTS, ConfigError, section_settings

FORMATS = ('hf',)
EXPORT_DIR = 'export'


def export_dir(workdir: str, fmt: str = 'hf') -> str:
  return os.path.join(workdir, EXPORT_DIR, fmt)


def run_export(config, workdir: str) -> str:
  """Exports the latest checkpoint of `workdir`; returns the directory written. The model is the one the
  workdir's config.json records (the vocabulary the task gave it), else `config.model`."""
  from transformer import checkpoint, setup
  from transformer import workdir as workdir_lib
  from transformer.interop import hf

  settings = section_settings(config, 'export', EXPORT_DEFAULTS)
  if settings['format'] not in FORMATS:
    raise ConfigError(f'config.export.format={settings["format"]!r} is not one of: {", ".join(FORMATS)}.')
  saved = workdir_lib.load_saved(workdir)
  model_config = setup.resolve_model(saved['model'] if saved and 'model' in saved else config.model)
  hf.hf_config(model_config)  # a model Hugging Face cannot express: the error before anything is read
  if not layout.checkpoint_steps(workdir):
    raise ConfigError(f'No checkpoint in {layout.checkpoints_dir(workdir)} to export: train first (--mode train).')
  with checkpoint.Checkpoints(layout.checkpoints_dir(workdir), async_save=False) as ckpts:
    params, step = ckpts.read_params()
  out = export_dir(workdir, settings['format'])
  hf.export_checkpoint(model_config, params, out, tokenizer_file(config))
  print(f'Step {step} of {workdir} exported as a Hugging Face {hf.family_for(model_config).MODEL_TYPE} model to {out}')
  return out


def tokenizer_file(config) -> str | None:
  """The SentencePiece model of the run's task (built as training builds it: from the cache), or None for a task
  without one (synthetic, music)."""
  if 'task' not in config:
    return None
  from transformer import tasks

  tokenizer = getattr(tasks.get_task(config), 'tokenizer', None)
  path = getattr(tokenizer, 'path', None)
  return path if path and os.path.isfile(path) else None
