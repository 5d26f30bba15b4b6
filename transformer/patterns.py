"""Block-sparse attention patterns: which key blocks each query block may see, defined once.

A pattern cuts a row into blocks of `block` tokens and says, for query block I and key block J, whether
the queries of I may attend to the keys of J (`Pattern.table`). Every kernel reads that one table: the
dense reference expands it to tokens (`Pattern.token_mask`), the CPU block path gathers only its
non-empty blocks (`attention.block_attention`), splash gets it as its block mask (`splash.py`), and
decoding skips the cache blocks it rules out (`cached_attention.py`). Causality, padding and packed
segments are applied on top by the usual mask rule, so a pattern only ever removes keys.

Blocks are cut on the row's indices (a decoding cache's slots), as in the block-sparse kernels that
made these patterns practical. Window and strided depend only on I - J, so a packed row's documents
see the same pattern as alone; fixed's chunks and BigBird's global and random blocks are the row's.

- `strided` (Child et al. 2019, "Generating Long Sequences with Sparse Transformers", section 4.2):
  the previous `stride` blocks (their l positions) and every `stride`-th block before (i - j mod l = 0),
  merged into one head as in their section 4.3's option 2, at block granularity.
- `fixed` (ibid.): the blocks of the query's own chunk of `stride` blocks, and the last `summary`
  blocks of every chunk (their c positions that summarise it).
- `bigbird` (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", appendix D's block
  form): `local` blocks around the query's (a sliding window), the first `global_blocks` blocks (which
  also see everything, when not causal), and `random` blocks per query block, drawn from `seed` and
  the layer, so each layer has its own fixed draw.
"""

import dataclasses
import functools

import numpy as np

from transformer.config import ConfigError, ModelConfig

KINDS = ('strided', 'fixed', 'bigbird')


@dataclasses.dataclass(frozen=True)
class Pattern:
  """One block-sparse pattern; hashable (a static argument of jitted code)."""

  kind: str
  block: int  # tokens per block
  causal: bool
  stride: int = 4  # strided / fixed: blocks per stride (Child et al.'s l = stride * block)
  summary: int = 1  # fixed: summary blocks at the end of each chunk (their c = summary * block)
  local: int = 3  # bigbird: window blocks, the query's own in the middle
  global_blocks: int = 2  # bigbird
  random: int = 3  # bigbird: random key blocks per query block
  seed: int = 0  # bigbird: the random draws' seed (each layer draws from (seed, layer))

  def table(self, q_blocks: int, k_blocks: int, layer: int = 0) -> np.ndarray:
    """bool `[q_blocks, k_blocks]`: True where query block I may see key block J (causality included
    at block level: J <= I when causal; the diagonal block is then cut per token by the mask rule)."""
    return _table(self, q_blocks, k_blocks, layer if self.depends_on_layer else 0)

  @property
  def depends_on_layer(self) -> bool:
    return self.kind == 'bigbird' and self.random > 0

  def blocks(self, length: int) -> int:
    """The blocks a `length`-token row is cut into (the last may be shorter)."""
    return -(-length // self.block)

  def token_mask(self, q_index, k_index, q_length: int, k_length: int, layer: int = 0):
    """bool, the broadcast of `q_index` and `k_index` (int arrays, NumPy or JAX, indices into rows of
    `q_length` queries and `k_length` keys): the table at their blocks."""
    table = self.table(self.blocks(q_length), self.blocks(k_length), layer)
    xp = np if isinstance(q_index, np.ndarray) and isinstance(k_index, np.ndarray) else _jnp()
    return xp.asarray(table)[q_index // self.block, k_index // self.block]

  def density(self, length: int) -> float:
    """The fraction of a causal (or full) `length`-token attention matrix's blocks that the pattern keeps."""
    table = self.table(self.blocks(length), self.blocks(length))
    full = np.tril(np.ones_like(table)) if self.causal else np.ones_like(table)
    return float(table.sum() / full.sum())


def _jnp():
  import jax.numpy as jnp

  return jnp


@functools.lru_cache(maxsize=256)
def _table(pattern: Pattern, q_blocks: int, k_blocks: int, layer: int) -> np.ndarray:
  i = np.arange(q_blocks)[:, None]
  j = np.arange(k_blocks)[None, :]
  gap = i - j
  if pattern.kind == 'strided':
    table = (np.abs(gap) < pattern.stride) | (gap % pattern.stride == 0)
  elif pattern.kind == 'fixed':
    table = (i // pattern.stride == j // pattern.stride) | (j % pattern.stride >= pattern.stride - pattern.summary)
  elif pattern.kind == 'bigbird':
    half = pattern.local // 2
    table = np.abs(gap) <= half
    table |= j < pattern.global_blocks
    if not pattern.causal:
      table |= i < pattern.global_blocks
    table = table | _random_blocks(pattern, q_blocks, k_blocks, layer)
  else:
    raise ConfigError(f'attention_pattern={pattern.kind!r} is not a block pattern: pick one of {KINDS}.')
  if pattern.causal:
    table &= gap >= 0
  table.flags.writeable = False
  return table


def _random_blocks(pattern: Pattern, q_blocks: int, k_blocks: int, layer: int) -> np.ndarray:
  """`random` blocks per query block among those the window and global blocks leave out (and, causal,
  before it): BigBird's random attention, one fixed draw per (seed, layer)."""
  rng = np.random.default_rng([pattern.seed, layer])
  out = np.zeros((q_blocks, k_blocks), bool)
  half = pattern.local // 2
  for i in range(q_blocks):
    last = min(i, k_blocks - 1) if pattern.causal else k_blocks - 1
    candidates = [j for j in range(pattern.global_blocks, last + 1) if abs(i - j) > half]
    if candidates:
      out[i, rng.choice(candidates, size=min(pattern.random, len(candidates)), replace=False)] = True
  return out


def from_config(config: ModelConfig, *, causal: bool, seed: int = 0) -> Pattern | None:
  """The config's block pattern for self-attention, or None (`dense` and `window`)."""
  if config.attention_pattern not in KINDS:
    return None
  return Pattern(
    kind=config.attention_pattern,
    block=config.pattern_block,
    causal=causal,
    stride=config.pattern_stride,
    summary=config.pattern_summary,
    local=config.pattern_local,
    global_blocks=config.pattern_global,
    random=config.pattern_random,
    seed=seed,
  )
