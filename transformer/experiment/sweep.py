"""Ablation sweeps: one experiment repeated with named override sets and seeds, then one table and plot.

A sweep file is a config file whose `get_config` returns `sweep_config(...)`: the base experiment's
config plus a `sweep` section (so `--config.model.d_model=64` on the command line is checked against
the base experiment and applies to every variant):

    from transformer.experiment import sweep

    def get_config(arg=None):
      return sweep.sweep_config(
          base='experiments/text.py:tiny',
          variants=sweep.product(positional=['sinusoidal', 'learned', 'rope', 'alibi', 'none']),
          seeds=(0, 1, 2), metric='eval/loss')

`run_sweep` runs every variant x seed as its own `python -m transformer.experiment` process in
`<workdir>/<variant>/seed<s>`,
`parallel` at a time, and writes `results.csv`, `results.md` and `results.png` (see `results.py`).
Each run ends finished, interrupted (a signal: it saved and exited), failed (an error), stalled (no new
step or checkpoint for `stall_timeout` seconds: the sweep killed it) or diverged (a NaN or infinite loss);
one run's fault never stops the others. Re-running the sweep skips finished runs, resumes interrupted
ones from their checkpoints and retries the outcomes named by `retry` (default failed and stalled, not
diverged: `--config.sweep.retry=all` retries those too); on a finished sweep it only re-aggregates.
"""

import copy
import dataclasses
import itertools
import json
import os
import signal
import sys
import time

import ml_collections

from transformer import layout, setup, signals
from transformer.config import ConfigError, did_you_mean, flatten
from transformer.experiment import overrides as overrides_lib
from transformer.experiment import results
from transformer.experiment import slurm as slurm_executor
from transformer.files import write_atomic
from transformer.layout import LOG_FILE, STATUS_FILE

# Metrics where larger is better; any other metric is minimised unless the sweep says otherwise.
HIGHER_IS_BETTER = ('accuracy', 'bleu')
EXECUTORS = ('local', 'slurm')  # config.sweep.executor: processes on this machine, or jobs (slurm.py)


# ---------------------------------------------------------------------------------------------------
# Writing sweep files: named override sets.


def variant(name: str | None = None, **overrides) -> list[dict]:
  """One override set, e.g. `variant('h=1', num_heads=1, d_k=128, d_v=128)`; a list, so sets add up
  with `+`. Keys are config paths ('model.d_k') or, when unambiguous, their last name ('d_k')."""
  if name is None:
    name = ','.join(f'{key.rsplit(".", 1)[-1]}={overrides_lib.render(value)}' for key, value in overrides.items())
  return [{'name': name or 'base', 'overrides': dict(overrides)}]


def product(**axes) -> list[dict]:
  """Every combination of the axes' values: `product(norm_position=['post', 'pre'], norm_type=[...])`
  gives four sets named like 'norm_position=pre,norm_type=rmsnorm'."""
  keys = list(axes)
  return [variant(**dict(zip(keys, values)))[0] for values in itertools.product(*axes.values())]


