"""config.train.loggers: W&B (offline, to the workdir) and MLflow (a local store) get what metrics.jsonl holds,
the run config and the eval samples, grouped by sweep and variant; a tracker that cannot start or fails is one
warning and the run goes on. Without wandb or mlflow these tests skip, except under CI=true, where they fail
(CI installs the test extra)."""

import glob
import importlib
import json
import os
import struct
import subprocess
import sys
import warnings

import pytest

from transformer import metrics, trackers
from transformer.config import ConfigError, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need(module: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    message = f'{module} is not installed (pip install -e .[test])'
    if os.environ.get('CI') == 'true':
      pytest.fail(message + ' (CI=true: the test extra installs it)')
    pytest.skip(message)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """The trackers' defaults, whatever this machine's environment says."""
  for name in ('WANDB_MODE', 'WANDB_PROJECT', 'WANDB_DIR', 'MLFLOW_TRACKING_URI', 'MLFLOW_EXPERIMENT_NAME'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('WANDB_SILENT', 'true')


def wandb_records(workdir: str) -> list:
  """Every record of the run's offline `.wandb` file: W&B's LevelDB-style log (after a 7-byte `:W&B` header,
  32 KiB blocks of chunks: 4-byte checksum, 2-byte length, 1-byte type (1 full, 2 first, 3 middle, 4 last)),
  each record a `wandb_internal_pb2.Record`."""
  from wandb.proto import wandb_internal_pb2

  (path,) = glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', '*.wandb'))
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  block, at, chunks, records = 32768, 7, b'', []
  while at + 7 <= len(data):
    if block - at % block < 7:  # a block's tail too short for a chunk header is padding
      at += block - at % block
      continue
    _, length, kind = struct.unpack('<IHB', data[at : at + 7])
    if kind == 0:
      break
    chunks += data[at + 7 : at + 7 + length]
    at += 7 + length
    if kind in (1, 4):
      records.append(wandb_internal_pb2.Record.FromString(chunks))
      chunks = b''
  return records


def wandb_history(records) -> dict:
  """{(step, tag): value} of the logged numbers (W&B's own `_step`, `_runtime`, ... left out)."""
  logged = {}
  for record in records:
    if record.WhichOneof('record_type') == 'history':
      step = record.history.step.num
      for item in record.history.item:
        key = item.key or '/'.join(item.nested_key)
        value = json.loads(item.value_json)
        if not key.startswith(('_', 'eval/samples')) and isinstance(value, (int, float)):
          logged[step, key] = float(value)
  return logged


def jsonl_numbers(workdir: str) -> dict:
  numbers = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for row in map(json.loads, f):
      numbers.update({(row['step'], k): v for k, v in row.items() if k != 'step' and isinstance(v, float)})
  return numbers


def samples_by_step(workdir: str) -> dict:
  rows = {}
  with open(os.path.join(workdir, 'samples.jsonl')) as f:
    for row in map(json.loads, f):
      rows.setdefault(row['step'], []).append(row)
  return rows


@pytest.mark.slow(15)
def test_wandb_and_mlflow_get_what_metrics_jsonl_holds_grouped_by_sweep(tmp_path):
  """The real loop, as a sweep's run (`<sweep>/<variant>/seed<s>` next to sweep.json): every number of
  metrics.jsonl at its step in both trackers, the config, the samples table of each eval, and the grouping."""
  need('wandb')
  need('mlflow')
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  from test_loop import small_config

  from transformer import loop

  sweep = tmp_path / 'pos'
  sweep.mkdir()
  (sweep / 'sweep.json').write_text('{}')
  workdir = str(sweep / 'rope' / 'seed1')
  config = small_config(4, eval_every=2, checkpoint_every=100, loggers=('jsonl', 'wandb', 'mlflow'))
  config.train.num_samples = 2
  with warnings.catch_warnings():
    warnings.simplefilter('error', trackers.TrackerWarning)  # neither may fail
    loop.train_and_evaluate(config, workdir)
  expected = jsonl_numbers(workdir)
  assert {step for step, _ in expected} == {1, 2, 3, 4} and (2, 'eval/loss') in expected
  saved_config = json.load(open(os.path.join(workdir, 'config.json')))
  samples = samples_by_step(workdir)
  assert sorted(samples) == [2, 4] and len(samples[2]) == 2
  assert not glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))  # not in loggers

  # W&B: the offline run in <workdir>/wandb
  records = wandb_records(workdir)
  assert wandb_history(records) == expected
  (run,) = [r.run for r in records if r.WhichOneof('record_type') == 'run']
  assert (run.run_group, run.job_type, run.display_name, run.project) == ('pos', 'rope', 'rope/seed1', 'transformer')
  wandb_config = {item.key: json.loads(item.value_json) for item in run.config.update}
  assert {key: wandb_config[key] for key in saved_config} == saved_config
  tables = []
  for record in records:
    if record.WhichOneof('record_type') == 'history':
      items = {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
      if 'eval/samples/path' in items:
        path = glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', 'files', items['eval/samples/path']))[0]
        table = json.load(open(path))
        tables.append((record.history.step.num, [dict(zip(table['columns'], row)) for row in table['data']]))
  assert tables == sorted(samples.items())

  # MLflow: the sweep's store, one experiment per sweep
  from mlflow.tracking import MlflowClient

  client = MlflowClient(f'sqlite:///{sweep / "mlflow.db"}')
  (found,) = client.search_runs([client.get_experiment_by_name('pos').experiment_id])
  assert found.info.run_name == 'rope/seed1' and found.info.status == 'FINISHED'
  assert (found.data.tags['variant'], found.data.tags['seed']) == ('rope', 'seed1')
  run_id = found.info.run_id
  logged = {
    (m.step, tag): m.value
    for tag in {tag for _, tag in expected}
    for m in client.get_metric_history(run_id, trackers.mlflow_key(tag))
  }
  assert logged == expected
  assert found.data.params['train.num_steps'] == '4' and found.data.params['model.d_model'] == '32'
  artifacts = client.download_artifacts(run_id, '', str(tmp_path / 'artifacts'))
  assert json.load(open(os.path.join(artifacts, 'config.json'))) == saved_config
  for step, rows in samples.items():
    table = json.load(open(os.path.join(artifacts, 'samples', f'step_{step}.json')))
    assert [dict(zip(table['columns'], row)) for row in table['data']] == rows


def test_a_tracker_that_cannot_start_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch):
  """wandb missing (an ImportError) and an MLflow store in a folder that cannot exist: one warning each, naming
  the tracker; metrics.jsonl and TensorBoard get every row."""
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError
  (tmp_path / 'file').write_text('')
  monkeypatch.setenv('MLFLOW_TRACKING_URI', f'sqlite:///{tmp_path / "file" / "mlflow.db"}')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    writer = metrics.MetricsWriter(str(tmp_path / 'run'), loggers=('jsonl', 'tensorboard', 'wandb', 'mlflow'))
    for step in range(1, 4):
      writer.write(step, {'train/loss': 1.0 / step})
    writer.samples(3, [{'step': 3, 'output': 'a'}])
    writer.close()
  messages = [str(w.message) for w in caught if issubclass(w.category, trackers.TrackerWarning)]
  assert len(messages) == 2, messages
  assert messages[0].startswith('config.train.loggers: wandb could not start: ModuleNotFoundError')
  assert 'pip install wandb' in messages[0]
  assert messages[1].startswith('config.train.loggers: mlflow could not start')
  assert list(jsonl_numbers(str(tmp_path / 'run'))) == [(1, 'train/loss'), (2, 'train/loss'), (3, 'train/loss')]
  assert writer.tensorboard


