"""Joining a multi-process job (several hosts, or several processes on one): explicit flags or a detected
cluster environment (SLURM, Open MPI, TPU pods)."""

import os

import jax


def _multi_process_environment() -> bool:
  """A cluster, with more than one process, that `jax.distributed.initialize()` reads by itself."""
  env = os.environ
  if 'SLURM_JOB_ID' in env:
    return int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1'))) > 1
  if 'OMPI_COMM_WORLD_SIZE' in env:
    return int(env['OMPI_COMM_WORLD_SIZE']) > 1
  # TPU pods on GKE list their workers; multislice has a coordinator. (A TPU VM pod slice works
  # without initialising: its runtime connects the hosts.)
  hosts = env.get('TPU_PROCESS_ADDRESSES', env.get('TPU_WORKER_HOSTNAMES', ''))
  return len([h for h in hosts.split(',') if h.strip()]) > 1 or 'MEGASCALE_COORDINATOR_ADDRESS' in env


def initialize_distributed(
  coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  """Joins a multi-process job: from explicit values, else a detected SLURM / Open MPI / TPU-pod cluster;
  a no-op for a single process and when already initialized. Call it before anything else uses JAX."""
  if jax.distributed.is_initialized():
    return
  if (coordinator_address, num_processes, process_id) != (None, None, None):
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  elif _multi_process_environment():
    jax.distributed.initialize()
