"""Checkpoints (orbax): train state + data-iterator state + config, and a preemption guard.

One step's checkpoint is a directory `<directory>/<step>/` with three items:
  state      the `TrainState` pytree (params, optimizer state, step, rng), written shard by shard;
  data_pos   each process's data-iterator state, `process_<i>-of-<n>.json`, written by that process (its rows'
             streams: on another process count the union of all of them is restored)
             (checkpoints of older versions hold one `data` item, from process 0);
  config     the resolved experiment config (JSON), so `--mode eval` can rebuild the model.
The state restores onto any mesh, device or process count, and into either layer layout (scanned or
unrolled): both compute the same function from the same numbers.
orbax writes each step into `<step>.orbax-checkpoint-tmp-<timestamp>/` and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which is never listed as a step (and is
deleted when the next run opens the directory).

A complete step that cannot be read (a file cut short or overwritten, a metadata file missing) is moved to
`<directory>/damaged/<step>/`, kept for inspection, and the restore falls back to the step before it. When
no complete step is left, the run stops with a message naming the damaged steps: it never quietly starts
from scratch.
"""

import dataclasses
import glob
import json
import logging as std_logging
import os
import re
import signal
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer import models, signals
from transformer.config import ConfigError

DAMAGED = 'damaged'  # sub-folder of the checkpoint directory for steps that could not be restored


class CheckpointError(ConfigError):
  """A problem with the checkpoint directory a user has to resolve (every checkpoint damaged, a save that
  failed): one message saying what happened and what to do, no traceback."""


class IncompatibleCheckpoint(ConfigError):
  """The checkpoint holds another model (shapes or parameters differ): the config, not the files, is wrong."""


class ProcessStateHandler(ocp.CheckpointHandler):
  """Each process saves its own JSON state (`process_<i>-of-<n>.json`) and restores its own.

  On another process count the file of this index is absent: then every process's file
  is returned, as a list in process order, and the pipeline takes its rows' streams from their union
  (`transformer.data.streams`).
  """

  def save(self, directory: epath.Path, args: 'ProcessStateSave'):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _process_file(jax.process_index(), jax.process_count())
    path.write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: 'ProcessStateRestore' = None):
    own = directory / _process_file(jax.process_index(), jax.process_count())
    if own.exists():
      return json.loads(own.read_text())
    found = glob.glob(os.fspath(directory / 'process_*-of-*.json'))
    if not found:
      raise FileNotFoundError(f'No data-iterator state in {directory}.')
    index = lambda path: int(re.search(r'process_(\d+)-of-', os.path.basename(path)).group(1))
    logging.warning(
      '%s was saved by %d processes: resuming the data position from the union of their states.',
      directory,
      len(found),
    )
    return [json.loads(epath.Path(path).read_text()) for path in sorted(found, key=index)]

  def metadata(self, directory):
    return None

  def structure(self, directory):
    return None

  def finalize(self, directory):
    _hold_for_test(directory)

  def close(self):
    pass


def _hold_for_test(directory) -> None:
  """Tests of fault tolerance: `TRANSFORMER_TEST_HOLD_SAVE=<step>` holds that step's save open (all its files
  written under orbax's temporary name, not yet renamed), so a test can kill the process inside the save. This
  runs in orbax's finalize, on the thread that completes the save, just before the rename."""
  step = os.environ.get('TRANSFORMER_TEST_HOLD_SAVE')
  if step and re.search(rf'(^|/){step}\.orbax-checkpoint-tmp', os.fspath(directory)):
    print(f'Holding the save of step {step} open (TRANSFORMER_TEST_HOLD_SAVE)', file=sys.stderr, flush=True)
    time.sleep(3600)


