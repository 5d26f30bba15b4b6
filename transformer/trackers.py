"""Where a run's metrics go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow (`config.train.loggers`).

One class per tracker behind one interface (`Tracker`): `scalars(step, values)` gets the numbers of every
metrics.jsonl row, `samples(step, rows)` the decoded examples of an eval (a table), `close()` ends it; the
run config (config.json's) and the run's place in a sweep (`RunInfo`) are given when it starts. The metrics
writer (`metrics.MetricsWriter`, process 0 only) makes them with `start` and keeps them going: a tracker that
cannot start or later fails (package missing, bad directory, a server refusing) is one `TrackerWarning`, and
the run goes on with the others. wandb and mlflow are imported only by the tracker that uses them.

A run of a sweep lives in `<sweep>/<variant>/seed<s>` next to `<sweep>/sweep.json` (experiment/sweep.py); the
trackers group it by that path: W&B `group=<sweep>`, `job_type=<variant>`, name `<variant>/seed<s>`; MLflow
experiment `<sweep>`, run name `<variant>/seed<s>` with tags `variant` and `seed`. A tracker run's id is kept
in `<workdir>/trackers.json`, so a resumed run (or a later --mode eval) continues the same tracker run.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import socket
import sys
import time
import uuid
import warnings

from transformer import layout
from transformer.files import write_atomic

TRACKERS_FILE = 'trackers.json'  # each tracker's run id, for resuming it


class TrackerWarning(UserWarning):
  """A tracker that could not start or stopped; the run goes on without it."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What the trackers are told about the run."""

  workdir: str  # absolute
  config: dict  # config.json's, {} when there is none
  name: str  # '<variant>/seed<s>' in a sweep, else the workdir's folder name
  sweep: str | None = None  # the sweep's folder name
  variant: str | None = None
  seed: str | None = None  # the run's folder, 'seed<s>'

  @property
  def sweep_dir(self) -> str | None:
    return os.path.dirname(os.path.dirname(self.workdir)) if self.sweep else None


def run_info(workdir: str) -> RunInfo:
  """The run in `workdir`, placed in its sweep when `<workdir>/../../sweep.json` exists."""
  workdir = os.path.abspath(workdir)
  config = {}
  if os.path.exists(layout.config_file(workdir)):
    with open(layout.config_file(workdir)) as f:
      config = json.load(f)
  variant_dir = os.path.dirname(workdir)
  sweep_dir = os.path.dirname(variant_dir)
  if os.path.exists(os.path.join(sweep_dir, 'sweep.json')):
    variant, seed = os.path.basename(variant_dir), os.path.basename(workdir)
    return RunInfo(workdir, config, f'{variant}/{seed}', os.path.basename(sweep_dir), variant, seed)
  return RunInfo(workdir, config, os.path.basename(workdir))


class Tracker:
  """The interface: every method may raise; `metrics.MetricsWriter` turns that into one warning."""

  name = ''

  def scalars(self, step: int, values: dict[str, float]) -> None:
    raise NotImplementedError

  def samples(self, step: int, rows: list[dict]) -> None:
    """An eval's decoded examples (one dict per example, the same keys in each)."""

  def close(self) -> None:
    pass


def _columns(rows: list[dict]) -> tuple[list[str], list[list]]:
  """The samples as a table: a `step` column first, values that are not plain scalars as JSON text."""
  columns = list(dict.fromkeys(key for row in rows for key in row))
  data = [[_cell(row.get(key)) for key in columns] for row in rows]
  return columns, data


def _cell(value):
  return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)


