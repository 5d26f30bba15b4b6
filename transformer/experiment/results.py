"""A sweep's results: one row per run from its metrics.jsonl, status.json and config.json, mean ± std per
variant over its finished runs with the count of the others beside it ("2/3 (1 diverged)"), written as
results.csv, results.md and the figures of plots.py (results.png; results_lengths.png for a reported
'<name>@<L>' series). The sweep's `report` metrics get a column each, with the runs' notes on values that
cannot exist (a null in metrics.jsonl: 'n/a'). Also the run status vocabulary every executor writes."""

import csv
import functools
import json
import math
import os
import re

import numpy as np

from transformer import layout
from transformer import workdir as workdir_lib
from transformer.config import did_you_mean
from transformer.experiment import plots

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
NOTES = 'eval/notes'  # metrics.jsonl's text tag: why a value of that eval row is null ('loss@512: ...; ...')
_STEP = re.compile(r' at step (\d+)')  # where NonFiniteLoss's message says the loss became NaN


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


def run_row(run, metric: str, higher_is_better: bool, report=()) -> dict:
  """One run's row: status, steps, final and best `metric`, parameters, tokens/s, wall time, the final value of
  every other eval/* tag and of each `report` metric (None where the run logged null: a value that cannot exist;
  NaN where it logged none), the notes of its last eval row when it has some, and its error."""
  status = run.status()
  records = read_metrics(run.directory)
  series = [values[metric] for values in records.values() if metric in values]
  numbers = [value for value in series if value is not None and not math.isnan(value)]
  speeds = [values['train/tokens_per_sec'] for values in records.values() if 'train/tokens_per_sec' in values]
  row = {
    'variant': run.variant,
    'seed': run.seed,
    'status': status.get('status', QUEUED),
    'steps': float(max(records)) if records else math.nan,
    'final': series[-1] if series else math.nan,
    'best': (max(numbers) if higher_is_better else min(numbers)) if numbers else math.nan,
    'params': count_params(run.directory),
    'tokens/s': float(np.mean(speeds)) if speeds else math.nan,
    'wall s': float(status.get('wall_s', math.nan)),
  }
  finals = {name: math.nan for name in report}
  for values in records.values():
    finals.update({tag: value for tag, value in values.items() if tag.startswith('eval/') and tag != NOTES})
    finals.update({name: values[name] for name in report if name in values})
  finals.pop(metric, None)  # the 'final' column
  row.update({f'final {tag}': finals[tag] for tag in sorted(finals, key=_tag_order)})
  evals = [values for values in records.values() if any(tag.startswith('eval/') for tag in values)]
  if evals and evals[-1].get(NOTES):
    row['notes'] = evals[-1][NOTES]
  row['error'] = status.get('error', '')
  return row


def _tag_order(tag: str):
  """Tags by name, those of a '<name>@<L>' series by L (64 before 128)."""
  split = plots.split_length(tag)
  return split if split else (tag, -1)


def summarize(rows: list[dict], report=()) -> list[dict]:
  """Per variant, in order of appearance: mean and std (numpy, ddof=1: the seeds are a sample; 0 for one
  seed) of every numeric column over the variant's finished runs only, and how many runs ended how. Each
  `report` metric's statistics (`report`: {name: {'mean', 'std', 'n', 'null'}}) are over the finished runs
  that have a value (n of them); 'null' counts those that logged null (no value can exist), and the mean is
  None (n/a) when only nulls were logged."""
  summaries = []
  for name in dict.fromkeys(row['variant'] for row in rows):
    mine = [row for row in rows if row['variant'] == name]
    done = [row for row in mine if row['status'] == FINISHED]
    numeric = [
      key for key in dict.fromkeys(k for row in mine for k in row) if key in _NUMERIC or key.startswith('final ')
    ]
    mean, std = {}, {}
    for key in numeric:
      values = np.array([row.get(key, math.nan) for row in done], dtype=float)
      mean[key] = float(np.mean(values)) if len(values) else math.nan
      std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if len(values) else math.nan)
    stats = {}
    for tag in report:
      stats[tag] = _statistics([row.get(f'final {tag}', math.nan) for row in done])
      mean[f'final {tag}'], std[f'final {tag}'] = stats[tag]['mean'], stats[tag]['std']
    counts = {status: sum(row['status'] == status for row in mine) for status in STATUSES}
    summaries.append(
      {
        'variant': name,
        'done': len(done),
        'runs': len(mine),
        'counts': counts,
        'mean': mean,
        'std': std,
        'report': stats,
      }
    )
  return summaries


