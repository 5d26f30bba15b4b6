"""Runs on SLURM: a sweep's variants x seeds as batch jobs (plain `sbatch`, no extra dependency), and what a
job does when its training process exits (`python -m transformer.experiment.slurm after ...`).

A sweep with `--config.sweep.executor=slurm` writes `<run>/job.sbatch` for each unfinished run and submits
it with the resources of `config.sweep.slurm`. The job runs the training command under `srun` (every task
joins the run from SLURM's environment), appends its output to `<run>/log.txt` and records its outcome in
`<run>/status.json`, with the job id the submitter wrote there. Re-running the sweep submits nothing for a run
that is finished or whose job is still in the queue (asked of `squeue`: a one-node test cluster has no
accounting database for `sacct`), resubmits the others, and aggregates as a local sweep does.

Preemption and time limits: `--signal=TERM@<signal_lead_s>` sends SIGTERM to every task of the job's steps
(not to the batch shell, which then decides what follows); the training loop agrees on a step across processes,
saves it and exits 0. `after` then requeues the job (`scontrol requeue`: same job id, resumes from that
checkpoint) unless it was already requeued `max_requeues` times or made no progress since its last requeue.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import ml_collections

from transformer import layout
from transformer import workdir as workdir_lib
from transformer.config import ConfigError
from transformer.experiment import results
from transformer.files import write_atomic
from transformer.layout import LOG_FILE, STATUS_FILE

SCRIPT_FILE = 'job.sbatch'
REQUEUE_FILE = 'requeues.json'  # the steps at which a job stopped and was requeued
# squeue states of a job that is over; any other state (PENDING, RUNNING, REQUEUED, ...) is still in the queue.
ENDED = (
  'COMPLETED',
  'FAILED',
  'CANCELLED',
  'TIMEOUT',
  'NODE_FAIL',
  'PREEMPTED',
  'OUT_OF_MEMORY',
  'BOOT_FAIL',
  'DEADLINE',
)


def resources(**values) -> ml_collections.ConfigDict:
  """`config.sweep.slurm`: what each run's job asks for. partition '' and time '' take the cluster's
  defaults; time as sbatch takes it ('30', '4:00:00', '1-00:00:00'). signal_lead_s: seconds before the time
  limit at which the tasks get SIGTERM to save. extra: more sbatch options ('--account=x --qos=y')."""
  config = ml_collections.ConfigDict(
    dict(
      partition='',
      nodes=1,
      tasks_per_node=1,
      cpus_per_task=1,
      gpus_per_task=0,
      time='',
      signal_lead_s=120,
      max_requeues=3,
      extra='',
    )
  )
  config.update(values)
  return config


def sbatch_options(spec, directory: str, name: str) -> list[str]:
  """The `#SBATCH` options of one run's job."""
  options = [
    f'--job-name={name}',
    f'--output={os.path.join(directory, LOG_FILE)}',
    '--open-mode=append',
    '--requeue',
    f'--signal=TERM@{int(spec.signal_lead_s)}',
    f'--nodes={int(spec.nodes)}',
    f'--ntasks-per-node={int(spec.tasks_per_node)}',
    f'--cpus-per-task={int(spec.cpus_per_task)}',
  ]
  if int(spec.gpus_per_task):
    options.append(f'--gpus-per-task={int(spec.gpus_per_task)}')
  if spec.partition:
    options.append(f'--partition={spec.partition}')
  if str(spec.time):
    options.append(f'--time={spec.time}')
  return options + shlex.split(spec.extra)


def job_script(run, spec) -> str:
  """A batch script: the run's command in an srun step, then `after` (status, requeue)."""
  directory = os.path.abspath(run.directory)
  helper = [sys.executable, '-m', 'transformer.experiment.slurm']
  where = ['--workdir', directory, '--num_steps', str(run.num_steps)]
  lines = ['#!/bin/bash']
  lines += [f'#SBATCH {option}' for option in sbatch_options(spec, directory, f'sweep:{run.label}')]
  lines += [
    f'#SBATCH --chdir={os.getcwd()}',
    '# Written by transformer/experiment/slurm.py for a sweep; resubmitting the sweep rewrites it.',
    f'echo; echo "=== $(date "+%Y-%m-%d %H:%M:%S") job $SLURM_JOB_ID (requeued ${{SLURM_RESTART_COUNT:-0}}x)"'
    f' {shlex.quote(shlex.join(run.command))}',
    shlex.join([*helper, 'started', *where]),
    shlex.join(['srun', '--kill-on-bad-exit=1', *run.command]),
    shlex.join([*helper, 'after', *where, '--max_requeues', str(int(spec.max_requeues)), '--sweep'])
    + ' --returncode $?',
  ]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------------
# The scheduler.


class SlurmError(ConfigError):
  """SLURM refused or is missing (a partition that does not exist, no sbatch here): one message, no traceback."""


