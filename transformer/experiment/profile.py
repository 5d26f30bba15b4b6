"""Where the compiled train step's time goes: `--mode bench --config.bench.profile=True`.

A few steps run under `jax.profiler`; the runtime records one event per executed XLA op (its `hlo_op`
stat). Each op is put in one category by the HLO instruction it runs: its opcode, whether it holds a
matmul (`dot`), the size of its result, and the JAX operation it came from (the `op_name` metadata,
which carries the Flax module path, e.g. `.../layer_3/self_attention/...`). The table gives each
category's time per step, its share of all op time, and its FLOPs: exact for matmuls, one per result
element for everything else (an estimate: it only says which rows are bound by memory, not compute).

Each op's time runs from its start to its completion (for a matmul that XLA hands to Eigen's thread pool,
its `end:` event, not the moment its thunk returns), and every instant of wall time is split equally
between the ops running then: the shares add up to the time some op was running, never more than the
step. Summed op durations, as a trace viewer shows them, miss the asynchronous matmuls and count twice
the ops that share the cores with them.
"""

import collections
import dataclasses
import glob
import math
import os
import re
import tempfile

import jax

from transformer import hlo_audit

# (category, what it holds), in the order of the table.
CATEGORIES = (
  ('matmuls', 'projections (q, k, v, out) and the FFN, forward and backward'),
  ('vocabulary matmuls', 'the logits (embedding.attend or the output layer) and their gradients'),
  ('attention', 'the kernel: scores, mask, softmax over keys, weighted values'),
  ('vocabulary softmax/loss', 'log-softmax, cross-entropy and accuracy over [tokens, vocab] arrays'),
  ('norms & elementwise', 'layer norms, activations, residuals, embeddings, dropout'),
  ('optimizer', 'clipping, the optimizer update and the step metrics (after the gradient)'),
  ('copies & transposes', 'pure data movement'),
  ('collectives', 'all-reduce, all-gather, reduce-scatter, ...'),
  ('other', 'loop control and ops not found in the HLO'),
)
_LOOPS = {'while', 'conditional', 'call'}
_MOVES = {'copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'parameter', 'constant', 'slice', 'concatenate'}
_INDEXING = {'tuple', 'get-tuple-element', 'iota', 'dynamic-slice', 'dynamic-update-slice', 'pad', 'gather'}
_NO_FLOPS = _MOVES | _LOOPS | _INDEXING  # no arithmetic (a loop's own result is its body's)
_ATTENTION = re.compile(r'/(self|cross)_attention/(?!(query|key|value|out)/)')
_VOCAB_MATMUL = re.compile(r'attend|/logits/|/output/')


@dataclasses.dataclass
class Op:
  name: str
  category: str
  flops: int  # per run: matmul FLOPs plus one per result element of other arithmetic
  dot_flops: int  # per run: matmul FLOPs only
  op_name: str  # the JAX operation (HLO metadata)
  # How the trace times it: 'event' (its own event), 'async' (an unfused matmul: XLA CPU hands it to Eigen's
  # thread pool and goes on; `spans`) or 'loop' (a while, conditional or call, whose event holds its body's).
  timing: str = 'event'


def _parsed(computations):
  """{computation: [(name, opcode, result type, line)]}: each instruction's line read once."""
  found = {}
  for computation, lines in computations.items():
    matches = [(hlo_audit.INSTRUCTION.match(line), line) for line in lines]
    found[computation] = [(m.group(1), m.group(3), m.group(2), line) for m, line in matches if m]
  return found


def _elements(type_text: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(',') if d) for _, dims in hlo_audit.ARRAY.findall(type_text))


def _flops(rows, types) -> tuple[int, int]:
  """(matmul FLOPs of the `dot`s among `rows`, one per result element of the other arithmetic)."""
  dots = other = 0
  for _, opcode, type_text, line in rows:
    if opcode == 'dot':
      dots += hlo_audit.one_dot_flops(type_text, line.split(' dot(', 1)[1], types)
    elif opcode not in _NO_FLOPS and opcode != 'fusion':
      other += _elements(type_text)
  return dots, other


