"""Checkpoints: bitwise round trips, retention, data-iterator state, resharding, clear errors, preemption.

Multi-device and multi-process cases run this file as a script in subprocesses (see `__main__` below):
the device count must be in XLA_FLAGS before JAX starts.
"""

import asyncio
import gc
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import grain
import jax
import numpy as np
import optax
import pytest
from conftest import tiny
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer import checkpoint, models, optim, train
from transformer.checkpoint import CheckpointError, Checkpoints, PreemptionGuard
from transformer.config import default_train_config

CONFIG = {'model': {'d_model': 32}, 'train': {'seed': 0, 'mesh': {'data': -1}}}


def make_state(d_model=32):
  """A TrainState after one fake update, so that the step, Adam moments and count are all non-trivial.
  adamw + clipping: its optax state has empty nodes (EmptyState, MaskedState), which must round-trip too.
  Jitted: one compile is much faster than running the init op by op."""
  train_config = default_train_config(optimizer='adamw', grad_clip=1.0, weight_decay=0.1)
  optimizer = optim.make_optimizer(train_config, d_model)
  model = models.build_model(tiny(d_model=d_model))

  @jax.jit
  def build():
    state = train.init_state(model, optimizer, seed=0)
    updates, opt_state = optimizer.update(state.params, state.opt_state, state.params)
    return state.replace(step=state.step + 5, params=optax.apply_updates(state.params, updates), opt_state=opt_state)

  return build()


def sharded(tree, devices):
  """Each array split over `devices` along dim 0 when it divides evenly, else replicated."""
  mesh = Mesh(np.array(devices), ('x',))

  def sharding(x):
    split = x.ndim and x.shape[0] % len(devices) == 0
    return NamedSharding(mesh, P('x') if split else P())

  return jax.tree.map(sharding, tree)


def abstract(state, shardings=None):
  shardings = shardings or jax.tree.map(lambda x: x.sharding, state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def assert_bitwise_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope='module')
def state():
  return make_state()


def test_round_trip_is_bitwise(state, tmp_path):
  ckpt = Checkpoints(str(tmp_path), async_save=False)
  assert ckpt.latest_step() is None
  assert ckpt.save(5, state, data_state={'next_index': 12}, config=CONFIG)
  restored, data_state = ckpt.restore(abstract(state))
  assert_bitwise_equal(restored, state)
  assert int(restored.step) == 5 and data_state == {'next_index': 12}
  with open(os.path.join(ckpt.directory, '5', 'config', 'metadata')) as f:  # orbax's JSON item
    assert json.load(f) == CONFIG
  ckpt.close()


def test_keep_latest_and_async(state, tmp_path):
  ckpt = Checkpoints(str(tmp_path / 'relative' / '..' / 'ckpt'), keep=2)  # async by default
  assert os.path.isabs(ckpt.directory)
  for step in (1, 2, 3, 4):
    assert ckpt.save(step, state.replace(step=state.step * 0 + step))
  assert not ckpt.save(4, state)  # an existing step is skipped, not an error
  ckpt.wait()
  assert ckpt.latest_step() == 4 and ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(ckpt.directory)) == ['3', '4']
  restored, data_state = ckpt.restore(abstract(state), step=3)
  assert int(restored.step) == 3 and data_state is None
  assert not os.path.exists(os.path.join(ckpt.directory, '3', 'config'))  # saved without a config
  ckpt.close()
  with Checkpoints(ckpt.directory) as reopened:  # a new process finds the same checkpoints
    assert reopened.latest_step() == 4


def test_grain_iterator_state_round_trip(state, tmp_path):
  dataset = grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset()
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  with Checkpoints(str(tmp_path)) as ckpt:
    ckpt.save(3, state, data_state=iterator.get_state())
    _, data_state = ckpt.restore(abstract(state))
  fresh = iter(dataset)
  fresh.set_state(data_state)
  for _ in range(3):
    np.testing.assert_array_equal(next(fresh), next(iterator))


