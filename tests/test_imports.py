"""Imports point down: data and tasks need the token ids (transformer.tokens), never the model or flax."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATA_AND_TASKS = (
  'transformer.data.pipeline',
  'transformer.data.music',
  'transformer.tasks.text',
  'transformer.tasks.translation',
  'transformer.tasks.music',
  'transformer.tasks.synthetic',
)


def test_data_and_tasks_import_neither_the_model_nor_flax():
  script = '\n'.join(
    [
      'import importlib, sys',
      *(f'importlib.import_module({name!r})' for name in DATA_AND_TASKS),
      "print(sorted(m for m in sys.modules if m == 'flax' or m.startswith(('flax.', 'transformer.models'))))",
    ]
  )
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, check=True)
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout + result.stderr


def test_the_command_line_config_checks_and_sweep_status_load_no_jax():
  """`--help`, override checks, sweep planning and `--mode status` stay fast: JAX loads only when a mode runs."""
  modules = ('transformer.config', 'transformer.experiment.cli', 'transformer.experiment.sweep')
  script = '\n'.join(
    [
      'import importlib, sys',
      *(f'importlib.import_module({name!r})' for name in modules + ('transformer.experiment.status',)),
      "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))",
    ]
  )
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, check=True)
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout + result.stderr


def test_hugging_face_import_and_export_run_without_torch_or_transformers(tmp_path):
  """transformer/interop reads and writes safetensors with NumPy: PyTorch and transformers are test-only extras."""
  script = f"""
import sys
import jax
from transformer import models
from transformer.config import ModelConfig
from transformer.interop import export, hf, init
cfg = ModelConfig(kind='decoder_only', vocab_size=16, num_decoder_layers=1, d_model=8, d_ff=16, num_heads=2,
  positional='rope', norm_position='pre', norm_type='rmsnorm', activation='swiglu', scale_embeddings=False)
hf.export_checkpoint(cfg, models.init_params(models.build_model(cfg), jax.random.key(0)), {str(tmp_path)!r})
hf.import_checkpoint({str(tmp_path)!r})
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))
"""
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, check=True)
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout + result.stderr
