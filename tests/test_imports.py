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
