"""Run an experiment: flags -> config -> run.

    python launch.py --config experiments/translation.py:base --dry_run
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and samples go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Build the model abstractly, print its parameters, exit.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from transformer import run  # after flag parsing: keeps --help fast
  from transformer.config import ConfigError
  config = _CONFIG.value
  try:
    if _DRY_RUN.value:
      logging.set_verbosity(logging.WARNING)  # no backend-discovery chatter around the table
      print(run.dry_run(config))
      return
    run.run(config, _MODE.value, _WORKDIR.value)
  except ConfigError as error:  # a user's mistake: one message, no traceback
    raise app.UsageError(str(error)) from None


if __name__ == '__main__':
  app.run(main)
