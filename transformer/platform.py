"""What a step is built for: the platform of the devices it is compiled for, never the host's.

A step jitted over a mesh traces under that mesh (`train.sharding_context`, `--mode compile`), and the
mesh's abstract device names its platform: a TPU program compiled on a CPU host is the TPU program
(bfloat16, XLA's attention, none of the CPU's matmul layouts). Outside a mesh (one device, pmap,
decoding on this machine) the step runs on JAX's default backend, so that is the target.
"""

import jax

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
