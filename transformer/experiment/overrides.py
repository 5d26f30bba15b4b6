"""Config files and `--config.a.b=v` overrides, checked with messages a user can act on.

ml_collections' config_flags applies the overrides, but on its own a misspelt key ends in a traceback
and a value of the wrong type in `invalid literal for int()`. `check_argv` runs first and turns both into
one message naming the key, the nearest valid key or the expected type. The sweep uses the same checks
for the override sets of its variants.
"""

import importlib.util
import os
import re
import traceback

import ml_collections
from absl import flags
from ml_collections.config_flags import tuple_parser

from transformer.config import ConfigError, did_you_mean, flatten

_OVERRIDE = re.compile(r'^--?(no)?config\.([^=]+)(?:=(.*))?$', re.DOTALL)
_TRUE, _FALSE = ('true', 't', '1'), ('false', 'f', '0')  # what absl's boolean parser accepts


def resolve_path(path: str, near: str | None = None) -> str:
  """`path` from the working directory if it is there; else, when `near` (the file naming it, e.g. a sweep
  file naming its base) is given, from `near`'s folder or the nearest parent folder holding it, so
  'experiments/text.py' named in experiments/ablations/norm.py is found wherever the command runs."""
  if os.path.isabs(path) or os.path.exists(path) or near is None:
    return os.path.abspath(path)
  folder = os.path.dirname(os.path.abspath(near))
  while True:
    candidate = os.path.join(folder, path)
    if os.path.exists(candidate):
      return candidate
    if os.path.dirname(folder) == folder:
      return os.path.abspath(path)
    folder = os.path.dirname(folder)


