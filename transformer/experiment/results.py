"""A sweep's results: one row per run from its metrics.jsonl, status.json and config.json, mean ± std per
variant over its finished runs with the count of the others beside it ("2/3 (1 diverged)"), written as
results.csv, results.md and results.png. Also the run status vocabulary every executor writes."""

import csv
import functools
import json
import math
import os
import re

import numpy as np

from transformer import layout
from transformer import workdir as workdir_lib

# A run's status (the 'status' of its status.json). Every executor writes these and only these.
QUEUED = 'queued'  # planned, not started yet (no status.json), or waiting in a scheduler's queue
RUNNING = 'running'
FINISHED = 'finished'  # exited 0 with its last checkpoint saved
INTERRUPTED = 'interrupted'  # stopped by a signal (state saved): resumes from its checkpoint on a re-run
FAILED = 'failed'  # exited with an error: retried on a re-run
STALLED = 'stalled'  # no progress for config.sweep.stall_timeout seconds, killed: retried on a re-run
DIVERGED = 'diverged'  # the training loss became NaN or infinite: retried only if config.sweep.retry says so
STATUSES = (FINISHED, INTERRUPTED, FAILED, STALLED, DIVERGED, RUNNING, QUEUED)  # the tables' order
PROBLEMS = (FAILED, STALLED, DIVERGED)  # the outcomes config.sweep.retry chooses from

_LOG_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d')  # absl's log lines: never the error itself
# The line a diverged run's traceback ends with: transformer.loop.NonFiniteLoss's name, then its message.
_DIVERGED = re.compile(r'^(\w+\.)*NonFiniteLoss: ')
_NUMERIC = ('steps', 'final', 'best', 'params', 'tokens/s', 'wall s')


def read_metrics(directory: str) -> dict[int, dict]:
  """{step: {tag: value}} from metrics.jsonl; a step logged again after a resume keeps its latest values. A line
  that is not whole JSON is left out: one still being written (a running run, read by `--mode status`) or cut
  by a killed process."""
  path = layout.metrics_file(directory)
  by_step = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue
          by_step.setdefault(int(record.pop('step')), {}).update(record)
  return dict(sorted(by_step.items()))


def attempt_lines(path: str) -> list[str]:
  """The lines a run's log got from its last attempt (each attempt starts with a '=== ' line), as a
  terminal would show them."""
  if not os.path.exists(path):
    return []
  with open(path, errors='replace') as f:
    text = f.read().split('\n=== ')[-1]
  return [line.split('\r')[-1].rstrip() for line in text.splitlines()[1:]]


def log_tail(path: str, max_lines: int = 12) -> str:
  """The error at the end of a run's log: its last paragraph without absl log lines and, for a Python
  traceback, only the exception after the last frame; at most `max_lines` lines."""
  lines = [line for line in attempt_lines(path) if not _LOG_LINE.match(line)]
  while lines and not lines[-1]:
    lines.pop()
  paragraph = []
  for line in reversed(lines):
    if not line:
      break
    paragraph.insert(0, line)
  if any(line.startswith('Traceback') for line in paragraph):
    frames = [i for i, line in enumerate(paragraph) if line.startswith(' ')]
    paragraph = paragraph[frames[-1] + 1 :] if frames else paragraph
  if len(paragraph) > max_lines:  # a long message: its start says what, its end what to do
    paragraph = paragraph[: max_lines - 2] + ['...', paragraph[-1]]
  return '\n'.join(paragraph)


def diverged_error(path: str) -> str:
  """The NaN-loss error of the log's last attempt ('' if none), wherever it is: a run may print more after
  its traceback (orbax finishing a save)."""
  return next((line for line in reversed(attempt_lines(path)) if _DIVERGED.match(line)), '')


def last_lines(path: str, max_lines: int = 6) -> str:
  """The last non-empty lines of a run's log as written, absl lines included: what a stalled run said last."""
  return '\n'.join([line for line in attempt_lines(path) if line][-max_lines:])


@functools.lru_cache(maxsize=None)
def _count_params(model_json: str) -> int:
  import jax  # noqa: PLC0415 -- only when a table is made

  from transformer import models, setup, summary  # noqa: PLC0415

  model = models.build_model(setup.resolve_model(json.loads(model_json)))
  return summary.count_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))


