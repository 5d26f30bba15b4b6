"""Cloud TPU chips and their slices' topologies, compiled for through libtpu without a TPU.

`libtpu` is the package `jax[tpu]` pins for the installed JAX (the `tpu` extra of this project). Its
compiler builds a slice's program from a topology description (`jax.experimental.topologies`): the
topology name ('v5e:4x4'), the chip configuration (megacore: one JAX device per v4 / v5p chip) and the
chips per host. Usable HBM is what that compiler reports as available for a program (an oversized one
fails with it), measured here with libtpu 0.0.42.1; the other figures are Cloud TPU's system-architecture
pages (docs.cloud.google.com/tpu/docs/<v4|v5e|v5p|v6e>).
"""

import itertools
import math
import os

from transformer.accelerators import Chip, Figure
from transformer.config import ConfigError

_GB = 1e9
_GIB = 2**30
_COMPILER = 'libtpu 0.0.42.1: the HBM available to a program (transformer/accelerators/tpu.py)'


def _chip(family, device_kind, hbm_gib, hbm_gbps, ici_gbps, ici_source, dcn_gbps, dcn_source, cores=False):
  page = f'Cloud TPU {family} system architecture (docs.cloud.google.com/tpu/docs/{family})'
  return Chip(
    family=family,
    platform='tpu',
    device_kind=device_kind,
    hbm=Figure(hbm_gib * _GIB, _COMPILER),
    hbm_bandwidth=Figure(hbm_gbps * _GB, f'{page}: {hbm_gbps:,} GBps per chip'),
    # Half the bidirectional per-chip figure: the bytes a chip can send per second over all its ICI ports.
    link_bandwidth=Figure(ici_gbps / 2 * _GB, ici_source or f'{page}: bidirectional ICI {ici_gbps:,} GBps per chip'),
    dcn_bandwidth=Figure(dcn_gbps / 8 * _GB, dcn_source),
    names_count_cores=cores,
  )


CHIPS = {
  'v4': _chip(
    'v4',
    'TPU v4',
    30.75,
    1200,
    540,
    'Austin et al., How to Scale Your Model (2025), TPUs: 4.5e10 B/s one way per ICI link, 6 links per v4 chip',
    25,
    "assumed: v5e's 25 Gbps per chip (the v4 page gives no per-chip data-center network figure)",
    cores=True,
  ),
  'v5e': _chip(
    'v5e',
    'TPU v5 lite',
    15.75,
    819,
    400,
    None,
    25,
    'Cloud TPU v5e system architecture: 2 x 100 Gbps NICs per host of 8 chips, i.e. 25 Gbps per chip',
  ),
  'v5p': _chip(
    'v5p',
    'TPU v5',
    95.74,
    2765,
    1200,
    None,
    50,
    'Cloud TPU v5p system architecture: DCN 50 Gbps per chip',
    cores=True,
  ),
  'v6e': _chip(
    'v6e',
    'TPU v6 lite',
    31.25,
    1638,
    800,
    None,
    50,
    "assumed: v5p's 50 Gbps per chip (the v6e page gives no per-chip data-center network figure)",
  ),
}

# libtpu's names for the chip types and their chip configurations (one device per chip: megacore).
_LIBTPU = {'v4': ('v4', 'megacore'), 'v5e': ('v5e', 'default'), 'v5p': ('v5', 'megacore'), 'v6e': ('v6e', 'default')}
_3D = ('v4', 'v5p')


def shape(family: str, chips: int) -> tuple[int, ...]:
  """The slice's chip grid as Cloud TPU builds it: 2-d for v5e and v6e (2x4, 4x4, 8x16, 16x16), 3-d for v4
  and v5p (2x2x1, 2x2x2, 2x4x4, 4x4x8, 4x4x12); from 64 chips every 3-d side is a multiple of 4."""
  if chips == 1:
    return (1, 1) if family not in _3D else (1, 1, 1)
  if family not in _3D:
    sides = [(a, chips // a) for a in range(1, chips + 1) if chips % a == 0 and a <= chips // a]
    sides = [s for s in sides if all(side & (side - 1) == 0 for side in s)]  # powers of two
  elif chips == 4:
    sides = [(2, 2, 1)]
  else:
    step = 4 if chips >= 64 else 2
    sides = [
      (a, b, chips // (a * b))
      for a, b in itertools.product(range(step, chips + 1, step), repeat=2)
      if a <= b and chips % (a * b) == 0 and chips // (a * b) >= b and chips // (a * b) % step == 0
    ]
  if not sides:
    raise ConfigError(f'{family} has no slice of {chips} chips: use a count Cloud TPU offers, e.g. {family}-8 or -16.')
  return min(sides, key=lambda s: (max(s) / max(min(s), 1), s))


def _wrap(family: str, sides: tuple[int, ...]) -> tuple[bool, ...]:
  """Torus links along a side: whole 16-chip rows of a 2-d pod; 3-d slices from a full cube (4x4x4) up."""
  if family in _3D:
    torus = math.prod(sides) >= 64 and all(side % 4 == 0 for side in sides)
    return (torus,) * 3
  return tuple(side == 16 for side in sides) + (False,)


def unavailable() -> str | None:
  """None where libtpu loads; otherwise why, and what to install."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    import jax

    return f"libtpu is not installed: pip install -e '.[tpu]' (or 'jax[tpu]=={jax.__version__}')"
  return None


def devices(target) -> list:
  """The deviceless TPU devices of `target` (its slices x chips), numbered as a real slice numbers them."""
  from jax.experimental import topologies

  reason = unavailable()
  if reason:
    raise ConfigError(f'--mode compile for {target.name} needs libtpu: {reason}.')
  # No metadata server to ask on a machine that is not a TPU VM (axlearn and MaxText set the same), and
  # no TPU to guard: libtpu's lock file would let one process at a time compile (pytest -n 2, a sweep).
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # Without these libtpu's start-up prints three warnings about a TPU VM it is not on; the topology below
  # decides what is compiled for (libtpu starts once per process, with the first target's name).
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', target.name.replace('v5e-', 'v5litepod-'))
  family = target.chip.family
  sides = shape(family, target.per_slice)
  name, chip_config = _LIBTPU[family]
  host_bounds = tuple(min(side, 2) for side in sides[:2]) + (1,)
  topology = topologies.get_topology_desc(
    platform='tpu',
    topology_name=f'{name}:{"x".join(map(str, sides))}',
    chip_config_name=chip_config,
    chips_per_host_bounds=host_bounds,
    num_slices=target.slices,
    wrap=_wrap(family, sides),
  )
  return list(topology.devices)