def load_config(spec: str, near: str | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict of `'file.py[:arg]'`, as `--config file.py[:arg]` would load it (`near`: see resolve_path)."""
  path, _, arg = spec.partition(':')
  path = resolve_path(path, near)
  if not os.path.isfile(path):
    raise ConfigError(f'Config file {path} does not exist (from {spec!r}).')
  name = 'config_file_' + re.sub(r'\W', '_', os.path.splitext(os.path.basename(path))[0])
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, 'get_config', None)):
      raise ConfigError(f'Config file {path} defines no get_config(): add one that returns a ConfigDict.')
    return module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # the file's own bug: one message naming its line, not a traceback through importlib
    raise ConfigError(_config_file_error(path, spec, e)) from None


def _config_file_error(path: str, spec: str, error: Exception) -> str:
  if isinstance(error, SyntaxError) and error.filename == path:
    where = f'at line {error.lineno}'
  else:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == path]
    where = f'at line {frames[-1].lineno} ({(frames[-1].line or "").strip()})' if frames else 'while loading'
  return f'Config file {path} failed {where} (from {spec!r}): {type(error).__name__}: {error}. Fix the file.'


def lookup(config, path: str):
  """The value at dotted `path`; an unknown key is a ConfigError naming the nearest valid key."""
  node, walked = config, []
  for key in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      raise ConfigError(_unknown(config, path, walked, key, node))
    node = node[key]
    walked.append(key)
  return node


def _unknown(config, path, walked, key, node):
  where = 'config.' + '.'.join(walked) if walked else 'config'
  if not isinstance(node, ml_collections.ConfigDict):
    return f'Unknown key config.{path}: {where} is a value, not a section.'

  def under(near):  # the rest of the path under the near key, if it exists there: config.modle.d_ff -> model.d_ff
    rest = path.split('.')[len(walked) + 1 :]
    section = node[near]
    if rest and isinstance(section, ml_collections.ConfigDict) and '.'.join(rest) in flatten(section):
      return 'config.' + '.'.join(walked + [near] + rest)
    return 'config.' + '.'.join(walked + [near])

  paths = list(flatten(config))
  tails = {p.rsplit('.', 1)[-1]: p for p in paths}
  hint = (
    did_you_mean(key, node.keys(), show=under, sentence=True)
    # e.g. `--config.num_heads`: the same name elsewhere (`config.model.num_heads`)
    or did_you_mean(key, tails, show=lambda tail: 'config.' + tails[tail], sentence=True)
    or did_you_mean(path, paths, show='config.{}'.format, sentence=True)
  )
  return f'Unknown key config.{path}.{hint} Valid keys in {where}: {", ".join(node.keys())}.'


def _type_name(value) -> str:
  return {
    bool: 'a bool (true or false)',
    int: 'an int',
    float: 'a float',
    str: 'a string',
    tuple: "a tuple, e.g. '(1, 2)'",
  }[type(value)]


def _refuse_section(path: str, current, how: str):
  # config_flags and ConfigDict would replace the whole section: every key not named is lost.
  if isinstance(current, ml_collections.ConfigDict):
    keys = list(current.keys())
    example = f'config.{path}.{keys[0]}' if keys else f'config.{path}.<key>'
    raise ConfigError(
      f'config.{path} is a section, not a value: set its keys one by one ({how.format(example)}); '
      f'its keys: {", ".join(keys)}.'
    )


def parse_text(path: str, current, text: str):
  """The command-line `text` for config.`path` as the type of its `current` value, parsed as config_flags
  parses it (absl's parsers, its tuple parser); a ConfigError if it is not one, or if `path` is a whole
  section. Other types config_flags parses in its own way (None) pass through."""
  _refuse_section(path, current, '--{}=...')
  if type(current) not in (bool, int, float, str, tuple):
    return text
  try:
    if isinstance(current, tuple):
      return tuple_parser.TupleParser().parse(text)
    if isinstance(current, bool):
      if text.lower() not in _TRUE + _FALSE:
        raise ValueError(text)
      return text.lower() in _TRUE
    if isinstance(current, int):  # absl's rule: decimal, 0x hex, 0o octal (not int(text, 0): '010', '0b1')
      return flags.IntegerParser().parse(text)
    if isinstance(current, float):
      return float(text)
    return text
  except ValueError:
    raise ConfigError(
      f'--config.{path}={text}: config.{path} must be {_type_name(current)} (the config has {current!r}).'
    ) from None


def check_value(path: str, current, value):
  """A Python `value` for config.`path` (a sweep's override), converted like config_flags would: an int
  where a float is expected is fine, anything else of the wrong type (None included) or a whole section is
  a ConfigError."""
  _refuse_section(path, current, "'{}': value")
  if value is None and current is not None:  # ConfigDict takes None for any field, a tuple's too
    raise ConfigError(f"config.{path}=None: give a value like the config's {current!r}.")
  if type(current) not in (bool, int, float, str):
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if type(value) is not type(current):
    raise ConfigError(f'config.{path}={value!r} must be {_type_name(current)} (the config has {current!r}).')
  return value


def render(value) -> str:
  """`value` as command-line text that config_flags parses back to it."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return repr(value) if isinstance(value, float) else str(value)


def set_value(config, path: str, value):
  """Sets config.`path` (which must exist) to `value` checked against its current type."""
  value = check_value(path, lookup(config, path), value)
  *parents, key = path.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  try:
    node[key] = value
  except TypeError as error:  # a type check_value leaves to ConfigDict (tuples, other objects)
    raise ConfigError(f'config.{path}={value!r}: {error}') from None


def split_argv(argv) -> tuple[str | None, list[tuple[str, str | None, int]]]:
  """(the `--config` file argument, [(override path, its text or None if bare, its index in argv)])."""
  config_arg, found, i = None, [], 1
  while i < len(argv):
    arg = argv[i]
    if arg == '--':
      break
    if arg in ('--config', '-config') and i + 1 < len(argv):
      config_arg, i = argv[i + 1], i + 2
      continue
    if arg.startswith(('--config=', '-config=')):
      config_arg = arg.split('=', 1)[1]
    match = _OVERRIDE.match(arg)
    if match:
      negated, path, text = match.groups()
      found.append((path, 'false' if negated else text, i))
    i += 1
  return config_arg, found


def check_argv(argv) -> None:
  """Loads the config file `argv` names and checks every `--config.*` override against it: a ConfigError
  for an unknown key (naming the nearest valid one) or a value of the wrong type, or the file's own
  ConfigError. Other failures to load are left to config_flags, which reports them next."""
  config_arg, found = split_argv(argv)
  if not config_arg:
    return
  try:
    config = load_config(config_arg)
  except ConfigError:  # e.g. an unknown variant: the file's own clear message
    raise
  except Exception:  # noqa: BLE001 -- config_flags loads it next and reports the error itself
    return
  for path, text, index in found:
    current = lookup(config, path)
    if _OVERRIDE.match(argv[index]).group(1) and (not isinstance(current, bool) or '=' in argv[index]):
      raise ConfigError(
        f'{argv[index].partition("=")[0]}: only a boolean is negated, as --noconfig.<key> without a value; '
        f'config.{path} has {current!r}: use --config.{path}=<value>.'
      )
    if text is None:  # `--config.flag` alone: a boolean, or absl takes the next argument as the value
      if isinstance(current, bool):
        continue
      if index + 1 >= len(argv):
        raise ConfigError(f'--config.{path} needs a value: --config.{path}=<value> (the config has {current!r}).')
      text = argv[index + 1]
    parse_text(path, current, text)
