"""Joining a multi-process job from a detected cluster environment."""

import jax
import pytest

from transformer import distributed

_CLUSTER_VARIABLES = (
  'SLURM_JOB_ID',
  'SLURM_NTASKS',
  'SLURM_NPROCS',
  'SLURM_STEP_NODELIST',
  'OMPI_COMM_WORLD_SIZE',
  'TPU_PROCESS_ADDRESSES',
  'TPU_WORKER_HOSTNAMES',
  'MEGASCALE_COORDINATOR_ADDRESS',
)


@pytest.fixture
def calls(monkeypatch):
  """The arguments of every `jax.distributed.initialize` call, in a clean environment."""
  recorded = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args, **kwargs: recorded.append((args, kwargs)))
  for name in _CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  return recorded


def test_initialize_distributed_only_joins_a_detected_cluster(monkeypatch, calls):
  distributed.initialize_distributed()  # a single process: nothing to join
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'worker-0')
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  distributed.initialize_distributed()  # a one-host TPU, a one-task SLURM batch script: still nothing
  assert calls == []
  monkeypatch.delenv('SLURM_JOB_ID')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'worker-0,worker-1')
  distributed.initialize_distributed()
  assert calls == [((), {})]  # JAX reads the TPU pod's environment itself


def _step(**values) -> dict:
  """The variables srun sets in a task of a step (job 123 on nodes gpu07, gpu08)."""
  env = dict(
    SLURM_JOB_ID='123',
    SLURM_NTASKS='2',
    SLURM_STEP_NODELIST='gpu[07-08]',
    SLURM_STEP_NUM_TASKS='2',
    SLURM_STEP_NUM_NODES='2',
    SLURM_PROCID='1',
    SLURM_LOCALID='0',
  )
  env.update(values)
  return env


def test_slurm_step_sets_every_argument_and_one_process_per_node_sees_all_its_devices(monkeypatch, calls):
  for name, value in _step().items():
    monkeypatch.setenv(name, value)
  distributed.initialize_distributed()
  # port: JAX's rule, 61440 + job id % 4096; local_device_ids None: the process keeps its node's GPUs
  # (JAX's detection would have given it only [SLURM_LOCALID] = [0]).
  assert calls == [
    (
      (),
      dict(
        coordinator_address='gpu07:61563',
        num_processes=2,
        process_id=1,
        local_device_ids=None,
        cluster_detection_method='deactivate',
      ),
    )
  ]


def test_slurm_local_device_ids_follow_tasks_per_node_and_gpus_per_task():
  four_on_one = dict(SLURM_STEP_NUM_TASKS='4', SLURM_STEP_NUM_NODES='1', SLURM_LOCALID='3', SLURM_STEP_NODELIST='vm')
  assert distributed.slurm_settings(_step(**four_on_one))['local_device_ids'] == [3]  # one device per task
  gpus = dict(four_on_one, SLURM_GPUS_PER_TASK='2', SLURM_LOCALID='1', CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7')
  assert distributed.slurm_settings(_step(**gpus))['local_device_ids'] == [2, 3]  # its own pair of the node's 8
  bound = dict(gpus, CUDA_VISIBLE_DEVICES='2,3')  # SLURM already hid the other tasks' GPUs
  assert distributed.slurm_settings(_step(**bound))['local_device_ids'] is None
  typed = dict(gpus, SLURM_GPUS_PER_TASK='a100:2')
  assert distributed.slurm_settings(_step(**typed))['local_device_ids'] == [2, 3]
  assert distributed.slurm_settings(_step(JAX_COORDINATOR_PORT='1234'))['coordinator_address'] == 'gpu07:1234'
  assert distributed.slurm_settings(_step(SLURM_STEP_NUM_TASKS='1')) is None  # `srun -n 1`: nothing to join


def test_first_host_of_a_slurm_hostlist():
  for nodelist, host in (
    ('vm', 'vm'),
    ('node001,host2', 'node001'),
    ('node[001-015],host2', 'node001'),
    ('node[007,009-015]', 'node007'),
    ('a-b[3]', 'a-b3'),
  ):
    assert distributed.first_host(nodelist) == host, nodelist


def test_a_multi_task_job_outside_an_srun_step_is_told_to_use_srun(monkeypatch, calls):
  """The batch script of `sbatch -n 2` (or a shell in `salloc -n 2`) runs python directly: SLURM_NTASKS is 2
  but no step variables exist, so no process knows its rank. JAX's detection failed with a KeyError."""
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '2')
  with pytest.raises(distributed.DistributedError, match=r'2 tasks.*outside an srun step.*srun python launch\.py'):
    distributed.initialize_distributed()
  assert calls == []