def zip_(**axes) -> list[dict]:
  """The axes' values side by side: `zip_(num_heads=[1, 4], d_k=[128, 32])` gives two sets."""
  lengths = {key: len(values) for key, values in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ConfigError(f'zip_ needs equally long value lists; got lengths {lengths}.')
  keys = list(axes)
  return [variant(**dict(zip(keys, values)))[0] for values in zip(*axes.values())]


def group(label: str, variants: list[dict]) -> list[dict]:
  """The same sets with names prefixed by `label`: a table's row groups ('A:num_heads=1,...')."""
  return [{'name': f'{label}:{v["name"]}', 'overrides': v['overrides']} for v in variants]


def sweep_config(
  base: str,
  variants: list[dict],
  seeds=(0,),
  parallel: int = 1,
  metric: str = 'eval/loss',
  higher_is_better: bool | None = None,
  overrides: dict | None = None,
  stall_timeout: float = 1800.0,
  retry: str = 'failed,stalled',
  executor: str = 'local',
  slurm: dict | None = None,
  wait: bool = False,
  report=(),
) -> ml_collections.ConfigDict:
  """The base experiment's config (`'experiments/text.py:tiny'`) plus a `sweep` section. `overrides` apply
  to every variant (a variant's own setting wins); change the base only through them, as each run loads the
  base file afresh. Each key is resolved to its full path and its value checked against the base config;
  `higher_is_better` defaults from the metric's name (accuracy, bleu: higher). A run with no new step or
  checkpoint for `stall_timeout` seconds (startup and evals included; 0: never) is killed as stalled;
  `retry` names the outcomes a re-run retries (comma-separated from failed, stalled, diverged, or 'all').
  `executor='slurm'` submits each run as a SLURM job with the resources `slurm` sets (see
  `slurm.resources`) and returns once they are queued, or with `wait` when they have ended. `report` names
  more metrics for the tables, e.g. ('eval/loss@64', 'eval/loss@128'): a column each, and a '<name>@<L>' series
  also a plot against L (see results.py)."""
  near = sys._getframe(1).f_globals.get('__file__')  # the sweep file: its base resolves from there too
  config = overrides_lib.load_config(base, near)
  if 'sweep' in config:
    raise ConfigError(f'The base experiment {base!r} is itself a sweep; name an experiment file.')
  if not variants:
    raise ConfigError('A sweep needs at least one variant, e.g. sweep.variant("base").')
  common = resolve_overrides(config, overrides or {}, 'overrides')
  for path, value in common.items():
    overrides_lib.set_value(config, path, value)
  resolved = [{'name': v['name'], 'overrides': resolve_overrides(config, v['overrides'], v['name'])} for v in variants]
  names = [v['name'] for v in resolved]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ConfigError(f'Two variants share a name: {", ".join(duplicates)}; name them with sweep.variant(name, ...).')
  check_distinct(config, resolved)
  if higher_is_better is None:
    higher_is_better = any(word in metric for word in HIGHER_IS_BETTER)
  config.sweep = ml_collections.ConfigDict(
    dict(
      base=base,
      base_file=_resolved_spec(base, near),
      overrides=tuple(common.items()),
      variants=resolved,
      seeds=tuple(int(s) for s in seeds),
      parallel=int(parallel),
      metric=metric,
      higher_is_better=bool(higher_is_better),
      stall_timeout=float(stall_timeout),
      retry=str(retry),
      executor=str(executor),
      slurm=slurm_executor.resources(**(slurm or {})),
      wait=bool(wait),
      report=check_report(report, metric),
    )
  )
  check_retry(config.sweep.retry)
  return config


def check_distinct(config, variants: list[dict]):
  """A ConfigError if two variants give the same effective config (the base with the common overrides, then
  each variant's): a row that sets what the base already has would compare a run with a copy of itself."""
  seen = {}
  for v in variants:
    flat = flatten(variant_config(config, v))
    seen.setdefault(repr(sorted(flat.items())), []).append((v, flat))
  for same in seen.values():
    if len(same) > 1:
      names = ', '.join(repr(v['name']) for v, _ in same)
      flat = same[0][1]
      paths = sorted({path for v, _ in same for path in v['overrides']})
      settings = ', '.join(f'config.{path}={overrides_lib.render(flat[path])}' for path in paths) or 'no overrides'
      raise ConfigError(
        f'Variants {names} resolve to the same config ({settings}): a variant must change something the base '
        "and the others do not; drop one, or change the base (its file or the sweep's `overrides`)."
      )


def check_retry(text: str) -> tuple[str, ...]:
  """config.sweep.retry -> the outcomes a re-run retries: 'failed,stalled' -> ('failed', 'stalled')."""
  names = [name.strip() for name in text.split(',') if name.strip()]
  if names == ['all']:
    return results.PROBLEMS
  for name in names:
    if name not in results.PROBLEMS:
      hint = did_you_mean(name, results.PROBLEMS)
      raise ConfigError(
        f'config.sweep.retry={text!r}: {name!r}{hint} is not an outcome to retry; name some of '
        f'{", ".join(results.PROBLEMS)} (comma-separated), or all.'
      )
  return tuple(names)


REPORTABLE = ('eval/', 'train/')  # what metrics.jsonl's tags start with (besides 'step')


def check_report(report, metric: str) -> tuple[str, ...]:
  """config.sweep.report: metric names as metrics.jsonl tags them ('eval/loss@256'), not the sweep's metric
  (its own columns show it), each once."""
  if isinstance(report, str):
    raise ConfigError(
      f'config.sweep.report={report!r} must be a tuple of metric names: report=({report!r},) in the sweep file.'
    )
  names = tuple(report)
  for name in names:
    if not isinstance(name, str) or not name.startswith(REPORTABLE) or name in REPORTABLE:
      raise ConfigError(
        f'config.sweep.report names {name!r}, which is not a metric: name tags as metrics.jsonl writes them, '
        "starting with 'eval/' or 'train/', e.g. 'eval/loss@256' or 'train/tokens_per_sec'."
      )
    if name == metric:
      raise ConfigError(
        f"config.sweep.report names {name!r}, the sweep's metric, which the table already shows; drop it there."
      )
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ConfigError(f'config.sweep.report names {", ".join(map(repr, duplicates))} twice; name each metric once.')
  return names


def _resolved_spec(spec: str, near: str | None) -> str:
  """'file.py[:arg]' with the file's absolute path, so the runs find it from any working directory."""
  path, _, arg = spec.partition(':')
  return overrides_lib.resolve_path(path, near) + (f':{arg}' if arg else '')


def resolve_overrides(config, overrides: dict, name: str = '') -> dict:
  """{short or full key: value} -> {full path: value checked against the config}."""
  out = {}
  for key, value in overrides.items():
    try:
      path = resolve_key(config, key)
      out[path] = overrides_lib.check_value(path, overrides_lib.lookup(config, path), value)
    except ConfigError as error:
      raise ConfigError(f'{name}: {error}' if name == 'overrides' else f'Variant {name!r}: {error}') from None
  return out


def resolve_key(config, key: str) -> str:
  """'model.d_k' as is (if it exists); 'd_k' to the one path ending in it."""
  if '.' in key:
    overrides_lib.lookup(config, key)
    return key
  paths = [p for p in flatten(config) if p.rsplit('.', 1)[-1] == key]
  if len(paths) == 1:
    return paths[0]
  if paths:
    raise ConfigError(
      f'{key!r} is ambiguous: it could be {" or ".join("config." + p for p in paths)}; '
      f'write the full path, e.g. **{{{paths[0]!r}: ...}}.'
    )
  names = {p.rsplit('.', 1)[-1]: p for p in flatten(config)}
  hint = did_you_mean(key, names, show=lambda near: f'{near!r} (config.{names[near]})', sentence=True)
  raise ConfigError(f'No config key is named {key!r}.{hint}')


# ---------------------------------------------------------------------------------------------------
# Running: one process per variant x seed.


@dataclasses.dataclass
class Run:
  variant: str
  seed: int
  directory: str
  command: list[str]
  num_steps: int  # the step whose checkpoint marks the run finished

  @property
  def label(self) -> str:
    return f'{self.variant}/seed{self.seed}'

  def status(self) -> dict:
    path = os.path.join(self.directory, STATUS_FILE)
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)

  def finished(self) -> bool:
    status = self.status()
    return status.get('status') == results.FINISHED and status.get('num_steps') == self.num_steps

  def to_run(self, retry: tuple[str, ...]) -> bool:
    """Unfinished, and not an outcome left alone by `retry` (interrupted, queued or running ones resume)."""
    status = self.status().get('status')
    return not self.finished() and (status not in results.PROBLEMS or status in retry)

  def write_status(self, **values):
    path = os.path.join(self.directory, STATUS_FILE)
    write_atomic(path, json.dumps(values, indent=2))


