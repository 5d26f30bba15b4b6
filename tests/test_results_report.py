"""A sweep's results beyond its main metric, from hand-written run folders (no training): the loss band over
seeds (diverged runs apart), the columns of config.sweep.report with the runs' notes on values that cannot
exist, the plot against evaluation length, and report names refused when they are not metrics."""

import csv
import json
import math
import os
import re

import pytest

from transformer.config import ConfigError
from transformer.experiment import plots, results, sweep

BASE = 'experiments/synthetic.py:reverse'
NOTE = 'loss@128: learned positions end at config.model.max_len=64'
DIVERGED = 'transformer.loop.NonFiniteLoss: The training loss became nan at step 27: lower the learning rate.'


def fake_run(tmp_path, variant, seed, status, records, error='', num_steps=30):
  """A run folder as a sweep leaves it: status.json and metrics.jsonl ({step: {tag: value}}, null for None)."""
  run = sweep.Run(variant, seed, str(tmp_path / variant / f'seed{seed}'), [], num_steps)
  os.makedirs(run.directory)
  run.write_status(status=status, num_steps=num_steps, wall_s=10.0, error=error)
  with open(os.path.join(run.directory, 'metrics.jsonl'), 'w') as f:
    for step, values in records.items():
      f.write(json.dumps({'step': step, **values}) + '\n')
  return run


def losses(**by_step):
  return {int(step[1:]): {'eval/loss': value} for step, value in by_step.items()}


def test_the_band_is_mean_and_std_over_finished_seeds_at_their_common_steps_and_diverged_runs_are_apart(tmp_path):
  runs = [
    fake_run(tmp_path, 'a', 0, 'finished', losses(s10=4.0, s20=3.0, s30=2.0)),
    fake_run(tmp_path, 'a', 1, 'finished', losses(s10=5.0, s20=3.5, s30=2.5, s40=2.4)),
    fake_run(tmp_path, 'a', 2, 'finished', losses(s10=6.0, s30=3.0)),  # no step 20: step 20 is left out
    fake_run(tmp_path, 'a', 3, 'diverged', losses(s10=4.5, s20=1e9, s30=math.nan), DIVERGED),
    fake_run(tmp_path, 'a', 4, 'failed', losses(s10=0.5), 'ValueError: bad'),  # neither averaged nor drawn
    fake_run(tmp_path, 'b', 0, 'finished', losses(s10=7.0, s20=6.0)),
  ]
  rows = [results.run_row(run, 'eval/loss', higher_is_better=False) for run in runs]
  curves = results.curves(runs, rows, 'eval/loss')
  assert curves['a'].band == plots.Band(steps=[10, 30], mean=[5.0, 2.5], std=[1.0, 0.5], n=3)
  assert curves['a'].diverged == [plots.Diverged(steps=[10, 20], values=[4.5, 1e9], at_step=27)]
  assert curves['b'] == plots.Curves(plots.Band([10, 20], [7.0, 6.0], [0.0, 0.0], 1), [])
  # The y-range: the finished bands (2.0 .. 6.0 for a, 6.0 .. 7.0 for b) with 5% margins, not the 1e9.
  assert plots.y_limits(curves) == (2.0 - 0.05 * 5.0, 7.0 + 0.05 * 5.0)
  assert plots.diverged_curve({10: 3.0, 20: math.inf}) == plots.Diverged([10], [3.0], 10)  # no step given
  assert plots.band([]) == plots.Band([], [], [], 0)
  assert plots.y_limits({'c': plots.Curves(plots.band([]), curves['a'].diverged)}) is None  # nothing to clip to
  results.write_results(str(tmp_path), runs, 'eval/loss', higher_is_better=False)
  assert os.path.getsize(tmp_path / 'results.png') > 0 and not os.path.exists(tmp_path / 'results_lengths.png')


def length_runs(tmp_path):
  """sinusoidal: 3 finished seeds at lengths 64 and 128; learned: 2 finished seeds with no value at 128 (null
  and a note) and a diverged one whose values must not count."""
  final = lambda at64, at128: {'eval/loss': at64, 'eval/loss@64': at64, 'eval/loss@128': at128}
  learned = lambda at64: {**final(at64, None), 'eval/notes': NOTE}
  return [
    fake_run(tmp_path, 'sin', 0, 'finished', {10: final(5.0, 5.0), 30: final(3.0, 3.25)}),
    fake_run(tmp_path, 'sin', 1, 'finished', {30: final(3.5, 3.75)}),
    fake_run(tmp_path, 'sin', 2, 'finished', {30: final(4.0, 4.25)}),
    fake_run(tmp_path, 'learned', 0, 'finished', {30: learned(3.25)}),
    fake_run(tmp_path, 'learned', 1, 'finished', {30: {**learned(3.75), 'train/loss': 3.0}}),  # last eval row
    fake_run(tmp_path, 'learned', 2, 'diverged', {10: learned(9.0)}, DIVERGED),
  ]


