"""Joining a multi-process job from a detected cluster environment."""

import jax

from transformer import distributed


def test_initialize_distributed_only_joins_a_detected_cluster(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args, **kwargs: calls.append((args, kwargs)))
  for name in (
    'SLURM_JOB_ID',
    'SLURM_NTASKS',
    'SLURM_NPROCS',
    'OMPI_COMM_WORLD_SIZE',
    'TPU_PROCESS_ADDRESSES',
    'TPU_WORKER_HOSTNAMES',
    'MEGASCALE_COORDINATOR_ADDRESS',
  ):
    monkeypatch.delenv(name, raising=False)
  distributed.initialize_distributed()  # a single process: nothing to join
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'worker-0')
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  distributed.initialize_distributed()  # a one-host TPU, a one-task SLURM job: still nothing
  assert calls == []
  monkeypatch.setenv('SLURM_NTASKS', '4')
  distributed.initialize_distributed()
  monkeypatch.delenv('SLURM_JOB_ID')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'worker-0,worker-1')
  distributed.initialize_distributed()
  assert calls == [((), {})] * 2  # JAX reads the cluster's environment itself
