"""What a compiled train step communicates: its collectives, read from the compiled HLO text.

XLA's cost analysis, like a plain scan of the text, sees a while loop's body once; here every
instruction is counted as many times as it runs per step (the trip counts of the while loops around
it multiplied, from `known_trip_count`). `expected` gives the analytic traffic of the data, FSDP and
tensor-parallel layouts, to compare against (`--mode bench` with `config.bench.audit`, and the tests).
"""

import dataclasses
import json
import math
import re

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
  'c64': 8,
  'c128': 16,
}
ARRAY = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')
_HEADER = re.compile(r'^(ENTRY )?%?([\w.\-]+) .*\{\s*$')
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$')
_CALLS = re.compile(r'\b(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)')


@dataclasses.dataclass
class Collective:
  kind: str  # one of KINDS
  bytes: int  # per run and device: the larger of operands and result (the whole buffer reduced / gathered)
  runs: int  # times it runs per step
  name: str
  op_name: str  # the JAX operation it came from (HLO metadata)
  group: int = 0  # devices in each of its replica groups (0: not written, i.e. all)


def array_bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (`f32[8,64]{1,0}` or a tuple of them)."""
  return sum(
    _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
    for dtype, dims in ARRAY.findall(type_text)
    if dtype in _BYTES or dtype.startswith('f8')
  )


def split(text: str):
  """{computation: [instruction lines]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(' '):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif current is not None and line.strip() != '}':
      computations[current].append(line)
  return computations, entry


def _calls(computations):
  """(caller, role, callee, the calling line) for each computation an instruction calls (`body=`, `calls=`...)."""
  for name, lines in computations.items():
    for line in lines:
      for role, callees in _CALLS.findall(line):
        for callee in callees.strip('{}').replace('%', '').replace(' ', '').split(','):
          if callee in computations:
            yield name, role, callee, line


_BOUND = re.compile(r'compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT')


def _trip_count(computations, line: str) -> int | None:
  """A while loop's trip count: XLA CPU writes it in the loop's backend config; the TPU compiler leaves a
  condition `counter < constant` (the counter from 0, as `scan` and `fori_loop` count). A loop that may stop
  early (decoding's `while not all done and i < max_len`) counts its most trips."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
  if known:
    return int(known.group(1))
  condition = re.search(r'\bcondition=%?([\w.\-]+)', line)
  names, lines = [condition.group(1)] if condition else [], []
  for name in names:  # the condition and what it calls (XLA GPU fuses the comparison); `names` grows
    lines += computations.get(name, [])
    names += [c for text in computations.get(name, []) for c in re.findall(r'\bcalls=%?([\w.\-]+)', text)]
  constants = dict(re.findall(r'%([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)', '\n'.join(lines)))
  bounds = [int(constants[b.group(1)]) for b in map(_BOUND.search, lines) if b and b.group(1) in constants]
  return max(bounds) if bounds else None


def _runs(computations, entry):
  """Times each computation runs per step: while bodies multiply by their trip count."""
  edges = {name: [] for name in computations}
  for name, role, callee, line in _calls(computations):
    if role == 'body':
      factor = _trip_count(computations, line)
      if factor is None:
        raise ValueError(f'while loop without a known trip count in {name}: {line[:200]}')
    else:
      factor = 1  # conditionals count as if every branch ran: an upper bound
    edges[name].append((callee, factor))
  runs = {}

  def visit(name, factor):
    runs[name] = runs.get(name, 0) + factor
    for callee, times in edges[name]:
      visit(callee, factor * times)

  visit(entry, 1)
  return runs


def loop_computations(hlo_text: str) -> set[str]:
  """The computations that run inside a while loop: its bodies and conditions and all they call."""
  computations, _ = split(hlo_text)
  callees = {name: set() for name in computations}
  todo = []
  for name, role, callee, _ in _calls(computations):
    callees[name].add(callee)
    if role in ('body', 'condition'):
      todo.append(callee)
  found = set()
  while todo:
    name = todo.pop()
    if name not in found:
      found.add(name)
      todo.extend(callees[name])
  return found


def _instructions(hlo_text: str):
  """(runs per step, name, result type, opcode, the rest of the line, {name: type} so far) of every
  instruction in a computation that runs."""
  computations, entry = split(hlo_text)
  runs = _runs(computations, entry)
  for name, lines in computations.items():
    types = {}
    for line in lines:
      match = INSTRUCTION.match(line)
      if match:
        result, type_text, opcode, rest = match.groups()
        types[result] = type_text
        if runs.get(name):
          yield runs[name], result, type_text, opcode, rest, types


def _operands(rest: str):
  return re.findall(r'%([\w.\-]+)', rest.split(')')[0])


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of a compiled module (`compiled.as_text()`), with its runs per step."""
  found = []
  for runs, result, type_text, opcode, rest, types in _instructions(hlo_text):
    kind = opcode.removesuffix('-start')
    if kind not in KINDS or opcode.endswith('-done'):
      continue
    size = max(array_bytes(type_text), sum(array_bytes(types.get(o, '')) for o in _operands(rest)))
    op_name = re.search(r'op_name="([^"]*)"', rest)
    found.append(Collective(kind, size, runs, result, op_name.group(1) if op_name else '', _group_size(rest)))
  return found


def _group_size(rest: str) -> int:
  """Devices per replica group: `replica_groups={{0,1},{2,3}}`, the iota form `replica_groups=[2,2]<=[4]`
  (groups x size) or the TPU compiler's mesh form `replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`
  (the listed axes' sizes multiplied); a permute's pairs count 2."""
  mesh = re.search(r'replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}', rest)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", mesh.group(2)))
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]', rest)
  if iota:
    return int(iota.group(2))
  listed = re.search(r'replica_groups=\{\{([\d,]*)\}', rest)
  if listed:
    return len(listed.group(1).split(','))
  return 2 if 'source_target_pairs' in rest else 0