def test_reported_metrics_get_mean_std_and_count_columns_with_n_a_and_the_runs_notes(tmp_path, capsys):
  runs = length_runs(tmp_path)
  report = ('eval/loss@64', 'eval/loss@128')
  results.write_results(str(tmp_path), runs, 'eval/loss', higher_is_better=False, report=report)
  markdown = open(tmp_path / 'results.md').read()
  head = '| variant | finished | final eval/loss | best eval/loss | params | tokens/s | wall s | eval/loss@64 |'
  assert head + ' eval/loss@128 |' in markdown
  assert '| sin | 3/3 | **3.5 ± 0.5** | 3.5 ± 0.5 | - | - | 10 ± 0 | 3.5 ± 0.5 (n=3) | 3.75 ± 0.5 (n=3) |' in markdown
  assert (
    '| learned | 2/3 (1 diverged) | **3.5 ± 0.3536** | 3.5 ± 0.3536 | - | - | 10 ± 0 | 3.5 ± 0.3536 (n=2) | n/a |'
    in (markdown)
  )
  assert f"Notes (from the runs' last evaluation):\n- learned: {NOTE}\n" in markdown
  # Runs: the lengths in order (64 before 128), the null as n/a, the note and error of the diverged run.
  assert f'| learned | 2 | diverged | 10 | 9 | 9 | - | - | 10 | 9 | n/a | {NOTE} | {DIVERGED} |' in markdown
  assert markdown.split('\n## Runs')[0] in capsys.readouterr().out  # the summary, notes included, printed

  table = list(csv.DictReader(open(tmp_path / 'results.csv')))
  by = {(r['variant'], r['seed']): r for r in table}
  assert [by['sin', 'mean'][k] for k in ('final eval/loss@64', 'n eval/loss@64', 'final eval/loss@128')] == [
    '3.5',
    '3',
    '3.75',
  ]
  assert [by['sin', 'std'][k] for k in ('final eval/loss@64', 'final eval/loss@128', 'n eval/loss@128')] == [
    '0.5',
    '0.5',
    '3',
  ]
  assert float(by['learned', 'std']['final eval/loss@64']) == math.sqrt(0.125)  # |3.25 - 3.75| / sqrt(2)
  assert [by['learned', stat]['final eval/loss@128'] for stat in ('mean', 'std')] == ['n/a', 'n/a']
  assert by['learned', 'mean']['n eval/loss@128'] == '0' and by['learned', '1']['final eval/loss@128'] == 'n/a'
  assert by['learned', '1']['notes'] == NOTE and by['sin', '0']['notes'] == ''
  assert by['sin', '0']['n eval/loss@64'] == ''  # counts belong to the variants' rows


def test_a_reported_name_no_run_logged_is_a_warning_not_a_crash(tmp_path, capsys):
  runs = length_runs(tmp_path)
  report = ('eval/los@64', 'train/loss', 'train/tokens_per_sec')
  results.write_results(str(tmp_path), runs, 'eval/loss', higher_is_better=False, report=report)
  warnings = [
    "Warning: no run logged 'eval/los@64', named in config.sweep.report: a typo, or a metric these runs do not "
    "compute. Did you mean 'eval/loss@64'?",
    # train/ tags were logged (one run's train/loss: no warning for it), so this one is missing too
    "Warning: no run logged 'train/tokens_per_sec', named in config.sweep.report: a typo, or a metric these runs "
    "do not compute. Did you mean 'train/loss'?",
  ]
  assert results.unlogged(runs, report) == warnings
  markdown, out = open(tmp_path / 'results.md').read(), capsys.readouterr().out
  assert f'\n\n{warnings[0]}\n\n{warnings[1]}\n\n## Runs' in markdown and markdown.split('## Runs')[0] in out
  assert results.unlogged(runs[:3], ('train/loss',)) == []  # no run logged any train/ tag: nothing to compare with
  assert '| 3/3 | **3.5 ± 0.5** | 3.5 ± 0.5 | - | - | 10 ± 0 | - | - | - |' in markdown
  assert '| 2/3 (1 diverged) | **3.5 ± 0.3536** | 3.5 ± 0.3536 | - | - | 10 ± 0 | - | 3 (n=1) | - |' in markdown
  assert not os.path.exists(tmp_path / 'results_lengths.png')  # one length of 'eval/los': no series


