"""Runs the real `launch.py` in subprocesses, as users do: one process, or several joined on localhost.

The device count goes into XLA_FLAGS before JAX starts (the conftest's fast-compile flags are inherited).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from conftest import PEAK_FLOPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_PEAK = f'--config.train.peak_flops={PEAK_FLOPS}'  # conftest.PEAK_FLOPS: no matmul timed for MFU


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(
  config: str, workdir, *overrides, devices: int = 1, processes: int = 1, mode: str = 'train', env: dict | None = None
) -> list[subprocess.Popen]:
  """`processes` launch.py processes of `devices` CPU devices each; their output goes to
  `<workdir>/log.<i>.txt` (appended, so restarts keep the history)."""
  os.makedirs(workdir, exist_ok=True)
  environ = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
  command = [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config',
    config,
    '--workdir',
    str(workdir),
    '--mode',
    mode,
    *((FIXED_PEAK,) if mode in ('train', 'sweep') else ()),
    *overrides,
  ]
  port = free_port() if processes > 1 else None
  procs = []
  for index in range(processes):
    multi = (
      [f'--coordinator_address=localhost:{port}', f'--num_processes={processes}', f'--process_id={index}']
      if port
      else []
    )
    log = open(os.path.join(workdir, f'log.{index}.txt'), 'a')
    procs.append(subprocess.Popen(command + multi, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return procs


def wait(procs, workdir, timeout: float = 600) -> None:
  """Waits for all; if one fails, kills the rest (they would hang in a collective) and shows its log."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed or time.time() > deadline:
        index = failed[0] if failed else 0
        raise AssertionError(f'launch.py process {index} failed or timed out:\n{log_tail(workdir, index)}')
      time.sleep(0.2)
    for index, p in enumerate(procs):
      assert p.returncode == 0, f'launch.py process {index} exited {p.returncode}:\n{log_tail(workdir, index)}'
  finally:
    kill(procs)


def run(config: str, workdir, *overrides, **kwargs) -> None:
  timeout = kwargs.pop('timeout', 600)
  wait(start(config, workdir, *overrides, **kwargs), workdir, timeout)


def kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
      p.wait()


def log_tail(workdir, index: int = 0, chars: int = 6000) -> str:
  with open(os.path.join(workdir, f'log.{index}.txt')) as f:
    return f.read()[-chars:]


def metrics(workdir) -> dict[int, dict]:
  """step -> the metrics logged for it; a step logged again after a resume keeps its last values."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      out.setdefault(record.pop('step'), {}).update(record)
  return out


def losses(workdir) -> dict[int, float]:
  return {step: m['train/loss'] for step, m in metrics(workdir).items() if 'train/loss' in m}


def batch_digests(workdir) -> dict[int, list[str]]:
  """step -> the hashes of the global batch's rows, joined from every process's `batches/` log (the
  last entry of a step wins, as after a resume)."""
  rows = {}
  directory = os.path.join(workdir, 'batches')
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name)) as f:
      for line in f:
        record = json.loads(line)
        start, _ = record['rows']
        rows.setdefault(record['step'], {}).update({start + i: digest for i, digest in enumerate(record['digests'])})
  return {step: [by_row[i] for i in sorted(by_row)] for step, by_row in rows.items()}


def checkpoint_params(workdir, step: int) -> dict[str, np.ndarray]:
  """The parameters saved at `step`, as numpy arrays by path, whatever topology saved them."""
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    tree = checkpointer.restore(path, restore_args=as_numpy)
  return {'/'.join(k): np.asarray(v) for k, v in ocp.tree.to_flat_dict(tree['params']).items()}


def wait_for_log(workdir, text: str, index: int = 0, timeout: float = 600, procs=()) -> None:
  """Waits until `text` appears in process `index`'s log; fails early if one of `procs` exits first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(os.path.join(workdir, f'log.{index}.txt')) and text in log_tail(workdir, index, 10**6):
      return
    exited = [p.returncode for p in procs if p.poll() is not None]
    assert not exited, f'launch.py exited ({exited}) before logging {text!r}:\n{log_tail(workdir, index)}'
    time.sleep(0.2)
  raise AssertionError(f'{text!r} not logged within {timeout}s:\n{log_tail(workdir, index)}')


def partial_checkpoints(workdir) -> list[str]:
  """orbax's temporary folders of unfinished saves under `<workdir>/checkpoints`."""
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(name for name in os.listdir(directory) if '.orbax-checkpoint-tmp' in name)


def run_starts(workdir) -> list[int]:
  """The first step of each run in the workdir (the step that logged `train/compile_s`), in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['step'] for r in map(json.loads, f) if 'train/compile_s' in r]
