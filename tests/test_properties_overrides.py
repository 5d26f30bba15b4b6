"""Property tests for config overrides: random keys (real, misspelt, nested too deep, sections) and values
(text on the command line, Python values in a sweep) are either accepted with exactly the effect
config_flags and the sweep give them, or one ConfigError; never another exception."""

import copy
import os

import hypothesis.strategies as st
import ml_collections
import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from ml_collections import config_flags

from transformer.config import ConfigError, ModelConfig, flatten
from transformer.experiment import overrides

# Derandomized: CI runs exactly the examples a developer ran locally, never a new one nobody has seen.
settings.register_profile(
  'properties', derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile('properties')
# config_flags loads config files with a deprecated importlib call, once per example.
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'experiments', 'synthetic.py') + ':reverse'
BASE = overrides.load_config(CONFIG)
BASE_FLAT = flatten(BASE)
PATHS = sorted(BASE_FLAT)
SECTIONS = {path.rpartition('.')[0] for path in PATHS} - {''}


@st.composite
def keys(draw):
  """A real dotted key, or one a user might type by mistake."""
  path = draw(st.sampled_from(PATHS))
  section, _, leaf = path.rpartition('.')
  i = draw(st.integers(0, len(path) - 1))
  return draw(
    st.sampled_from(
      [
        path,
        path,
        path[:i] + path[i + 1 :],  # a letter left out
        path[:i] + path[i] * 2 + path[i + 1 :],  # a letter doubled
        path + '.extra',  # below a value
        section or path,  # a whole section
        leaf,  # the section left out
        path.replace('.', '..'),
        path.upper(),
      ]
    )
  )


TEXTS = st.one_of(
  st.sampled_from(
    [
      *('0', '1', '-3', '010', '0x1F', '0X1F', '-0x10', '0o7', '0b11', '1_000', ' 7 ', '+5', '2.5', '1e-3'),
      *('nan', 'inf', '-inf', 'true', 'False', 'T', 'f', 'yes', '', 'None', '(1, 2)', '[1]', "'quoted'"),
      *('rope', 'decoder_only', 'adamw', 'a=b', '\n', 'ü', '--config.model.d_ff=1'),
    ]
  ),
  st.integers(-(2**40), 2**40).map(str),
  st.floats(allow_nan=True).map(repr),
  st.text(max_size=8),
)


def _config_flags(argv):
  """What ml_collections' config_flags makes of `argv` (as launch.py parses it), or None if it refuses."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, sys_argv=argv)
  try:
    values(argv)
  except Exception:  # noqa: BLE001 -- any refusal; what matters is that check_argv refused first
    return None
  return values.config


@st.composite
def command_lines(draw):
  path, text = draw(keys()), draw(TEXTS)
  form = draw(st.sampled_from(['=', 'space', 'bare', 'no']))
  if form == 'space' and isinstance(BASE_FLAT.get(path), bool):
    form = 'bare'  # absl: a boolean flag never takes the next argument as its value
  if form == '=':
    flag_args = [f'--config.{path}={text}']
  elif form == 'space':  # `--config.a.b value`
    flag_args = [f'--config.{path}', text]
  elif form == 'bare':  # a boolean switched on
    flag_args, text = [f'--config.{path}'], 'true'
  else:
    flag_args, text = [f'--noconfig.{path}'], 'false'
  return path, text, ['launch.py', '--config', CONFIG, *flag_args]


@settings(PROFILE, max_examples=250)
@given(command_line=command_lines())
def test_command_line_overrides_are_applied_exactly_or_refused_once(command_line):
  path, text, argv = command_line
  try:
    overrides.check_argv(argv)
  except ConfigError as error:
    # A whole section is refused on purpose: config_flags would replace it by a dict, losing its other keys.
    assert path in SECTIONS or config_flags_refuses(argv), f'check_argv refused what config_flags accepts: {error}'
    return
  config = _config_flags(argv)
  assert config is not None, f'check_argv accepted {argv[3:]}, which config_flags refuses (a traceback)'
  flat, base = flatten(config), flatten(BASE)
  changed = {key for key in base if flat[key] != base[key] and flat[key] == flat[key]}  # nan != nan
  assert changed <= {path} and flat.keys() == base.keys()
  current = base[path]
  expected = overrides.parse_text(path, current, text)
  assert type(flat[path]) is type(current)
  assert flat[path] == expected or (expected != expected and flat[path] != flat[path])
  if path.startswith('model.'):  # the model's own checks: accepted, or one ConfigError
    try:
      assert getattr(ModelConfig.from_config(config.model), path[len('model.') :]) == flat[path]
    except ConfigError:
      pass


def config_flags_refuses(argv):
  return _config_flags(argv) is None


PYTHON_VALUES = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(-(2**40), 2**40),
  st.floats(allow_nan=False),
  st.text(max_size=6),
  st.tuples(st.integers()),
  st.lists(st.integers(), max_size=2),
  st.dictionaries(st.sampled_from(['d_ff', 'x']), st.integers(), max_size=1),
)


@settings(PROFILE, max_examples=250)
@given(path=keys(), value=PYTHON_VALUES)
def test_sweep_values_are_set_exactly_or_refused_once(path, value):
  """A sweep's Python values: the key's own type (an int for a float converted), or one ConfigError."""
  config = copy.deepcopy(BASE)
  try:
    overrides.set_value(config, path, value)
  except ConfigError:
    refused = True
  else:
    refused = False
  current = BASE_FLAT.get(path)
  is_int = isinstance(value, int) and not isinstance(value, bool)
  fits = path in BASE_FLAT and (type(value) is type(current) or (isinstance(current, float) and is_int))
  assert refused != fits, (path, value)
  if refused:
    assert config.to_dict() == BASE.to_dict()  # nothing half-set
    return
  got = flatten(config)
  assert type(got[path]) is type(current) and got[path] == value
  assert {k for k, v in got.items() if v != BASE_FLAT[k]} <= {path}


MIXED = ml_collections.ConfigDict(
  dict(model=dict(d_ff=48, rate=0.1, kind='x'), train=dict(eval_lengths=(16, 32), flag=True, nothing=None))
)
MIXED_PATHS = sorted(flatten(MIXED)) + ['model', 'train']


@settings(PROFILE, max_examples=150)
@given(path=st.sampled_from(MIXED_PATHS), value=PYTHON_VALUES.filter(lambda v: not isinstance(v, dict)))
def test_sweep_values_for_tuples_none_and_sections_are_set_exactly_or_refused_once(path, value):
  """Keys config_flags types in its own way (tuples, None) and whole sections: set exactly as given, or one
  ConfigError (ConfigDict's own TypeError included), the config untouched."""
  config = copy.deepcopy(MIXED)
  try:
    overrides.set_value(config, path, value)
  except ConfigError:
    assert config.to_dict() == MIXED.to_dict()
    return
  assert path not in ('model', 'train')  # a section is never replaced: its other keys would be lost
  got, current = overrides.lookup(config, path), flatten(MIXED)[path]
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)  # ConfigDict keeps a tuple key a tuple, as config_flags parses '[16]' for it
  assert got == value and (type(got) is type(value) or isinstance(got, float))
  assert {k for k, v in flatten(config).items() if v != flatten(MIXED)[k]} <= {path}
