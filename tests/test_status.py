"""`launch.py --mode status`: a sweep's runs at a glance. The sweeps are built by hand with the writers the
sweep, its SLURM jobs and the training loop use (status.json, log.txt, metrics.jsonl, checkpoints/)."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from transformer import workdir as workdir_lib
from transformer.config import ConfigError
from transformer.experiment import results, slurm, status, sweep
from transformer.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 20
TRACEBACK = 'Traceback (most recent call last):\n  File "loop.py", line 1\n'


def sweep_dir(tmp_path, variants, seeds=(0,), metric='eval/loss') -> str:
  """A sweep's workdir with its sweep.json (the keys run_sweep writes) and its planned runs."""
  workdir = tmp_path / 'sweep'
  workdir.mkdir()
  spec = {
    'base': 'experiments/text.py:tiny',
    'overrides': {},
    'variants': [{'name': name, 'overrides': {}} for name in variants],
    'seeds': list(seeds),
    'metric': metric,
    'higher_is_better': False,
    'command_line': [],
  }
  (workdir / 'sweep.json').write_text(json.dumps(spec, indent=2))
  return str(workdir)


def planned(workdir: str, name: str, seed: int) -> sweep.Run:
  directory = os.path.join(workdir, sweep.directory_name(name), f'seed{seed}')
  return sweep.Run(name, seed, directory, [sys.executable, '-m', 'transformer.experiment'], NUM_STEPS)


def train(run: sweep.Run, losses: dict[int, float], evals: dict[int, float] = (), checkpoint: int | None = None):
  """What the training loop leaves: metrics.jsonl rows and a checkpoint folder."""
  writer = MetricsWriter(run.directory)
  for step, loss in losses.items():
    writer.write(step, {'train/loss': loss})
    if step in evals:
      writer.write(step, {'eval/loss': evals[step]})
  writer.close()
  if checkpoint is not None:
    os.makedirs(os.path.join(run.directory, 'checkpoints', str(checkpoint)))


def start_local(run: sweep.Run, pid: int) -> dict:
  """The status the local executor writes as it starts a run's process."""
  os.makedirs(run.directory, exist_ok=True)
  previous = run.status()
  run.write_status(
    status=results.RUNNING, num_steps=NUM_STEPS, attempts=previous.get('attempts', 0) + 1, pid=pid, command=[]
  )
  return previous


def end_local(run: sweep.Run, returncode: int, log: str = '', stalled: float | None = None):
  """The local executor's record of how a run's process ended, its log holding `log`."""
  previous = start_local(run, 1)
  with open(os.path.join(run.directory, sweep.LOG_FILE), 'a') as f:
    f.write(f'\n=== attempt\n{log}')
  reason = sweep.stall_report(run, stalled) if stalled else None
  state, error = sweep.outcome(run, returncode, None, reason)
  sweep._record(run, state, error, returncode, 5.0, previous)


