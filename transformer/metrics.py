"""Metrics: `metrics.jsonl` + the trackers (TensorBoard, W&B, MLflow) + a progress line, and MFU from analytic FLOPs."""

import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from transformer import layout, trackers
from transformer.config import ModelConfig


class MetricsWriter:
  """Writes scalars from process 0 only; other processes get a writer that does nothing.

  Every row goes to `metrics.jsonl`; its numbers, and the eval samples, also go to the trackers that
  `loggers` names (`transformer/trackers.py`). A tracker that cannot start or fails later is one
  `trackers.TrackerWarning` and is dropped: the run and its metrics.jsonl go on.
  """

  def __init__(self, workdir: str, enabled: bool = True, loggers=('jsonl', 'tensorboard')):
    self.enabled = enabled
    self._trackers = []
    self.tensorboard = False  # whether TensorBoard event files are written (process 0)
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(layout.metrics_file(workdir), 'a')
    self._trackers = trackers.start(loggers, workdir)
    self.tensorboard = any(tracker.name == 'tensorboard' for tracker in self._trackers)

  def write(self, step: int, scalars: dict):
    """One metrics.jsonl row: numbers as floats; None (a value that does not exist, JSON null) and strings
    (`eval/notes`, saying why) as they are. The trackers get the numbers."""
    if not self.enabled:
      return
    scalars = {k: v if v is None or isinstance(v, str) else float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    numbers = {tag: value for tag, value in scalars.items() if isinstance(value, float)}
    self._each('scalars', int(step), numbers)

  def samples(self, step: int, rows: list[dict]):
    """An eval's decoded examples, for the trackers (samples.jsonl is the loop's)."""
    if self.enabled and rows:
      self._each('samples', int(step), rows)

  def _each(self, method: str, *args):
    for tracker in list(self._trackers):
      try:
        getattr(tracker, method)(*args)
      except Exception as error:  # noqa: BLE001 -- a tracker's failure is not the run's
        self._trackers.remove(tracker)
        trackers.warn(tracker.name, 'stopped', error)
        _close_quietly(tracker)

  def close(self):
    if self.enabled:
      try:
        self._jsonl.close()
      finally:  # a full disk failing the first close still closes the trackers
        for tracker in self._trackers:
          try:
            tracker.close()
          except Exception as error:  # noqa: BLE001
            trackers.warn(tracker.name, 'did not close', error)
        self._trackers = []


def _close_quietly(tracker) -> None:
  try:
    tracker.close()
  except Exception:  # noqa: BLE001 -- already reported as stopped
    pass


class Progress:
  """One line: step, loss, tokens/s and ETA; redrawn in place on a terminal, printed per log otherwise."""

  def __init__(self, total_steps: int, enabled: bool = True):
    self.total, self.enabled = total_steps, enabled
    self.tty = sys.stdout.isatty()

  def update(self, step: int, loss: float, tokens_per_sec: float, seconds_per_step: float):
    if not self.enabled:
      return
    eta = max(self.total - step, 0) * seconds_per_step
    line = (
      f'step {step}/{self.total}  loss {loss:.4f}  {tokens_per_sec:,.0f} tok/s  '
      f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}'
    )
    print(('\r' + line) if self.tty else line, end='' if self.tty else '\n', flush=True)

  def close(self):
    if self.enabled and self.tty:
      print()


