"""A run's workdir remembers the config it ran with (`config.json`) and refuses to resume with a config
that does not fit its checkpoints.

The rule, once a workdir has checkpoints: the new config may differ from its config.json only in the
keys `RESUMABLE` lists: how long the run is and what it logs, the learning-rate schedule and clipping
(what one changes to rescue a diverging run), how the same computation is laid out on hardware, and
eval-time decoding settings. Any other difference is refused with the changed keys and their old and
new values: the model (shapes, kind, positions, norms, dropout, ...), `config.task`, `config.data`'s
corpus, tokenizer and lengths, the seed, the optimizer, the batch size, a key added or removed. Such a
config is a different experiment and belongs in a new --workdir. A workdir without checkpoints has
nothing to resume: its config.json is simply replaced.

Before a run trains, `locked` makes it the workdir's only writer and `check_writable` proves the checkpoint
folder takes a file and has room for a checkpoint: each a clear error before any step instead of a failure
at the first save.
"""

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import time

from absl import logging

from transformer import layout
from transformer.config import ConfigError, flatten
from transformer.files import write_atomic
from transformer.layout import CONFIG_FILE, LOCK_FILE


class WorkdirError(ConfigError):
  """The workdir cannot take this run (in use, read-only, full): the message says what to do."""


# Keys (fnmatch patterns over dotted paths) that may differ between a workdir's config.json and a resume.
RESUMABLE = (
  # run length and what the run writes along the way
  'train.num_steps',
  'train.log_every',
  'train.eval_every',
  'train.eval_lengths',
  'train.checkpoint_every',
  'train.keep_checkpoints',
  'train.peak_flops',
  'train.log_batch_digests',
  'train.loggers',
  # the learning-rate schedule and clipping
  'train.learning_rate',
  'train.warmup_steps',
  'train.grad_clip',
  # the same computation laid out differently on hardware: the same examples in every step (one global
  # order), dropout keyed by each example's index in the global batch and by layer index, and
  # checkpoints that restore onto any mesh, process count or layer layout. (model.dtype and
  # attention_impl change rounding, not the function.)
  'train.parallelism',
  'train.mesh.*',
  'train.grad_accum_steps',
  'model.attention_impl',
  'model.remat',
  'model.dtype',
  'model.scan_layers',
  # set by the task's tokenizer at run time; config.task and config.data are compared instead
  'model.vocab_size',
  # decoding and sampling at eval time: the trained model is the same
  'data.beam_size',
  'data.alpha',
  'data.extra_decode_len',
  'data.decode_batch_size',
  'data.bleu_examples',
  'data.temperature',
  'data.top_k',
  'data.top_p',
  'data.prompt_words',
  'data.sample_len',
  # what --mode compile and --mode bench build, never what a run trains
  'compile.*',
  'bench.*',
  'export.*',  # --mode export's format: what the checkpoints are written as, never what they hold
  # fine-tuning's starting point, read at step 0 only: a resumed run continues from its own checkpoints
  'train.init_from',
)
_ABSENT = '<absent>'


def has_checkpoints(workdir: str) -> bool:
  return bool(layout.checkpoint_steps(workdir))


def load_saved(workdir: str) -> dict | None:
  """The workdir's config.json as a dict, or None when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _as_json(config) -> dict:
  """The config as config.json holds it (tuples become lists, and so on), so values compare equal."""
  tree = config.to_dict() if hasattr(config, 'to_dict') else config
  return json.loads(json.dumps(tree, default=str))


def resumable(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)


def incompatible_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(key, old value, new value) for every difference outside `RESUMABLE`, sorted by key."""
  old_flat, new_flat = flatten(old), flatten(new)
  changes = []
  for key in sorted(set(old_flat) | set(new_flat)):
    before, after = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
    if before == _ABSENT and key.startswith('model.') and after == _model_default(key[len('model.') :]):
      continue  # a model knob added since the run started, at its default: the function the run trained
    if before != after and not resumable(key):
      changes.append((key, before, after))
  return changes


