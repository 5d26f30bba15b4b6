"""NVIDIA data-center GPUs in 8-GPU nodes (DGX / HGX), compiled for through JAX's CUDA plugin without a GPU.

The plugin is the `jax[cuda12]` extra (about 5 GB of NVIDIA wheels: too big for CI, so none of this runs
there). Its compiler builds a program from a topology ('2x1x8': NVLink domains x hosts per domain x GPUs
per host) and a target config: the `GpuTargetConfigProto` text that XLA otherwise reads from a live GPU.
`target_config` writes that text from the few data-sheet facts below; the rest (block, thread and shared
memory limits) is the same for compute capabilities 9.0 and 10.0, from NVIDIA's CUDA C++ Programming Guide
("Technical Specifications per Compute Capability"). The programs are the GPU's own: PTX for sm_90a or
sm_100a, assembled by the ptxas the plugin installs; no kernel is autotuned (that needs the GPU).

On a host without a GPU the plugin's start-up check of the CUDA libraries calls cuInit and fails; `devices`
skips that check (`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`, which JAX_PLATFORMS=cpu also implies). JAX then
still computes on the CPU: it starts no CUDA backend where no NVIDIA GPU is visible.

Memory: NVIDIA's capacities are binary (an H200's 141 GB is 141 GiB); CUDA leaves a program slightly less,
and JAX preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
"""

import functools
import importlib.util
import os

from transformer.accelerators import Chip, Figure
from transformer.config import ConfigError

GPUS_PER_NODE = 8  # DGX and HGX H100, H200 and B200 nodes: eight GPUs on one NVLink switch
_GB = 1e9
_GIB = 2**30
_FP32_LANES = 128  # FP32 cores per SM, Hopper and Blackwell (NVIDIA's architecture whitepapers)

# Per GPU: JAX's device kind (CUDA's device name), compute capability, SMs, dense FP32 TFLOPS (for the
# clock), L2 cache in MiB, HBM in GiB and TB/s, NVLink GB/s (both directions), and where each figure comes from.
# XLA's cost model needs the FP32 lanes and the L2 size: without them it fuses differently (the temporaries of
# experiments/bench.py:lm's step on h100-8 grew 2% without the L2 size, 2.2x without the lanes); with them that
# step compiles to what openxla/xla's own H100 config (target_config/specs/h100_sxm.txtpb) gives it.
_H100 = 'NVIDIA H100 Tensor Core GPU data sheet (H100 SXM)'
_H200 = 'NVIDIA H200 Tensor Core GPU data sheet (H200 SXM)'
_B200 = 'NVIDIA DGX B200 data sheet (8 B200 GPUs)'
_SPECS = {
  'h100': dict(
    kind='NVIDIA H100 80GB HBM3',
    capability=(9, 0),
    sms=(132, 'NVIDIA H100 Tensor Core GPU Architecture whitepaper: 132 SMs in H100 SXM5'),
    fp32_tflops=(67, f'{_H100}: FP32 67 TFLOPS'),
    l2_mib=(50, 'NVIDIA H100 Tensor Core GPU Architecture whitepaper: 50 MB L2 cache'),
    hbm_gib=(80, f'{_H100}: 80 GB'),
    hbm_tbps=(3.35, f'{_H100}: 3.35 TB/s'),
    nvlink_gbps=(900, f'{_H100}: NVLink 900 GB/s'),
  ),
  'h200': dict(
    kind='NVIDIA H200',
    capability=(9, 0),
    # The H200 data sheet gives no SM count; its compute figures are H100 SXM's, on the same GH100.
    sms=(132, f'{_H200}: the compute figures of H100 SXM (132 SMs)'),
    fp32_tflops=(67, f'{_H200}: FP32 67 TFLOPS'),
    l2_mib=(50, 'the GH100 of H100 SXM: 50 MB L2 cache'),
    hbm_gib=(141, f'{_H200}: 141 GB'),
    hbm_tbps=(4.8, f'{_H200}: 4.8 TB/s'),
    nvlink_gbps=(900, f'{_H200}: NVLink 900 GB/s'),
  ),
  'b200': dict(
    kind='NVIDIA B200',
    capability=(10, 0),
    # NVIDIA publishes no SM count for B200.
    sms=(148, "Chips and Cheese, Nvidia's B200: Keeping the CUDA Juggernaut Rolling (2025): 148 SMs, 74 per die"),
    fp32_tflops=(80, 'NVIDIA Blackwell Architecture Technical Brief: HGX B200 FP32 80 TFLOPS per GPU'),
    l2_mib=(126.5, "CUDA's L2 size on a B200 (132,644,864 B), as XLA's b200.txtpb target config records it"),
    hbm_gib=(180, f'{_B200}: 1,440 GB in all, 180 GB per GPU (192 GB was announced; DGX and HGX B200 give 180)'),
    hbm_tbps=(8, f'{_B200}: 64 TB/s in all, 8 TB/s per GPU (HGX B200 tables give 7.7)'),
    nvlink_gbps=(1800, f'{_B200}: NVLink 1.8 TB/s per GPU'),
  ),
}
# One 400 Gb/s NIC per GPU for the compute fabric in all three DGX systems.
_DCN = 'NVIDIA DGX {} user guide: eight single-port ConnectX-7 NICs of 400 Gb/s for the compute fabric, one per GPU'


