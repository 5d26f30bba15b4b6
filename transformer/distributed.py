"""Joining a multi-process job (several hosts, or several processes on one): explicit flags or a detected
cluster environment (SLURM, Open MPI, TPU pods).

SLURM is read here rather than by JAX's own detection, which needs an srun step's variables (a batch script
that runs python without srun failed with a KeyError) and gives each process one device (a process per node
then saw one of its node's GPUs)."""

import os
import re

import jax

from transformer.config import ConfigError


class DistributedError(ConfigError):
  """A job started in a way its processes cannot join: the message says how to start it (the command line
  shows it without a traceback)."""


def _multi_process_environment() -> bool:
  """A cluster, with more than one process, that `jax.distributed.initialize()` reads by itself."""
  env = os.environ
  if 'OMPI_COMM_WORLD_SIZE' in env:
    return int(env['OMPI_COMM_WORLD_SIZE']) > 1
  # TPU pods on GKE list their workers; multislice has a coordinator. (A TPU VM pod slice works
  # without initialising: its runtime connects the hosts.)
  hosts = env.get('TPU_PROCESS_ADDRESSES', env.get('TPU_WORKER_HOSTNAMES', ''))
  return len([h for h in hosts.split(',') if h.strip()]) > 1 or 'MEGASCALE_COORDINATOR_ADDRESS' in env


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: 'node[001-004,9],gpu2' -> 'node001'."""
  match = re.match(r'([^,\[]*)(?:\[([^,\-\]]*))?', nodelist)
  return match.group(1) + (match.group(2) or '')


def slurm_settings(env=None) -> dict | None:
  """`jax.distributed.initialize` arguments for a multi-task srun step; None outside SLURM or for one task.

  local_device_ids: one task per node sees all its node's devices; several tasks per node with
  `--gpus-per-task` each take their own GPUs (all they see when SLURM bound them, else their slice by
  SLURM_LOCALID); several tasks without it take one device each, JAX's convention."""
  env = os.environ if env is None else env
  if 'SLURM_JOB_ID' not in env:
    return None
  if 'SLURM_STEP_NODELIST' not in env:  # the batch script itself, or a shell inside an allocation
    if int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1'))) > 1:
      raise DistributedError(
        f'This SLURM job has {env.get("SLURM_NTASKS", env.get("SLURM_NPROCS"))} tasks, but this process runs '
        'outside an srun step, so it cannot tell which task it is: start it with `srun python launch.py ...` '
        '(in a batch script too; see scripts/slurm/train.sbatch).'
      )
    return None
  num_processes = int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1')))
  if num_processes == 1:
    return None
  local_id = int(env['SLURM_LOCALID'])
  one_per_node = num_processes == int(env.get('SLURM_STEP_NUM_NODES', env.get('SLURM_NNODES', '1')))
  gpus_per_task = int(env.get('SLURM_GPUS_PER_TASK', '0').split(':')[-1] or 0)
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if one_per_node or (gpus_per_task and len(visible) == gpus_per_task):
    local_device_ids = None
  elif gpus_per_task:
    local_device_ids = list(range(local_id * gpus_per_task, (local_id + 1) * gpus_per_task))
  else:
    local_device_ids = [local_id]
  port = env.get('JAX_COORDINATOR_PORT') or 61440 + int(env['SLURM_JOB_ID']) % 4096  # JAX's choice
  return dict(
    coordinator_address=f'{first_host(env["SLURM_STEP_NODELIST"])}:{port}',
    num_processes=num_processes,
    process_id=int(env['SLURM_PROCID']),
    local_device_ids=local_device_ids,
  )


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
  elif (slurm := slurm_settings()) is not None:
    # Every value given: JAX's own SLURM detection would replace local_device_ids=None by [SLURM_LOCALID].
    jax.distributed.initialize(**slurm, cluster_detection_method='deactivate')
  elif _multi_process_environment():
    jax.distributed.initialize()