def _statistics(values: list) -> dict:
  """Mean, std (ddof=1; 0 for one value) and count of the numbers among `values`; None for both when there is
  none and some value was null."""
  numbers = [float(v) for v in values if v is not None and not math.isnan(v)]
  nulls = sum(v is None for v in values)
  if not numbers:
    blank = None if nulls else math.nan
    return {'mean': blank, 'std': blank, 'n': 0, 'null': nulls}
  std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0
  return {'mean': float(np.mean(numbers)), 'std': std, 'n': len(numbers), 'null': nulls}


def curves(runs, rows, metric: str) -> dict[str, plots.Curves]:
  """{variant: its `metric` curves}: the band over its finished runs (plots.band) and its diverged runs apart
  (plots.diverged_curve, at the step their error names); failed, stalled and unfinished runs are not drawn."""
  finished, diverged = {}, {}
  for run, row in zip(runs, rows):
    series = {step: values[metric] for step, values in read_metrics(run.directory).items() if metric in values}
    finished.setdefault(row['variant'], [])
    diverged.setdefault(row['variant'], [])
    if row['status'] == FINISHED:
      finished[row['variant']].append(series)
    elif row['status'] == DIVERGED:
      at = _STEP.search(row.get('error', ''))
      diverged[row['variant']].append(plots.diverged_curve(series, int(at[1]) if at else None))
  return {name: plots.Curves(plots.band(finished[name]), diverged[name]) for name in finished}


def unlogged(runs, report) -> list[str]:
  """A warning for each `report` name no run logged although some run logged others of its kind (eval/ or
  train/): most likely a typo, which would otherwise show as an empty column."""
  logged = set()
  for run in runs:
    for values in read_metrics(run.directory).values():
      logged.update(values)
  warnings = []
  for name in report:
    if name not in logged and any(tag.startswith(name.split('/')[0] + '/') for tag in logged):
      hint = did_you_mean(name, sorted(logged - {NOTES}), sentence=True)
      warnings.append(
        f'Warning: no run logged {name!r}, named in config.sweep.report: a typo, or a metric these runs do not '
        f'compute.{hint}'
      )
  return warnings


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


LENGTHS_PLOT = 'results_lengths.png'


def write_results(workdir: str, runs, metric: str, higher_is_better: bool, report=()) -> list[dict]:
  """Writes results.csv, results.md and results.png for `runs`, and results_lengths.png when `report` holds
  a '<name>@<L>' series (removed when it no longer does); prints the summary table; returns the rows."""
  report = tuple(report)
  rows = [run_row(run, metric, higher_is_better, report) for run in runs]
  summaries = summarize(rows, report)
  _write_csv(os.path.join(workdir, 'results.csv'), rows, summaries, metric, report)
  lengths = plots.length_curves(summaries, report)
  lengths_path = os.path.join(workdir, LENGTHS_PLOT)
  if lengths:
    plots.plot_lengths(lengths_path, lengths)
  elif os.path.exists(lengths_path):
    os.remove(lengths_path)
  table = _markdown(rows, summaries, metric, higher_is_better, report, unlogged(runs, report), bool(lengths))
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table)
  finals = [(s['variant'], s['mean']['final'], s['std']['final']) for s in summaries]
  plots.plot_results(os.path.join(workdir, 'results.png'), metric, curves(runs, rows, metric), finals)
  print(table.split('\n## ')[0], flush=True)
  return rows


def _columns(rows, metric):
  """Display names: 'final'/'best' carry the metric's name. The error last, whichever row has notes."""
  keys = sorted(dict.fromkeys(key for row in rows for key in row), key=lambda key: key == 'error')
  names = {'final': f'final {metric}', 'best': f'best {metric}'}
  return keys, [names.get(key, key) for key in keys]