def classify(hlo_text: str, vocab_elements: int) -> dict:
  """{instruction name: Op} for every instruction of the compiled module's scheduled computations.

  `vocab_elements`: tokens per step and device times the vocabulary: a result at least that large
  (and not a matmul) is work over the vocabulary.
  """
  computations, _ = hlo_audit.split(hlo_text)
  parsed = _parsed(computations)
  types = {name: type_text for rows in parsed.values() for name, _, type_text, _ in rows}
  ops = {}
  for rows in parsed.values():
    for row in rows:
      name, opcode, type_text, line = row
      op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ''])[1]
      inner = [row]
      callee = re.search(r'calls=%?([\w.\-]+)', line)
      if opcode == 'fusion' and callee and callee.group(1) in parsed:
        inner = parsed[callee.group(1)]
      opcodes = {r[1] for r in inner}
      has_dot = bool(opcodes & {'dot', 'convolution'}) or 'matmul' in line.lower()
      dots, other = _flops(inner, types)
      category = _category(opcode, opcodes, has_dot, op_name, type_text, vocab_elements)
      timing = 'async' if opcode in ('dot', 'convolution') else 'loop' if opcode in _LOOPS else 'event'
      ops[name] = Op(name, category, dots + other, dots, op_name, timing)
  return ops


def _category(opcode, opcodes, has_dot, op_name, type_text, vocab_elements) -> str:
  if any(opcode.startswith(kind) for kind in hlo_audit.KINDS):
    return 'collectives'
  if opcode in ('while', 'conditional', 'call', 'tuple', 'get-tuple-element', 'parameter', 'constant'):
    return 'other'
  if opcodes <= _MOVES | {'fusion', 'dynamic-slice', 'dynamic-update-slice', 'pad', 'gather'}:
    return 'copies & transposes'
  if has_dot:
    if _ATTENTION.search(op_name):
      return 'attention'
    return 'vocabulary matmuls' if _VOCAB_MATMUL.search(op_name) else 'matmuls'
  if _ATTENTION.search(op_name):
    return 'attention'
  if _elements(type_text) >= vocab_elements:
    return 'vocabulary softmax/loss'
  if 'jvp(' not in op_name:
    return 'optimizer'
  return 'norms & elementwise'


def op_times(trace_dir: str, module: str, timing=None) -> dict:
  """{hlo op name: [nanoseconds, runs]} of the ops of the XLA modules whose name contains `module` (e.g.
  'train_step': `jit_train_step`, `pmap_train_step`) in a trace, over all devices: each op's share of the
  wall time (`wall_shares`) from its start to its completion (`spans`). `timing`: {op: `Op.timing`}."""
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f'no profile (*.xplane.pb) was written under {trace_dir}')
  data = jax.profiler.ProfileData.from_file(paths[-1])
  events = []
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get('hlo_op') if module in str(stats.get('hlo_module', '')) else None
        events.append((event.name, event.start_ns, event.duration_ns, op))
  timing = timing or {}
  asynchronous = {op for op, kind in timing.items() if kind == 'async'}
  return wall_shares(spans(events, asynchronous), {op for op, kind in timing.items() if kind == 'loop'})


def spans(events, asynchronous=frozenset()) -> list:
  """[(start, end, op)] from trace events (name, start, duration, hlo op or None). XLA CPU records an op's
  event while its thunk runs. The `asynchronous` ops (a plain `dot`, which Eigen's thread pool computes:
  a weight gradient `x^T g`) return at once, and only their `end: <op>` event marks when the work finished;
  for the others that event can come much later (when the executor gets to it), so their own event counts."""
  pending = collections.defaultdict(collections.deque)
  found = []
  for name, start, duration, op in sorted(events, key=lambda event: event[1]):
    if op in asynchronous:
      pending[op].append((start, start + duration))
    elif op:
      found.append((start, start + duration, op))
    elif name.startswith('end: ') and pending[name[5:]]:
      begin, end = pending[name[5:]].popleft()
      found.append((begin, max(end, start), name[5:]))
  found += [(begin, end, op) for op, runs in pending.items() for begin, end in runs]
  return found


