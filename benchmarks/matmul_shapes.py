"""float32 matmul rates at the model's own shapes, in XLA and in PyTorch: where the train step's and the decoding
loop's time goes once the work is fixed (docs/performance.md: the profile puts two thirds of the step in matmuls).

A 2048^2 GEMM says what a library can do at its best; the step's matmuls are thinner (`[tokens, d_model] x
[d_model, d_ff]`), and a decoding step multiplies 1 or 8 rows by every weight of the model. Each shape is
measured as `copies` independent matmuls against distinct weights, enough of them (64 MiB of weights or more)
that the weights stream from memory as in a real step instead of sitting in the cache.

    python benchmarks/worker.py --impl shapes_xla --variant lm
    python benchmarks/compare.py --only matmuls
"""

import math
import time

WEIGHT_BYTES = 64 * 2**20  # at least this much distinct weight per measurement: more than a CPU's last cache


# How each operand is stored: 'nn' a [m, k] times b [k, n]; 'nt' b stored [n, k] (a layer's input gradient
# g W^T, or logits against a tied [vocab, d_model] table); 'tn' a stored [k, m] (a weight gradient x^T g).
LAYOUTS = ('nn', 'nt', 'tn')


def shapes(model_config, tokens: int, decode_batches=(1, 8)) -> list[tuple[str, int, int, int, str]]:
  """[(name, m, k, n, layout)]: each matmul of a train step over `tokens` tokens (forward, input gradient and
  weight gradient of the attention projections, the FFN and the tied logits), and the FFN input and the
  logits of one decoding step at each of `decode_batches`."""
  d, ff, vocab = model_config.d_model, model_config.d_ff, model_config.vocab_size
  found = []
  for kind, fan_in, fan_out in (('attention projection', d, d), ('FFN in', d, ff), ('FFN out', ff, d)):
    found += [
      (f'train: {kind}', tokens, fan_in, fan_out, 'nn'),
      (f'train: {kind}, input gradient', tokens, fan_out, fan_in, 'nt'),
      (f'train: {kind}, weight gradient', fan_in, tokens, fan_out, 'tn'),
    ]
  found += [
    ('train: logits (tied table)', tokens, d, vocab, 'nt'),
    ('train: logits, input gradient', tokens, vocab, d, 'nn'),
    ('train: logits, table gradient', d, tokens, vocab, 'tn'),
  ]
  for b in decode_batches:
    found += [(f'decode batch {b}: FFN in', b, d, ff, 'nn'), (f'decode batch {b}: logits', b, d, vocab, 'nt')]
  return found


def copies(k: int, n: int) -> int:
  return max(1, math.ceil(WEIGHT_BYTES / (4 * k * n)))


def flops(m: int, k: int, n: int) -> int:
  """The FLOPs one timed call does: `copies` matmuls of `[m, k] x [k, n]`."""
  return 2 * m * k * n * copies(k, n)


def _stored(m, k, n, layout):
  """The shapes the two operands are stored in."""
  return (k, m) if layout == 'tn' else (m, k), (n, k) if layout == 'nt' else (k, n)


def xla_matmul(a, b, layout: str):
  """The `[m, n]` product of operands stored as `layout` says."""
  import jax.numpy as jnp

  return jnp.einsum({'nn': 'mk,kn->mn', 'nt': 'mk,nk->mn', 'tn': 'km,kn->mn'}[layout], a, b)


def torch_matmul(a, b, layout: str):
  """The same product in PyTorch, a transposed operand as a strided view (no copy)."""
  return (a.t() if layout == 'tn' else a) @ (b.t() if layout == 'nt' else b)


def xla_rate(m: int, k: int, n: int, layout: str, repeats: int) -> float:
  """Best-of-`repeats` FLOP/s of one jitted call doing `copies(k, n)` matmuls against distinct second operands."""
  import jax
  import jax.numpy as jnp

  a_shape, b_shape = _stored(m, k, n, layout)
  keys = jax.random.split(jax.random.key(0), copies(k, n) + 1)
  a = jax.random.normal(keys[0], a_shape, jnp.float32)
  bs = [jax.random.normal(key, b_shape, jnp.float32) for key in keys[1:]]
  call = jax.jit(lambda a, bs: [xla_matmul(a, b, layout) for b in bs])
  jax.block_until_ready(call(a, bs))
  return flops(m, k, n) / _best(lambda: jax.block_until_ready(call(a, bs)), repeats)


def torch_rate(m: int, k: int, n: int, layout: str, repeats: int) -> float:
  """The same measurement in PyTorch (eager, its default threads), transposed operands as strided views."""
  import torch

  a_shape, b_shape = _stored(m, k, n, layout)
  generator = torch.Generator().manual_seed(0)
  a = torch.randn(*a_shape, generator=generator)
  bs = [torch.randn(*b_shape, generator=generator) for _ in range(copies(k, n))]
  with torch.no_grad():
    call = lambda: [torch_matmul(a, b, layout) for b in bs]
    call()
    return flops(m, k, n) / _best(call, repeats)


def _best(call, repeats: int) -> float:
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - start)
  return best
