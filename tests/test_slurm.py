"""Runs and sweeps on a live SLURM (`scripts/local_slurm.sh start`: a one-node cluster on this machine; .ci/run
starts it). Without an answering SLURM these tests skip, except under CI=true, where they fail.

Every run is the tiny decoder-only copy task; the reference is the same run on one process, and runs on two
processes must match it step for step (the losses, and the examples each process fed: batch digests)."""

import csv
import json
import os
import re
import subprocess
import sys
import time

import launching
import ml_collections
import numpy as np
import pytest
from conftest import PEAK_FLOPS

from transformer.config import ConfigError
from transformer.experiment import results, slurm, sweep

ROOT = launching.ROOT
CONFIG = 'experiments/synthetic.py:lm_copy'
STEPS = 12  # two processes agree on a signal after an eval (step 6) and every 10 steps (checkpoint.PreemptionGuard)
TINY = (
  '--config.model.d_model=32',
  '--config.model.d_ff=64',
  '--config.model.num_heads=2',
  '--config.model.num_decoder_layers=1',
  '--config.data.num_eval=16',
  '--config.train.batch_size=8',
  '--config.train.warmup_steps=1',
  '--config.train.log_every=1',
  '--config.train.num_samples=0',
  launching.FIXED_PEAK,
)
RUN = (
  *TINY,
  f'--config.train.num_steps={STEPS}',
  '--config.train.eval_every=6',  # the eval's compilation holds the run at step 6, a step it may stop at
  f'--config.train.checkpoint_every={STEPS}',  # a checkpoint before the last step can only be the signal's
  '--config.train.log_batch_digests=True',
)
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHON=sys.executable, PYTHONUNBUFFERED='1')


@pytest.fixture(scope='session')
def cluster():
  """A SLURM that answers. Starts nothing: .ci/run (or you: scripts/local_slurm.sh start) did."""
  try:
    answer = subprocess.run(['scontrol', 'ping'], capture_output=True, text=True, timeout=30)
    up = answer.returncode == 0 and 'UP' in answer.stdout
    reason = answer.stdout.strip() or answer.stderr.strip()
  except FileNotFoundError:
    up, reason = False, 'scontrol is not installed'
  if not up:
    message = f'no SLURM answers `scontrol ping` ({reason}): start one with scripts/local_slurm.sh start'
    if os.environ.get('CI') == 'true':
      pytest.fail(message + ' (CI=true: .ci/run starts it before the tests)')
    pytest.skip(message)


@pytest.fixture(scope='module')
def reference(shared):
  """The run on one process, without SLURM (made once per session)."""
  workdir = shared('slurm_reference', (CONFIG, RUN), lambda path: launching.run(CONFIG, path, *RUN))
  assert sorted(launching.losses(workdir)) == list(range(1, STEPS + 1))
  return workdir


def _assert_same_run(workdir, reference):
  want, got = launching.losses(reference), launching.losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)
  assert launching.batch_digests(workdir) == launching.batch_digests(reference)


def _squeue(job: str) -> tuple[str, str]:
  """(state, reason) of a job, ('', '') once SLURM forgot it."""
  out = subprocess.run(['squeue', '--noheader', '--states=all', '--format=%T %r', f'--jobs={job}'], **_TEXT).stdout
  return tuple(out.split()[:2]) if out.strip() else ('', '')


_TEXT = dict(capture_output=True, text=True, timeout=60)


def _wait_for_job(job: str, timeout: float = 900) -> str:
  """Waits until the job is over and returns its last state. A requeued job waits ~2 minutes before it may
  start again (SLURM's hold after a requeue); the test lets it start after 5 s (at once, slurmd may still
  refuse its launch, within the second its previous run was revoked: "Job credential revoked")."""
  deadline, held_since = time.time() + timeout, None
  while time.time() < deadline:
    state, reason = _squeue(job)
    if state in slurm.ENDED or not state:
      return state
    held = state == 'PENDING' and reason == 'BeginTime'
    held_since = (held_since or time.time()) if held else None
    if held and time.time() - held_since > 5:
      subprocess.run(['scontrol', 'update', f'JobId={job}', 'StartTime=now'], **_TEXT)
    time.sleep(1)
  subprocess.run(['scancel', job], **_TEXT)
  raise AssertionError(f'job {job} did not end in {timeout:.0f} s')


def _steps_fed(workdir) -> int:
  """The lowest step both processes have reached."""
  reached = []
  for index in (0, 1):
    path = workdir / 'batches' / f'process_{index}.jsonl'
    lines = path.read_text().splitlines() if path.exists() else []
    reached.append(json.loads(lines[-1])['step'] if lines else 0)
  return min(reached)


