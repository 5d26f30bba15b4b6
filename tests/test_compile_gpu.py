"""GPU targets (`accelerators.gpu`): H100, H200 and B200 nodes, compiled for through JAX's CUDA plugin on this
CPU host (no GPU).

The plugin is `jax[cuda12]`, about 5 GB of NVIDIA wheels: CI installs none, so the compiling tests skip there,
as anywhere `gpu.unavailable()` gives a reason. The figures and the node counts need no plugin.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer import accelerators, metrics, parallel, setup
from transformer.accelerators import gpu
from transformer.config import ConfigError
from transformer.experiment import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import bench as bench_experiments  # noqa: E402

_REASON = gpu.unavailable()
TRITON = '__gpu$xla.gpu.triton'  # the custom call of a Pallas GPU kernel (transformer/flash.py)
needs_plugin = pytest.mark.skipif(
  bool(_REASON), reason=f'{_REASON} (CI installs no CUDA wheels: too big for it)' if _REASON else ''
)


@pytest.mark.parametrize(
  'name, slices, topology',
  [('h100-1', 1, '1x1x1'), ('h200-4', 1, '1x1x4'), ('b200-8', 1, '1x1x8'), ('h100-16', 1, '2x1x8'),
   ('h100-8', 2, '2x1x8'), ('b200-64', 2, '16x1x8')],
)  # fmt: skip
def test_a_name_counts_gpus_and_a_node_holds_eight(name, slices, topology):
  assert gpu.topology(accelerators.parse(name, slices)) == topology


@pytest.mark.parametrize('name', ['h100-3', 'h200-12', 'b200-20'])
def test_a_count_that_is_not_part_of_a_node_or_whole_nodes_is_refused_before_the_plugin_is_needed(name):
  target = accelerators.parse(name)
  with pytest.raises(ConfigError, match=r'come 8 to a node: use 1, 2, 4, 8 or a multiple of 8 \(\w+-16 is two nodes\)'):
    target.devices()


def test_each_gpu_has_its_data_sheet_figures_each_with_its_source():
  """JAX's name for each GPU finds its peak in `metrics`; NVLink and the network are one direction's share."""
  assert set(gpu.CHIPS) == {'h100', 'h200', 'b200'} and accelerators.parse('h200-8').chip is gpu.CHIPS['h200']
  for family, chip in gpu.CHIPS.items():
    assert chip.platform == 'gpu' and family.upper() in chip.device_kind
    assert metrics.datasheet_peak(chip.device_kind)[1].startswith(f'NVIDIA {family.upper()}')
    figures = (chip.hbm, chip.hbm_bandwidth, chip.link_bandwidth, chip.dcn_bandwidth, chip.peak_flops)
    assert all(figure.value > 0 and figure.source for figure in figures)
    assert f'device_description_str: "{chip.device_kind}"' in gpu.target_config(family)
  assert [gpu.CHIPS[f].hbm.value / 2**30 for f in ('h100', 'h200', 'b200')] == [80, 141, 180]
  assert [gpu.CHIPS[f].link_bandwidth.value for f in ('h100', 'h200', 'b200')] == [450e9, 450e9, 900e9]
  assert {chip.dcn_bandwidth.value for chip in gpu.CHIPS.values()} == {50e9}


@needs_plugin
def test_an_array_sharded_over_eight_h100s_takes_an_eighth_of_it_on_each():
  devices = accelerators.parse('h100-8').devices()
  assert [(d.platform, d.device_kind) for d in devices] == [('gpu', 'NVIDIA H100 80GB HBM3')] * 8
  mesh = Mesh(np.array(devices), ('d',))
  split, whole = NamedSharding(mesh, PartitionSpec('d')), NamedSharding(mesh, PartitionSpec())
  x = jax.ShapeDtypeStruct((8 * 256, 1024), jnp.float32, sharding=split)
  w = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=whole)
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w).sum()).lower(x, w).compile()
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes == 8 * 256 * 1024 * 4 // 8 + 1024 * 512 * 4
  assert memory.temp_size_in_bytes > 0
  assert 'all-reduce' in compiled.as_text()  # the partial sums of the eight GPUs


@needs_plugin
def test_sixteen_gpus_are_two_nodes_numbered_node_by_node():
  for devices in (accelerators.parse('h100-16').devices(), accelerators.parse('h100-8', slices=2).devices()):
    assert [d.id for d in devices] == list(range(16))
    assert [d.process_index for d in devices] == [0] * 8 + [1] * 8


def _state_and_batch_bytes(runner, batch) -> int:
  """The bytes of the train step's arguments on one device: each array's shard."""
  rows = NamedSharding(runner.mesh, PartitionSpec(parallel.BATCH_AXES))
  leaves = jax.tree.leaves(runner.abstract_state()) + [
    jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows) for x in batch.values()
  ]
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)


@needs_plugin
@pytest.mark.slow(6)
@pytest.mark.parametrize(
  'name, mesh', [('h100-8', (8, 1, 1)), ('h200-8', (1, 8, 1)), ('b200-8', (1, 1, 8)), ('h100-16', (2, 8, 1))]
)
def test_the_train_step_compiles_for_the_gpus_with_what_each_one_holds(name, mesh):
  """The training step (`parallel.JitRunner`) compiled for the GPUs: its arguments on each GPU are the shards
  of the state and batch; in bfloat16 with the flash kernel (Triton, `auto`'s choice) on every mesh."""
  config = bench_experiments.get_config('tiny')
  config.model.update(d_model=64, d_ff=256, num_heads=8, vocab_size=512, max_len=128)
  config.train.batch_size, config.data.seq_len = 16, 128
  config.train.mesh.data, config.train.mesh.fsdp, config.train.mesh.tensor = mesh
  built = setup.build(config, with_task=False)
  runner = parallel.JitRunner(
    built.train_config, built.model, built.optimizer, built.schedule, devices=accelerators.parse(name).devices()
  )
  batch = bench.synthetic_batch(built.model_config, 16, 128)
  compiled = runner.lower_train_step(batch).compile()
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes == _state_and_batch_bytes(runner, batch)
  assert memory.temp_size_in_bytes > 0
  text = compiled.as_text()
  assert 'bf16[' in text
  assert TRITON in text and '__cudnn$fmha' not in text


@needs_plugin
def test_two_nodes_compile_every_step_and_their_reduction_is_bounded_by_the_network(tmp_path):
  """`--mode compile`'s report for 2 nodes of 8 H100s (slices=2, the data axis across them; the flash kernel,
  `auto`'s choice, under the batch shards' vmap): every step compiles, the gradient all-reduce spans
  both nodes, and its time bound is the network's (1/8 of the bytes at 50 GB/s), not NVLink's."""
  from transformer.experiment import aot

  config = bench_experiments.get_config('lm')
  config.model.num_decoder_layers = 2
  config.train.batch_size = 16
  target = accelerators.parse('h100-8', slices=2)
  report = aot.compile_config(config, target, workdir=tmp_path)
  assert report['fits'] and report['mesh'] == {'data': 16, 'fsdp': 1, 'tensor': 1}
  train = report['steps']['train']
  found = aot.hlo_audit.collectives((tmp_path / 'train.hlo.txt').read_text())
  assert {(c.kind, c.group) for c in found} == {('all-reduce', 16)}  # XLA GPU splits it into chunks
  sent = sum(2 * c.bytes * 15 / 16 for c in found)
  assert sum(c.bytes for c in found) == pytest.approx(train['expected_collectives']['all-reduce'], rel=0.01)
  assert train['bound']['collectives_s'] == pytest.approx(sent / 8 / 50e9) and sent / 8 / 50e9 > sent / 450e9
  assert TRITON in (tmp_path / 'train.hlo.txt').read_text()