def wall_shares(op_spans, loops=frozenset()) -> dict:
  """{op: [nanoseconds, runs]}: every instant of wall time split equally between the ops running then, so
  that ops overlapping on the CPU's cores (an async matmul beside the next op) are not counted twice and
  the shares add up to the time some op was running. A `loops` op (a while loop: scanned layers) runs its
  body's ops inside its own event, so it gets only the instants when none of them runs."""
  times = collections.defaultdict(lambda: [0.0, 0])
  edges = sorted(edge for i, (begin, end, _) in enumerate(op_spans) for edge in ((begin, 1, i), (end, -1, i)))
  running, last = set(), None
  for at, change, i in edges:
    if running:
      working = [j for j in running if op_spans[j][2] not in loops] or running
      for j in working:
        times[op_spans[j][2]][0] += (at - last) / len(working)
    last = at
    if change > 0:
      running.add(i)
      times[op_spans[i][2]][1] += 1
    else:
      running.discard(i)
  return dict(times)


def trace(run_steps, steps: int, trace_dir: str | None = None) -> str:
  """Runs `run_steps(steps)` under the profiler; returns the directory the trace went to."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix='profile-')
  jax.profiler.start_trace(trace_dir)
  try:
    run_steps(steps)
  finally:
    jax.profiler.stop_trace()
  return trace_dir


def breakdown(times: dict, ops: dict, steps: int) -> dict:
  """Per step: {'categories': {category: {'ms', 'share', 'gflop', 'gflops'}}, 'op_ms': all op time,
  'dot_gflop': all matmul work, 'top': the ten slowest ops as (ms, name, category, source)}. `times`
  as `op_times` returns it."""
  rows = {name: {'ms': 0.0, 'gflop': 0.0} for name, _ in CATEGORIES}
  per_op = []
  dot_gflop = 0.0
  for name, (ns, runs) in times.items():
    op = ops.get(name) or Op(name, 'other', 0, 0, '')
    dot_gflop += op.dot_flops * runs / steps / 1e9
    ms = ns / steps / 1e6
    rows[op.category]['ms'] += ms
    rows[op.category]['gflop'] += op.flops * runs / steps / 1e9
    per_op.append((ms, op.name, op.category, '/'.join(op.op_name.split('/')[-3:])))
  total_ms = sum(row['ms'] for row in rows.values()) or 1.0
  for row in rows.values():
    row['share'] = row['ms'] / total_ms
    row['gflops'] = row['gflop'] / (row['ms'] / 1e3) if row['ms'] else 0.0
  return {
    'categories': {k: v for k, v in rows.items() if v['ms'] or v['gflop']},
    'op_ms': total_ms,
    'dot_gflop': dot_gflop,
    'top': sorted(per_op, reverse=True)[:10],
  }


def format_breakdown(result: dict, step_ms: float) -> str:
  lines = [
    f'op time per step {result["op_ms"]:.4g} ms (wall time with an op running) for a {step_ms:.4g} ms step:',
    '| category | ms / step | share | GFLOP / step | GFLOP/s |',
    '|---|---|---|---|---|',
  ]
  for name, _ in CATEGORIES:
    row = result['categories'].get(name)
    if row:
      lines.append(f'| {name} | {row["ms"]:.0f} | {row["share"]:.1%} | {row["gflop"]:.2f} | {row["gflops"]:.0f} |')
  lines.append('slowest ops (ms / step, op, category, source):')
  lines += [f'  {ms:8.3g}  {name}  [{category}]  {source}' for ms, name, category, source in result['top']]
  lines.append(f'trace: {result["trace_dir"]}')
  return '\n'.join(lines)


def profile_train(bench, steps: int = 2, trace_dir: str = '') -> dict:
  """`breakdown` of a `bench.TrainBench` (compiled and warmed up) over `steps` traced steps, per device,
  with 'trace_dir': where the trace went (TensorBoard's profile plugin or xprof open it) and
  'unmatched': ops of the trace not found in the compiled module's text (0 unless XLA renamed them)."""
  trace_dir = trace(bench.times, steps, trace_dir or None)
  hlo = bench.runner.lower_train_step(bench.batch).compile().as_text()
  devices = jax.local_device_count()
  tokens = bench.runner.local_batch_size() * bench.seq_len // devices
  ops = classify(hlo, tokens * bench.model_config.vocab_size)
  times = op_times(trace_dir, 'train_step', {name: op.timing for name, op in ops.items()})
  result = breakdown(times, ops, steps * devices)
  result['trace_dir'] = trace_dir
  result['unmatched'] = sum(name not in ops for name in times)
  return result