def _saved_ids(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, TRACKERS_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _save_id(workdir: str, tracker: str, value) -> None:
  ids = _saved_ids(workdir)
  ids[tracker] = value
  write_atomic(os.path.join(workdir, TRACKERS_FILE), json.dumps(ids, indent=2))


def _tensorboardx():
  """tensorboardX's events writer and protos, imported with PyTorch hidden: its package imports PyTorch when
  installed (1.0 s per process here, measured) only to accept torch tensors, which no writer here gets."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2, summary_pb2
  finally:
    if hide:
      del sys.modules['torch']
  return EventsWriter, event_pb2, summary_pb2


class TensorBoard(Tracker):
  """Scalars into a new event file in the workdir, through tensorboardX's synchronous `EventsWriter` (its
  `SummaryWriter` writes from a queue thread: a full disk would be a thread's traceback and lost events,
  here it is one error in the caller, which the metrics writer reports). Tags are metrics.jsonl's as they are."""

  name = 'tensorboard'
  _opened = 0  # this process's writers: two in one second get two files

  def __init__(self, info: RunInfo):
    EventsWriter, event_pb2, summary_pb2 = _tensorboardx()
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    TensorBoard._opened += 1
    suffix = f'.{os.getpid()}.{TensorBoard._opened}'
    self._writer = EventsWriter(os.path.join(info.workdir, 'events'), suffix)
    self._writer.flush()
    self.path = self._writer._file_name

  def scalars(self, step, values):
    if values:
      summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
      self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=summary))
      self._writer.flush()

  def close(self):
    self._writer.close()


class WandB(Tracker):
  """A Weights & Biases run, offline unless `WANDB_MODE` says otherwise, its files in `<workdir>/wandb/`
  (`wandb sync <workdir>/wandb/offline-run-*` uploads it later). The project is `WANDB_PROJECT`, else
  'transformer'."""

  name = 'wandb'

  def __init__(self, info: RunInfo):
    import wandb

    self._wandb = wandb
    run_id = _saved_ids(info.workdir).get(self.name) or uuid.uuid4().hex[:12]
    self._run = wandb.init(
      project=os.environ.get('WANDB_PROJECT') or 'transformer',
      dir=info.workdir,
      mode=None if os.environ.get('WANDB_MODE') else 'offline',
      id=run_id,
      resume='allow',
      name=info.name,
      group=info.sweep,
      job_type=info.variant,
      tags=[info.seed] if info.seed else None,
      config=info.config,
      settings=wandb.Settings(quiet=True, console='off', x_disable_stats=True),
      reinit='create_new',
    )
    _save_id(info.workdir, self.name, run_id)

  def scalars(self, step, values):
    self._run.log(values, step=step)

  def samples(self, step, rows):
    columns, data = _columns(rows)
    self._run.log({'eval/samples': self._wandb.Table(columns=columns, data=data)}, step=step)

  def close(self):
    self._run.finish()


def mlflow_key(tag: str) -> str:
  """A metrics.jsonl tag as MLflow accepts a metric name: characters outside letters, digits, `_-. /` as
  '_' (`eval/loss@512` -> `eval/loss_512`)."""
  return re.sub(r'[^\w\-. /]', '_', tag)


