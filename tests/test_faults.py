"""Faults cost at most the steps since the last checkpoint, never a result: processes killed anywhere (inside a
checkpoint save too), damaged checkpoints, SIGTERM in training and in an eval, full and read-only disks, two
runs on one workdir. Each fault hits a real `launch.py` process; the uninterrupted reference and the final
resumes run in this process (the same numbers: one CPU device, the same XLA flags), to keep the file cheap.
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys

import launching
import pytest

sys.path.insert(0, launching.ROOT)
from conftest import PEAK_FLOPS
from test_checkpoint import corrupt  # noqa: E402

from experiments import synthetic  # noqa: E402
from transformer import loop, workdir  # noqa: E402
from transformer.checkpoint import CheckpointError, Checkpoints  # noqa: E402

CONFIG = 'experiments/synthetic.py:reverse'
STEPS = 18
SETTINGS = {
  'model.d_model': 32,
  'model.d_ff': 64,
  'model.num_heads': 2,
  'model.num_encoder_layers': 1,
  'model.num_decoder_layers': 1,
  'model.dropout_rate': 0.1,  # a resume must reproduce the dropout masks too
  'data.num_eval': 16,
  'data.max_len': 8,
  'data.seq_len': 12,
  'train.batch_size': 8,
  'train.num_steps': STEPS,
  'train.log_every': 1,
  'train.eval_every': 6,
  'train.checkpoint_every': 3,
  'train.warmup_steps': 5,
  'train.num_samples': 0,
  'train.peak_flops': PEAK_FLOPS,  # no matmul timed for MFU
}


def flags(**extra) -> list[str]:
  """The settings as launch.py flags; `extra` uses `__` for dots (train__num_steps=...)."""
  values = {**SETTINGS, **{k.replace('__', '.'): v for k, v in extra.items()}}
  return [f'--config.{key}={value}' for key, value in values.items()]


def config(**extra):
  """The same settings as a config object, for runs in this process."""
  result = synthetic.get_config('reverse')
  for key, value in {**SETTINGS, **{k.replace('__', '.'): v for k, v in extra.items()}}.items():
    section, name = key.split('.')
    result[section][name] = value
  return result


@pytest.fixture(scope='module')
def reference(shared):
  """The uninterrupted run: losses of every step and eval metrics every 6 steps (made once per session)."""
  directory = str(shared('faults_reference', SETTINGS, lambda path: loop.train_and_evaluate(config(), str(path))))
  assert sorted(launching.losses(directory)) == list(range(1, STEPS + 1))
  return directory


def complete_steps(directory) -> list[int]:
  return sorted(int(name) for name in os.listdir(os.path.join(directory, 'checkpoints')) if name.isdigit())


def assert_same_run(directory, reference):
  """Bitwise the same losses at every step and the same eval metrics as the uninterrupted run."""
  got, want = launching.metrics(directory), launching.metrics(reference)
  assert [got[s]['train/loss'] for s in range(1, STEPS + 1)] == [want[s]['train/loss'] for s in range(1, STEPS + 1)]
  for step in range(6, STEPS + 1, 6):
    assert got[step]['eval/loss'] == want[step]['eval/loss'], step


@pytest.mark.slow(33)
def test_killed_at_seeded_points_and_inside_a_save_resumes_exactly(reference, tmp_path):
  """SIGKILL after two seeded steps, then inside the asynchronous save of a seeded checkpoint step (held
  open by a test hook after orbax wrote its files under the temporary name, before the rename). Each run
  resumes from the newest complete checkpoint; the half-saved step is never restored and its temporary
  folder is deleted; every step's loss equals the uninterrupted run's. While the held run is alive, a
  second run on its workdir is refused, naming the holder; once it is killed, its lock is gone."""
  rng = random.Random(0)
  first, second = sorted(rng.sample(range(2, 12), 2))
  held = rng.choice((12, 15))
  assert (first, second, held) == (8, 11, 12)  # the points the runs' starts below follow from
  run = str(tmp_path / 'killed')
  newest = []  # the newest complete checkpoint after each kill: the next run must start right after it
  for point in (first, second):
    procs = launching.start(CONFIG, run, *flags(), env={'TRANSFORMER_TEST_KILL_AT': f'{point}:0'})
    procs[0].wait(timeout=600)
    assert procs[0].returncode == -signal.SIGKILL, launching.log_tail(run)
    assert max(launching.losses(run)) == point
    newest.append(complete_steps(run)[-1])
  procs = launching.start(CONFIG, run, *flags(), env={'TRANSFORMER_TEST_HOLD_SAVE': str(held)})
  try:
    launching.wait_for_log(run, f'Holding the save of step {held} open', procs=procs)
    partial = launching.partial_checkpoints(run)
    assert [name.split('.')[0] for name in partial] == [str(held)]  # written, not renamed
    second_run = launch(run, *flags())
    one_message(second_run, f'{run} is in use by another run (host {socket.gethostname()}, pid {procs[0].pid}, ')
  finally:
    launching.kill(procs)
  assert procs[0].returncode == -signal.SIGKILL
  newest.append(complete_steps(run)[-1])
  assert newest[-1] < held  # the held save never completed
  loop.train_and_evaluate(config(), run)
  assert launching.run_starts(run) == [1] + [step + 1 for step in newest]
  assert launching.partial_checkpoints(run) == []
  assert_same_run(run, reference)


def launch(directory, *extra_flags, timeout: float = 600) -> subprocess.CompletedProcess:
  """launch.py with its output captured here (not in the workdir, which may be read-only or full)."""
  command = [sys.executable, os.path.join(launching.ROOT, 'launch.py'), '--config', CONFIG, '--workdir', str(directory)]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    command + list(extra_flags), cwd=launching.ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def one_message(result: subprocess.CompletedProcess, text: str) -> None:
  """The run failed with `text` in its output, and no traceback."""
  output = result.stdout + result.stderr
  assert result.returncode not in (0, None) and text in output, output[-4000:]
  assert 'Traceback' not in output, output[-4000:]


def copy_run(reference, directory, until: int):
  """A copy of the reference workdir with its metrics up to step `until`, as if it had stopped there."""
  shutil.copytree(reference, directory, dirs_exist_ok=True)
  path = os.path.join(directory, 'metrics.jsonl')
  with open(path) as f:
    rows = [line for line in f if json.loads(line)['step'] <= until]
  with open(path, 'w') as f:
    f.writelines(rows)


def test_lock_refuses_a_second_run_names_the_holder_and_is_free_once_released(tmp_path):
  """In one process (the real-process case is in the kill test): a second holder is refused with the
  first's host and pid; the other processes of the same run (not primary) are not; released, it is free."""
  directory = str(tmp_path / 'run')
  with workdir.locked(directory):
    holder = f'in use by another run (host {socket.gethostname()}, pid {os.getpid()}, started '
    with pytest.raises(workdir.WorkdirError, match=re.escape(holder)):
      with workdir.locked(directory):
        pass
    with workdir.locked(directory, primary=False):
      pass
  with workdir.locked(directory):
    pass


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(reference, tmp_path):
  """The newest checkpoint (18) with an array file cut in half: the run says so in one line naming the step,
  moves it to checkpoints/damaged/18, resumes from 15 and ends with the uninterrupted run's numbers. With no
  complete checkpoint left, the run stops with one message naming the step and the way out."""
  run = tmp_path / 'run'
  copy_run(reference, run, until=15)
  corrupt(run / 'checkpoints' / '18', 'truncated')
  launching.run(CONFIG, run, *flags())
  log = launching.log_tail(run, 0, 10**6)
  lines = [line for line in log.splitlines() if 'is damaged' in line]
  assert len(lines) == 1 and f'The checkpoint of step 18 in {run}/checkpoints is damaged' in lines[0], log[-4000:]
  assert f'moved to {run}/checkpoints/damaged/18' in lines[0]
  assert 'Traceback' not in log and 'Event loop is closed' not in log, log[-4000:]
  assert launching.run_starts(run)[-1] == 16
  assert os.listdir(run / 'checkpoints' / 'damaged') == ['18']
  assert '18' in os.listdir(run / 'checkpoints')  # saved again
  assert_same_run(run, reference)

  only = tmp_path / 'only_damaged'
  copy_run(reference, only, until=STEPS)
  for step in ('12', '15'):
    shutil.rmtree(only / 'checkpoints' / step)
  corrupt(only / 'checkpoints' / '18', 'zeros')
  result = launch(only, *flags())
  one_message(
    result, f'No complete checkpoint is left in {only}/checkpoints: every checkpoint there is damaged (step 18'
  )
  with Checkpoints(str(only / 'checkpoints')) as again:  # the next attempt does not start from scratch either
    with pytest.raises(CheckpointError, match='No complete checkpoint is left'):
      again.latest_step()
  assert not os.path.exists(only / 'checkpoints' / '18')


