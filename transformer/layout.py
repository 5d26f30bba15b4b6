"""Where a run keeps its files: one home for the workdir layout. The training loop writes it; the resume
rule, the sweep, its results, the SLURM executor and `--mode status` read it.

    <workdir>/config.json       the config the run trained with (workdir.save_config)
    <workdir>/metrics.jsonl     one JSON line per log or eval (metrics.MetricsWriter)
    <workdir>/samples.jsonl     decoded examples of each eval
    <workdir>/checkpoints/<step>  orbax checkpoints; damaged/<step> those set aside
    <workdir>/samples/, decode/  files of decoded examples (a task's), --mode decode's output
    <workdir>/batches/          per-process batch digests (train.log_batch_digests)
    <workdir>/lock              held by the run's process 0 (workdir.locked)
    <workdir>/status.json, log.txt  a sweep's run: its state and its output
"""

import os

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
SAMPLES_FILE = 'samples.jsonl'
CHECKPOINTS_DIR = 'checkpoints'
BATCHES_DIR = 'batches'
SAMPLES_DIR = 'samples'  # files a task writes per decoded example (music: MIDI)
DECODE_DIR = 'decode'  # --mode decode: decode/step_<step>.jsonl
LOCK_FILE = 'lock'
STATUS_FILE = 'status.json'
LOG_FILE = 'log.txt'


def config_file(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def metrics_file(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def samples_file(workdir: str) -> str:
  return os.path.join(workdir, SAMPLES_FILE)


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoints' steps, oldest first (orbax writes into a temporary folder, then renames it
  to the step: only a bare number is complete)."""
  try:
    names = os.listdir(checkpoints_dir(workdir))
  except OSError:
    return []
  return sorted(int(name) for name in names if name.isdigit())