def run_self(*args, devices=1):
  env = dict(
    os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'
  )
  return subprocess.run(
    [sys.executable, __file__, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(__file__),
  )


def test_restore_onto_another_device_count(state, tmp_path):
  saved = run_self('save_sharded', str(tmp_path), devices=8)
  assert saved.returncode == 0, saved.stderr[-3000:]
  loaded = run_self('restore_sharded', str(tmp_path), devices=2)
  assert loaded.returncode == 0 and 'restored on 2 devices' in loaded.stdout, loaded.stderr[-3000:]
  with Checkpoints(str(tmp_path)) as ckpt:  # and on this process's single device
    restored, _ = ckpt.restore(abstract(state))
  assert_bitwise_equal(restored, state)


def test_changed_model_is_a_clear_error(state, tmp_path):
  with Checkpoints(str(tmp_path)) as ckpt:
    ckpt.save(5, state)
    other = jax.eval_shape(lambda: make_state(d_model=16))
    with pytest.raises(ValueError, match=r'params/\S+ has shape \(32, \d+\) .* but \(16, \d+\) .*changed'):
      ckpt.restore(abstract(other, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), other)))


def test_missing_checkpoint_is_a_clear_error(state, tmp_path):
  with Checkpoints(str(tmp_path)) as ckpt:
    with pytest.raises(FileNotFoundError, match='No checkpoint in'):
      ckpt.restore(abstract(state))
    ckpt.save(1, state)
    with pytest.raises(FileNotFoundError, match=r'step 7 .*saved steps: \[1\]'):
      ckpt.restore(abstract(state), step=7)


def test_incomplete_checkpoint_is_ignored(state, tmp_path):
  with Checkpoints(str(tmp_path)) as ckpt:
    ckpt.save(1, state)
  # What a save killed before its final rename leaves behind: all files, under the temporary name.
  shutil.copytree(tmp_path / '1', tmp_path / '2.orbax-checkpoint-tmp-1700000000')
  (tmp_path / '3.orbax-checkpoint-tmp-1700000001').mkdir()
  with Checkpoints(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    restored, _ = ckpt.restore(abstract(state))
  assert_bitwise_equal(restored, state)


def _wait_for(condition, seconds=5.0):
  """Signal handlers run in the main thread at its next check, not inside os.kill: give them a moment."""
  deadline = time.time() + seconds
  while not condition() and time.time() < deadline:
    time.sleep(0.01)
  return condition()


def test_preemption_guard_catches_sigterm():
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  with PreemptionGuard() as guard:
    assert not guard.requested and not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert _wait_for(lambda: guard.requested) and guard.should_stop(1)
  assert {sig: signal.getsignal(sig) for sig in before} == before
  # Python's own Ctrl-C handler before the guard (pytest-xdist workers ignore SIGINT).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with PreemptionGuard() as guard:
      os.kill(os.getpid(), signal.SIGINT)
      assert _wait_for(lambda: guard.requested)
      with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still interrupts
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # interrupted by the handler
  finally:
    signal.signal(signal.SIGINT, before[signal.SIGINT])


def test_preemption_agrees_across_processes():
  """Only process 1 receives SIGTERM; both stop at the same (synced) step."""
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = str(sock.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, 'preempt', port, str(i)],
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      cwd=os.path.dirname(__file__),
    )
    for i in range(2)
  ]
  outputs = [proc.communicate(timeout=120) for proc in procs]
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
    assert 'should_stop [False, False, True]' in out, out + err[-3000:]


def corrupt(step_directory, how):
  """Damages a saved step as failing disks and interrupted copies do."""
  state_directory = os.path.join(step_directory, 'state')
  if how == 'missing_metadata':
    os.remove(os.path.join(state_directory, '_METADATA'))
    return
  biggest = max(glob.glob(os.path.join(state_directory, 'ocdbt.process_*', 'd', '*')), key=os.path.getsize)
  size = os.path.getsize(biggest)
  if how == 'truncated':
    os.truncate(biggest, size // 2)
  else:  # 'zeros': the right size, the wrong bytes
    with open(biggest, 'wb') as f:
      f.write(bytes(size))


@pytest.mark.parametrize('how', ['truncated', 'zeros', 'missing_metadata'])
def test_damaged_latest_step_is_set_aside_and_the_previous_one_restored(state, tmp_path, how, caplog):
  later = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1, state.params))
  with Checkpoints(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, data_state={'next_index': 1})
    ckpt.save(2, later, data_state={'next_index': 2})
  corrupt(tmp_path / '2', how)
  with Checkpoints(str(tmp_path)) as ckpt, caplog.at_level(logging.ERROR):
    restored, data_state = ckpt.restore(abstract(state))
    assert_bitwise_equal(restored, state)
    assert data_state == {'next_index': 1}
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1 and ckpt.damaged_steps() == ['2']
    messages = [r.getMessage() for r in caplog.records if 'damaged' in r.getMessage()]
    assert len(messages) == 1 and f'step 2 in {tmp_path}' in messages[0]
    assert f'moved to {tmp_path}/damaged/2' in messages[0]
    ckpt.save(2, later, data_state={'next_index': 2})  # the step can be saved again
    restored, data_state = ckpt.restore(abstract(state))
  assert_bitwise_equal(restored, later)
  assert data_state == {'next_index': 2}
  assert sorted(os.listdir(tmp_path / 'damaged' / '2')) == sorted(os.listdir(tmp_path / '2'))  # kept as it was