def flops_per_token(config: ModelConfig, target_len: int, source_len: int = 0) -> float:
  """Training FLOPs per target token (forward + backward = 3x forward), counted from the shapes.

  Matmuls: 2 FLOPs per weight per token. Attention: 2 * (d_k + d_v) per head per attended key; causal
  self-attention attends to (T + 1) / 2 keys on average, a window to at most `attention_window`.
  """
  d, h, kv = config.d_model, config.num_heads, config.kv_heads
  dk, dv = config.head_dim_qk, config.head_dim_v
  projections = d * h * dk + d * kv * (dk + dv) + h * dv * d
  ffn = (3 if config.activation == 'swiglu' else 2) * d * config.d_ff

  def keys(length, causal):
    mean = (length + 1) / 2 if causal else length
    return min(mean, config.attention_window) if config.attention_window else mean

  per_key = 2 * h * (dk + dv)
  decoder = config.num_decoder_layers * (2 * (projections + ffn) + per_key * keys(target_len, True))
  forward = decoder + 2 * d * config.vocab_size  # output logits
  if config.kind == 'encoder_decoder':
    source_len = source_len or target_len
    # Cross-attention: queries per target token; keys/values of the source, per source token.
    cross = config.num_decoder_layers * (2 * (d * h * dk + h * dv * d) + per_key * source_len)
    cross_kv = config.num_decoder_layers * 2 * d * kv * (dk + dv) * source_len / target_len
    encoder = config.num_encoder_layers * (2 * (projections + ffn) + per_key * keys(source_len, False))
    forward += cross + cross_kv + encoder * source_len / target_len
  return 3.0 * forward


# Dense (not 2:4-sparse) peak FLOP/s per JAX device from vendors' data sheets, bfloat16 unless the
# name says otherwise. Where a data sheet gives only the with-sparsity figure (marked *), dense is half.
# Keys are lower-case pieces of `jax.devices()[0].device_kind` ('NVIDIA H100 80GB HBM3', 'TPU v5 lite',
# 'AMD Instinct MI300X'); see `datasheet_peak`. None: no public figure, and a shorter key would be wrong.
_PEAK_FLOPS = {
  # NVIDIA product data sheets (TFLOPS).
  'h100': (989.5e12, 'NVIDIA H100 SXM bf16'),  # H100 SXM 1,979*
  'h100 pcie': (756.5e12, 'NVIDIA H100 PCIe bf16'),  # H100 PCIe 1,513*
  'h100 nvl': (835.5e12, 'NVIDIA H100 NVL bf16'),  # H100 NVL 1,671*
  'h200': (989.5e12, 'NVIDIA H200 SXM bf16'),  # H200 SXM 1,979*
  'h200 nvl': (835.5e12, 'NVIDIA H200 NVL bf16'),  # H200 NVL 1,671*
  'gh200': (989.5e12, 'NVIDIA GH200 bf16'),  # GH200 1,979*
  'b200': (2.25e15, 'NVIDIA B200 bf16'),  # HGX B200, per GPU 4.5 PFLOPS*
  'gb200': (2.5e15, 'NVIDIA GB200 bf16'),  # GB200 NVL72, per GPU 5 PFLOPS*
  'a100': (312e12, 'NVIDIA A100 bf16'),  # A100 SXM and PCIe 312 | 624*
  'a30': (165e12, 'NVIDIA A30 bf16'),  # A30 165 | 330*
  'a40': (149.7e12, 'NVIDIA A40 bf16'),  # A40 149.7 | 299.4*
  'a10': (125e12, 'NVIDIA A10 bf16'),  # A10 125 | 250* (A10G has no data sheet)
  'l4': (121e12, 'NVIDIA L4 bf16'),  # L4 242*
  'l40': (181.05e12, 'NVIDIA L40 bf16'),  # L40 181.05 | 362.1*
  'l40s': (362.05e12, 'NVIDIA L40S bf16'),  # L40S 362.05 | 733*
  'v100': (125e12, 'NVIDIA V100 SXM2 fp16'),  # V100 SXM2 tensor 125 (no bf16)
  'v100-pcie': (112e12, 'NVIDIA V100 PCIe fp16'),  # V100 PCIe tensor 112 (no bf16)
  't4': (65e12, 'NVIDIA T4 fp16'),  # T4 mixed precision 65 (no bf16)
  # AMD Instinct data sheets, dense bf16 (TFLOPS); one device per GPU (SPX partition mode).
  'mi300x': (1307.4e12, 'AMD Instinct MI300X bf16'),
  'mi300a': (980.6e12, 'AMD Instinct MI300A bf16'),
  'mi325x': (1307.4e12, 'AMD Instinct MI325X bf16'),
  'mi350x': (2306.9e12, 'AMD Instinct MI350X bf16'),
  'mi355x': (2516.6e12, 'AMD Instinct MI355X bf16'),
  # Google Cloud TPU system-architecture pages, per chip (TFLOPS). v2, v3 and TPU7x show JAX one
  # device per TensorCore, two per chip: halved. v4, v5p: one megacore device per chip.
  'tpu v2': (22.5e12, 'TPU v2 core bf16'),  # 45 per chip
  'tpu v3': (61.5e12, 'TPU v3 core bf16'),  # 123 per chip
  'tpu v4': (275e12, 'TPU v4 chip bf16'),
  'tpu v4 lite': None,  # v4i
  'tpu v5 lite': (197e12, 'TPU v5e chip bf16'),
  'tpu v5e': (197e12, 'TPU v5e chip bf16'),
  'tpu v5': (459e12, 'TPU v5p chip bf16'),  # JAX names v5p 'TPU v5'
  'tpu v5p': (459e12, 'TPU v5p chip bf16'),
  'tpu v6 lite': (918e12, 'TPU v6e (Trillium) chip bf16'),
  'tpu v6e': (918e12, 'TPU v6e (Trillium) chip bf16'),
  'tpu7x': (1153.5e12, 'TPU7x (Ironwood) core bf16'),  # 2,307 per chip
}


