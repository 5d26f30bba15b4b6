"""What a step is built for: the platform of the devices it is compiled for, never the host's.

A step jitted over a mesh traces under that mesh (`train.sharding_context`, `--mode compile`), and the
mesh's abstract device names its platform: a TPU program compiled on a CPU host is the TPU program
(bfloat16, XLA's attention, none of the CPU's matmul layouts). Outside a mesh (one device, pmap,
decoding on this machine) the step runs on JAX's default backend, so that is the target.
"""

import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import PartitionSpec

from transformer import matmuls

_GPU = ('gpu', 'cuda', 'rocm')


def target() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh being traced under, else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  platform = device.platform if device is not None else jax.default_backend()
  return 'gpu' if platform in _GPU else platform


def is_cpu() -> bool:
  """The step is built for XLA's CPU backend."""
  return target() == 'cpu'


def building_for(mesh):
  """Within it, `target` is the platform of `mesh`'s devices: for what is built outside a jitted step's own
  trace (the compute dtype a report shows, a decoding loop lowered for another machine's devices)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
  """The model's one matmul (every Dense, attention projection and the logits): `matmuls.dot_general`, a 2-d
  product of rows on every backend, with the CPU's own layouts in a step built for the CPU."""
  return matmuls.dot_general(x, kernel, dimension_numbers, precision, preferred_element_type, cpu=is_cpu())


# Remat's `dots` policy: every matmul's output, also the row products, which have a gradient of their own.
SAVE_MATMULS = jax.checkpoint_policies.save_from_both_policies(
  jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  jax.checkpoint_policies.save_only_these_names(matmuls.ROW_PRODUCT),
)


_ACTIVATION_RULES = contextvars.ContextVar('activation_rules', default=())


@contextlib.contextmanager
def activation_sharding(rules):
  """While tracing under a mesh: activations are sharded by `rules` (logical name -> mesh axes;
  `models._constrain`), and the Pallas kernels run on each device's share (`kernel_specs`).

  Not flax's `nn.logical_axis_rules`: under those Flax also constrains parameter initialisers, which
  `apply` traces to check shapes, and DenseGeneral's flattened kernel then fails its rank-3 names.
  """
  token = _ACTIVATION_RULES.set(tuple(rules))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def activation_rules() -> tuple:
  """The logical activation rules the step is traced under; () outside `activation_sharding`."""
  return _ACTIVATION_RULES.get()


def kernel_specs(batch: int, heads: int, kv_heads: int):
  """(query, key/value, segment-id) PartitionSpecs of the `jax.shard_map` around an attention kernel
  (`splash.py`, `flash.py`: XLA cannot partition a pallas_call, and gathers every row to every device
  without one), or None outside a mesh of several devices.

  The batch and the heads are split as the activation rules split them (`activation_batch`,
  `activation_heads`, `activation_kv_heads`), where those axes divide them: under the train step's vmap over
  batch shards the rules leave the batch to the vmap's `spmd_axis_name`, which the shard_map's batching adds.
  Query heads split over an axis their key/value heads are not split over would pair head n with the wrong
  key head on every device but the first: both stay whole then (unless there is one key head, which every
  device holds)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  rules = dict(activation_rules())

  def axes(name, size):
    found = rules.get(name)
    names = found if isinstance(found, tuple) else (found,) if found else ()
    count = int(np.prod([mesh.shape[n] for n in names]))
    return found if names and size % count == 0 else None

  batch_axes = axes('activation_batch', batch)
  head_axes, kv_axes = axes('activation_heads', heads), axes('activation_kv_heads', kv_heads)
  if kv_heads > 1 and head_axes != kv_axes:
    head_axes = kv_axes = None
  spec = PartitionSpec
  return spec(batch_axes, None, head_axes, None), spec(batch_axes, None, kv_axes, None), spec(batch_axes, None)


def on_each_device(kernel, query, key, value, *segment_ids):
  """`kernel(query, key, value, *segment_ids)` (`[B, T, N or K, D]` and `[B, T]` in, `[B, T, N, Dv]` out) on each
  device's rows and heads (`kernel_specs`): in a `jax.shard_map` under a mesh of several devices, else as is."""
  specs = kernel_specs(query.shape[0], query.shape[2], key.shape[2])
  if specs is None:
    return kernel(query, key, value, *segment_ids)
  q_spec, kv_spec, segment_spec = specs
  in_specs = (q_spec, kv_spec, kv_spec) + (segment_spec,) * len(segment_ids)
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=q_spec, check_vma=False)(query, key, value, *segment_ids)
