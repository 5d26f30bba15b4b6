"""The config of `--mode export --workdir W` given without `--config`: W's config.json (what the run trained
with), with a `config.export` section, so that `--config.export.format=...` overrides it.

    python launch.py --workdir runs/x --mode export   # the CLI passes --config=<this file>:runs/x
"""

import json
import os

import ml_collections

from transformer.config import ConfigError, default_export_config


def get_config(workdir=None):
  path = os.path.join(workdir or '', 'config.json')
  if not workdir or not os.path.isfile(path):
    raise ConfigError(f'{path} does not exist: --mode export without --config reads the config of the --workdir run.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if 'export' not in config:
    config.export = default_export_config()
  return config