def datasheet_peak(device_kind: str):
  """(FLOP/s, name) of the table entry for `device_kind`, or None.

  Case-insensitive; a key matches only as a whole piece of the name (no letter or digit either side),
  so 'a10' misses 'A100' and 'A10G', 'h200' misses 'GH200', 'tpu v5' misses 'TPU v5 lite'. The longest
  matching key wins: 'NVIDIA H100 PCIe' is 'h100 pcie', not 'h100'.
  """
  kind = device_kind.lower()
  for key in sorted(_PEAK_FLOPS, key=len, reverse=True):
    if re.search(rf'(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])', kind):
      return _PEAK_FLOPS[key]
  return None


def peak_flops_basis(configured: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of one device and what it is: the configured figure, else the data-sheet entry for
  the device, else a measured matmul rate (bfloat16 on an unknown accelerator, float32 on CPU)."""
  if configured > 0:
    return float(configured), 'configured (config.train.peak_flops)'
  device = jax.devices()[0]
  if device.platform == 'cpu':
    # 2048^2: a 1024^2 matmul reads lower on some CPUs (threads barely busy), which would flatter MFU.
    return measure_matmul_flops(size=2048), 'measured f32 matmul (cpu)'
  entry = datasheet_peak(device.device_kind)
  if entry is not None:
    return entry[0], f'data sheet: {entry[1]}'
  if jax.process_index() == 0:
    print(
      f'Warning: no data-sheet peak for {device.device_kind!r}; MFU is against a measured bfloat16 matmul '
      'rate, which overstates it. Set config.train.peak_flops to the dense bf16 peak FLOP/s per device.',
      file=sys.stderr,
      flush=True,
    )
  # A large matmul: a small one on a big accelerator measures launch overhead, not the MXU/tensor cores.
  return (
    measure_matmul_flops(size=8192, dtype=jnp.bfloat16),
    f'measured bf16 matmul (unknown accelerator: {device.device_kind})',
  )


def peak_flops_per_device(configured: float = 0.0) -> float:
  """The peak FLOP/s of `peak_flops_basis`, without its label."""
  return peak_flops_basis(configured)[0]


def measure_matmul_flops(size: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """Best-of-`repeats` matmul rate of one device: the CPU's (float32) or an unknown accelerator's
  (bfloat16) practical peak for MFU."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
