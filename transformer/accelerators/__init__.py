"""Accelerator targets by the names users rent them by ('v5e-16', 'v5p-128', 'h100-8'), for `--mode compile`.

A `Target` is a chip type (`Chip`: its memory and bandwidths, each figure with its source), how many JAX
devices a slice or node group has, and how many slices. `Target.devices()` gives devices of that
topology from JAX's deviceless compilers (libtpu for TPUs, the CUDA plugin for GPUs): programs compiled
for them are the accelerator's own programs, built on this host without the hardware.
"""

import dataclasses
import re

from transformer.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Figure:
  """A data-sheet or compiler figure and where it comes from."""

  value: float
  source: str


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device's resources (a TPU chip, megacore or not; a GPU). Bandwidths are bytes/s per device."""

  family: str  # the name's prefix: 'v5e', 'h100'
  platform: str  # 'tpu' or 'gpu'
  device_kind: str  # as JAX names the device; `metrics.datasheet_peak` reads its peak FLOP/s from it
  hbm: Figure  # bytes a program may use, as the compiler counts them
  hbm_bandwidth: Figure
  link_bandwidth: Figure  # within a slice (ICI) or node (NVLink), one direction
  dcn_bandwidth: Figure  # between slices or nodes, one direction
  names_count_cores: bool = False  # v4 and v5p names count TensorCores: two per (megacore) device

  @property
  def peak_flops(self) -> Figure:
    from transformer import metrics

    flops, name = metrics.datasheet_peak(self.device_kind)
    return Figure(flops, f'data sheet: {name} (transformer/metrics.py)')


@dataclasses.dataclass(frozen=True)
class Target:
  """`slices` x `per_slice` devices of `chip`, named as users know them (`name`, `slices`)."""

  name: str
  chip: Chip
  per_slice: int
  slices: int = 1

  @property
  def device_count(self) -> int:
    return self.per_slice * self.slices

  @property
  def link_domain(self) -> int:
    """The devices one fast link joins: a TPU slice (ICI), a GPU node of at most 8 (NVLink)."""
    return self.per_slice if self.chip.platform == 'tpu' else min(self.per_slice, 8)

  @property
  def label(self) -> str:
    return self.name if self.slices == 1 else f'{self.slices}x {self.name}'

  def devices(self) -> list:
    """The target's devices (deviceless: for compiling only), in the order JAX numbers them."""
    return _module(self.chip.platform).devices(self)

  def unavailable(self) -> str | None:
    """Why this host cannot compile for the target (its compiler plugin is not installed), or None."""
    return _module(self.chip.platform).unavailable()


def _module(platform: str):
  if platform == 'tpu':
    from transformer.accelerators import tpu

    return tpu
  from transformer.accelerators import gpu

  return gpu


def chips() -> dict[str, Chip]:
  """Every known chip by family name."""
  from transformer.accelerators import gpu, tpu

  return {**tpu.CHIPS, **gpu.CHIPS}


_NAME = re.compile(r'^([a-z0-9]+?)-(\d+)$')


def parse(name: str, slices: int = 1) -> Target:
  """The target a name stands for: `v5e-16` (16 chips), `v4-8` and `v5p-128` (TensorCores: 4 and 64
  chips), `h100-8` (GPUs; 16 is two nodes). A name no chip matches is a `ConfigError` listing the known ones."""
  known = chips()
  match = _NAME.match(name.strip().lower())
  chip = known.get(match.group(1)) if match else None
  if chip is None:
    examples = ', '.join(f'{family}-{8 if not c.names_count_cores else 16}' for family, c in known.items())
    raise ConfigError(
      f'config.compile.target={name!r} is not a known accelerator: use one of {examples} '
      '(other sizes as Cloud TPU and NVIDIA nodes come).'
    )
  if slices < 1:
    raise ConfigError(f'config.compile.slices={slices} must be >= 1.')
  count = int(match.group(2))
  if chip.names_count_cores:
    if count % 2:
      raise ConfigError(
        f'config.compile.target={name!r}: {chip.family} names count TensorCores, two per chip: use an even number.'
      )
    count //= 2
  if count < 1:
    raise ConfigError(f'config.compile.target={name!r} has no devices.')
  return Target(name, chip, count, slices)