class _Pause:
  def __await__(self):
    yield


def _abandoned_read(filename):
  """A suspended coroutine whose code lives in `filename` and, closed, raises as orbax's array read does
  (`except BaseException: raise Exception(...)`), so its garbage collection is an unraisable exception."""
  source = (
    'async def read(pause):\n  try:\n    await pause\n'
    '  except BaseException as e:\n    raise Exception("read") from e\n'
  )
  namespace = {}
  exec(compile(source, filename, 'exec'), namespace)
  coroutine = namespace['read'](_Pause())
  coroutine.send(None)
  return coroutine


def test_abandoned_orbax_reads_print_no_traceback(monkeypatch):
  """Orbax's pending reads of a damaged checkpoint, closed by the garbage collector, reach the unraisable
  hook; Checkpoints drops those (restore reports the damage once) and passes every other one on."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: seen.append(unraisable.object.cr_code.co_filename))
  checkpoint._quiet_orbax_tracebacks()
  checkpoint._quiet_orbax_tracebacks()  # installed once however many Checkpoints a process opens
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'serialization.py')
  other_file = os.path.join(os.sep, 'site-packages', 'other', 'serialization.py')
  for filename in (orbax_file, other_file):
    coroutine = _abandoned_read(filename)
    del coroutine  # the last reference: Python closes it now, and the close raises
  assert seen == [other_file]


def _raised_in(filename):
  namespace = {}
  exec(compile('def write():\n  raise ValueError("RESOURCE_EXHAUSTED: Error writing")\n', filename, 'exec'), namespace)
  try:
    namespace['write']()
  except ValueError as error:
    return error


def test_orbax_futures_never_retrieved_are_not_logged(caplog):
  """A failed orbax write that asyncio logs as "never retrieved" when collected (a full disk; save reports it
  once) is dropped before its traceback is formatted; asyncio's other errors are logged as before."""
  checkpoint._quiet_orbax_tracebacks()
  checkpoint._quiet_orbax_tracebacks()  # one filter however many Checkpoints a process opens
  asyncio_logger = logging.getLogger('asyncio')
  assert sum(isinstance(f, checkpoint._NoOrbaxFutures) for f in asyncio_logger.filters) == 1
  for directory in ('orbax', 'other'):
    error = _raised_in(os.path.join(os.sep, 'site-packages', directory, 'serialization.py'))
    asyncio_logger.error(f'Future exception was never retrieved ({directory})', exc_info=error)
  assert [r.getMessage() for r in caplog.records] == ['Future exception was never retrieved (other)']