def _model_default(key: str):
  """config.model's default for `key` as config.json holds it (`_ABSENT` for no such key)."""
  import dataclasses

  from transformer.config import ModelConfig

  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  return _as_json(defaults).get(key, _ABSENT) if key in defaults else _ABSENT


def check_resume(config, workdir: str) -> None:
  """A ConfigError when `workdir` has checkpoints and `config` differs from its config.json in a key
  that may not change on resume (see the module docstring)."""
  saved = load_saved(workdir)
  if saved is None or not has_checkpoints(workdir):
    return
  changes = incompatible_changes(saved, _as_json(config))
  if changes:
    lines = '\n'.join(f'  config.{key}: {before!r} -> {after!r}' for key, before, after in changes)
    raise ConfigError(
      f'Cannot resume {workdir} with this config: it changes what the checkpoints were trained on.\n'
      f'{lines}\nUse a new --workdir for this config, or undo these changes. On resume only these keys may '
      f'change: {", ".join(RESUMABLE)}.'
    )


def save_config(config, workdir: str, model_config=None, write: bool = True) -> None:
  """Checks that `config` may resume `workdir` (`check_resume`), then writes it as config.json. With the
  built `model_config`, config.json records the vocabulary the task really gave the model."""
  check_resume(config, workdir)
  if not write:
    return
  tree = _as_json(config)
  if model_config is not None and isinstance(tree.get('model'), dict):
    tree['model']['vocab_size'] = model_config.vocab_size
  write_atomic(os.path.join(workdir, CONFIG_FILE), json.dumps(tree, indent=2))  # never a half-written config.json


@contextlib.contextmanager
def locked(workdir: str, primary: bool = True):
  """Holds an exclusive `flock` on `<workdir>/lock` while the block runs, so a second run on the same workdir
  is refused with a WorkdirError naming the holder (host, pid, start time). Only `primary` (process 0 of a
  run) takes it: the other processes of a multi-host run share the workdir. The kernel releases the lock
  when its holder exits, however it exits, so a killed run never blocks its own resume. On a filesystem
  that refuses locks the run goes on with a warning."""
  if not primary or '://' in workdir:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    raise WorkdirError(_unwritable(workdir, error)) from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'a run that has not yet written its name'
      raise WorkdirError(
        f'{workdir} is in use by another run ({holder}). Wait for it to finish or stop it, or choose another '
        f'--workdir. (The kernel releases {path} when that run exits.)'
      ) from None
    except OSError as error:  # e.g. ENOLCK: a network filesystem without a lock service
      logging.warning('Cannot lock %s (%s): a second run on this workdir would not be refused.', path, error)
    else:
      started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
      holder = f'host {socket.gethostname()}, pid {os.getpid()}, started {started}'
      os.ftruncate(fd, 0)
      os.pwrite(fd, holder.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def check_writable(workdir: str, checkpoint_bytes: int = 0) -> None:
  """A WorkdirError unless `workdir` and `workdir/checkpoints` take a new file (a probe, written, synced and
  removed) and the checkpoint folder has `checkpoint_bytes` free (one checkpoint's size). Remote paths are
  not probed."""
  if '://' in workdir:
    return
  directory = layout.checkpoints_dir(workdir)
  for folder in (workdir, directory):
    try:
      os.makedirs(folder, exist_ok=True)
      probe = os.path.join(folder, f'.probe-{socket.gethostname()}-{os.getpid()}')
      try:
        with open(probe, 'wb') as f:
          f.write(bytes(4096))
          f.flush()
          os.fsync(f.fileno())
      finally:
        if os.path.exists(probe):
          os.remove(probe)
    except OSError as error:
      raise WorkdirError(_unwritable(folder, error)) from None
  free = shutil.disk_usage(directory).free
  if free < checkpoint_bytes:
    raise WorkdirError(
      f'{directory} has {_mb(free)} free, but one checkpoint of this model takes about {_mb(checkpoint_bytes)} '
      '(parameters and optimizer state): free space there or choose another --workdir.'
    )


def _unwritable(folder: str, error: OSError) -> str:
  return f'Cannot write to {folder} ({error.strerror or error}): choose a writable --workdir, or free space there.'


def _mb(count: int) -> str:
  return f'{count / 2**20:.1f} MiB'