def _flat(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


class MLflow(Tracker):
  """An MLflow run through `MlflowClient` (no process-global active run). The tracking URI is
  `MLFLOW_TRACKING_URI`, else a local SQLite store, `sqlite:///<dir>/mlflow.db` with artifacts in
  `<dir>/mlartifacts`, where `<dir>` is the sweep's folder for a sweep's run (one store for the sweep) and
  the workdir otherwise (`mlflow ui --backend-store-uri sqlite:///<dir>/mlflow.db`). MLflow 3 refuses its
  file store (`file:./mlruns`) unless `MLFLOW_ALLOW_FILE_STORE=true`. The experiment is the sweep's name
  (`MLFLOW_EXPERIMENT_NAME`, else 'transformer', for a run outside a sweep). The config is the run's params
  (flattened keys, set when the run is created) and its `config.json` artifact; samples are
  `samples/step_<step>.json` tables."""

  name = 'mlflow'

  def __init__(self, info: RunInfo):
    from mlflow.entities import Metric, Param, RunStatus

    self._metric, self._status = Metric, RunStatus
    home = info.sweep_dir or info.workdir
    uri = os.environ.get('MLFLOW_TRACKING_URI') or f'sqlite:///{os.path.join(home, "mlflow.db")}'
    # A sweep's parallel runs share the store: one at a time creates its tables, the experiment and its run.
    with _locked(os.path.join(home, 'mlflow.lock')):
      self._start(info, uri, home, Param)
    _save_id(info.workdir, self.name, {'tracking_uri': uri, 'run_id': self.run_id})

  def _start(self, info, uri, home, Param):
    from mlflow.tracking import MlflowClient

    self.client = client = MlflowClient(uri)
    saved = _saved_ids(info.workdir).get(self.name) or {}
    run = None
    if saved.get('tracking_uri') == uri:
      try:
        run = client.get_run(saved['run_id'])
        client.update_run(run.info.run_id, status='RUNNING')
      except Exception:  # noqa: BLE001 -- a store emptied since: a new run
        run = None
    if run is None:
      experiment = info.sweep or os.environ.get('MLFLOW_EXPERIMENT_NAME') or 'transformer'
      found = client.get_experiment_by_name(experiment)
      if found is not None:
        experiment_id = found.experiment_id
      else:
        try:
          experiment_id = client.create_experiment(experiment, artifact_location=_artifacts(home, uri))
        except Exception:  # noqa: BLE001 -- another run of the sweep created it first
          experiment_id = client.get_experiment_by_name(experiment).experiment_id
      tags = {'workdir': info.workdir, 'host': socket.gethostname()}
      tags.update({key: value for key in ('variant', 'seed') if (value := getattr(info, key))})
      run = client.create_run(experiment_id, run_name=info.name, tags=tags)
      params = [Param(key, str(value)[:6000]) for key, value in _flat(info.config).items()]
      for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    self.run_id = run.info.run_id
    if info.config:
      client.log_dict(self.run_id, info.config, 'config.json')

  def scalars(self, step, values):
    now = int(time.time() * 1000)
    metrics = [self._metric(mlflow_key(tag), value, now, step) for tag, value in values.items()]
    if metrics:
      self.client.log_batch(self.run_id, metrics=metrics)

  def samples(self, step, rows):
    columns, data = _columns(rows)
    table = {column: [row[i] for row in data] for i, column in enumerate(columns)}
    self.client.log_table(self.run_id, table, f'samples/step_{step}.json')

  def close(self):
    self.client.set_terminated(self.run_id, self._status.to_string(self._status.FINISHED))


@contextlib.contextmanager
def _locked(path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _artifacts(home: str, uri: str) -> str | None:
  """Artifacts next to a local store; a remote server's own default otherwise."""
  return os.path.join(home, 'mlartifacts') if uri.startswith(('sqlite:', 'file:')) or '://' not in uri else None


TRACKERS = {'tensorboard': TensorBoard, 'wandb': WandB, 'mlflow': MLflow}


def start(loggers, workdir: str) -> list[Tracker]:
  """The trackers `loggers` names ('jsonl' is the metrics writer's own), each started; one that cannot
  start is one warning and left out."""
  names = [name for name in loggers if name in TRACKERS]
  if not names:
    return []
  info = run_info(workdir)
  started = []
  for name in names:
    try:
      started.append(TRACKERS[name](info))
    except Exception as error:  # noqa: BLE001 -- any failure of a tracker leaves the run going
      warn(name, 'could not start', error)
  return started


def warn(name: str, what: str, error: BaseException) -> None:
  hint = f' (pip install {name}, or install the [{name}] extra)' if isinstance(error, ImportError) else ''
  warnings.warn(
    f'config.train.loggers: {name} {what}: {type(error).__name__}: {error}{hint}. The run goes on without it; '
    'metrics.jsonl has every metric.',
    TrackerWarning,
    stacklevel=3,
  )