def count_params(directory: str) -> float:
  """Parameters of the model a run built, from its config.json (which holds the task's vocabulary); built
  abstractly, nothing allocated. NaN when the run never got that far."""
  saved = workdir_lib.load_saved(directory)
  if saved is None:
    return math.nan
  model = saved.get('model')
  try:
    return float(_count_params(json.dumps(model, sort_keys=True)))
  except Exception:  # noqa: BLE001 -- a table with a blank beats no table
    return math.nan


def run_row(run, metric: str, higher_is_better: bool) -> dict:
  """One run's row: status, steps, final and best `metric`, parameters, tokens/s, wall time, error, and the
  final value of every other eval/* tag."""
  status = run.status()
  records = read_metrics(run.directory)
  series = [values[metric] for values in records.values() if metric in values]
  speeds = [values['train/tokens_per_sec'] for values in records.values() if 'train/tokens_per_sec' in values]
  row = {
    'variant': run.variant,
    'seed': run.seed,
    'status': status.get('status', QUEUED),
    'steps': float(max(records)) if records else math.nan,
    'final': series[-1] if series else math.nan,
    'best': (max(series) if higher_is_better else min(series)) if series else math.nan,
    'params': count_params(run.directory),
    'tokens/s': float(np.mean(speeds)) if speeds else math.nan,
    'wall s': float(status.get('wall_s', math.nan)),
  }
  finals = {}
  for values in records.values():
    finals.update({tag: value for tag, value in values.items() if tag.startswith('eval/') and tag != metric})
  row.update({f'final {tag}': value for tag, value in sorted(finals.items())})
  row['error'] = status.get('error', '')
  return row


def summarize(rows: list[dict]) -> list[dict]:
  """Per variant, in order of appearance: mean and std (numpy, ddof=1: the seeds are a sample; 0 for one
  seed) of every numeric column over the variant's finished runs only, and how many runs ended how."""
  summaries = []
  for name in dict.fromkeys(row['variant'] for row in rows):
    mine = [row for row in rows if row['variant'] == name]
    done = [row for row in mine if row['status'] == FINISHED]
    numeric = [key for key in mine[0] if key in _NUMERIC or key.startswith('final ')]
    mean, std = {}, {}
    for key in numeric:
      values = np.array([row.get(key, math.nan) for row in done], dtype=float)
      mean[key] = float(np.mean(values)) if len(values) else math.nan
      std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if len(values) else math.nan)
    counts = {status: sum(row['status'] == status for row in mine) for status in STATUSES}
    summaries.append(
      {'variant': name, 'done': len(done), 'runs': len(mine), 'counts': counts, 'mean': mean, 'std': std}
    )
  return summaries


def count_text(summary: dict) -> str:
  """'2/3 (1 diverged)': the finished runs the means are over, of all, and how the others ended."""
  others = counts_text({status: n for status, n in summary['counts'].items() if status != FINISHED})
  return f'{summary["done"]}/{summary["runs"]}' + (f' ({others})' if others else '')


def counts_text(counts: dict[str, int]) -> str:
  """'3 finished, 1 running, 1 diverged': the non-zero counts of {status: count}, in the tables' order."""
  return ', '.join(f'{counts[status]} {status}' for status in STATUSES if counts.get(status))


def error_line(status: str, error: str) -> str:
  """The one line of a run's error a listing shows: a stalled run's first (why it was killed; its log's last
  lines follow), any other's last (the exception)."""
  lines = error.strip().splitlines()
  return (lines[0] if status == STALLED else lines[-1]) if lines else ''


def write_results(workdir: str, runs, metric: str, higher_is_better: bool) -> list[dict]:
  """Writes results.csv, results.md and results.png for `runs`; prints the summary table; returns the rows."""
  rows = [run_row(run, metric, higher_is_better) for run in runs]
  summaries = summarize(rows)
  _write_csv(os.path.join(workdir, 'results.csv'), rows, summaries, metric)
  table = _markdown(rows, summaries, metric, higher_is_better)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table)
  plot(os.path.join(workdir, 'results.png'), runs, rows, summaries, metric)
  print(table.split('\n## ')[0], flush=True)
  return rows


def _columns(rows, metric):
  """Display names: 'final'/'best' carry the metric's name."""
  keys = list(dict.fromkeys(key for row in rows for key in row))
  names = {'final': f'final {metric}', 'best': f'best {metric}'}
  return keys, [names.get(key, key) for key in keys]


