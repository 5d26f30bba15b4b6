"""Tasks: each builds its data iterators (and later its metrics and decoding) from the config."""

from transformer.config import ConfigError

TASKS = ('copy', 'reverse')


def get_task(config):
  if config.task in TASKS:  # the synthetic tasks
    from transformer.tasks.synthetic import SyntheticTask
    return SyntheticTask(config)
  raise ConfigError(f'config.task={config.task!r} is not one of: {", ".join(TASKS)}.')
