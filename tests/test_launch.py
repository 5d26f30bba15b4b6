"""launch.py's `--config.*` overrides (clear errors for unknown keys and wrong types) and the workdir's
resume rule (refuse a config the checkpoints do not fit; allow run-length changes)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import synthetic  # noqa: E402
from transformer import loop, setup, workdir  # noqa: E402
from transformer.config import ConfigError  # noqa: E402
from transformer.experiment import overrides  # noqa: E402

CONFIG = 'experiments/synthetic.py:reverse'


def launch(*args):
  return subprocess.run(
    [sys.executable, 'launch.py', '--config', CONFIG, *args, '--dry_run'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_unknown_override_is_one_message_naming_the_nearest_key():
  result = launch('--config.model.num_head=3')
  assert result.returncode == 1
  assert 'Unknown key config.model.num_head. Did you mean config.model.num_heads?' in result.stderr
  assert 'Traceback' not in result.stderr + result.stdout


def test_dry_run_refuses_a_data_setting_the_corpus_never_reads():
  result = subprocess.run(
    [
      sys.executable,
      'launch.py',
      '--config',
      'experiments/text.py:tiny',
      '--config.data.train_files=my.txt',
      '--dry_run',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert "config.data.train_files='my.txt' would be ignored: config.data.corpus='bible' does not read it." in (
    result.stderr
  )
  assert 'Traceback' not in result.stderr + result.stdout


def test_wrong_type_is_one_message_naming_the_type():
  result = launch('--config.model.num_heads=abc')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    'Error: --config.model.num_heads=abc: config.model.num_heads must be an int (the config has 4).'
  )
  assert 'Traceback' not in result.stderr + result.stdout


def test_valid_overrides_reach_the_config():
  result = launch('--config.model.d_model', '48', '--noconfig.model.tie_embeddings')
  assert result.returncode == 0, result.stderr
  assert 'd_model=48' in result.stdout
  assert 'target_embedding' in result.stdout  # untied: a separate target embedding exists


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--config.modle.d_ff=1', 'Did you mean config.model.d_ff?'),  # misspelt section, rest of the path kept
    ('--config.num_heads=2', 'Did you mean config.model.num_heads?'),  # section left out
    ('--config.train.sed=1', 'Did you mean config.train.seed?'),
    ('--config.model.dropout_rate=high', 'config.model.dropout_rate must be a float (the config has 0.0)'),
    ('--config.model.tie_embeddings=maybe', 'config.model.tie_embeddings must be a bool (true or false)'),
    ('--config.model.num_heads=2.5', 'config.model.num_heads must be an int'),
  ],
)
def test_check_argv_errors(flag, message):
  with pytest.raises(ConfigError) as error:
    overrides.check_argv(['launch.py', '--config', CONFIG, flag])
  assert message in str(error.value)


def test_check_argv_accepts_what_config_flags_accepts():
  overrides.check_argv(
    [
      'launch.py',
      f'--config={CONFIG}',
      '--config.train.learning_rate=1',  # int for a float
      '--config.model.tie_embeddings',
      '--noconfig.model.scan_layers',
      '--config.model.d_ff',
      '96',
      '--config.model.kind=decoder_only',
      '--config.model.tie_embeddings=false',
    ]
  )


def test_render_round_trips_through_parse_text():
  config = synthetic.get_config('reverse')
  for path, value in [
    ('model.dropout_rate', 1e-05),
    ('model.tie_embeddings', False),
    ('model.d_model', 48),
    ('model.positional', 'rope'),
    ('train.learning_rate', 0.1),
  ]:
    parsed = overrides.parse_text(path, overrides.lookup(config, path), overrides.render(value))
    assert parsed == value and type(parsed) is type(value)


# --- the resume rule


def test_incompatible_changes_follow_the_allow_list():
  old = {
    'task': 'reverse',
    'model': {'d_model': 32, 'vocab_size': 32, 'remat': 'none'},
    'data': {'seq_len': 12, 'beam_size': 4},
    'train': {'num_steps': 10, 'eval_every': 5, 'seed': 0, 'mesh': {'data': -1}},
  }
  new = json.loads(json.dumps(old))
  new['train'].update(num_steps=20, eval_every=10, mesh={'data': 2})
  new['model'].update(vocab_size=40, remat='full')
  new['data']['beam_size'] = 1
  assert workdir.incompatible_changes(old, new) == []
  new.update(task='copy', extra=1)
  new['model']['d_model'] = 64
  new['data']['seq_len'] = 16
  new['train']['seed'] = 1
  assert workdir.incompatible_changes(old, new) == [
    ('data.seq_len', 12, 16),
    ('extra', '<absent>', 1),
    ('model.d_model', 32, 64),
    ('task', 'reverse', 'copy'),
    ('train.seed', 0, 1),
  ]


def test_without_checkpoints_config_json_is_replaced(tmp_path):
  config = small_config(2)
  workdir.save_config(config, str(tmp_path))
  config.model.d_model = 48  # no checkpoints: nothing to resume, so nothing to refuse
  workdir.save_config(config, str(tmp_path))
  assert json.load(open(tmp_path / 'config.json'))['model']['d_model'] == 48


def small_config(num_steps):
  config = synthetic.get_config('reverse')
  # vocab_size: the task sets the model's vocabulary (32) whatever the config says
  config.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, vocab_size=99)
  config.data.update(num_eval=16, max_len=8, seq_len=12)
  config.train.update(
    num_steps=num_steps, batch_size=8, log_every=1, eval_every=100, checkpoint_every=100, warmup_steps=2
  )
  return config


def test_resume_refuses_model_and_task_changes_and_allows_more_steps(tmp_path):
  """The loop checks before it restores anything (test_sweep's sweep also meets the refusal through launch.py)."""
  run = str(tmp_path / 'run')
  workdir.save_config(small_config(2), run, setup.resolve(small_config(2), vocab_size=32).model_config)
  assert json.load(open(os.path.join(run, 'config.json')))['model']['vocab_size'] == 32  # the model's, as built
  os.makedirs(os.path.join(run, 'checkpoints', '2'))  # what a trained run leaves; never read: refused first
  wider = small_config(2)
  wider.model.d_model = 48
  with pytest.raises(ConfigError) as error:
    loop.train_and_evaluate(wider, run)
  assert str(error.value).startswith(f'Cannot resume {run} with this config')
  assert '\n  config.model.d_model: 32 -> 48\nUse a new --workdir' in str(error.value)
  other_task = small_config(2)
  other_task.task = 'copy'
  with pytest.raises(ConfigError, match=r"\n  config\.task: 'reverse' -> 'copy'\n"):
    loop.train_and_evaluate(other_task, run)
  longer = small_config(3)  # more steps and another eval interval: allowed, and recorded
  longer.train.eval_every = 3
  workdir.save_config(longer, run)
  saved = json.load(open(os.path.join(run, 'config.json')))
  assert saved['train']['num_steps'] == 3 and saved['train']['eval_every'] == 3


def test_a_sweep_file_outside_sweep_mode_is_refused():
  from experiments.ablations import norm
  from transformer.experiment import run

  with pytest.raises(ConfigError, match='This config is a sweep: run it with --mode sweep'):
    run.run(norm.get_config(), 'train', '/nonexistent')


def test_compilation_cache_takes_jax_variables_unless_ours_is_set(monkeypatch, tmp_path):
  """The tests' launch.py runs share the session's cache and its threshold through JAX's own variables."""
  import jax

  from transformer.experiment import run

  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  before = {name: getattr(jax.config, name) for name in names}
  settings = lambda: tuple(getattr(jax.config, name) for name in names)
  try:
    monkeypatch.delenv('TRANSFORMER_COMPILATION_CACHE', raising=False)
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
    monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.25')
    run.enable_compilation_cache()
    assert settings() == (str(tmp_path / 'jax'), 0.25)
    monkeypatch.setenv('TRANSFORMER_COMPILATION_CACHE', str(tmp_path / 'ours'))
    monkeypatch.delenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')
    run.enable_compilation_cache()
    assert settings() == (str(tmp_path / 'ours'), 1.0)
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
