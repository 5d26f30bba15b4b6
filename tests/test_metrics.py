"""The peak MFU divides by: data-sheet lookup by device_kind, the measured fallbacks, and the label that
says which one was used. The device and the measuring function are faked: nothing here times a matmul."""

import jax
import jax.numpy as jnp
import pytest

from transformer import metrics

# device_kind strings as JAX reports them -> dense per-device FLOP/s of the data sheet.
DEVICE_KINDS = {
  'NVIDIA H100 80GB HBM3': 989.5e12,  # SXM
  'NVIDIA H100 PCIe': 756.5e12,
  'NVIDIA H100 NVL': 835.5e12,
  'NVIDIA H200': 989.5e12,
  'NVIDIA H200 NVL': 835.5e12,
  'NVIDIA GH200 480GB': 989.5e12,
  'NVIDIA B200': 2.25e15,
  'NVIDIA GB200': 2.5e15,
  'NVIDIA A100-SXM4-80GB': 312e12,
  'NVIDIA A100-PCIE-40GB': 312e12,
  'NVIDIA A10': 125e12,
  'NVIDIA L4': 121e12,
  'NVIDIA L40S': 362.05e12,
  'Tesla V100-SXM2-16GB': 125e12,
  'Tesla V100-PCIE-32GB': 112e12,
  'Tesla T4': 65e12,
  'AMD Instinct MI300X': 1307.4e12,
  'AMD Instinct MI325X': 1307.4e12,
  'AMD Instinct MI355X': 2516.6e12,
  'TPU v3': 61.5e12,  # per core: JAX shows both cores of a chip
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,  # v5e
  'TPU v5': 459e12,  # v5p
  'TPU v6 lite': 918e12,  # v6e (Trillium)
  'TPU7x': 1153.5e12,  # Ironwood: 2,307 per chip, two devices per chip
}


@pytest.mark.parametrize('kind', DEVICE_KINDS)
def test_datasheet_peak_of_real_device_kinds(kind):
  flops, name = metrics.datasheet_peak(kind)
  assert flops == DEVICE_KINDS[kind]
  assert ('fp16' if kind.startswith('Tesla') else 'bf16') in name


def test_most_specific_entry_wins():
  assert metrics.datasheet_peak('NVIDIA H100 PCIe')[1] == 'NVIDIA H100 PCIe bf16'
  assert metrics.datasheet_peak('NVIDIA H100 80GB HBM3')[1] == 'NVIDIA H100 SXM bf16'
  assert metrics.datasheet_peak('nvidia l40s')[0] == 362.05e12  # not L4, not L40; any case
  assert metrics.datasheet_peak('NVIDIA L40')[0] == 181.05e12
  assert metrics.datasheet_peak('NVIDIA GB200')[0] == 2.5e15  # not B200
  assert metrics.datasheet_peak('NVIDIA GH200 480GB')[1] == 'NVIDIA GH200 bf16'  # not H200
  assert metrics.datasheet_peak('TPU v5 lite')[0] == 197e12  # not TPU v5 (v5p)


@pytest.mark.parametrize(
  'kind',
  [
    'NVIDIA A10G',
    'NVIDIA A100X',
    'TPU v4 lite',
    'Tesla V100S-PCIE-32GB',
    'NVIDIA GeForce RTX 4090',
    'NVIDIA B300',
    'cpu',
  ],
)
def test_near_misses_are_not_in_the_table(kind):
  # A10G is no A10, V100S no V100, v4i no v4: a wrong data-sheet figure is worse than a measured one.
  assert metrics.datasheet_peak(kind) is None


class FakeDevice:
  def __init__(self, kind, platform='gpu'):
    self.device_kind, self.platform = kind, platform


def _fake(monkeypatch, kind, platform='gpu'):
  calls = []
  monkeypatch.setattr(jax, 'devices', lambda *a: [FakeDevice(kind, platform)])
  monkeypatch.setattr(metrics, 'measure_matmul_flops', lambda **kw: calls.append(kw) or 7e12)
  return calls


def test_known_accelerator_uses_its_data_sheet(monkeypatch):
  calls = _fake(monkeypatch, 'NVIDIA H200')
  assert metrics.peak_flops_basis() == (989.5e12, 'data sheet: NVIDIA H200 SXM bf16')
  assert metrics.peak_flops_per_device() == 989.5e12 and not calls


def test_unknown_accelerator_measures_bf16_and_says_so(monkeypatch, capsys):
  calls = _fake(monkeypatch, 'Example Accelerator 9000')
  flops, label = metrics.peak_flops_basis()
  assert flops == 7e12 and label == 'measured bf16 matmul (unknown accelerator: Example Accelerator 9000)'
  assert len(calls) == 1 and calls[0]['dtype'] == jnp.bfloat16
  warning = capsys.readouterr().err
  assert 'Example Accelerator 9000' in warning and 'config.train.peak_flops' in warning


def test_cpu_measures_float32(monkeypatch, capsys):
  calls = _fake(monkeypatch, 'cpu', platform='cpu')
  assert metrics.peak_flops_basis() == (7e12, 'measured f32 matmul (cpu)')
  assert calls[0].get('dtype', jnp.float32) == jnp.float32
  assert capsys.readouterr().err == ''  # no warning: the CPU has no data sheet to miss


@pytest.mark.parametrize(
  'kind,platform', [('NVIDIA H100 80GB HBM3', 'gpu'), ('Example Accelerator 9000', 'gpu'), ('cpu', 'cpu')]
)
def test_configured_peak_wins(monkeypatch, capsys, kind, platform):
  calls = _fake(monkeypatch, kind, platform)
  assert metrics.peak_flops_basis(123e12) == (123e12, 'configured (config.train.peak_flops)')
  assert not calls and capsys.readouterr().err == ''


def test_measure_matmul_flops_runs_in_the_dtype_asked():
  assert metrics.measure_matmul_flops(size=64, repeats=1, dtype=jnp.bfloat16) > 0
