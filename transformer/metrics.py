"""Metrics: `metrics.jsonl` + TensorBoard events + a progress line, and MFU from analytic FLOPs."""

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from transformer.config import ModelConfig


class MetricsWriter:
  """Writes scalars from process 0 only; other processes get a writer that does nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:  # TensorBoard is optional: the JSONL file carries every figure anyway
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(workdir)
    except ImportError:
      self._tb = None

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for tag, value in scalars.items():
        self._tb.add_scalar(tag, value, int(step))
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Progress:
  """One line: step, loss, tokens/s and ETA; redrawn in place on a terminal, printed per log otherwise."""

  def __init__(self, total_steps: int, enabled: bool = True):
    self.total, self.enabled = total_steps, enabled
    self.tty = sys.stdout.isatty()

  def update(self, step: int, loss: float, tokens_per_sec: float, seconds_per_step: float):
    if not self.enabled:
      return
    eta = max(self.total - step, 0) * seconds_per_step
    line = (f'step {step}/{self.total}  loss {loss:.4f}  {tokens_per_sec:,.0f} tok/s  '
            f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}')
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


# Dense peak FLOP/s per device from vendors' data sheets (bfloat16 unless the name says otherwise).
_PEAK_FLOPS = {'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12,
               'tpu v6 lite': 918e12, 'h100': 989e12, 'a100': 312e12, 'l4': 121e12, 'v100': 125e12}


def peak_flops_per_device(configured: float = 0.0) -> float:
  """The configured peak, else the device's data-sheet peak, else (CPU) a measured float32 matmul rate."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops
  return measure_matmul_flops()


def measure_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 matmul rate of one device: the CPU's practical peak for MFU."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best