def _chip(family: str, spec: dict) -> Chip:
  hbm, hbm_source = spec['hbm_gib']
  hbm_source += '; CUDA leaves a program slightly less, JAX preallocates 75% of it (XLA_PYTHON_CLIENT_MEM_FRACTION)'
  bandwidth, bandwidth_source = spec['hbm_tbps']
  nvlink, nvlink_source = spec['nvlink_gbps']
  return Chip(
    family=family,
    platform='gpu',
    device_kind=spec['kind'],
    hbm=Figure(hbm * _GIB, hbm_source),
    hbm_bandwidth=Figure(bandwidth * 1e12, bandwidth_source),
    # Half the bidirectional figure: what one GPU sends per second over all its links.
    link_bandwidth=Figure(nvlink / 2 * _GB, f'{nvlink_source}, both directions: half of it each way'),
    dcn_bandwidth=Figure(400 / 8 * _GB, _DCN.format(family.upper())),
  )


CHIPS = {family: _chip(family, spec) for family, spec in _SPECS.items()}


def target_config(family: str) -> str:
  """The `GpuTargetConfigProto` text the CUDA plugin compiles for (`family` is a key of `CHIPS`)."""
  spec = _SPECS[family]
  sms, major, minor = spec['sms'][0], *spec['capability']
  # The clock that gives the data sheet's FP32 rate (one fused multiply-add, 2 FLOPs, per lane and cycle):
  # XLA's cost model reads it, it changes no memory figure. cuDNN 9.8: the oldest the plugin accepts.
  clock = spec['fp32_tflops'][0] * 1e12 / (sms * _FP32_LANES * 2) / 1e9
  return f"""gpu_device_info {{
  name: "{spec['kind']}"
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  core_count: {sms}
  fpus_per_core: {_FP32_LANES}
  clock_rate_ghz: {clock:.3f}
  l2_cache_size: {int(spec['l2_mib'][0] * 2**20)}
  device_memory_size: {spec['hbm_gib'][0] * _GIB}
  memory_bandwidth: {int(spec['hbm_tbps'][0] * 1e12)}
  threads_per_warp: 32
  threads_per_block_limit: 1024
  threads_per_core_limit: 2048
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{spec['kind']}"
"""


def topology(target) -> str:
  """The plugin's topology of `target`: '<nodes>x1x<GPUs per node>', one NVLink domain per node. A name
  counts GPUs: h100-16 is two nodes of 8; 1, 2 and 4 are part of one node."""
  count = target.per_slice
  if count not in (1, 2, 4) and count % GPUS_PER_NODE:
    family = target.chip.family
    raise ConfigError(
      f'config.compile.target={target.name!r}: {family} GPUs come {GPUS_PER_NODE} to a node: use 1, 2, 4, '
      f'{GPUS_PER_NODE} or a multiple of {GPUS_PER_NODE} ({family}-16 is two nodes).'
    )
  per_node = min(count, GPUS_PER_NODE)
  return f'{count // per_node * target.slices}x1x{per_node}'


def _plugin():
  """The installed CUDA plugin's module name, or None."""
  for name in ('jax_plugins.xla_cuda12', 'jax_plugins.xla_cuda13'):
    try:
      if importlib.util.find_spec(name) is not None:
        return name
    except ImportError:  # no jax_plugins package at all
      return None
  return None


def _describe(family: str, topology_name: str) -> list:
  from jax.experimental import topologies

  # The plugin checks the CUDA libraries by starting CUDA, which fails without a GPU; compiling needs none.
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  config = target_config(family)
  try:
    found = topologies.get_topology_desc(platform='cuda', target_config=config, topology=topology_name)
  except NotImplementedError:
    # JAX tried the plugin before the check was skipped (a backend was used first) and left it out: load it now.
    importlib.import_module(_plugin()).initialize()
    found = topologies.get_topology_desc(platform='cuda', target_config=config, topology=topology_name)
  return list(found.devices)


@functools.cache
def unavailable() -> str | None:
  """None where the CUDA plugin compiles (tried once, for one H100); otherwise why, and what to install."""
  import jax

  install = f"pip install 'jax[cuda12]=={jax.__version__}' (the plugin of this JAX: about 5 GB of NVIDIA wheels)"
  if _plugin() is None:
    return f'the CUDA plugin is not installed: {install}'
  try:
    _describe('h100', '1x1x1')
  except Exception as error:  # JaxRuntimeError and the plugin's own: their types are private
    return f'the CUDA plugin cannot compile here ({type(error).__name__}: {error}): {install}'
  return None


def devices(target) -> list:
  """The deviceless GPUs of `target`, node by node (JAX numbers each node's GPUs together)."""
  topology_name = topology(target)
  reason = unavailable()
  if reason:
    raise ConfigError(f'--mode compile for {target.name} needs the CUDA plugin: {reason}.')
  return _describe(target.chip.family, topology_name)
