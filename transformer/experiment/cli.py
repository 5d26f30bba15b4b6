"""The command line: flags -> config -> `run.run`. `launch.py` and `python -m transformer.experiment` call `main`.

Light at import: the library loads when a mode runs, so `--help` stays fast."""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from transformer.experiment import run
from transformer.experiment.run import MODES

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant]; every mode but status.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and samples; default runs/<config>-<variant>.')
_MODE = flags.DEFINE_enum(
  'mode',
  'train',
  list(MODES),
  'train (resumes), eval / decode (latest checkpoint), sweep, bench, compile (for an accelerator: fits?), '
  "status (a sweep's or run's workdir), prepare (tokenize the text corpus once into its token store), "
  "export (the latest checkpoint as config.export.format: hf; --config optional, default the workdir's).",
)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Build the model abstractly, print its parameters, exit.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "Multi-host: this process's index.")


def default_workdir(config_arg: str) -> str:
  """runs/<config file stem>-<variant>, e.g. runs/translation-tiny."""
  path, _, variant = config_arg.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{stem}-{variant}' if variant else stem)


def _main(argv):
  del argv
  from transformer.config import ConfigError

  config = _CONFIG.value
  quiet_library_logs()
  if _MODE.value == 'status':  # before the library and distributed start-up: it only reads files
    _status(config)
    return
  if config is None:
    what = '--dry_run' if _DRY_RUN.value else f'--mode {_MODE.value}'
    raise app.UsageError(
      f'{what} needs --config <experiment file>[:variant], e.g. --config experiments/translation.py:tiny '
      '(only --mode status goes without one).'
    )
  try:
    if _DRY_RUN.value:
      print(run.dry_run(config))
      return
    if _MODE.value not in ('compile', 'prepare'):  # compile: one host, for devices it lacks; prepare: no JAX
      from transformer import distributed

      distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS['config']))
    run.run(config, _MODE.value, workdir, command_line_overrides())
  except ConfigError as error:  # a user's mistake: one message, no traceback
    raise app.UsageError(str(error)) from None


def _status(config):
  """--mode status: the --workdir given, or the default one of --config."""
  from transformer.config import ConfigError

  if _WORKDIR.value is None and config is None:
    raise app.UsageError('--mode status needs --workdir <the workdir of a sweep or a run>.')
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS['config']))
  try:
    run.run(config, 'status', workdir)
  except ConfigError as error:
    raise app.UsageError(str(error)) from None


def quiet_library_logs():
  """absl's own `--verbosity` / `-v` decides, when given; otherwise WARNING: the INFO lines of absl and orbax
  (hundreds per run, some over 1,000 characters) would bury the progress and eval lines."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def command_line_overrides() -> tuple[str, ...]:
  """The `--config.*` flags as config_flags parsed them, normalised to `--config.a.b=value`."""
  from transformer.experiment.overrides import render

  values = flags.FLAGS['config'].override_values
  return tuple(f'--config.{path}={render(value)}' for path, value in values.items())


def parse_flags(argv):
  """absl's flag parsing, after our check of the `--config.*` overrides: a misspelt key or a value of the
  wrong type is one message (the nearest valid key, the expected type), not a traceback."""
  from transformer.config import ConfigError
  from transformer.experiment import overrides

  argv = export_argv(argv)
  try:
    overrides.check_argv(argv)
  except ConfigError as error:
    sys.exit(f'Error: {error}')
  return app.parse_flags_with_usage(argv)


def export_argv(argv):
  """`--mode export --workdir W` without `--config`: the config of W's run (transformer/interop/saved_config.py),
  so that `--config.export.*` overrides apply to it."""
  flag = lambda name: next(
    (argv[i + 1] if a == f'--{name}' and i + 1 < len(argv) else a.partition('=')[2])
    for i, a in enumerate(argv)
    if a == f'--{name}' or a.startswith(f'--{name}=')
  )
  given = lambda name: any(a == f'--{name}' or a.startswith(f'--{name}=') for a in argv)
  if not given('mode') or flag('mode') != 'export' or given('config') or not given('workdir'):
    return argv
  from transformer.interop import saved_config

  # first: absl defines the --config.* override flags when it parses --config
  return [argv[0], f'--config={saved_config.__file__}:{os.path.abspath(flag("workdir"))}', *argv[1:]]


def main():
  app.run(_main, flags_parser=parse_flags)
