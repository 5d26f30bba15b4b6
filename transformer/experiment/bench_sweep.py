"""`--mode bench` on a sweep file: its variants side by side, timed in alternating rounds.

Each variant's config is the one its sweep runs train (`sweep.variant_config`, with seed 0). Every variant
is built and compiled first (its train step on synthetic batches, and `decoding.generate`'s cached greedy
loop over random weights, as the single-config bench times them); then each of `config.bench.rounds` rounds
times every variant in turn (variant 1, 2, ..., n), so load drifting on a shared machine hits all variants
alike, and a variant's figure is the median over rounds. The KV cache's size is read from the cache
variables' shapes and dtypes (`jax.eval_shape` of `models.init_cache`) for `config.bench.decode_batch` rows at
the model's max_len.

    python launch.py --config experiments/ablations/gqa.py --mode bench --workdir runs/gqa

prints a Markdown table, then one JSON line, and writes both to `<workdir>/bench.md` and `bench.json`.
"""

import json
import os
import statistics

import jax
import ml_collections

from transformer import models, platform
from transformer.config import ConfigError
from transformer.experiment import bench, sweep
from transformer.files import write_atomic

TABLE_FILE, JSON_FILE = 'bench.md', 'bench.json'


def variant_configs(config, overrides=()) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, config) per variant of the sweep `config`, in its order: `sweep.variant_config` (what the variant's
  runs train), with seed 0. `overrides`, the command line's `--config.*` flags (already applied to `config`),
  are checked as `--mode sweep` checks them (`sweep.plan`: e.g. one that sets what the sweep varies is an
  error; `bench.*` flags set this benchmark, not the runs)."""
  sweep.plan(config, 'bench', overrides)
  configs = []
  for v in config.sweep.variants:
    variant = sweep.variant_config(config, v)
    variant.train.seed = 0  # random weights and batches from seed 0, as the single-config bench
    configs.append((v['name'], variant))
  return configs


def kv_cache_bytes(model_config, batch: int, source_length: int = 1) -> dict:
  """Bytes of the decoding cache for `batch` rows at `model_config.max_len` (and `source_length` encoder
  tokens), from its variables' shapes and dtypes: `total`, `kv` (the attention layers' keys and values),
  `other` (what else it holds: the slots' positions and segment ids, the write index) and `per_token`
  (total / (batch * max_len))."""
  model = models.build_model(model_config)
  shapes = jax.eval_shape(lambda: models.init_cache(model, batch, model_config.max_len, source_length))
  kv = other = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    size = leaf.size * leaf.dtype.itemsize
    if {'cached_key', 'cached_value'} & {str(getattr(k, 'key', '')) for k in path}:  # a block of them, or all
      kv += size
    else:
      other += size
  total = kv + other
  return {'total': total, 'kv': kv, 'other': other, 'per_token': total / (batch * model_config.max_len)}


class VariantBench:
  """One variant, built and compiled: its train step (`bench.TrainBench`) and its cached greedy decode."""

  def __init__(self, name: str, config, s: dict):
    self.name, self.settings = name, s
    self.train = bench.TrainBench(config)
    model_config = self.train.model_config
    self.batch, self.decode_len = int(s['decode_batch']), int(s['decode_len'])
    prompt_len = int(s['prompt_len'])
    calls = bench.decode_calls(model_config, batch=self.batch, prompt_len=prompt_len, decode_len=self.decode_len)
    self.decode = calls['cached']
    source_length = prompt_len if model_config.kind == 'encoder_decoder' else 1  # the decode bench's source
    self.cache = kv_cache_bytes(model_config, self.batch, source_length)

  def warm_up(self):
    """Compiles (first train step, first decode) and runs the untimed warm-up steps."""
    self.train.step()
    self.train.times(int(self.settings['warmup']))
    self.decode()

  def time_round(self) -> dict:
    """One round's seconds: the median train step of `steps`, the median decode of `decode_repeats`."""
    steps = self.train.times(max(int(self.settings['steps']), 1))
    decodes = [bench.timed(self.decode) for _ in range(max(int(self.settings['decode_repeats']), 1))]
    return {'step_s': statistics.median(steps), 'decode_s': statistics.median(decodes)}


def measure_rounds(benches: list, rounds: int) -> dict:
  """{name: {figure: median over rounds}}: each round times every bench once, in order (1, 2, ..., n)."""
  seen = {b.name: [] for b in benches}
  for _ in range(rounds):
    for b in benches:
      seen[b.name].append(b.time_round())
  return {name: {key: statistics.median(r[key] for r in got) for key in got[0]} for name, got in seen.items()}


def check_settings(s: dict) -> int:
  """The number of rounds; a ConfigError for a setting this comparison cannot honour."""
  if s['audit']:
    raise ConfigError(
      'config.bench.audit applies to one config: bench the sweep base (or a variant) on its own to audit '
      'its collectives, or set config.bench.audit=False.'
    )
  rounds = int(s['rounds'])
  if rounds < 1:
    raise ConfigError(f'config.bench.rounds={rounds} must be >= 1 (the alternating rounds per variant).')
  if int(s['decode_len']) < 1 or int(s['decode_batch']) < 1:
    raise ConfigError('config.bench.decode_len and config.bench.decode_batch must be >= 1.')
  return rounds


def rows_of(benches: list, medians: dict) -> list[dict]:
  rows = []
  for b in benches:
    m = medians[b.name]
    rows.append(
      {
        'variant': b.name,
        'params': b.train.params,
        'max_len': b.train.model_config.max_len,
        'kv_cache_bytes': b.cache['total'],
        'kv_cache_bytes_per_token': b.cache['per_token'],
        'kv_bytes': b.cache['kv'],
        'decode_tokens_per_sec': b.batch * b.decode_len / m['decode_s'],
        'decode_ms_per_step': 1000 * m['decode_s'] / b.decode_len,
        'train_tokens_per_sec': b.train.tokens_per_step / m['step_s'],
        'step_ms': 1000 * m['step_s'],
      }
    )
  first = rows[0]
  for row in rows:
    row['cache_ratio'] = row['kv_cache_bytes'] / first['kv_cache_bytes']
    row['decode_ratio'] = row['decode_tokens_per_sec'] / first['decode_tokens_per_sec']
    row['train_ratio'] = row['train_tokens_per_sec'] / first['train_tokens_per_sec']
  return rows


def format_table(result: dict) -> str:
  """The comparison as Markdown: what was measured, then one row per variant (ratios against the first)."""
  s = result['settings']
  lines = [
    f'Cached greedy decode of {s["decode_len"]} tokens after a {s["prompt_len"]}-token prompt, '
    f"{s['decode_batch']} row(s); KV cache for {s['decode_batch']} row(s) at the model's max_len; train step "
    f'on synthetic batches. Medians of {s["rounds"]} rounds alternating the variants '
    f'({result["backend"]}, {result["devices"]} device(s)); ratios against the first variant.',
    '',
    '| variant | params | KV cache (bytes, per token) | decode tok/s | ratio | train tok/s |',
    '|---|---:|---:|---:|---|---:|',
  ]
  for row in result['variants']:
    cache = f'{row["kv_cache_bytes"]:,} ({row["kv_cache_bytes_per_token"]:,.1f})'
    ratio = f'cache {row["cache_ratio"]:.2f}x, decode {row["decode_ratio"]:.2f}x, train {row["train_ratio"]:.2f}x'
    lines.append(
      f'| {row["variant"]} | {row["params"]:,} | {cache} | {row["decode_tokens_per_sec"]:,.0f} | {ratio} '
      f'| {row["train_tokens_per_sec"]:,.0f} |'
    )
  return '\n'.join(lines)


def run_bench_sweep(config, workdir: str | None = None, overrides=()) -> dict:
  """`--mode bench` on a sweep file: prints the table, then (last line) the figures as JSON, and writes both to
  `workdir` (when given) as bench.md and bench.json; returns the figures."""
  s = bench.settings(config)
  rounds = check_settings(s)
  benches = [VariantBench(name, variant_config, s) for name, variant_config in variant_configs(config, overrides)]
  for b in benches:  # compile and warm up every variant before any round: no round pays for a compile
    b.warm_up()
  result = {
    'variants': rows_of(benches, measure_rounds(benches, rounds)),
    'settings': {key: s[key] for key in ('rounds', 'steps', 'decode_batch', 'prompt_len', 'decode_len')},
    'backend': platform.target(),
    'devices': jax.device_count(),
  }
  table, line = format_table(result), json.dumps(result)
  print(table)
  print(line, flush=True)
  if workdir:  # write_atomic creates the folder
    write_atomic(os.path.join(workdir, TABLE_FILE), table + '\n')
    write_atomic(os.path.join(workdir, JSON_FILE), line + '\n')
  return result