@pytest.mark.slow(48)
def test_sbatch_job_signalled_saves_on_every_task_requeues_itself_and_resumes_exactly(cluster, reference, tmp_path):
  """scripts/slurm/train.sbatch with two tasks, sent SIGTERM as `--signal=TERM@<lead>` does before a time limit:
  both processes stop at the step they agreed on (6 or 10) and save it, the job requeues itself, and the requeued
  job (same job id) resumes there and ends with the uninterrupted run's losses, each process fed the same rows.
  The script starts them as users do by hand, `srun python launch.py ...` with no coordinator flags: the two
  processes join from SLURM's step variables alone (a separate `srun -n 2` run cost half a minute more)."""
  workdir = tmp_path / 'sbatch'
  log = tmp_path / 'job.out'
  submit = ['sbatch', '--parsable', f'--output={log}', f'--chdir={ROOT}', 'scripts/slurm/train.sbatch']
  job = subprocess.run([*submit, '--config', CONFIG, '--workdir', str(workdir), *RUN], cwd=ROOT, env=ENV, **_TEXT)
  assert job.returncode == 0, job.stderr
  job = job.stdout.strip().split(';')[0]
  deadline = time.time() + 600
  while _steps_fed(workdir) < 2:  # both processes are training (compiled; the next sync point is step 6)
    assert time.time() < deadline and _squeue(job)[0] not in slurm.ENDED, log.read_text()[-3000:]
    time.sleep(0.5)
  subprocess.run(['scancel', '--signal=TERM', job], check=True, **_TEXT)
  assert _wait_for_job(job) == 'COMPLETED', log.read_text()[-3000:]
  text = log.read_text()
  stopped = [int(step) for step in re.findall(r'Stopped by a signal at step (\d+); checkpoint saved\.', text)]
  assert len(stopped) == 1 and stopped[0] in (6, 10), text[-3000:]
  stop = stopped[0]
  assert f'stopped at step {stop} of {STEPS}: requeueing job {job}' in text and '(requeued 1x)' in text, text[-3000:]
  assert json.loads((workdir / slurm.REQUEUE_FILE).read_text()) == {'stops': [stop]}
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == [str(stop), str(STEPS)]
  for index in (0, 1):  # each process fed steps 1..stop, then (after the requeue) the rest, each once
    fed = [
      json.loads(line)['step'] for line in (workdir / 'batches' / f'process_{index}.jsonl').read_text().splitlines()
    ]
    assert fed == list(range(1, STEPS + 1)), (index, fed)
  _assert_same_run(workdir, reference)


def _checkpoint(workdir, step):
  os.makedirs(os.path.join(workdir, 'checkpoints', str(step)), exist_ok=True)


def test_requeue_cap_and_no_progress_stop_a_job_from_requeueing_forever(tmp_path):
  workdir = str(tmp_path)
  _checkpoint(workdir, 10)
  os.makedirs(os.path.join(workdir, 'checkpoints', '20.orbax-checkpoint-tmp-1'))  # a save in flight: not a step
  assert slurm.requeue_decision(workdir, restarts=0, max_requeues=3) == (True, '')
  requeue, why = slurm.requeue_decision(workdir, restarts=1, max_requeues=3)  # stopped at 10 again
  assert not requeue and 'Stopped at step 10 twice in a row' in why
  _checkpoint(workdir, 20)
  assert slurm.requeue_decision(workdir, restarts=1, max_requeues=3) == (True, '')
  _checkpoint(workdir, 30)
  requeue, why = slurm.requeue_decision(workdir, restarts=3, max_requeues=3)
  assert not requeue and 'after 3 requeues' in why and 'max_requeues=3' in why
  assert json.loads((tmp_path / slurm.REQUEUE_FILE).read_text()) == {'stops': [10, 20]}


