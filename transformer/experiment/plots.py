"""A sweep's figures: results.png (the metric during training per variant, mean over its finished seeds with a
± std band, diverged runs drawn apart; and the final value per variant) and results_lengths.png (a reported
'<name>@<L>' series against L). The numbers each figure shows come from pure functions (`band`,
`diverged_curve`, `y_limits`, `length_series`, `length_curves`) that tests check; drawing only draws them.
Matplotlib's Agg canvas, imported when drawing, so no display or global backend is touched."""

import math
import re
from typing import NamedTuple

import numpy as np

_SERIES = re.compile(r'^(?P<name>.+)@(?P<length>\d+)$')  # 'eval/loss@256' -> ('eval/loss', 256)


class Band(NamedTuple):
  """A variant's curve: at each step every averaged seed logged, the mean and std (ddof=1; 0 for one seed)."""

  steps: list[int]
  mean: list[float]
  std: list[float]
  n: int  # the seeds averaged


class Diverged(NamedTuple):
  """A diverged run's curve up to its last finite value, and the step where it diverged (its error's step, or
  the last finite one when the error does not say)."""

  steps: list[int]
  values: list[float]
  at_step: int | None


class Curves(NamedTuple):
  band: Band
  diverged: list[Diverged]


def band(series: list[dict[int, float]]) -> Band:
  """Mean and std over seeds of `series` ({step: value} per seed, finished runs only) at the steps all of them
  logged: a step some seed lacks (it resumed, or logged at other steps) is left out rather than averaged over
  fewer seeds, so the band never mixes counts."""
  series = [s for s in series if s]
  if not series:
    return Band([], [], [], 0)
  steps = sorted(set.intersection(*(set(s) for s in series)))
  values = np.array([[s[step] for step in steps] for s in series], dtype=float).reshape(len(series), len(steps))
  std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(steps))
  return Band(steps, values.mean(axis=0).tolist(), std.tolist(), len(series))


def diverged_curve(series: dict[int, float], at_step: int | None = None) -> Diverged:
  """A diverged run's {step: value} up to (not including) its first non-finite value."""
  steps, values = [], []
  for step in sorted(series):
    value = series[step]
    if value is None or not math.isfinite(value):
      break
    steps.append(step)
    values.append(float(value))
  return Diverged(steps, values, at_step if at_step is not None else (steps[-1] if steps else None))


def y_limits(curves: dict[str, Curves], margin: float = 0.05) -> tuple[float, float] | None:
  """The y-range of the curves panel: the finished runs' bands, and below them whatever a diverged run reached
  first; never a diverged run's blow-up above them, which would flatten every other curve. None (matplotlib's
  own range) when no variant has a finished curve."""
  bands = [(m - s, m + s) for c in curves.values() for m, s in zip(c.band.mean, c.band.std)]
  finished = [(lo, hi) for lo, hi in bands if math.isfinite(lo) and math.isfinite(hi)]  # a null is no value
  if not finished:
    return None
  low = min([lo for lo, _ in finished] + [v for c in curves.values() for d in c.diverged for v in d.values])
  high = max(hi for _, hi in finished)
  pad = margin * (high - low) or margin * abs(high) or margin
  return low - pad, high + pad


def split_length(tag: str) -> tuple[str, int] | None:
  """'eval/loss@256' -> ('eval/loss', 256); None for a tag without an evaluation length."""
  match = _SERIES.match(tag)
  return (match['name'], int(match['length'])) if match else None


def length_series(report) -> dict[str, list[int]]:
  """The reported names that form a series over evaluation lengths: {'eval/loss': [64, 128, 256]} from
  'eval/loss@64', 'eval/loss@128', 'eval/loss@256' (at least two lengths of one name), lengths ascending."""
  lengths = {}
  for split in filter(None, map(split_length, report)):
    lengths.setdefault(split[0], set()).add(split[1])
  return {name: sorted(found) for name, found in lengths.items() if len(found) > 1}


class LengthCurve(NamedTuple):
  """One variant's final metric against evaluation length: the lengths with a value (mean, std, count over
  its finished seeds) and those without one (learned positions past max_len, or never logged)."""

  lengths: list[int]
  mean: list[float]
  std: list[float]
  n: list[int]
  missing: list[int]

  def label(self, variant: str) -> str:
    """'learned (n=3, n/a beyond L=64)'."""
    if not self.lengths:
      return f'{variant} (no value at any L)'
    text = f'{variant} (n={max(self.n)}'
    if self.missing and min(self.missing) > max(self.lengths):
      text += f', n/a beyond L={max(self.lengths)}'
    elif self.missing:
      text += f', n/a at L={",".join(str(length) for length in self.missing)}'
    return text + ')'


