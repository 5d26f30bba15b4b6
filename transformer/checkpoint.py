"""Checkpoints (orbax): train state + data-iterator state + config, and a preemption guard.

One step's checkpoint is a directory `<directory>/<step>/` with three items:
  state      the `TrainState` pytree (params, optimizer state, step, rng), written shard by shard;
  data_pos   each process's data-iterator state, `process_<i>-of-<n>.json`, written by that process
             (checkpoints of older versions hold one `data` item, from process 0);
  config     the resolved experiment config (JSON), so `--mode eval` can rebuild the model.
The state restores onto any mesh, device or process count, and into either layer layout (scanned or
unrolled): both compute the same function from the same numbers.
orbax writes each step into `<step>.orbax-checkpoint-tmp-<timestamp>/` and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which is never listed as a step.
"""

import dataclasses
import glob
import json
import os
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer import models


class ProcessStateHandler(ocp.CheckpointHandler):
  """Each process saves its own JSON state (`process_<i>-of-<n>.json`) and restores its own.

  On another process count the file of this index is absent: process 0's is used instead. That is
  exact for this codebase's pipelines, whose state is the same on every process (one global order).
  """

  def save(self, directory: epath.Path, args: 'ProcessStateSave'):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _process_file(jax.process_index(), jax.process_count())
    path.write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: 'ProcessStateRestore' = None):
    own = directory / _process_file(jax.process_index(), jax.process_count())
    if own.exists():
      return json.loads(own.read_text())
    others = sorted(glob.glob(os.fspath(directory / 'process_0-of-*.json')))
    if not others:
      raise FileNotFoundError(f'No data-iterator state in {directory}.')
    logging.warning(
      '%s was saved by another process count: resuming the data position from %s (exact: '
      'every process holds the same global order).',
      directory,
      os.path.basename(others[0]),
    )
    return json.loads(epath.Path(others[0]).read_text())

  def metadata(self, directory):
    return None

  def structure(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(
    self, step: int, state, data_state: dict | None = None, config: dict | None = None, force: bool = False
  ) -> bool:
    """Starts saving `step` and returns once the arrays are copied off the devices (the state may then be
    donated to the next step); the write itself finishes in the background. False if nothing was saved."""
    step = int(step)
    if step in self._manager.all_steps():  # e.g. the final step coincides with a periodic save
      return False
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:  # this process's own position (every process passes its own)
      items['data_pos'] = ProcessStateSave(data_state)
    if config is not None:
      items['config'] = ocp.args.JsonSave(config)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """`(state, data_state)` from `step` (default: the latest). Each array of `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct`) says via `.sharding` where it goes, so any device count or mesh works."""
    step = self._existing_step(step)
    metadata = self._manager.item_metadata(step)['state'].tree
    saved, target = ocp.tree.to_flat_dict(metadata), _flat_paths(abstract_state)
    if _scanned(target) != _scanned(saved):  # the other layer layout: restore as saved, then convert
      return self._restore_other_layout(abstract_state, metadata, step)
    self._check_shapes(target, saved, step)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    items.update(self._data_item(step))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], self._data_state(restored)

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

  def wait(self) -> None:
    self._manager.wait_until_finished()

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
        raise ValueError(f'{_name(path)} is not in {where}. {hint}')
      if tuple(saved[path].shape) != tuple(leaf.shape):
        raise ValueError(
          f'{_name(path)} has shape {tuple(saved[path].shape)} in {where} but '
          f'{tuple(leaf.shape)} in the model being restored. {hint}'
        )
    extra = [path for path in saved if path not in target]
    if extra:
      raise ValueError(f'{_name(extra[0])} is in {where} but not in the model being restored. {hint}')


def _name(path):
  return '/'.join(str(key) for key in path)


def _flat_paths(tree) -> dict:
  """{path tuple: leaf} in `tree`'s leaf order. Paths from jax's key paths, as orbax flattens a saved
  tree (not orbax's serialize_tree, which fails on empty optax states)."""
  return {ocp.tree.str_keypath(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _scanned(flat: dict) -> bool:
  """Whether parameters are in the `scan_layers` layout (a `layers` tree, not `layer_0`, `layer_1`...)."""
  return any('layers' in path for path in flat)


class PreemptionGuard:
  """Context manager: while active, SIGTERM (and SIGINT) set `requested` instead of killing the process,
  so the loop can save a checkpoint and exit cleanly. A second SIGINT falls through to the old handler
  (Ctrl-C twice still stops a stuck run). Restores the previous handlers on exit.

  Multi-process runs: call `should_stop(step)` on every process at every step. Every `sync_every` steps it
  all-gathers the flags, so all processes stop at the same step even if only some received the signal;
  between syncs it returns False, as a process that stopped alone would hang the others' collectives.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, sync_every: int = 10):
    self.requested = False
    self.sync_every = sync_every
    self._previous = {}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested and callable(self._previous.get(signum)):
      self._previous[signum](signum, frame)
    self.requested = True

  def __enter__(self):
    # Python only lets the main thread install handlers; elsewhere the guard is a no-op flag.
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def should_stop(self, step: int | None = None) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step is not None and int(step) % self.sync_every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))