def _slurm(*command: str) -> str:
  """Runs a SLURM command; its stdout, or one clear error."""
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
  except FileNotFoundError:
    raise SlurmError(
      f'{command[0]} is not installed here: run SLURM sweeps on a cluster login node (or start a local one: '
      'scripts/local_slurm.sh start), or use --config.sweep.executor=local.'
    ) from None
  if done.returncode:
    hint = ' Check config.sweep.slurm (partition, time, extra, ...).' if command[0] == 'sbatch' else ''
    raise SlurmError(f'`{shlex.join(command)}` failed: {done.stderr.strip() or done.stdout.strip()}{hint}')
  return done.stdout


def queue() -> dict[str, str]:
  """{job id: state} of this user's jobs that SLURM still knows (finished ones for a few minutes)."""
  states = {}
  for line in _slurm('squeue', '--me', '--noheader', '--states=all', '--format=%i %T').splitlines():
    if line.strip():
      job, state = line.split()[:2]
      states[job] = state
  return states


def in_queue(job: str, states: dict[str, str]) -> bool:
  return job in states and states[job] not in ENDED


# ---------------------------------------------------------------------------------------------------
# Submitting a sweep's runs.


def _status(directory: str) -> dict:
  path = os.path.join(directory, STATUS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _update_status(directory: str, **values) -> dict:
  status = {**_status(directory), **values}
  write_atomic(os.path.join(directory, STATUS_FILE), json.dumps(status, indent=2))
  return status


def submit(runs, spec) -> None:
  """Submits a job for each of `runs` (the sweep's unfinished runs) unless its job is still queued or running;
  with `spec.wait`, waits for all of them and reports each outcome. `spec` is config.sweep."""
  states = queue()
  submitted, queued = [], []
  for run in runs:
    status = _status(run.directory)
    job = str(status.get('job_id', ''))
    if job and in_queue(job, states):
      print(f'[sweep] {run.label}: job {job} is {states[job].lower()}: not submitted again', flush=True)
      queued.append(run)
      continue
    if job and status.get('status') in (results.QUEUED, results.RUNNING):  # the job ended without saying how
      _record_lost_job(run, job, states.get(job))
    os.makedirs(run.directory, exist_ok=True)
    script = os.path.join(run.directory, SCRIPT_FILE)
    with open(script, 'w') as f:
      f.write(job_script(run, spec.slurm))
    # Held until its status names it: the job itself then updates that file, and nothing overwrites it.
    job = _slurm('sbatch', '--parsable', '--hold', script).strip().split(';')[0]
    _update_status(
      run.directory,
      status=results.QUEUED,
      executor='slurm',
      job_id=job,
      num_steps=run.num_steps,
      attempts=int(status.get('attempts', 0)) + 1,
      wall_s=0.0 if status.get('status') == results.FINISHED else float(status.get('wall_s', 0.0)),
      command=run.command,
      error='',
      max_requeues=int(spec.slurm.max_requeues),  # for the sweep's status: `requeue_cap_reached`
    )
    _slurm('scontrol', 'release', job)
    print(f'[sweep] submitted {run.label}: job {job}', flush=True)
    submitted.append(run)
  print(
    f'[sweep] {len(submitted)} jobs submitted, {len(queued)} already queued; logs in <run>/{LOG_FILE}. '
    + ('Waiting for them (config.sweep.wait).' if spec.wait else 'Re-run this command to aggregate finished runs.'),
    flush=True,
  )
  if spec.wait:
    wait(submitted + queued)


def _record_lost_job(run, job: str, state: str | None) -> None:
  """A job that left the queue while its status still said queued or running: killed before its `after`
  (a time limit without a signal, scancel, a node failure). Recorded as failed with its log's last lines."""
  reason = lost_job_reason(job, state)
  tail = error_tail(os.path.join(run.directory, LOG_FILE))
  _update_status(run.directory, status=results.FAILED, error=f'{reason}\n{tail}'.strip())
  print(f'[sweep] failed {run.label}: {reason}', flush=True)


def lost_job_reason(job: str, state: str | None) -> str:
  """Why a run whose status still says queued or running is failed: its job left the queue (`state`: its last
  squeue state, None once squeue has forgotten it)."""
  return f'SLURM job {job} ended ({state or "no longer in squeue"}) without recording an outcome.'


def requeue_cap_reached(status: dict) -> int | None:
  """The cap, when a run's job stopped early and was not requeued because it had been requeued
  `max_requeues` times (see `requeue_decision`); else None. `status` is the run's status.json."""
  cap = status.get('max_requeues')
  if status.get('status') == results.INTERRUPTED and cap is not None and int(status.get('requeues', 0)) >= cap:
    return int(cap)
  return None


def wait(runs, poll_seconds: float = 2.0) -> None:
  """Until no run's job is in the queue; then reports each run's outcome (a failure with its log's last line)."""
  while True:
    states = queue()
    if not any(in_queue(str(_status(run.directory).get('job_id', '')), states) for run in runs):
      break
    time.sleep(poll_seconds)
  for run in runs:
    status = _status(run.directory)
    if status.get('status') in (results.QUEUED, results.RUNNING):
      _record_lost_job(run, str(status.get('job_id', '')), states.get(str(status.get('job_id', ''))))
      status = _status(run.directory)
    error = status.get('error', '')
    print(f'[sweep] {status.get("status")} {run.label}' + (f': {error.splitlines()[-1]}' if error else ''), flush=True)


# ---------------------------------------------------------------------------------------------------
# Inside a job: before and after the training step.


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step."""
  return max(layout.checkpoint_steps(workdir), default=None)


def _planned_steps(workdir: str) -> int:
  saved = workdir_lib.load_saved(workdir)
  if saved is None:
    raise FileNotFoundError(layout.config_file(workdir))
  return int(saved['train']['num_steps'])


def requeue_decision(workdir: str, restarts: int, max_requeues: int) -> tuple[bool, str]:
  """Whether a job that stopped early (a signal: preemption or the time limit's warning) should be requeued;
  and why not. Not once it was requeued `max_requeues` times, nor when it stopped at the same step as before
  its last requeue (twice in a row without progress: a longer wait would not help)."""
  step = latest_step(workdir)
  path = os.path.join(workdir, REQUEUE_FILE)
  stops = []
  if os.path.exists(path):
    with open(path) as f:
      stops = json.load(f)['stops']
  if restarts >= max_requeues:
    return False, (
      f'Stopped at step {step} after {restarts} requeues: not requeued again (max_requeues={max_requeues}). '
      'Give the job more time, or raise config.sweep.slurm.max_requeues; resubmitting resumes it.'
    )
  if restarts and stops and stops[-1] == step:
    return False, (
      f'Stopped at step {step} twice in a row, without progress since its last requeue: not requeued again. '
      'Its log says why; give the job more time (the step between checkpoints may not fit).'
    )
  write_atomic(path, json.dumps({'stops': [*stops, step]}))
  return True, ''


def error_tail(path: str) -> str:
  """The run's error at the end of its log, without srun's own lines about the failed task (which follow it)."""
  tail = results.log_tail(path)
  own = [line for line in tail.splitlines() if not line.startswith('srun: ')]
  return '\n'.join(own) if own else tail


def started(workdir: str) -> None:
  _update_status(workdir, status=results.RUNNING, started=time.time())


def after(workdir: str, returncode: int, num_steps: int | None, max_requeues: int, sweep_run: bool, env=None) -> int:
  """What a job does when its srun step ends: finished, failed, or stopped early by a signal (then requeued
  unless `requeue_decision` says no). Writes the sweep status when `sweep_run`. Returns the job's exit code."""
  env = os.environ if env is None else env
  num_steps = _planned_steps(workdir) if num_steps is None else num_steps
  step = latest_step(workdir)
  requeue, error = False, ''
  if returncode == 0 and step == num_steps:
    outcome = results.FINISHED
  elif returncode:
    outcome, error = results.FAILED, error_tail(os.path.join(workdir, LOG_FILE))
    if 'NonFiniteLoss: ' in error:  # transformer.loop's error for a NaN or infinite loss
      outcome = results.DIVERGED
  else:
    requeue, error = requeue_decision(workdir, int(env.get('SLURM_RESTART_COUNT', '0')), max_requeues)
    outcome = results.QUEUED if requeue else results.INTERRUPTED
  if sweep_run:
    status = _status(workdir)
    elapsed = time.time() - float(status.get('started', time.time()))
    _update_status(
      workdir,
      status=outcome,
      returncode=returncode,
      error=error,
      wall_s=float(status.get('wall_s', 0.0)) + elapsed,
      requeues=int(env.get('SLURM_RESTART_COUNT', '0')) + requeue,
    )
  if requeue:
    print(f'[slurm] stopped at step {step} of {num_steps}: requeueing job {env["SLURM_JOB_ID"]}.', flush=True)
    _slurm('scontrol', 'requeue', env['SLURM_JOB_ID'])
    return 0
  if error:
    print(f'[slurm] {outcome}: {error}', flush=True)
  return 0 if outcome == results.FINISHED else (returncode or 1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m transformer.experiment.slurm', description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  for name in ('started', 'after'):
    command = commands.add_parser(name)
    command.add_argument('--workdir', required=True)
    command.add_argument('--num_steps', type=int, default=None, help="default: the run's config.json")
    command.add_argument('--returncode', type=int, default=0)
    command.add_argument('--max_requeues', type=int, default=3)
    command.add_argument('--sweep', action='store_true', help="write the sweep's status.json")
  args = parser.parse_args(argv)
  if args.command == 'started':
    started(args.workdir)
    return 0
  return after(args.workdir, args.returncode, args.num_steps, args.max_requeues, args.sweep)


if __name__ == '__main__':
  sys.exit(main())