@ocp.args.register_with_handler(ProcessStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(ProcessStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessStateRestore(ocp.args.CheckpointArgs):
  pass


def _process_file(index: int, count: int) -> str:
  return f'process_{index}-of-{count}.json'


class Checkpoints:
  """orbax `CheckpointManager` under `directory` (absolute path made from the given one)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    # orbax wants absolute paths; leave remote URLs (gs://...) alone.
    self.directory = directory if '://' in str(directory) else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
    )  # leftovers of a killed save are deleted on start
    # Handlers up front: a fresh manager can then read metadata before anything was saved or restored.
    handlers = {
      'state': ocp.StandardCheckpointHandler(),
      'data_pos': ProcessStateHandler(),
      'data': ocp.JsonCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._saving = None  # the step of the save in flight, named if it fails
    _quiet_orbax_tracebacks()

  def latest_step(self) -> int | None:
    """The newest complete step; None for a directory without checkpoints. A CheckpointError when only
    damaged steps are left (see `restore`): a run must not start from scratch over them unasked."""
    step = self._manager.latest_step()
    if step is None and self.damaged_steps():
      raise CheckpointError(self._nothing_left())
    return step

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def damaged_steps(self) -> list[str]:
    """Names of the folders under `<directory>/damaged/`, oldest first."""
    directory = epath.Path(self.directory) / DAMAGED
    return sorted((p.name for p in directory.iterdir()), key=_step_order) if directory.exists() else []

  def save(
    self, step: int, state, data_state: dict | None = None, config: dict | None = None, force: bool = False
  ) -> bool:
    """Starts saving `step` and returns once the arrays are copied off the devices (the state may then be
    donated to the next step); the write itself finishes in the background. False if nothing was saved.
    A write that fails (a full or read-only disk), now or in the background, is a CheckpointError naming the
    step, raised here or by `wait`; the steps saved before it stay intact."""
    step = int(step)
    if step in self._manager.all_steps():  # e.g. the final step coincides with a periodic save
      return False
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:  # this process's own position (every process passes its own)
      items['data_pos'] = ProcessStateSave(data_state)
    if config is not None:
      items['config'] = ocp.args.JsonSave(config)
    self.wait()  # the previous save's error surfaces here
    self._saving = step
    _UNFINISHED.append(self._folder(step))
    with self._failed_save_is_clear(step):
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """`(state, data_state)` from `step` (default: the latest). Each array of `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct`) says via `.sharding` where it goes, so any device count or mesh works.

    Without `step`, a latest step that cannot be read is moved to `<directory>/damaged/<step>` with one
    message naming it, and the step before it is tried; when none is left, a CheckpointError. Every process
    must call this (multi-process runs agree on which steps are damaged; process 0 moves them)."""
    if step is not None:
      return self._restore_step(abstract_state, self._existing_step(step))
    while True:
      step = self._existing_step(None)
      restored, error = None, None
      try:
        restored = self._restore_step(abstract_state, step)
      except (ConfigError, MemoryError):  # another model, or too big for this host: not the files' fault
        raise
      except Exception as e:  # noqa: BLE001 -- whatever a damaged file makes orbax or tensorstore raise
        error = e
      if not _on_any_process(error is not None):
        return restored
      self._set_aside(step, error)

  def _restore_step(self, abstract_state, step):
    _UNFINISHED.append(self._folder(step))  # kept listed if the read fails (see _UNFINISHED)
    restored = self._read_step(abstract_state, step)
    _finished(self._folder(step))
    return restored

  def _read_step(self, abstract_state, step):
    metadata = self._manager.item_metadata(step)['state']
    if metadata is None:  # orbax found no readable metadata for the item
      raise FileNotFoundError('the metadata of the state (state/_METADATA) is missing or unreadable')
    metadata = metadata.tree
    saved, target = ocp.tree.to_flat_dict(metadata), _flat_paths(abstract_state)
    if _scanned(target) != _scanned(saved):  # the other layer layout: restore as saved, then convert
      return self._restore_other_layout(abstract_state, metadata, step)
    self._check_shapes(target, saved, step)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    items.update(self._data_item(step))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], self._data_state(restored)

  def _set_aside(self, step: int, error: Exception | None) -> None:
    """Moves the damaged `step` to `damaged/<step>` (process 0; the others wait), and forgets it."""
    if jax.process_index() == 0:
      target = self._damaged_path(step)
      reason = _reason(error) if error is not None else 'unreadable on another process'
      logging.error(
        'The checkpoint of step %d in %s is damaged (%s): moved to %s, falling back to the step before it.',
        step,
        self.directory,
        reason,
        target,
      )
      target.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
    self._manager.reload()

  def _damaged_path(self, step: int) -> epath.Path:
    """`damaged/<step>`, or `damaged/<step>.<n>` when that step was set aside before."""
    directory = epath.Path(self.directory) / DAMAGED
    target, n = directory / str(step), 1
    while target.exists():
      target, n = directory / f'{step}.{n}', n + 1
    return target

  def _nothing_left(self) -> str:
    damaged = ', '.join(self.damaged_steps())
    where = os.path.join(self.directory, DAMAGED)
    return (
      f'No complete checkpoint is left in {self.directory}: every checkpoint there is damaged (step {damaged}, '
      f'moved to {where} for inspection). To train from scratch, delete {where} or use a new --workdir; to try '
      f'a step again, move it back to {self.directory}/<step>.'
    )

  def _failed_save_is_clear(self, step):
    return _SaveErrors(self, step)

  def _data_item(self, step):
    if self._has_item(step, 'data_pos'):
      return {'data_pos': ProcessStateRestore()}
    return {'data': ocp.args.JsonRestore()} if self._has_item(step, 'data') else {}

  @staticmethod
  def _data_state(restored):
    return restored['data_pos'] if 'data_pos' in restored else restored.get('data')

  def _restore_other_layout(self, abstract_state, metadata, step):
    """Restores a checkpoint of the other layer layout (`scan_layers` switched): read replicated as
    saved (`metadata`), stacked or unstacked, then placed as `abstract_state` says."""
    target = _flat_paths(abstract_state)
    target_scanned = _scanned(target)
    replicated = NamedSharding(jax.tree.leaves(abstract_state)[0].sharding.mesh, P())
    as_saved = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), metadata)
    items = {'state': ocp.args.StandardRestore(as_saved), **self._data_item(step)}
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    converted = ocp.tree.to_flat_dict(models.convert_layers(restored['state'], scanned=target_scanned))
    self._check_shapes(target, converted, step)
    placed = [jax.device_put(converted[path].astype(a.dtype), a.sharding) for path, a in target.items()]
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), placed)
    logging.warning(
      'Restored step %d, saved with %s layers, into %s layers.',
      step,
      'scanned' if not target_scanned else 'unrolled',
      'scanned' if target_scanned else 'unrolled',
    )
    return state, self._data_state(restored)

  def read_params(self, step: int | None = None):
    """`(params, step)`: the parameters saved at `step` (default: the latest) as saved (their layer layout
    included), on this process's first device, for `--mode export` and `config.train.init_from`. The rest of the
    state is read and dropped."""
    step = self._existing_step(step)
    metadata = self._manager.item_metadata(step)['state']
    if metadata is None:
      raise CheckpointError(f'The checkpoint of step {step} in {self.directory} has no readable state metadata.')
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    as_saved = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), metadata.tree)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(as_saved)))
    return restored['state']['params'], step

  def wait(self) -> None:
    with self._failed_save_is_clear(self._saving):
      self._manager.wait_until_finished()
    if self._saving is not None:  # complete: none of its writes is left behind
      _finished(self._folder(self._saving))
      self._saving = None

  def _folder(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _existing_step(self, step):
    self.wait()  # a save still in flight is not listed yet
    steps = self.all_steps()
    if step is None:
      if not steps and self.damaged_steps():
        raise CheckpointError(self._nothing_left())
      if not steps:
        raise FileNotFoundError(
          f'No checkpoint in {self.directory}: train first, or pass the workdir that holds checkpoints/.'
        )
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(f'No checkpoint for step {step} in {self.directory}; saved steps: {steps}.')
    return int(step)

  def _has_item(self, step, name):
    return (self._manager.directory / str(step) / name).exists()

  def _check_shapes(self, target, saved, step):
    """One readable error instead of orbax's deep traceback when the model no longer matches."""
    where = f'the checkpoint at step {step} in {self.directory}'
    hint = (
      'The model/config changed since it was saved: restore with the config it was trained with '
      "(the workdir's config.json) or start a fresh workdir."
    )
    for path in sorted(target, key=lambda path: path[0] != 'params'):  # name a parameter before its Adam moment
      leaf = target[path]
      if path not in saved:
        raise IncompatibleCheckpoint(f'{_name(path)} is not in {where}. {hint}')
      if tuple(saved[path].shape) != tuple(leaf.shape):
        raise IncompatibleCheckpoint(
          f'{_name(path)} has shape {tuple(saved[path].shape)} in {where} but '
          f'{tuple(leaf.shape)} in the model being restored. {hint}'
        )
    extra = [path for path in saved if path not in target]
    if extra:
      raise IncompatibleCheckpoint(f'{_name(extra[0])} is in {where} but not in the model being restored. {hint}')


class _SaveErrors:
  """Turns a failed checkpoint write of `step` (a disk full or read-only, seen in orbax's or tensorstore's
  own exception types) into one CheckpointError; other errors pass unchanged."""

  def __init__(self, checkpoints: Checkpoints, step: int | None):
    self.checkpoints, self.step = checkpoints, step

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    if error is None or isinstance(error, ConfigError) or not _is_storage_error(error):
      return False
    saved = self.checkpoints.all_steps()
    kept = f'the checkpoint of step {saved[-1]} is intact' if saved else 'no earlier checkpoint exists'
    raise CheckpointError(
      f'Saving the checkpoint of step {self.step} to {self.checkpoints.directory} failed ({_storage_reason(error)}); '
      f'{kept}. Free space there (or make it writable) and re-run to resume, or choose another --workdir.'
    ) from None


def _in_orbax(filename: str) -> bool:
  """Whether a source file is orbax's own: the one test the filters and the hook below share."""
  return f'{os.sep}orbax{os.sep}' in filename


class _NoOrbaxTracebacks(std_logging.Filter):
  """orbax logs a failed save's traceback several times from its threads (and a failed read's); Checkpoints
  raises that error once, as a message naming the step, so the tracebacks go (orbax's one-line messages
  stay)."""

  def filter(self, record):
    if record.exc_info and _in_orbax(record.pathname):
      record.exc_info, record.exc_text = None, None
    return True


class _NoOrbaxFutures(std_logging.Filter):
  """asyncio logs "Future exception was never retrieved", with a traceback, when the garbage collector frees
  one of orbax's failed writes (a full disk) or one of the operations a failed save or restore abandoned
  (see `_drop_orbax_reads`), in whatever thread it runs; `Checkpoints` reports the failure once. Dropped
  before any formatting: Python 3.11 parses source with `ast` to format a traceback, which is not
  thread-safe (a concurrent `ast.parse` elsewhere failed with "AST constructor recursion depth mismatch")."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and (_raised_in_orbax(error) or _names_unfinished_step(error)))


def _raised_in_orbax(error) -> bool:
  frame = getattr(error, '__traceback__', None)
  while frame is not None:
    if _in_orbax(frame.tb_frame.f_code.co_filename):
      return True
    frame = frame.tb_next
  return False


# The step folders (`<directory>/<step>`) whose save or restore is in flight, or failed, in this process:
# when one array fails, orbax stops waiting for the others, which tensorstore still finishes in its threads.
_UNFINISHED: list[str] = []


def _finished(folder: str) -> None:
  if folder in _UNFINISHED:
    _UNFINISHED.remove(folder)


def _names_unfinished_step(error) -> bool:
  """A tensorstore error naming a step folder (or its temporary `<step>.orbax-checkpoint-tmp-*`) listed in
  `_UNFINISHED`: the failure `Checkpoints` reports once, or one of the operations it abandoned."""
  return any(re.search(re.escape(folder) + r'[./]', str(error)) for folder in _UNFINISHED)


def _is_closed_loop_callback(unraisable) -> bool:
  """A tensorstore read or write finishing after orbax closed the event loop of a failed restore or save: its
  completion callback (`loop.call_soon_threadsafe`, from tensorstore's thread) raises "Event loop is closed".
  Dropped only while a save or restore is in flight or after one failed (`_UNFINISHED`)."""
  frame = unraisable.exc_traceback
  while frame is not None and frame.tb_frame.f_code.co_name != 'call_soon_threadsafe':
    frame = frame.tb_next
  return (
    unraisable.object is None
    and isinstance(unraisable.exc_value, RuntimeError)
    and str(unraisable.exc_value) == 'Event loop is closed'
    and frame is not None
    and bool(_UNFINISHED)
  )


def _quiet_orbax_tracebacks() -> None:
  for logger, kind in (
    (logging.get_absl_logger(), _NoOrbaxTracebacks),
    (std_logging.getLogger('asyncio'), _NoOrbaxFutures),
  ):
    if not any(isinstance(f, kind) for f in logger.filters):
      logger.addFilter(kind())
  if not getattr(sys.unraisablehook, 'drops_orbax_reads', False):
    sys.unraisablehook = _drop_orbax_reads(sys.unraisablehook)


def _drop_orbax_reads(previous):
  """An unraisable-exception hook without the noise of the array operations a failed restore (a damaged
  checkpoint) or save (a full disk) abandons. When one array fails, orbax's `asyncio.gather` returns and
  its event loop is closed while the others are pending; then, at whatever moment,
  - the garbage collector closes each pending read, and orbax's `except BaseException` turns the close into
    an exception Python prints as a traceback ("Exception ignored in: <coroutine ...>");
  - tensorstore finishes each read or write in its own thread and calls back into the closed loop ("Event
    loop is closed", see `_is_closed_loop_callback`).
  Orbax offers no way to wait for them; `Checkpoints` reports the one failure, and every other unraisable
  exception reaches `previous`."""

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if (code is not None and _in_orbax(code.co_filename)) or _is_closed_loop_callback(unraisable):
      return
    previous(unraisable)

  hook.drops_orbax_reads = True
  return hook


_STORAGE_ERRORS = ('No space left on device', 'Read-only file system', 'Permission denied', 'Disk quota exceeded')


def _is_storage_error(error: BaseException) -> bool:
  return any(isinstance(e, OSError) or any(s in str(e) for s in _STORAGE_ERRORS) for e in _chain(error))


def _storage_reason(error: BaseException) -> str:
  """The operating system's words (e.g. 'No space left on device') rather than tensorstore's long preamble."""
  for e in _chain(error):
    for phrase in _STORAGE_ERRORS:
      if phrase in str(e):
        return phrase
  return _reason(error)


def _chain(error: BaseException):
  """`error` and the exceptions it was raised from, outermost first."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def _reason(error: BaseException, limit: int = 300) -> str:
  """The innermost cause's first line (tensorstore's own words, e.g. OUT_OF_RANGE: ... byte range ...)."""
  text = str(_chain(error)[-1]).strip().splitlines() or [type(error).__name__]
  return text[0] if len(text[0]) <= limit else text[0][:limit] + '...'


def _step_order(name: str):
  head = name.split('.')[0]
  return (int(head) if head.isdigit() else -1, name)


def size_bytes(abstract_state) -> int:
  """Bytes of the arrays of a state (`jax.ShapeDtypeStruct`s or arrays): what one checkpoint of it holds."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))


def _name(path):
  return '/'.join(str(key) for key in path)


def _flat_paths(tree) -> dict:
  """{path tuple: leaf} in `tree`'s leaf order. Paths from jax's key paths, as orbax flattens a saved
  tree (not orbax's serialize_tree, which fails on empty optax states)."""
  return {ocp.tree.str_keypath(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _scanned(flat: dict) -> bool:
  """Whether parameters are in the `scan_layers` layout (a `layers` tree, not `layer_0`, `layer_1`...)."""
  return any('layers' in path for path in flat)


class PreemptionGuard(signals.Guard):
  """Context manager: while active, SIGTERM (and SIGINT) set `requested` instead of killing the process,
  so the loop can save a checkpoint and exit cleanly. A second SIGINT falls through to the old handler
  (Ctrl-C twice still stops a stuck run). Restores the previous handlers on exit.

  Multi-process runs: call `should_stop(step)` on every process at every step. Every `sync_every` steps (and
  whenever the caller passes `sync=True` on every process, e.g. right after an eval) it all-gathers the flags,
  so all processes stop at the same step even if only some received the signal; between syncs it returns
  False, as a process that stopped alone would hang the others' collectives.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, sync_every: int = 10):
    super().__init__(self.SIGNALS)
    self.sync_every = sync_every

  @property
  def requested(self) -> bool:
    return self.received is not None

  def should_stop(self, step: int | None = None, sync: bool = False) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if not sync and step is not None and int(step) % self.sync_every:
      return False
    return _on_any_process(self.requested)


def _on_any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process; every process must call it (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