def test_after_a_job_records_its_outcome_and_requeues_only_a_stopped_run(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(slurm, '_slurm', lambda *command: calls.append(command) or '')
  workdir = str(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'train': {'num_steps': 20}}))
  (tmp_path / slurm.STATUS_FILE).write_text(json.dumps({'job_id': '7', 'wall_s': 5.0, 'started': time.time()}))
  env = {'SLURM_JOB_ID': '7'}
  _checkpoint(workdir, 10)
  assert slurm.after(workdir, 0, None, 3, sweep_run=True, env=env) == 0  # stopped early: requeued
  assert calls == [('scontrol', 'requeue', '7')]
  status = json.loads((tmp_path / slurm.STATUS_FILE).read_text())
  assert (status['status'], status['job_id'], status['requeues']) == (results.QUEUED, '7', 1)
  assert status['wall_s'] >= 5.0
  assert slurm.after(workdir, 0, None, 3, sweep_run=True, env=dict(env, SLURM_RESTART_COUNT='1')) == 1
  assert calls == [('scontrol', 'requeue', '7')]  # no progress since: not requeued
  status = json.loads((tmp_path / slurm.STATUS_FILE).read_text())
  assert status['status'] == results.INTERRUPTED and 'twice in a row' in status['error']
  log = '=== start\nTraceback (most recent call last):\n  File "x"\nOSError: disk\nsrun: error: vm: task 0: Exited\n'
  (tmp_path / slurm.LOG_FILE).write_text(log)
  assert slurm.after(workdir, 1, None, 3, sweep_run=True, env=env) == 1
  status = json.loads((tmp_path / slurm.STATUS_FILE).read_text())
  assert (status['status'], status['error']) == (results.FAILED, 'OSError: disk')
  _checkpoint(workdir, 20)
  assert slurm.after(workdir, 0, None, 3, sweep_run=True, env=env) == 0
  assert json.loads((tmp_path / slurm.STATUS_FILE).read_text())['status'] == results.FINISHED
  assert len(calls) == 1


SWEEP_FILE = """
from transformer.experiment import sweep


def get_config(arg=None):
  return sweep.sweep_config(
    base={base!r},
    variants=sweep.variant('base') + sweep.variant('diverges', **{{'train.learning_rate': 1e30}}),
    overrides={overrides!r},
  )
"""