def dot_flops(hlo_text: str) -> int:
  """Matmul FLOPs per step and device (2 x output elements x contracted size of every `dot`, and of every
  `convolution`, the TPU compiler's form of a matmul), loops counted by their trip counts: unlike XLA's
  cost analysis, which sees a loop body once."""
  total = 0
  for runs, _, type_text, opcode, rest, types in _instructions(hlo_text):
    if opcode == 'dot':
      total += runs * one_dot_flops(type_text, rest, types)
    elif opcode == 'convolution':
      total += runs * one_convolution_flops(type_text, rest, types)
  return total


def one_convolution_flops(type_text: str, rest: str, types: dict) -> int:
  """FLOPs of one run of a `convolution`: 2 x output elements x input features per group x the input taps
  each output reads. The TPU compiler writes a batched matmul as a convolution whose window slides over
  the batch, padded or input-dilated so that one tap of it lands on data: along a spatial axis the taps
  are the window's size over the input dilation, at most the input's size."""
  lhs = ARRAY.search(types.get(_operands(rest)[0], ''))
  labels = re.search(r'dim_labels=([\w]+)_', rest)
  if lhs is None or labels is None:
    raise ValueError(f'cannot read the operand shape of a convolution: {rest[:200]}')
  dims = [int(d) for d in lhs.group(2).split(',') if d]
  features = dims[labels.group(1).index('f')]
  spatial = [dims[labels.group(1).index(str(axis))] for axis in range(len(dims) - 2)]
  window = re.search(r'window=\{([^}]*)\}', rest)
  field = lambda key, default: (
    [int(d) for d in re.search(rf'\b{key}=([\dx]+)', window.group(1)).group(1).split('x')]
    if window and re.search(rf'\b{key}=', window.group(1))
    else [default] * len(spatial)
  )
  sizes, dilation = field('size', 1), field('lhs_dilate', 1)
  taps = math.prod(min(-(-size // step), extent) for size, step, extent in zip(sizes, dilation, spatial))
  groups = re.search(r'feature_group_count=(\d+)', rest)
  out = math.prod(int(d) for d in ARRAY.search(type_text).group(2).split(',') if d)
  return 2 * out * features * taps // (int(groups.group(1)) if groups else 1)


def one_dot_flops(type_text: str, rest: str, types: dict) -> int:
  """FLOPs of one run of a `dot`: its result type, the text after `dot(`, and {name: type} of its operands."""
  lhs = ARRAY.search(types.get(_operands(rest)[0], ''))
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
  if lhs is None or contracting is None:
    raise ValueError(f'cannot read the operand shape of a dot: {rest[:200]}')
  dims = [int(d) for d in lhs.group(2).split(',') if d]
  contracted = math.prod(dims[int(i)] for i in contracting.group(1).split(',') if i)
  out = math.prod(int(d) for d in ARRAY.search(type_text).group(2).split(',') if d)
  return 2 * out * contracted


def summary(found: list[Collective]) -> dict:
  """{kind: {'count': runs per step, 'bytes': bytes per step and device}} for every kind present."""
  table = {}
  for c in found:
    row = table.setdefault(c.kind, {'count': 0, 'bytes': 0})
    row['count'] += c.runs
    row['bytes'] += c.runs * c.bytes
  return table


def expected(
  layout: str,
  param_bytes: int,
  gathered_bytes: int = 0,
  activation_bytes: int = 0,
  reductions: float = 0,
  accum: int = 1,
) -> dict:
  """Analytic bytes per step and device, by collective kind (buffer sizes, as `collectives` counts).

  data:   one all-reduce of the gradients (all `param_bytes`), after the last micro-batch.
  fsdp:   the FSDP-split parameters (`gathered_bytes`, whole) all-gathered once: the backward pass and
          every micro-batch reuse them (XLA hoists the gathers out of the accumulation loop); and the
          gradients reduced once. CPU XLA emits no reduce-scatter: it all-reduces and each device
          keeps its slice, so that reduction is an all-reduce of `param_bytes`.
  tensor: `reductions` all-reduces of the [micro-batch, length, d_model] activation
          (`activation_bytes`) per micro-batch: the partial sums of matmuls whose contracted axis is
          split over 'tensor'.
  """
  if layout == 'data':
    return {'all-reduce': param_bytes}
  if layout == 'fsdp':
    return {'all-gather': gathered_bytes, 'all-reduce': param_bytes}
  if layout == 'tensor':
    return {'all-reduce': int(accum * reductions * activation_bytes)}
  raise ValueError(f'unknown layout {layout!r}: data, fsdp or tensor')


def format_table(rows: dict, expectation: dict | None = None) -> str:
  """Kind, count, bytes (and expected bytes and their ratio) as aligned text."""
  expectation = expectation or {}
  lines = [f'{"collective":<20}{"count":>7}{"bytes":>14}{"expected":>14}{"ratio":>8}']
  for kind in KINDS:
    row, want = rows.get(kind), expectation.get(kind)
    if row is None and want is None:
      continue
    count, size = (row['count'], row['bytes']) if row else (0, 0)
    ratio = f'{size / want:.3f}' if want else ''
    lines.append(f'{kind:<20}{count:>7}{size:>14,}{(f"{want:,}" if want is not None else ""):>14}{ratio:>8}')
  return '\n'.join(lines)


def to_json(found: list[Collective]) -> str:
  return json.dumps([dataclasses.asdict(c) for c in found])