def test_a_tracker_failing_mid_run_is_one_warning_and_dropped(tmp_path, monkeypatch):
  calls = []

  class Flaky(trackers.Tracker):
    name = 'tensorboard'

    def __init__(self, info):
      pass

    def scalars(self, step, values):
      calls.append(step)
      if step == 2:
        raise OSError('No space left on device')

  monkeypatch.setitem(trackers.TRACKERS, 'tensorboard', Flaky)
  with pytest.warns(trackers.TrackerWarning) as caught:
    writer = metrics.MetricsWriter(str(tmp_path))
    for step in range(1, 5):
      writer.write(step, {'train/loss': float(step)})
    writer.close()
  assert [str(w.message) for w in caught] == [
    'config.train.loggers: tensorboard stopped: OSError: No space left on device. The run goes on without it; '
    'metrics.jsonl has every metric.'
  ]
  assert calls == [1, 2]
  assert [step for step, _ in jsonl_numbers(str(tmp_path))] == [1, 2, 3, 4]


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path):
  need('wandb')
  need('mlflow')
  from mlflow.tracking import MlflowClient

  workdir = str(tmp_path / 'run')
  for steps in ((1, 2), (3,)):  # a run, then its resume
    writer = metrics.MetricsWriter(workdir, loggers=('jsonl', 'mlflow', 'wandb'))
    for step in steps:
      writer.write(step, {'train/loss': float(step)})
    writer.close()
  ids = json.load(open(os.path.join(workdir, trackers.TRACKERS_FILE)))
  client = MlflowClient(ids['mlflow']['tracking_uri'])
  assert ids['mlflow']['tracking_uri'] == f'sqlite:///{workdir}/mlflow.db'
  assert [(m.step, m.value) for m in client.get_metric_history(ids['mlflow']['run_id'], 'train/loss')] == [
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
  ]
  (experiment,) = [e for e in client.search_experiments() if e.name == 'transformer']
  assert len(client.search_runs([experiment.experiment_id])) == 1
  runs = glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*'))
  assert len(runs) == 2 and all(f'-{ids["wandb"]}' in os.path.basename(run) for run in runs)  # one id


def test_unknown_logger_names_are_refused():
  with pytest.raises(ConfigError, match=r"unknown logger 'wandbb' \(did you mean 'wandb'\?\); choose from jsonl"):
    TrainConfig.from_config({'loggers': ('jsonl', 'wandbb')})
  with pytest.raises(ConfigError, match="must keep 'jsonl'"):
    TrainConfig.from_config({'loggers': ('tensorboard',)})
  assert TrainConfig().loggers == ('jsonl', 'tensorboard')


def test_importing_the_library_imports_no_tracker():
  code = (
    'import sys, transformer.loop, transformer.experiment.cli; '
    "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboardX') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.strip() == '[]'