@contextlib.contextmanager
def tmpfs(path, size: str):
  """A tmpfs of `size` mounted at `path` (root only); unmounted afterwards. Skipped where mounting is
  impossible, except in CI (CI=true), where that is a failure."""
  os.makedirs(path, exist_ok=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True)
  if mounted.returncode:
    reason = f'cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}'
    if os.environ.get('CI') == 'true':
      pytest.fail(reason)
    pytest.skip(reason)
  try:
    yield path
  finally:
    if subprocess.run(['umount', str(path)], capture_output=True).returncode:  # busy: a file left open
      subprocess.run(['umount', '--lazy', str(path)], check=True)


def remount(path, mode: str):
  subprocess.run(['mount', '-o', f'remount,{mode}', str(path)], check=True)


def snapshot(directory) -> dict[str, bytes]:
  """Every file under `directory` with its contents."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def test_read_only_workdir_is_refused_before_training_and_left_as_it_was(reference, tmp_path):
  """A workdir with checkpoints on a read-only mount: one message naming it, before any step; every file
  as it was."""
  with tmpfs(tmp_path / 'ro', '8m') as run:
    copy_run(reference, run, until=STEPS)
    remount(run, 'ro')
    before = snapshot(run)
    result = launch(run, *flags(train__num_steps=STEPS + 6))
    one_message(result, f'Cannot write to {run} (Read-only file system)')
    assert snapshot(run) == before


def test_full_disk_is_refused_before_training(tmp_path):
  """A workdir with less room than one checkpoint: one message with both sizes, before any step."""
  with tmpfs(tmp_path / 'full', '64k') as run:
    result = launch(run, *flags())
    one_message(result, f'{run}/checkpoints has ')
    assert 'but one checkpoint of this model takes about' in result.stdout + result.stderr
    assert not os.path.exists(os.path.join(run, 'metrics.jsonl'))


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_disk_filling_up_fails_at_the_save_with_one_message_and_the_last_checkpoint_intact(reference, tmp_path):
  """Room for one checkpoint at the start, not two: the failing save of step 6 is one error naming the step
  and saying that step 3 is intact; resumed elsewhere, step 3 continues to the uninterrupted run's losses.
  The writes orbax abandons leave no unraisable exception behind ("Event loop is closed": an error here).
  (No evals: they change nothing here and cost a compile.)"""
  no_evals = config(train__eval_every=100)
  with tmpfs(tmp_path / 'filling', '700k') as run:
    with pytest.raises(
      CheckpointError,
      match=rf'step 6 to {run}/checkpoints failed \(No space left on device\); '
      'the checkpoint of step 3 is intact',
    ):
      loop.train_and_evaluate(no_evals, str(run))
    moved = tmp_path / 'moved'
    shutil.copytree(run, moved)
  loop.train_and_evaluate(no_evals, str(moved))
  assert launching.run_starts(moved) == [1, 4]
  got, want = launching.losses(moved), launching.losses(reference)
  assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]


@pytest.mark.slow(21)
def test_sigterm_in_an_eval_saves_and_resumes_exactly(reference, tmp_path):
  """SIGTERM during the eval of step 6 (the run signals itself as the eval starts, by a test hook): the eval
  finishes and is logged, a checkpoint of step 6 is saved right after it (checkpoints are otherwise saved at
  the last step only), and the run exits 0 saying to re-run. `--mode eval` signalled the same way exits 0
  and writes nothing. The resumed run equals the uninterrupted one at every step. (SIGTERM between steps:
  tests/test_loop.py; a stop between steps resumes exactly: its test_resumed_run_is_bitwise_identical.)"""
  run = tmp_path / 'sigterm'
  rare = flags(train__checkpoint_every=100)
  procs = launching.start(CONFIG, run, *rare, env={'TRANSFORMER_TEST_SIGTERM_IN_EVAL': '6'})
  launching.wait(procs, run)
  assert 'Stopped by a signal at step 6; checkpoint saved. Re-run to resume.' in launching.log_tail(run)
  assert complete_steps(run) == [6]
  assert launching.metrics(run)[6]['eval/loss'] == launching.metrics(reference)[6]['eval/loss']

  with open(run / 'metrics.jsonl') as f:
    logged = f.read()
  procs = launching.start(CONFIG, run, *rare, mode='eval', env={'TRANSFORMER_TEST_SIGTERM_IN_EVAL': '6'})
  launching.wait(procs, run)
  assert 'Stopped by a signal during the eval of step 6: nothing written. Re-run to evaluate it.' in (
    launching.log_tail(run)
  )
  with open(run / 'metrics.jsonl') as f:
    assert f.read() == logged

  loop.train_and_evaluate(config(train__checkpoint_every=100), str(run))
  assert launching.run_starts(run) == [1, 7]
  assert_same_run(run, reference)