def gone_pid() -> int:
  """The id of a process that has ended (and been reaped): no process has it now."""
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def test_a_local_sweep_in_every_state_is_one_table_the_counts_and_the_problems_errors(tmp_path, capsys):
  workdir = sweep_dir(tmp_path, ['base', 'h=1', 'pre/rms', 'wide'], seeds=(0, 1))
  base0, base1, h0, h1, pre0, pre1, wide0, _ = [
    planned(workdir, n, s) for n in ('base', 'h=1', 'pre/rms', 'wide') for s in (0, 1)
  ]
  train(base0, {10: 3.5, 20: 2.25}, {10: 3.75, 20: 2.5}, checkpoint=20)
  end_local(base0, 0)
  train(base1, {10: 3.4}, {10: 3.625}, checkpoint=10)
  end_local(base1, -15)  # SIGTERM: saved and stopped
  train(h0, {10: 4.0})
  end_local(h0, 1, TRACEBACK + 'OSError: [Errno 28] No space left on device\n')
  train(h1, {10: 3.9}, checkpoint=10)
  end_local(h1, -9, 'step 10/20\n', stalled=60)
  train(pre0, {10: 9.5, 11: float('nan')})
  end_local(pre0, 1, TRACEBACK + 'transformer.loop.NonFiniteLoss: The training loss became nan at step 11.\n')
  train(pre1, {10: 3.3, 15: 3.125}, {10: 3.5})
  with open(os.path.join(pre1.directory, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 16, "train/lo')  # a line the running process is writing right now
  start_local(pre1, os.getpid())  # a process that is alive: running
  start_local(wide0, gone_pid())  # the sweep died (SIGKILL) before it recorded how its run ended
  capsys.readouterr()  # the sweep's own lines
  assert status.status_text(workdir) == '\n'.join(
    [
      'variant  seed  state        step   train/loss  eval/loss  attempts',
      'base     0     finished     20/20  2.25        2.5 @20    1',
      'base     1     interrupted  10/20  3.4         3.625 @10  1',
      'h=1      0     failed       10/20  4           -          1',
      'h=1      1     stalled      10/20  3.9         -          1',
      'pre/rms  0     diverged     11/20  nan         -          1',
      'pre/rms  1     running      15/20  3.125       3.5 @10    1',
      'wide     0     interrupted  -/20   -           -          1',
      'wide     1     queued       -/?    -           -          0',
      '8 runs: 1 finished, 2 interrupted, 1 failed, 1 stalled, 1 diverged, 1 running, 1 queued',
      'h=1/seed0 failed: OSError: [Errno 28] No space left on device',
      'h=1/seed1 stalled: No new step or checkpoint for 60 s (after step 10): killed as stalled. If a step, an eval '
      'or the start can take that long, raise config.sweep.stall_timeout (0 disables the check).',
      'pre/rms/seed0 diverged: transformer.loop.NonFiniteLoss: The training loss became nan at step 11.',
      f'wide/seed0 interrupted: process {wide0.status()["pid"]} ended without recording an outcome; re-running the '
      'sweep resumes it',
    ]
  )


class FakeSlurm:
  """SLURM's commands as the executor calls them: sbatch hands out job ids, squeue prints `queue`."""

  def __init__(self):
    self.queue, self.next_job, self.calls = {}, 100, []

  def __call__(self, *command):
    self.calls.append(command[0])
    if command[0] == 'squeue':
      return ''.join(f'{job} {state}\n' for job, state in self.queue.items())
    if command[0] == 'sbatch':
      self.next_job += 1
      return f'{self.next_job}\n'
    return ''


def test_a_slurm_sweep_shows_jobs_requeues_their_live_state_and_a_requeue_cap_reached(tmp_path, monkeypatch, capsys):
  fake = FakeSlurm()
  monkeypatch.setattr(slurm, '_slurm', fake)
  workdir = sweep_dir(tmp_path, ['base', 'wide'], seeds=(0, 1, 2))
  runs = [planned(workdir, n, s) for n in ('base', 'wide') for s in (0, 1, 2)]
  slurm.submit(runs, ml_collections.ConfigDict(dict(slurm=slurm.resources(max_requeues=3), wait=False)))
  base0, base1, base2, wide0, wide1, wide2 = runs
  jobs = [run.status()['job_id'] for run in runs]
  assert jobs == ['101', '102', '103', '104', '105', '106']

  def job_ends(run, returncode, restarts=0, log=''):
    slurm.started(run.directory)
    with open(os.path.join(run.directory, slurm.LOG_FILE), 'a') as f:
      f.write(f'\n=== job\n{log}')
    env = {'SLURM_JOB_ID': run.status()['job_id'], 'SLURM_RESTART_COUNT': str(restarts)}
    slurm.after(run.directory, returncode, NUM_STEPS, 3, sweep_run=True, env=env)

  train(base0, {10: 3.5, 20: 2.25}, {20: 2.5}, checkpoint=20)
  job_ends(base0, 0)  # finished, and gone from squeue
  slurm.started(base1.directory)
  train(base1, {10: 3.25})  # running
  train(base2, {10: 3.75}, {10: 3.875}, checkpoint=10)
  job_ends(base2, 0)  # stopped early by the time limit's signal: requeued, waiting
  train(wide0, {15: 3.0}, checkpoint=10)
  os.makedirs(os.path.join(wide0.directory, 'checkpoints', '15'))
  job_ends(wide0, 0, restarts=3)  # requeued three times already: the cap
  slurm.started(wide1.directory)  # killed without its `after` (a time limit without the signal)
  job_ends(wide2, 1, log=TRACEBACK + 'transformer.loop.NonFiniteLoss: The training loss became inf at step 3.\n')
  fake.queue = {'102': 'RUNNING', '103': 'PENDING', '104': 'COMPLETED', '105': 'TIMEOUT'}
  capsys.readouterr()
  cap_error = wide0.status()['error']
  assert status.status_text(workdir) == '\n'.join(
    [
      'variant  seed  state        step   train/loss  eval/loss  attempts  requeues  job  scheduler',
      'base     0     finished     20/20  2.25        2.5 @20    1         0/3       101  finished',
      'base     1     running      10/20  3.25        -          1         0/3       102  RUNNING',
      'base     2     queued       10/20  3.75        3.875 @10  1         1/3       103  PENDING',
      'wide     0     interrupted  15/20  3           -          1         3/3       104  COMPLETED',
      'wide     1     failed       -/20   -           -          1         0/3       105  TIMEOUT',
      'wide     2     diverged     -/20   -           -          1         0/3       106  diverged',
      '6 runs: 1 finished, 1 interrupted, 1 failed, 1 diverged, 1 running, 1 queued',
      f'wide/seed0 interrupted: requeue cap 3 reached: {cap_error}',
      'wide/seed1 failed: SLURM job 105 ended (TIMEOUT) without recording an outcome.',
      'wide/seed2 diverged: transformer.loop.NonFiniteLoss: The training loss became inf at step 3.',
    ]
  )
  assert cap_error.startswith('Stopped at step 15 after 3 requeues: not requeued again (max_requeues=3).')
  assert wide1.status()['status'] == results.RUNNING  # only shown as failed: status never writes

  def no_slurm(*command):
    raise slurm.SlurmError('squeue is not installed here')

  monkeypatch.setattr(slurm, '_slurm', no_slurm)  # looked at from a machine without SLURM: the files' word
  rows = status.sweep_status(workdir).rows
  assert [(row.state, row.scheduler) for row in rows[:3]] == [
    (results.FINISHED, '?'),
    (results.RUNNING, '?'),
    (results.QUEUED, '?'),
  ]
  assert status.render(status.sweep_status(workdir)).endswith(
    'squeue failed, states as recorded: squeue is not installed here'
  )


def test_a_single_runs_workdir_is_one_line_and_a_missing_or_foreign_workdir_one_error(tmp_path):
  run = tmp_path / 'run'
  workdir_lib.save_config(ml_collections.ConfigDict({'train': {'num_steps': NUM_STEPS}}), str(run))
  writer = MetricsWriter(str(run))
  writer.write(10, {'train/loss': 3.5})
  writer.write(20, {'train/loss': 2.25})
  writer.write(20, {'eval/loss': 2.5, 'eval/accuracy': 0.3125})
  writer.close()
  os.makedirs(run / 'checkpoints' / '10')
  line = status.status_text(str(run))
  assert line.startswith(f'{run}: unfinished (last checkpoint 10), step 20/20, train loss 2.25, ')
  assert line.endswith('last written 0 s ago') or line.endswith('last written 1 s ago'), line
  os.makedirs(run / 'checkpoints' / '20')
  assert status.status_text(str(run)) == (
    f'{run}: finished, step 20/20, train loss 2.25, eval step 20: loss 2.5  accuracy 31.2%'
  )
  with pytest.raises(ConfigError, match='no such directory; give the workdir of a sweep or a run'):
    status.status_text(str(tmp_path / 'missing'))
  with pytest.raises(ConfigError, match=r'is neither a sweep \(no sweep.json\) nor a run'):
    status.status_text(str(tmp_path / 'run' / 'checkpoints'))


def test_launch_status_prints_the_table_and_refuses_a_missing_workdir_or_a_config_less_train(tmp_path, capsys):
  workdir = sweep_dir(tmp_path, ['base'], seeds=(0, 1))
  run = planned(workdir, 'base', 0)
  train(run, {10: 3.5, 20: 2.25}, {20: 2.5}, checkpoint=20)
  end_local(run, 0)
  capsys.readouterr()

  def launch(*args):
    return subprocess.Popen(
      [sys.executable, 'launch.py', *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

  table = launch('--mode', 'status', '--workdir', workdir)
  missing = launch('--mode', 'status', '--workdir', str(tmp_path / 'nowhere'))
  no_config = launch('--mode', 'train', '--workdir', str(tmp_path / 'train'))
  out, err = table.communicate(timeout=120)
  assert table.returncode == 0, err
  assert out.splitlines() == [
    'variant  seed  state     step   train/loss  eval/loss  attempts',
    'base     0     finished  20/20  2.25        2.5 @20    1',
    'base     1     queued    -/?    -           -          0',
    '2 runs: 1 finished, 1 queued',
  ]
  out, err = missing.communicate(timeout=120)
  assert missing.returncode == 1
  assert (
    err.strip().splitlines()[-1]
    == f'--workdir {tmp_path / "nowhere"}: no such directory; give the workdir of a sweep or a run.'
  )
  assert 'Traceback' not in out + err
  out, err = no_config.communicate(timeout=120)
  assert no_config.returncode == 1
  assert err.strip().splitlines()[-1] == (
    '--mode train needs --config <experiment file>[:variant], e.g. --config experiments/translation.py:tiny '
    '(only --mode status goes without one).'
  )
  assert not os.path.exists(tmp_path / 'train')
