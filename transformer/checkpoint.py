"""Checkpoints (orbax): train state + data-iterator state + config, and a preemption guard.

One step's checkpoint is a directory `<directory>/<step>/` with three items:
  state   the `TrainState` pytree (params, optimizer state, step, rng), written shard by shard;
  data    the grain iterator's `get_state()` (JSON);
  config  the resolved experiment config (JSON), so `--mode eval` can rebuild the model.
orbax writes each step into `<step>.orbax-checkpoint-tmp-<timestamp>/` and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which is never listed as a step.
"""

import os
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class Checkpoints:
  """orbax `CheckpointManager` under `directory` (absolute path made from the given one)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    # orbax wants absolute paths; leave remote URLs (gs://...) alone.
    self.directory = directory if '://' in str(directory) else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)  # leftovers of a killed save are deleted on start
    # Handlers up front: a fresh manager can then read metadata before anything was saved or restored.
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                'config': ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict | None = None, config: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `step` and returns once the arrays are copied off the devices (the state may then be
    donated to the next step); the write itself finishes in the background. False if nothing was saved."""
    step = int(step)
    if step in self._manager.all_steps():  # e.g. the final step coincides with a periodic save
      return False
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = ocp.args.JsonSave(data_state)
    if config is not None:
      items['config'] = ocp.args.JsonSave(config)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """`(state, data_state)` from `step` (default: the latest). Each array of `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct`) says via `.sharding` where it goes, so any device count or mesh works."""
    step = self._existing_step(step)
    self._check_shapes(abstract_state, step)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if self._has_item(step, 'data'):
      items['data'] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], restored['data'] if 'data' in items else None

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the latest); None if there is no checkpoint or no config."""
    if step is None and self.latest_step() is None:
      return None
    step = self._existing_step(step)
    if not self._has_item(step, 'config'):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

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
        raise FileNotFoundError(f'No checkpoint in {self.directory}: train first, or pass the workdir '
                                'that holds checkpoints/.')
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(f'No checkpoint for step {step} in {self.directory}; saved steps: {steps}.')
    return int(step)

  def _has_item(self, step, name):
    return (self._manager.directory / str(step) / name).exists()

  def _check_shapes(self, abstract_state, step):
    """One readable error instead of orbax's deep traceback when the model no longer matches."""
    saved = ocp.tree.to_flat_dict(self._manager.item_metadata(step)['state'].tree)
    # Paths from jax's key paths, not orbax's serialize_tree, which fails on empty optax states.
    target = {ocp.tree.str_keypath(path): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    where = f'the checkpoint at step {step} in {self.directory}'
    hint = ('The model/config changed since it was saved: restore with the config it was trained with '
            '(see restore_config / config.json) or start a fresh workdir.')
    for path in sorted(target, key=lambda path: path[0] != 'params'):  # name a parameter before its Adam moment
      leaf = target[path]
      if path not in saved:
        raise ValueError(f'{_name(path)} is not in {where}. {hint}')
      if tuple(saved[path].shape) != tuple(leaf.shape):
        raise ValueError(f'{_name(path)} has shape {tuple(saved[path].shape)} in {where} but '
                         f'{tuple(leaf.shape)} in the model being restored. {hint}')
    extra = [path for path in saved if path not in target]
    if extra:
      raise ValueError(f'{_name(extra[0])} is in {where} but not in the model being restored. {hint}')


def _name(path):
  return '/'.join(str(key) for key in path)


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
