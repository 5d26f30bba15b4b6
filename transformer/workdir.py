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
"""

import fnmatch
import json
import os

from transformer.config import ConfigError, flatten
from transformer.files import write_atomic

CONFIG_FILE = 'config.json'

# Keys (fnmatch patterns over dotted paths) that may differ between a workdir's config.json and a resume.
RESUMABLE = (
  # run length and what the run writes along the way
  'train.num_steps',
  'train.log_every',
  'train.eval_every',
  'train.checkpoint_every',
  'train.keep_checkpoints',
  'train.peak_flops',
  'train.log_batch_digests',
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
)
_ABSENT = '<absent>'


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


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
    if before != after and not resumable(key):
      changes.append((key, before, after))
  return changes


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
