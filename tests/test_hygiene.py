"""Hygiene a user on a shared machine relies on: no pickle reads any file (a checkpoint or cache from elsewhere
cannot run code), no subprocess starts through a shell, and a run opens no listening socket beyond what
multi-host JAX needs (the coordinator's port on process 0 and the CPU collectives' (gloo) ones)."""

import ast
import os
import pathlib
import re
import sys

import launching
import pytest

sys.path.insert(0, launching.ROOT)
from test_faults import CONFIG, flags  # noqa: E402

ROOT = pathlib.Path(launching.ROOT)
FORBIDDEN_MODULES = {'pickle', 'cPickle', 'cloudpickle', 'dill', 'shelve', 'marshal', '_pickle'}
SUBPROCESS_CALLS = {'run', 'call', 'check_call', 'check_output', 'Popen', 'getoutput', 'getstatusoutput'}


def _library_files() -> list[pathlib.Path]:
  folders = ('transformer', 'experiments', 'scripts')
  return [path for folder in folders for path in sorted((ROOT / folder).rglob('*.py'))] + [ROOT / 'launch.py']


def _dotted(node) -> str:
  """`a.b.c` for a Name/Attribute chain, '' otherwise."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
    return '.'.join(reversed(parts))
  return ''


def _true_keyword(call: ast.Call, name: str) -> bool:
  # Any value but a literal False counts: `shell=flag` may be True at run time.
  return any(k.arg == name and not (isinstance(k.value, ast.Constant) and not k.value.value) for k in call.keywords)


def violations(source: str, filename: str) -> list[str]:
  """`file:line: what` for each pickle import, `np.load(..., allow_pickle=True)`, shell subprocess call,
  `os.system` or `os.popen` in `source`."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [node.module or '']
    else:
      names = []
    for name in names:
      if name.split('.')[0] in FORBIDDEN_MODULES:
        found.append(f'{filename}:{node.lineno}: imports {name}')
    if not isinstance(node, ast.Call):
      continue
    callee = _dotted(node.func)
    last = callee.rsplit('.', 1)[-1]
    if callee in ('os.system', 'os.popen', 'system', 'popen'):
      found.append(f'{filename}:{node.lineno}: {callee}() runs a shell')
    if last in ('load', 'loads') and _true_keyword(node, 'allow_pickle'):
      found.append(f'{filename}:{node.lineno}: {callee}(allow_pickle=...)')
    if last in SUBPROCESS_CALLS and _true_keyword(node, 'shell'):
      found.append(f'{filename}:{node.lineno}: {callee}(shell=...)')
    if last in ('getoutput', 'getstatusoutput'):
      found.append(f'{filename}:{node.lineno}: {callee}() runs a shell')
  # ast.walk goes breadth first: report in line order.
  return sorted(found, key=lambda v: int(v.split(':')[1]))


def test_the_scanner_reports_each_planted_violation_with_its_line():
  planted = '\n'.join(
    [
      'import numpy as np, subprocess, os',  # 1: allowed
      'import pickle',  # 2
      'from dill import loads',  # 3
      'x = np.load("a.npy", allow_pickle=True)',  # 4
      'np.load("a.npy", allow_pickle=False)',  # 5: allowed
      'subprocess.run("ls", shell=True)',  # 6
      'subprocess.run(["ls"], shell=False)',  # 7: allowed
      'os.system("ls")',  # 8
      'import shelve, marshal',  # 9 (two)
      'os.popen("ls")',  # 10
    ]
  )
  assert violations(planted, 'planted.py') == [
    'planted.py:2: imports pickle',
    'planted.py:3: imports dill',
    'planted.py:4: np.load(allow_pickle=...)',
    'planted.py:6: subprocess.run(shell=...)',
    'planted.py:8: os.system() runs a shell',
    'planted.py:9: imports shelve',
    'planted.py:9: imports marshal',
    'planted.py:10: os.popen() runs a shell',
  ]


def test_the_library_reads_nothing_with_pickle_and_starts_no_shell():
  files = _library_files()
  assert ROOT / 'transformer' / 'checkpoint.py' in files and len(files) > 20  # the scan sees the library
  found = [v for path in files for v in violations(path.read_text(), str(path.relative_to(ROOT)))]
  assert found == []


def _descendants(pid: int) -> list[int]:
  pids, queue = [], [pid]
  while queue:
    current = queue.pop()
    pids.append(current)
    for task in os.listdir(f'/proc/{current}/task'):
      with open(f'/proc/{current}/task/{task}/children') as f:
        queue += [int(child) for child in f.read().split()]
  return pids


def listening_ports(pid: int) -> set[int]:
  """The TCP ports on which `pid` or one of its children listens: LISTEN (state 0A) sockets of
  /proc/<pid>/net/tcp and tcp6 whose inode is one of the processes' open files."""
  inodes = set()
  for current in _descendants(pid):
    for fd in os.listdir(f'/proc/{current}/fd'):
      try:
        match = re.fullmatch(r'socket:\[(\d+)\]', os.readlink(f'/proc/{current}/fd/{fd}'))
      except FileNotFoundError:  # closed meanwhile
        continue
      if match:
        inodes.add(match.group(1))
  ports = set()
  for table in ('tcp', 'tcp6'):
    with open(f'/proc/{pid}/net/{table}') as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        if fields[3] == '0A' and fields[9] in inodes:
          ports.add(int(fields[1].rsplit(':', 1)[1], 16))
  return ports


def _held_run(workdir, processes: int) -> list:
  """Starts the run and waits until process 0 holds the save of step 1 open: past compiling, a training step
  and the start of an asynchronous save, so every component a run starts is up."""
  settings = flags(train__num_steps=6, train__checkpoint_every=1)
  procs = launching.start(CONFIG, workdir, *settings, processes=processes, env={'TRANSFORMER_TEST_HOLD_SAVE': '1'})
  try:
    launching.wait_for_log(workdir, 'Holding the save of step 1 open', procs=procs)
  except BaseException:
    launching.kill(procs)
    raise
  return procs


def test_a_single_process_run_listens_on_no_port(tmp_path):
  """(The two-process test below is the control: the same reader finds the ports a run does open.)"""
  procs = _held_run(tmp_path, processes=1)
  try:
    assert listening_ports(procs[0].pid) == set()
  finally:
    launching.kill(procs)


def _coordinator_port(proc) -> int:
  with open(f'/proc/{proc.pid}/cmdline') as f:
    arguments = f.read().split('\0')
  return int(next(a for a in arguments if a.startswith('--coordinator_address=')).rsplit(':', 1)[1])


@pytest.mark.slow(20)
def test_a_two_process_run_listens_only_on_the_coordinator_port_and_one_gloo_port_each(tmp_path):
  """Process 0 listens on the coordinator port (JAX's coordination service); each process also listens on one
  port of the CPU collectives' Gloo TCP transport, opened when Gloo connects the ranks (which it logs). Nothing
  else: no TensorBoard or profiler server."""
  procs = _held_run(tmp_path, processes=2)
  try:
    ports = [listening_ports(p.pid) for p in procs]
    coordinator = _coordinator_port(procs[0])
  finally:
    launching.kill(procs)
  assert coordinator in ports[0]
  assert [len(ports[0] - {coordinator}), len(ports[1])] == [1, 1], (ports, coordinator)
  for index in (0, 1):
    assert f'[Gloo] Rank {index} is connected to 1 peer ranks' in launching.log_tail(tmp_path, index, 10**6)