def _closed_loop_callback():
  """What tensorstore's thread hands the unraisable hook when a read finishes after its event loop closed."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as error:
    return types.SimpleNamespace(
      exc_type=RuntimeError, exc_value=error, exc_traceback=error.__traceback__, err_msg=None, object=None
    )


def test_operations_abandoned_by_a_failed_save_or_restore_are_silent_and_nothing_else_is(
  state, tmp_path, monkeypatch, caplog
):
  """A failed restore's (or save's) other reads (writes) finish later in tensorstore's threads: each calls
  back into the closed event loop (an unraisable "Event loop is closed") and leaves an error asyncio logs as
  "never retrieved". Both are dropped only while a save or restore of that step folder (or of its temporary
  `<step>.orbax-checkpoint-tmp`) is in flight or after it failed; a healthy save and restore list nothing."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: seen.append(str(unraisable.exc_value)))
  monkeypatch.setattr(checkpoint, '_UNFINISHED', [])
  with Checkpoints(str(tmp_path)) as ckpt:
    ckpt.save(1, state)
    ckpt.restore(abstract(state))
  assert checkpoint._UNFINISHED == []

  def report_both(path):
    sys.unraisablehook(_closed_loop_callback())
    error = ValueError(f'FAILED_PRECONDITION: Error reading "w/0.0" in OCDBT database at local file "{path}"')
    logging.getLogger('asyncio').error('Future exception was never retrieved', exc_info=error)

  report_both('/ckpt/7/state/')  # no save or restore failed: both are someone else's errors
  assert seen == ['Event loop is closed'] and len(caplog.records) == 1
  checkpoint._UNFINISHED.append('/ckpt/7')
  report_both('/ckpt/7/state/')
  report_both('/ckpt/7.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/')
  assert seen == ['Event loop is closed'] and len(caplog.records) == 1
  report_both('/ckpt/70/state/')  # another folder's error is still logged
  assert len(caplog.records) == 2 and '/ckpt/70/' in str(caplog.records[1].exc_info[1])


def test_a_damaged_checkpoint_of_many_arrays_prints_one_message_and_no_traceback(tmp_path):
  """End to end, in a fresh process (as `launch.py` meets it): 300 arrays keep tensorstore reads in flight
  when the damaged one fails, which printed hundreds of "Event loop is closed" tracebacks before."""
  state = {f'w{i}': jax.random.normal(jax.random.key(i), (64, 64)) for i in range(300)}
  with Checkpoints(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state)
  for path in glob.glob(str(tmp_path / '1' / 'state' / 'ocdbt.process_*' / 'd' / '*')):  # every data file zeroed
    with open(path, 'r+b') as f:
      f.write(bytes(os.path.getsize(path)))
  result = run_self('restore_many_damaged', str(tmp_path))
  assert result.returncode == 0 and 'every checkpoint there is damaged' in result.stdout, result.stderr[-3000:]
  assert result.stderr.count('is damaged') == 1, result.stderr[-3000:]
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved'):
    assert noise not in result.stderr, result.stderr[-3000:]


def test_no_complete_step_left_is_a_clear_error_not_a_fresh_start(state, tmp_path):
  with Checkpoints(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(3, state)
  corrupt(tmp_path / '3', 'truncated')
  expected = rf'No complete checkpoint is left in {tmp_path}: .*damaged \(step 3, .*delete {tmp_path}/damaged'
  with Checkpoints(str(tmp_path)) as ckpt:
    with pytest.raises(CheckpointError, match=expected):
      ckpt.restore(abstract(state))
  with Checkpoints(str(tmp_path)) as ckpt:  # the next run cannot mistake the directory for an empty one
    with pytest.raises(CheckpointError, match=expected):
      ckpt.latest_step()


if __name__ == '__main__':
  command, *args = sys.argv[1:]
  if command == 'save_sharded':
    assert jax.device_count() == 8
    state = make_state()
    state = jax.device_put(state, sharded(state, jax.devices()))
    assert len(state.params['decoder']['stack']['layer_0']['ffn']['wi']['kernel'].sharding.device_set) == 8
    with Checkpoints(args[0]) as ckpt:
      ckpt.save(5, state)
  elif command == 'restore_sharded':
    assert jax.device_count() == 2
    expected = make_state()
    shardings = sharded(expected, jax.devices())
    with Checkpoints(args[0]) as ckpt:
      restored, _ = ckpt.restore(abstract(expected, shardings))
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, restored, shardings))
    assert_bitwise_equal(restored, expected)
    print('restored on 2 devices')
  elif command == 'restore_many_damaged':
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_state = {f'w{i}': jax.ShapeDtypeStruct((64, 64), np.float32, sharding=one_device) for i in range(300)}
    with Checkpoints(args[0]) as ckpt:
      try:
        ckpt.restore(abstract_state)
      except CheckpointError as error:
        print(error)
    gc.collect()
    time.sleep(1)  # the abandoned reads finish meanwhile, in tensorstore's threads
  elif command == 'preempt':
    port, index = args
    jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=int(index))
    with PreemptionGuard(sync_every=3) as guard:
      if jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      print('should_stop', [guard.should_stop(step) for step in (1, 2, 3)], flush=True)
    jax.distributed.shutdown()