def _write_csv(path, rows, summaries, metric):
  keys, names = _columns(rows, metric)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(names)
    for row in rows:
      writer.writerow([_csv_value(row.get(key, '')) for key in keys])
    for summary in summaries:
      for stat in ('mean', 'std'):
        values = summary[stat]
        line = {
          **values,
          'variant': summary['variant'],
          'seed': stat,
          'status': count_text(summary),
          'error': '',
        }
        writer.writerow([_csv_value(line.get(key, '')) for key in keys])


def _csv_value(value):
  if isinstance(value, float):
    return '' if math.isnan(value) else repr(value)
  return str(value).replace('\n', ' / ')


def _fmt(key, value):
  if isinstance(value, float) and math.isnan(value):
    return '-'
  if key == 'params':
    return f'{int(value):,}'
  if key in ('tokens/s', 'wall s', 'steps'):
    return f'{value:,.0f}'
  return f'{value:.4g}'


def _markdown(rows, summaries, metric, higher_is_better) -> str:
  goal = 'higher' if higher_is_better else 'lower'
  finals = [s['mean']['final'] for s in summaries if not math.isnan(s['mean']['final'])]
  best = (max if higher_is_better else min)(finals) if finals else None
  summary_keys = ['final', 'best', 'params', 'tokens/s', 'wall s']
  header = ['variant', 'finished', f'final {metric}', f'best {metric}', 'params', 'tokens/s', 'wall s']
  lines = [
    f'# Sweep results: {metric} ({goal} is better)',
    '',
    'Mean ± std over the finished runs of each variant; failed, stalled, diverged or unfinished runs are '
    'counted beside them, never averaged in (their rows and errors are under Runs).',
    '',
    '| ' + ' | '.join(header) + ' |',
    '|' + '---|' * len(header),
  ]
  for s in summaries:
    cells = [_cell(s['variant']), count_text(s)]
    for key in summary_keys:
      text = _fmt(key, s['mean'][key])
      if s['done'] > 1 and key in ('final', 'best', 'tokens/s', 'wall s'):
        text += f' ± {_fmt(key, s["std"][key])}'
      if key == 'final' and best is not None and s['mean'][key] == best:
        text = f'**{text}**'
      cells.append(text)
    lines.append('| ' + ' | '.join(cells) + ' |')
  keys, names = _columns(rows, metric)
  lines += ['', '## Runs', '', '| ' + ' | '.join(names) + ' |', '|' + '---|' * len(names)]
  for row in rows:
    lines.append(
      '| '
      + ' | '.join(_cell(_fmt(k, row[k]) if isinstance(row.get(k), float) else row.get(k, '')) for k in keys)
      + ' |'
    )
  lines += ['', '![results](results.png)', '']
  return '\n'.join(lines)


def _cell(value) -> str:
  return str(value).replace('|', '\\|').replace('\n', ' / ')


def plot(path: str, runs, rows, summaries, metric: str) -> None:
  """Left: `metric` against step per variant, mean over its finished seeds. Right: final `metric` per
  variant with ± std error bars. Matplotlib's Agg canvas, so no display or global backend is touched."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 -- only when plotting
  from matplotlib.figure import Figure  # noqa: PLC0415

  figure = Figure(figsize=(12, max(4, 0.35 * len(summaries) + 1.5)))
  FigureCanvasAgg(figure)
  curves, bars = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
  for summary in summaries:
    name = summary['variant']
    series = [
      {step: v[metric] for step, v in read_metrics(run.directory).items() if metric in v}
      for run, row in zip(runs, rows)
      if row['variant'] == name and row['status'] == FINISHED
    ]
    series = [s for s in series if s]
    if series:
      steps = sorted(set.intersection(*(set(s) for s in series)))
      values = np.array([[s[step] for step in steps] for s in series])
      curves.plot(steps, values.mean(axis=0), marker='.', label=name)
  curves.set_xlabel('step')
  curves.set_ylabel(metric)
  curves.set_title(f'{metric} during training (mean over seeds)')
  if curves.lines:
    curves.legend(fontsize='small')
  names = [s['variant'] for s in summaries]
  means = [s['mean']['final'] for s in summaries]
  stds = [s['std']['final'] for s in summaries]
  bars.errorbar(means, range(len(names)), xerr=stds, fmt='o', capsize=4)
  bars.set_yticks(range(len(names)), names, fontsize='small')
  bars.margins(y=0.3)
  bars.invert_yaxis()
  bars.set_xlabel(f'final {metric}')
  bars.set_title('final value per variant (mean ± std)')
  figure.tight_layout()
  figure.savefig(path, dpi=110)