def _write_csv(path, rows, summaries, metric, report=()):
  keys, names = _columns(rows, metric)
  for name in report:  # each reported metric's count of values beside its column, in the variants' rows
    at = keys.index(f'final {name}') + 1
    keys.insert(at, f'n {name}')
    names.insert(at, f'n {name}')
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
          **{f'n {name}': summary['report'][name]['n'] for name in report},
          'variant': summary['variant'],
          'seed': stat,
          'status': count_text(summary),
          'error': '',
        }
        writer.writerow([_csv_value(line.get(key, '')) for key in keys])


def _csv_value(value):
  if value is None:
    return 'n/a'
  if isinstance(value, float):
    return '' if math.isnan(value) else repr(value)
  return str(value).replace('\n', ' / ')


def _fmt(key, value):
  if value is None:
    return 'n/a'
  if isinstance(value, float) and math.isnan(value):
    return '-'
  if key == 'params':
    return f'{int(value):,}'
  if key in ('tokens/s', 'wall s', 'steps'):
    return f'{value:,.0f}'
  return f'{value:.4g}'


def report_text(stat: dict) -> str:
  """A reported metric's summary cell: '3.412 ± 0.02 (n=3)', '3.5 (n=1)', 'n/a' (no value can exist), '-'."""
  if not stat['n']:
    return _fmt('', stat['mean'])
  spread = f' ± {stat["std"]:.4g}' if stat['n'] > 1 else ''
  return f'{stat["mean"]:.4g}{spread} (n={stat["n"]})'


def _markdown(rows, summaries, metric, higher_is_better, report=(), warnings=(), lengths=False) -> str:
  goal = 'higher' if higher_is_better else 'lower'
  finals = [s['mean']['final'] for s in summaries if not math.isnan(s['mean']['final'])]
  best = (max if higher_is_better else min)(finals) if finals else None
  summary_keys = ['final', 'best', 'params', 'tokens/s', 'wall s']
  header = ['variant', 'finished', f'final {metric}', f'best {metric}', 'params', 'tokens/s', 'wall s', *report]
  lines = [
    f'# Sweep results: {metric} ({goal} is better)',
    '',
    'Mean ± std over the finished runs of each variant; failed, stalled, diverged or unfinished runs are '
    'counted beside them, never averaged in (their rows and errors are under Runs).'
    + (' Reported metrics: their final value, over the finished runs that have one (n).' if report else ''),
    '',
    '| ' + ' | '.join(_cell(name) for name in header) + ' |',
    '|' + '---|' * len(header),
  ]
  for s in summaries:
    cells = [_cell(s['variant']), count_text(s)]
    for key in summary_keys:
      text = _fmt(key, s['mean'][key])
      if s['done'] > 1 and key in ('final', 'best', 'tokens/s', 'wall s') and not math.isnan(s['mean'][key]):
        text += f' ± {_fmt(key, s["std"][key])}'
      if key == 'final' and best is not None and s['mean'][key] == best:
        text = f'**{text}**'
      cells.append(text)
    cells += [report_text(s['report'][name]) for name in report]
    lines.append('| ' + ' | '.join(cells) + ' |')
  notes = [
    f'{variant}: {note}'
    for variant in dict.fromkeys(row['variant'] for row in rows)
    for note in dict.fromkeys(row['notes'] for row in rows if row['variant'] == variant and row.get('notes'))
  ]
  if notes:
    lines += ['', "Notes (from the runs' last evaluation):", *(f'- {_cell(note)}' for note in notes)]
  for warning in warnings:  # a paragraph each
    lines += ['', warning]
  keys, names = _columns(rows, metric)
  lines += ['', '## Runs', '', '| ' + ' | '.join(_cell(name) for name in names) + ' |', '|' + '---|' * len(names)]
  for row in rows:
    cells = [
      _fmt(k, row[k]) if row.get(k, '') is None or isinstance(row.get(k), float) else row.get(k, '') for k in keys
    ]
    lines.append('| ' + ' | '.join(_cell(cell) for cell in cells) + ' |')
  lines += ['', '![results](results.png)', '']
  if lengths:
    lines += [f'![final values against evaluation length]({LENGTHS_PLOT})', '']
  return '\n'.join(lines)


def _cell(value) -> str:
  return str(value).replace('|', '\\|').replace('\n', ' / ')