def test_a_reported_length_series_is_plotted_against_length_and_re_aggregation_keeps_the_outputs_current(tmp_path):
  assert plots.length_series(('eval/loss@128', 'eval/loss@64', 'eval/accuracy@64', 'train/loss', 'eval/x@y')) == {
    'eval/loss': [64, 128]
  }
  config = sweep.sweep_config(
    BASE, sweep.variant('sin', min_len=4) + sweep.variant('learned', min_len=6), seeds=(0, 1, 2), report=()
  )
  workdir = tmp_path / 'sweep'
  runs = sweep.plan(config, str(workdir))
  fakes = length_runs(workdir)  # the same folders as the plan's runs, finished at the plan's step count
  assert [r.directory for r in runs] == [f.directory for f in fakes]
  for run, fake in zip(runs, fakes):
    fake.write_status(**{**fake.status(), 'num_steps': run.num_steps})
  config.sweep.report = ('eval/loss@64', 'eval/loss@128')  # as --config.sweep.report would set it
  rows = sweep.run_sweep(config, str(workdir))  # nothing to run: it only aggregates
  summaries = results.summarize(rows, config.sweep.report)
  curves = plots.length_curves(summaries, config.sweep.report)
  assert curves == {
    'eval/loss': {
      'sin': plots.LengthCurve([64, 128], [3.5, 3.75], [0.5, 0.5], [3, 3], []),
      'learned': plots.LengthCurve([64], [3.5], [math.sqrt(0.125)], [2], [128]),
    }
  }
  assert [c.label(v) for v, c in curves['eval/loss'].items()] == ['sin (n=3)', 'learned (n=2, n/a beyond L=64)']
  assert os.path.getsize(workdir / 'results_lengths.png') > 0
  markdown = open(workdir / 'results.md').read()
  assert '![results](results.png)\n\n![final values against evaluation length](results_lengths.png)\n' in markdown
  assert json.load(open(workdir / 'sweep.json'))['report'] == ['eval/loss@64', 'eval/loss@128']
  gap = plots.LengthCurve([64, 512], [1.0, 2.0], [0.0, 0.0], [1, 1], [128, 256])
  assert gap.label('v') == 'v (n=1, n/a at L=128,256)'
  assert plots.LengthCurve([], [], [], [], [64, 128]).label('v') == 'v (no value at any L)'

  config.sweep.report = ('eval/loss@64',)  # one length left: the stale plot goes
  sweep.run_sweep(config, str(workdir))
  assert not os.path.exists(workdir / 'results_lengths.png')
  assert 'results_lengths.png' not in open(workdir / 'results.md').read()


@pytest.mark.parametrize(
  'report, message',
  [
    (('loss@64',), "config.sweep.report names 'loss@64', which is not a metric: name tags as metrics.jsonl writes"),
    (('eval/',), "names 'eval/', which is not a metric"),
    ((3,), 'names 3, which is not a metric'),
    (('eval/loss',), "names 'eval/loss', the sweep's metric, which the table already shows"),
    (('eval/loss@64', 'eval/loss@64'), "names 'eval/loss@64' twice"),
  ],
)
def test_sweep_config_and_plan_refuse_a_report_name_that_is_not_a_metric(tmp_path, report, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    sweep.sweep_config(BASE, sweep.product(min_len=[4, 6]), report=report)
  config = sweep.sweep_config(BASE, sweep.product(min_len=[4, 6]))
  config.sweep.report = report  # set after the file, as a command-line override would
  with pytest.raises(ConfigError, match=re.escape(message)):
    sweep.plan(config, str(tmp_path))


def test_sweep_config_refuses_one_name_given_as_a_string():
  message = "config.sweep.report='eval/loss@64' must be a tuple of metric names: report=('eval/loss@64',)"
  with pytest.raises(ConfigError, match=re.escape(message)):
    sweep.sweep_config(BASE, sweep.product(min_len=[4, 6]), report='eval/loss@64')