def directory_name(name: str) -> str:
  """A variant's folder: its name with path separators and spaces replaced."""
  return ''.join('_' if c in '/\\ ' else c for c in name)


def _split_override(flag: str) -> tuple[str, str]:
  """'--config.a.b=v' -> ('a.b', 'v')."""
  name, _, value = flag.partition('=')
  return name.split('config.', 1)[1], value


def variant_config(config, variant: dict) -> ml_collections.ConfigDict:
  """The config one variant of the sweep `config` runs (seed aside): the base with the sweep's common
  overrides (already in `config`) and then the variant's own. References are resolved after the overrides,
  as in the run's process (config_flags sets them on the live config), so a variant that changes a referenced
  value (`data.vocab_size`) changes what refers to it (`model.vocab_size`) too."""
  effective = copy.deepcopy(config)
  for path, value in variant['overrides'].items():
    overrides_lib.set_value(effective, path, value)
  return effective.copy_and_resolve_references()


def plan(config, workdir: str, overrides=()) -> list[Run]:
  """The sweep's runs: the sweep's common overrides, the variant's, the command line's (all but
  `sweep.*`), then the seed, as command-line flags. Every variant's model config is checked here, before
  any process starts."""
  if 'sweep' not in config:
    raise ConfigError(
      '--mode sweep needs a sweep file (its get_config returns sweep.sweep_config(...)); see experiments/ablations/.'
    )
  spec = config.sweep
  check_retry(spec.retry)
  check_report(spec.get('report', ()), spec.metric)
  if spec.stall_timeout < 0:
    raise ConfigError(f'config.sweep.stall_timeout={spec.stall_timeout:g} must be >= 0 seconds (0: never).')
  if spec.executor not in EXECUTORS:
    hint = did_you_mean(spec.executor, EXECUTORS)
    raise ConfigError(f'config.sweep.executor={spec.executor!r}{hint}: choose one of {", ".join(EXECUTORS)}.')
  # sweep.* and bench.* (a sweep file's settings for `--mode bench`) configure this process, not the runs
  command_line = [flag for flag in overrides if not _split_override(flag)[0].startswith(('sweep.', 'bench.'))]
  varied = {path for v in spec.variants for path in v['overrides']}
  for flag in command_line:
    path = _split_override(flag)[0]
    if path == 'train.seed':
      raise ConfigError('The sweep sets config.train.seed for each run: choose seeds with --config.sweep.seeds.')
    if path in varied:
      raise ConfigError(f'{flag} overrides config.{path}, which the sweep varies; drop it or edit the sweep file.')
  runs = []
  for v in spec.variants:
    resolved = variant_config(config, v)
    try:
      setup.resolve(resolved)  # the model and train settings, cheaply: no tokenizer, no compile
    except ConfigError as error:
      raise ConfigError(f'Variant {v["name"]!r}: {error}') from None
    flags = [
      f'--config.{path}={overrides_lib.render(value)}' for path, value in [*spec.overrides, *v['overrides'].items()]
    ]
    for seed in spec.seeds:
      directory = os.path.join(workdir, directory_name(v['name']), f'seed{seed}')
      command = [
        sys.executable,
        '-m',
        'transformer.experiment',
        '--config',
        spec.base_file,
        *flags,
        *command_line,
        f'--config.train.seed={seed}',
        '--workdir',
        directory,
      ]
      runs.append(Run(v['name'], seed, directory, command, int(resolved.train.num_steps)))
  return runs