@pytest.mark.slow(30)
def test_sweep_on_slurm_submits_each_run_once_waits_and_aggregates_like_a_local_sweep(cluster, tmp_path):
  """`--mode sweep --config.sweep.executor=slurm`: one job per variant x seed, the command returning once they
  are queued; the same command again while they are queued, and after they ended, submits nothing; with
  `--config.sweep.wait=True` it waits for them and writes results.csv / results.md / results.png, the diverged
  run with its log's last line. (The jobs ask to begin in an hour, so they stay queued until the test lets them.)"""
  overrides = {
    'model.d_model': 32,
    'model.d_ff': 64,
    'model.num_heads': 2,
    'model.num_decoder_layers': 1,
    'data.num_eval': 16,
    'train.batch_size': 8,
    'train.warmup_steps': 1,
    'train.num_samples': 0,
    'train.num_steps': 4,
    'train.log_every': 1,
    'train.eval_every': 2,
    'train.checkpoint_every': 4,
    'train.peak_flops': PEAK_FLOPS,  # no matmul timed for MFU
  }
  path = tmp_path / 'sweep_file.py'
  path.write_text(SWEEP_FILE.format(base=os.path.join(ROOT, CONFIG), overrides=overrides))
  workdir = tmp_path / 'sweep'
  command = [sys.executable, 'launch.py', '--config', str(path), '--mode', 'sweep', '--workdir', str(workdir)]
  command += ['--config.sweep.executor=slurm', '--config.sweep.slurm.extra=--begin=now+3600']

  def sweep(*extra):
    done = subprocess.run([*command, *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout

  def statuses():
    return {name: json.loads((workdir / name / 'seed0' / 'status.json').read_text()) for name in ('base', 'diverges')}

  out = sweep()
  jobs = {name: status['job_id'] for name, status in statuses().items()}
  assert '2 jobs submitted, 0 already queued' in out and all(f'job {job}' in out for job in jobs.values()), out
  assert {name: status['status'] for name, status in statuses().items()} == dict.fromkeys(jobs, results.QUEUED)
  # Held until their begin time; SLURM fills in the reason ('BeginTime') on its next scheduling pass, 'None' until then.
  assert [_squeue(job)[0] for job in jobs.values()] == ['PENDING'] * 2
  assert {_squeue(job)[1] for job in jobs.values()} <= {'BeginTime', 'None'}
  out = sweep()  # the same command while they are queued
  assert '0 jobs submitted, 2 already queued' in out and out.count('not submitted again') == 2, out

  waiting = subprocess.Popen(
    [*command, '--config.sweep.wait=True'],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  said = []
  for line in waiting.stdout:  # it found both jobs queued and waits for them: let them start
    said.append(line)
    if '0 jobs submitted, 2 already queued' in line:
      break
  for job in jobs.values():
    subprocess.run(['scontrol', 'update', f'JobId={job}', 'StartTime=now'], check=True, **_TEXT)
  out = ''.join(said) + waiting.communicate(timeout=900)[0]
  assert waiting.returncode == 0, out[-3000:]
  status = statuses()
  assert {name: s['job_id'] for name, s in status.items()} == jobs
  assert status['base']['status'] == results.FINISHED and '[sweep] finished base/seed0' in out, out
  error = status['diverges']['error'].splitlines()[-1]  # the error, not srun's lines after it
  assert status['diverges']['status'] == results.DIVERGED, status['diverges']
  assert error.startswith('transformer.loop.NonFiniteLoss: The training loss became'), error
  assert f'[sweep] diverged diverges/seed0: {error}' in out, out

  with open(workdir / 'results.csv') as f:
    rows = {row['variant']: row for row in csv.DictReader(f) if row['seed'] == '0'}
  final = launching.metrics(workdir / 'base' / 'seed0')[4]['eval/loss']
  assert (rows['base']['status'], float(rows['base']['final eval/loss'])) == (results.FINISHED, final)
  assert rows['diverges']['status'] == results.DIVERGED and 'NonFiniteLoss' in rows['diverges']['error']
  assert (workdir / 'results.md').exists() and (workdir / 'results.png').stat().st_size > 0
  out = sweep()  # after they ended: nothing to submit
  assert 'submitted' not in out and {n: s['job_id'] for n, s in statuses().items()} == jobs, out


def test_sweep_resources_become_the_jobs_sbatch_options_and_a_misspelt_executor_is_refused():
  spec = slurm.resources(partition='gpu', nodes=2, tasks_per_node=8, gpus_per_task=1, time='4:00:00', extra='--qos=hi')
  assert slurm.sbatch_options(spec, '/runs/a/seed0', 'sweep:a/seed0') == [
    '--job-name=sweep:a/seed0',
    '--output=/runs/a/seed0/log.txt',
    '--open-mode=append',
    '--requeue',
    '--signal=TERM@120',
    '--nodes=2',
    '--ntasks-per-node=8',
    '--cpus-per-task=1',
    '--gpus-per-task=1',
    '--partition=gpu',
    '--time=4:00:00',
    '--qos=hi',
  ]
  config = sweep.sweep_config(base=os.path.join(ROOT, CONFIG), variants=sweep.variant('base'))
  assert (config.sweep.executor, config.sweep.wait, config.sweep.slurm.max_requeues) == ('local', False, 3)
  config.sweep.executor = 'slrum'
  with pytest.raises(ConfigError, match=r"executor='slrum' \(did you mean 'slurm'\?\): choose one of local, slurm"):
    sweep.plan(config, '/tmp/unused')


def test_a_job_gone_without_an_outcome_is_recorded_failed_and_submitted_again(tmp_path, monkeypatch, capsys):
  """A job killed before its `after` (a time limit without the signal, scancel) left status 'running'; the
  next sweep command finds it out of the queue, reports it with its log's last line and submits a new job."""
  commands = []

  def fake_slurm(*command):
    commands.append(command[0])
    return {'squeue': '5 TIMEOUT\n', 'sbatch': '6\n'}.get(command[0], '')

  monkeypatch.setattr(slurm, '_slurm', fake_slurm)
  (tmp_path / slurm.STATUS_FILE).write_text(json.dumps({'status': results.RUNNING, 'job_id': '5', 'attempts': 1}))
  (tmp_path / slurm.LOG_FILE).write_text('=== start\nstep 3/9\nslurmstepd: *** JOB 5 CANCELLED DUE TO TIME LIMIT ***\n')
  run = sweep.Run('a', 0, str(tmp_path), ['python', '-m', 'transformer.experiment'], 9)
  slurm.submit([run], ml_collections.ConfigDict(dict(slurm=slurm.resources(), wait=False)))
  out = capsys.readouterr().out
  assert '[sweep] failed a/seed0: SLURM job 5 ended (TIMEOUT) without recording an outcome.' in out, out
  assert commands == ['squeue', 'sbatch', 'scontrol']  # submitted held, then released
  status = json.loads((tmp_path / slurm.STATUS_FILE).read_text())
  assert (status['status'], status['job_id'], status['attempts']) == (results.QUEUED, '6', 2)
  assert '--requeue' in (tmp_path / slurm.SCRIPT_FILE).read_text()


def test_a_job_slurm_refuses_is_one_message_naming_the_setting(cluster):
  with pytest.raises(slurm.SlurmError, match=r'(?s)invalid partition.*Check config\.sweep\.slurm \(partition'):
    slurm._slurm('sbatch', '--partition=no_such_partition', '--wrap', 'true')
