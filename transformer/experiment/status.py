"""`launch.py --mode status --workdir <dir>`: a sweep's runs at a glance, from their files and the scheduler.

One row per variant x seed of the sweep's sweep.json: its state, the step reached, the latest train loss and
sweep metric, attempts, and on SLURM the job's requeues, id and live squeue state; then the count per state
and each problem's error line. A workdir without sweep.json is one run: one line. Reads only; never starts
JAX nor writes a file, so it is safe while the sweep runs."""

import dataclasses
import json
import math
import os
import time

from transformer import layout
from transformer import workdir as workdir_lib
from transformer.config import ConfigError
from transformer.experiment import results, slurm, sweep

SWEEP_FILE = 'sweep.json'  # what run_sweep writes in a sweep's workdir
_LIVE = ('RUNNING',)  # squeue states in which the job's training runs; other states in the queue wait


@dataclasses.dataclass
class Row:
  variant: str
  seed: int
  state: str  # one of results.STATUSES
  step: int | None  # the newest logged or checkpointed step
  num_steps: int | None
  train_loss: float | None
  metric: tuple[int, float] | None  # (step, value) of the sweep's metric's latest value
  attempts: int
  executor: str  # 'local' or 'slurm'
  requeues: int = 0
  max_requeues: int | None = None
  job: str = ''
  scheduler: str = ''  # squeue's state of the job, or its recorded status once squeue no longer knows it
  note: str = ''  # the error line of a problem, a requeue cap reached, a job or process gone


@dataclasses.dataclass
class SweepStatus:
  workdir: str
  metric: str
  rows: list[Row]
  scheduler_error: str = ''  # squeue failed: the states are as recorded


def sweep_status(workdir: str) -> SweepStatus:
  """The rows of a sweep's runs, in the sweep's order (variants, then seeds)."""
  with open(os.path.join(workdir, SWEEP_FILE)) as f:
    spec = json.load(f)
  runs = [  # only their directories and status files are read: no command, and the steps come from status.json
    sweep.Run(v['name'], int(seed), os.path.join(workdir, sweep.directory_name(v['name']), f'seed{seed}'), [], 0)
    for v in spec['variants']
    for seed in spec['seeds']
  ]
  statuses = [run.status() for run in runs]
  states, scheduler_error = None, ''
  if any(status.get('executor') == 'slurm' for status in statuses):
    try:
      states = slurm.queue()
    except slurm.SlurmError as error:  # e.g. looked at from a machine without SLURM: what the files say
      scheduler_error = str(error)
  rows = [_row(run, status, spec['metric'], states) for run, status in zip(runs, statuses)]
  return SweepStatus(workdir, spec['metric'], rows, scheduler_error)


def _latest(records: dict[int, dict], tag: str) -> tuple[int, float] | None:
  return next(((step, values[tag]) for step, values in reversed(records.items()) if tag in values), None)


def _newest_step(directory: str, records: dict) -> int | None:
  steps = [step for step in (max(records, default=None), slurm.latest_step(directory)) if step is not None]
  return max(steps, default=None)


def _row(run: sweep.Run, status: dict, metric: str, states: dict[str, str] | None) -> Row:
  records = results.read_metrics(run.directory)
  loss = _latest(records, 'train/loss')
  state = status.get('status', results.QUEUED)
  row = Row(
    variant=run.variant,
    seed=run.seed,
    state=state,
    step=_newest_step(run.directory, records),
    num_steps=status.get('num_steps'),
    train_loss=loss[1] if loss else None,
    metric=_latest(records, metric),
    attempts=int(status.get('attempts', 0)),
    executor=status.get('executor', 'local'),
  )
  if state in results.PROBLEMS or status.get('error'):  # an interrupted SLURM run says why it was not requeued
    row.note = results.error_line(state, status.get('error', ''))
  if row.executor == 'slurm':
    _scheduler(row, status, states)
  elif state == results.RUNNING and 'pid' in status and not _alive(int(status['pid'])):
    # The sweep died without recording how its child ended (e.g. SIGKILL); a re-run resumes the run.
    row.state = results.INTERRUPTED
    row.note = f'process {status["pid"]} ended without recording an outcome; re-running the sweep resumes it'
  return row


def _scheduler(row: Row, status: dict, states: dict[str, str] | None) -> None:
  """The SLURM columns, and the state corrected by the queue: a queued run whose job runs is running, and a
  queued or running one whose job left the queue failed (as the next sweep command records it)."""
  row.requeues, row.max_requeues, row.job = (
    int(status.get('requeues', 0)),
    status.get('max_requeues'),
    str(status.get('job_id', '')),
  )
  if states is None:  # squeue failed
    row.scheduler = '?'
    return
  row.scheduler = states.get(row.job, row.state)
  if row.state in (results.QUEUED, results.RUNNING):
    if slurm.in_queue(row.job, states):
      row.state = results.RUNNING if states[row.job] in _LIVE else results.QUEUED
    else:
      row.state, row.note = results.FAILED, slurm.lost_job_reason(row.job, states.get(row.job))
  cap = slurm.requeue_cap_reached(status)
  if cap is not None:
    row.note = f'requeue cap {cap} reached: {status.get("error", "")}'.strip()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0: only asks whether the process exists
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