def run_sweep(config, workdir: str, overrides=()) -> list[dict]:
  """Runs the sweep's unfinished runs, then aggregates all of them. Returns the per-run result rows."""
  runs = plan(config, workdir, overrides)
  spec = config.sweep
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(
      {
        'base': spec.base,
        'overrides': dict(spec.overrides),
        'variants': list(spec.variants),
        'seeds': list(spec.seeds),
        'metric': spec.metric,
        'higher_is_better': spec.higher_is_better,
        'report': list(spec.get('report', ())),
        'command_line': list(overrides),
      },
      f,
      indent=2,
    )
  retry = check_retry(spec.retry)
  todo = [run for run in runs if run.to_run(retry)]
  left = {run.label: run.status()['status'] for run in runs if not run.finished() and run not in todo}
  if left:
    asks = ','.join(status for status in results.PROBLEMS if status in retry or status in left.values())
    which = ', '.join(f'{label} ({status})' for label, status in left.items())
    print(
      f'[sweep] not retried (config.sweep.retry={spec.retry!r}): {which}; --config.sweep.retry={asks} retries them.',
      flush=True,
    )
  if todo:
    print(
      f'[sweep] {len(runs)} runs, {len(runs) - len(todo) - len(left)} finished, {len(todo)} to run, '
      f'{spec.parallel} at a time; logs in <run>/{LOG_FILE}',
      flush=True,
    )
    if spec.executor == 'slurm':
      stopped_by = slurm_executor.submit(todo, spec)
    else:
      stopped_by = execute(todo, spec.parallel, stall_timeout=spec.stall_timeout)
  else:
    done = f'all {len(runs)} runs finished' if not left else f'nothing to run ({len(runs) - len(left)} finished)'
    print(f'[sweep] {done}: aggregating only.', flush=True)
    stopped_by = None
  rows = results.write_results(workdir, runs, spec.metric, spec.higher_is_better, spec.get('report', ()))
  if stopped_by is not None:
    print(f'[sweep] stopped by {signal.Signals(stopped_by).name}: re-run the same command to resume.', flush=True)
  return rows


