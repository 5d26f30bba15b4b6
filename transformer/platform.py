"""What a step is built for: the platform of the devices it is compiled for, never the host's.

A step jitted over a mesh traces under that mesh (`train.sharding_context`, `--mode compile`), and the
mesh's abstract device names its platform: a TPU program compiled on a CPU host is the TPU program
(bfloat16, XLA's attention, none of the CPU's matmul layouts). Outside a mesh (one device, pmap,
decoding on this machine) the step runs on JAX's default backend, so that is the target.
"""

import jax

_GPU = ('gpu', 'cuda', 'rocm')


def target() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh being traced under, else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  platform = device.platform if device is not None else jax.default_backend()
  return 'gpu' if platform in _GPU else platform


def is_cpu() -> bool:
  """The step is built for XLA's CPU backend (where the measured matmul layouts of `layers` apply)."""
  return target() == 'cpu'


def building_for(mesh):
  """Within it, `target` is the platform of `mesh`'s devices: for what is built outside a jitted step's own
  trace (the compute dtype a report shows, a decoding loop lowered for another machine's devices)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