def length_curves(summaries: list[dict], report) -> dict[str, dict[str, LengthCurve]]:
  """{series name: {variant: LengthCurve}} for each series of `length_series(report)`, from the summaries'
  `report` statistics ({name: {'mean', 'std', 'n'}} per variant, see results.summarize)."""
  curves = {}
  for name, lengths in length_series(report).items():
    curves[name] = {}
    for summary in summaries:
      points = [(length, summary['report'][f'{name}@{length}']) for length in lengths]
      have = [(length, stat) for length, stat in points if stat['n']]
      curves[name][summary['variant']] = LengthCurve(
        [length for length, _ in have],
        [stat['mean'] for _, stat in have],
        [stat['std'] for _, stat in have],
        [stat['n'] for _, stat in have],
        [length for length, stat in points if not stat['n']],
      )
  return curves


def _figure(width, height):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 -- only when plotting
  from matplotlib.figure import Figure  # noqa: PLC0415

  figure = Figure(figsize=(width, height))
  FigureCanvasAgg(figure)
  return figure


def _colors():
  import matplotlib  # noqa: PLC0415

  return [style['color'] for style in matplotlib.rcParams['axes.prop_cycle']]


def plot_results(path: str, metric: str, curves: dict[str, Curves], finals: list[tuple[str, float, float]]) -> None:
  """Left: `metric` against step per variant, the mean over its finished seeds with a ± std band and the seed
  count in the legend; each diverged run a thin dashed line up to its last finite value and an 'x' where it
  diverged (at the top edge when that is above the range). Right: `finals` (variant, mean, std) as error bars."""
  figure = _figure(12, max(4, 0.35 * len(finals) + 1.5))
  left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
  limits = y_limits(curves)
  colors = _colors()
  for i, (name, curve) in enumerate(curves.items()):
    color = colors[i % len(colors)]
    b = curve.band
    if b.steps:
      mean, std = np.array(b.mean), np.array(b.std)
      left.plot(b.steps, mean, marker='.', color=color, label=f'{name} (n={b.n})')
      left.fill_between(b.steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    for j, d in enumerate(c for c in curve.diverged if c.steps):
      left.plot(d.steps, d.values, '--', linewidth=0.8, color=color, label=f'{name} (diverged)' if j == 0 else None)
      y = d.values[-1] if limits is None else min(d.values[-1], limits[1])
      left.plot([d.at_step], [y], 'x', color=color, markersize=8, clip_on=False)
  if limits is not None:
    left.set_ylim(*limits)
  left.set_xlabel('step')
  left.set_ylabel(metric)
  left.set_title(f'{metric} during training\nmean over finished seeds, band: ± 1 std over seeds', fontsize='medium')
  if left.get_legend_handles_labels()[0]:
    left.legend(fontsize='small')
  names = [name for name, _, _ in finals]
  right.errorbar([m for _, m, _ in finals], range(len(names)), xerr=[s for _, _, s in finals], fmt='o', capsize=4)
  right.set_yticks(range(len(names)), names, fontsize='small')
  right.margins(y=0.3)
  right.invert_yaxis()
  right.set_xlabel(f'final {metric}')
  right.set_title('final value per variant (mean ± std)', fontsize='medium')
  figure.tight_layout()
  figure.savefig(path, dpi=110)


def plot_lengths(path: str, curves: dict[str, dict[str, LengthCurve]]) -> None:
  """One panel per series of `length_curves`: the final value against evaluation length (log2 axis, a tick at
  each length), mean ± std error bars over each variant's finished seeds; the legend names missing lengths."""
  figure = _figure(6.5 * len(curves), 4.5)
  colors = _colors()
  for k, (name, by_variant) in enumerate(curves.items()):
    axes = figure.add_subplot(1, len(curves), k + 1)
    lengths = sorted({length for c in by_variant.values() for length in c.lengths + c.missing})
    for i, (variant, c) in enumerate(by_variant.items()):
      dodge = 2 ** (0.03 * (i - (len(by_variant) - 1) / 2))  # side by side at each L, so error bars do not overlap
      x = [length * dodge for length in c.lengths]
      axes.errorbar(x, c.mean, yerr=c.std, marker='o', capsize=3, color=colors[i % len(colors)], label=c.label(variant))
    axes.set_xscale('log', base=2)
    axes.set_xticks(lengths, [str(length) for length in lengths])
    axes.minorticks_off()
    axes.set_xlabel('evaluation length L (tokens)')
    axes.set_ylabel(f'final {name}@L')
    axes.set_title(f'{name} against evaluation length\nmean ± std over finished seeds', fontsize='medium')
    axes.legend(fontsize='small')
  figure.tight_layout()
  figure.savefig(path, dpi=110)