def _die_with_parent():
  """In the child: receive SIGTERM (checkpoint and exit) if the sweep process dies, instead of running on
  as an orphan that a re-run of the sweep would race. Linux only; elsewhere a no-op."""
  try:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


class _SignalForwarder(signals.Guard):
  """While active, SIGINT / SIGTERM to the sweep are passed on to the running children (which checkpoint
  and exit) and stop new launches. Children run in their own session, so a terminal's Ctrl-C reaches
  them once, through here; a second Ctrl-C is forwarded too (the children then stop at once)."""

  def __init__(self, running: dict):
    super().__init__(second_sigint_falls_through=False)
    self.running = running

  def on_signal(self, signum: int) -> None:
    for process in list(self.running.values()):
      if process.poll() is None:
        process.send_signal(signum)


class Progress:
  """When a run last made progress: its metrics.jsonl grew (a logged step, an eval) or its checkpoints
  changed. Log output does not count: a hung run may still print (e.g. retries of a lost connection)."""

  def __init__(self, directory: str):
    self.directory = directory  # files only: any executor whose runs write where the sweep can read may use it
    self.mark = self._mark()
    self.since = time.monotonic()

  def _mark(self):
    try:
      size = os.path.getsize(layout.metrics_file(self.directory))
    except OSError:
      size = -1
    try:  # orbax's temporary folders count too: a save in progress is progress
      saved = sorted(os.listdir(layout.checkpoints_dir(self.directory)))
    except OSError:
      saved = []
    return size, saved

  def idle_seconds(self) -> float:
    mark = self._mark()
    if mark != self.mark:
      self.mark, self.since = mark, time.monotonic()
    return time.monotonic() - self.since