# ---------------------------------------------------------------------------------------------------
# Rendering.


def _number(value: float | None) -> str:
  return '-' if value is None else f'{value:.4g}'


def _cells(row: Row, metric: str, with_slurm: bool) -> list[str]:
  step = '-' if row.step is None else str(row.step)
  cells = [row.variant, str(row.seed), row.state, f'{step}/{"?" if row.num_steps is None else row.num_steps}']
  cells.append(_number(row.train_loss))
  if metric != 'train/loss':
    cells.append('-' if row.metric is None else f'{_number(row.metric[1])} @{row.metric[0]}')
  cells.append(str(row.attempts))
  if with_slurm:
    if row.executor != 'slurm':
      return cells + ['-', '-', '-']
    cap = '' if row.max_requeues is None else f'/{row.max_requeues}'
    cells += [f'{row.requeues}{cap}', row.job, row.scheduler]
  return cells


def render(status: SweepStatus) -> str:
  """The table, the count per state, and one line per run with a note (its error, a requeue cap reached)."""
  with_slurm = any(row.executor == 'slurm' for row in status.rows)
  header = ['variant', 'seed', 'state', 'step', 'train/loss']
  header += [status.metric] if status.metric != 'train/loss' else []
  header += ['attempts'] + (['requeues', 'job', 'scheduler'] if with_slurm else [])
  table = [header] + [_cells(row, status.metric, with_slurm) for row in status.rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  lines = ['  '.join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
  counts = {state: sum(row.state == state for row in status.rows) for state in results.STATUSES}
  lines.append(f'{len(status.rows)} runs: {results.counts_text(counts)}')
  lines += [f'{row.variant}/seed{row.seed} {row.state}: {row.note}' for row in status.rows if row.note]
  if status.scheduler_error:
    lines.append(f'squeue failed, states as recorded: {status.scheduler_error}')
  return '\n'.join(lines)


def run_line(directory: str) -> str:
  """One run's workdir (no sweep.json) as one line: its state from its checkpoints and metrics, the step
  reached, the latest train loss and eval."""
  from transformer import summary  # noqa: PLC0415 -- its eval line's format; it imports JAX for its tables

  records = results.read_metrics(directory)
  saved = workdir_lib.load_saved(directory) or {}
  num_steps = saved.get('train', {}).get('num_steps')
  checkpoint, step = slurm.latest_step(directory), _newest_step(directory, records)
  loss = _latest(records, 'train/loss')
  if checkpoint is not None and checkpoint == num_steps:
    state = results.FINISHED
  elif loss is not None and not math.isfinite(loss[1]):
    state = results.DIVERGED
  else:
    state = f'unfinished (last checkpoint {"none" if checkpoint is None else checkpoint})'
  parts = [f'{directory}: {state}', f'step {"-" if step is None else step}/{num_steps or "?"}']
  if loss is not None:
    parts.append(f'train loss {_number(loss[1])}')
  evals = [step for step, values in records.items() if any(tag.startswith('eval/') for tag in values)]
  if evals:
    parts.append(summary.eval_line(evals[-1], records[evals[-1]]))
  if state not in (results.FINISHED, results.DIVERGED):  # running or stopped: how fresh its files are says which
    parts.append(f'last written {_age(directory)} ago')
  return ', '.join(parts)


def _age(directory: str) -> str:
  names = [layout.METRICS_FILE, layout.CHECKPOINTS_DIR, layout.CONFIG_FILE]
  times = [os.path.getmtime(os.path.join(directory, n)) for n in names if os.path.exists(os.path.join(directory, n))]
  seconds = time.time() - max(times, default=time.time())
  return (
    f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.0f} min' if seconds < 7200 else f'{seconds / 3600:.0f} h'
  )


def status_text(directory: str) -> str:
  """What `--mode status` prints for `directory`: a sweep's table or one run's line."""
  if not os.path.isdir(directory):
    raise ConfigError(f'--workdir {directory}: no such directory; give the workdir of a sweep or a run.')
  if os.path.exists(os.path.join(directory, SWEEP_FILE)):
    return render(sweep_status(directory))
  known = (layout.CONFIG_FILE, layout.METRICS_FILE, layout.CHECKPOINTS_DIR)
  if not any(os.path.exists(os.path.join(directory, name)) for name in known):
    raise ConfigError(
      f'--workdir {directory} is neither a sweep (no {SWEEP_FILE}) nor a run (no config.json, metrics.jsonl or '
      'checkpoints/): give the --workdir a sweep or a run was started with.'
    )
  return run_line(directory)