def execute(runs: list[Run], parallel: int = 1, poll_seconds: float = 0.1, stall_timeout: float = 0.0) -> int | None:
  """Runs `runs`, `parallel` at a time, each appending its output to `<directory>/log.txt` and ending with a
  `status.json` that says how it ended (see `outcome`). A run with no progress (`Progress`) for
  `stall_timeout` seconds (0: never) is killed with its process group. No run's end stops the others.
  Returns the signal that stopped the sweep, or None."""
  import subprocess  # noqa: PLC0415 -- only the sweep process starts others

  env = dict(os.environ, PYTHONUNBUFFERED='1')
  if parallel > 1:  # runs sharing an accelerator must not each grab most of its memory
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  pending, running, started, stalled = list(runs), {}, {}, {}
  with _SignalForwarder(running) as forwarder:
    while running or (pending and forwarder.received is None):
      while pending and len(running) < max(1, parallel) and forwarder.received is None:
        run = pending.pop(0)
        os.makedirs(run.directory, exist_ok=True)
        previous = run.status()
        log = open(os.path.join(run.directory, LOG_FILE), 'a')
        log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(run.command)}\n')
        log.flush()
        process = subprocess.Popen(
          run.command,
          stdout=log,
          stderr=subprocess.STDOUT,
          env=env,
          start_new_session=True,
          preexec_fn=_die_with_parent,
        )
        running[run.label] = process
        log.close()  # the child holds its own copy of the descriptor
        started[run.label] = (run, time.time(), previous, Progress(run.directory))
        run.write_status(
          status=results.RUNNING,
          num_steps=run.num_steps,
          attempts=previous.get('attempts', 0) + 1,
          wall_s=_earlier_wall(previous),
          pid=process.pid,
          command=run.command,
        )
        print(f'[sweep] started {run.label}', flush=True)
      time.sleep(poll_seconds)
      for label, process in list(running.items()):
        run, start, previous, progress = started[label]
        if process.poll() is None:
          if stall_timeout and label not in stalled and progress.idle_seconds() > stall_timeout:
            stalled[label] = stall_report(run, stall_timeout)
            try:  # SIGKILL: a hung run would never reach the step where a SIGTERM makes it save
              os.killpg(process.pid, signal.SIGKILL)  # it leads its own session: its helpers die with it
            except ProcessLookupError:  # it ended meanwhile
              pass
          continue
        del running[label]
        status, error = outcome(run, process.returncode, forwarder.received, stalled.get(label))
        _record(run, status, error, process.returncode, time.time() - start, previous)
  return forwarder.received


def stall_report(run: Run, stall_timeout: float) -> str:
  """Why a run is being killed as stalled (its log gets this too), and the last lines it wrote. Its re-run
  resumes from its last checkpoint."""
  steps = results.read_metrics(run.directory)
  newest = f'after step {max(steps)}' if steps else 'before its first step'
  reason = (
    f'No new step or checkpoint for {stall_timeout:g} s ({newest}): killed as stalled. If a step, an eval or '
    'the start can take that long, raise config.sweep.stall_timeout (0 disables the check).'
  )
  path = os.path.join(run.directory, LOG_FILE)
  said = results.last_lines(path) or '(nothing)'
  with open(path, 'a') as log:
    log.write(f'\n[sweep] {reason}\n')
  return f'{reason}\nLast lines of its log:\n{said}'


def outcome(run: Run, returncode: int, stop_signal: int | None, stall_reason: str | None) -> tuple[str, str]:
  """How a run that exited ended: (status, error text for the tables). Stalled if the sweep killed it for
  that; finished if it exited 0 with its last checkpoint saved; diverged if it failed with the NaN-loss
  error (transformer.loop.NonFiniteLoss); interrupted if a signal stopped it (the sweep's, forwarded; or one
  sent to the run itself, which saves and exits 0, or dies of it before its first checkpoint); failed
  otherwise."""
  if stall_reason is not None:
    return results.STALLED, stall_reason
  if returncode == 0 and run.num_steps in layout.checkpoint_steps(run.directory):
    return results.FINISHED, ''
  log = os.path.join(run.directory, LOG_FILE)
  diverged = results.diverged_error(log) if returncode else ''
  if diverged:
    return results.DIVERGED, diverged
  if stop_signal is not None or returncode == 0 or returncode in (-signal.SIGTERM, -signal.SIGINT):
    return results.INTERRUPTED, ''
  return results.FAILED, results.log_tail(log)


def _earlier_wall(previous: dict) -> float:
  """Wall time of earlier attempts of an unfinished run (a finished run starting over counts afresh)."""
  return 0.0 if previous.get('status') == results.FINISHED else float(previous.get('wall_s', 0.0))


def _record(run: Run, status: str, error: str, returncode: int, seconds: float, previous: dict):
  run.write_status(
    status=status,
    num_steps=run.num_steps,
    attempts=previous.get('attempts', 0) + 1,
    wall_s=_earlier_wall(previous) + seconds,
    returncode=returncode,
    error=error,
    command=run.command,
  )
  message = f': {error.splitlines()[0] if status == results.STALLED else error.splitlines()[-1]}' if error else ''
  print(f'[sweep] {status} {run.label} ({seconds:.0f}s, exit {returncode}){message}', flush=True)
