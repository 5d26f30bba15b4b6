"""TensorBoard event files (transformer/trackers.py's TensorBoard, through tensorboardX), read back record by
record: the TFRecord framing with both CRC-32C checks, then each `Event` protocol buffer."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from transformer import metrics


def _unmasked(masked: int) -> int:
  rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
  return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def read_events(path: str) -> list:
  """Every record of an event file, its two checksums verified."""
  with open(path, 'rb') as f:
    data = f.read()
  events, at = [], 0
  while at < len(data):
    header = data[at : at + 8]
    (length,) = struct.unpack('<Q', header)
    (length_crc,) = struct.unpack('<I', data[at + 8 : at + 12])
    payload = data[at + 12 : at + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[at + 12 + length : at + 16 + length])
    assert _unmasked(length_crc) == crc32c(header)
    assert _unmasked(payload_crc) == crc32c(payload)
    events.append(event_pb2.Event.FromString(payload))
    at += 16 + length
  return events


def event_files(workdir) -> list[str]:
  return sorted(os.path.join(workdir, n) for n in os.listdir(workdir) if n.startswith('events.out.tfevents.'))


def test_crc32c_check_value():
  assert crc32c(b'123456789') == 0xE3069283  # the CRC-32C catalogue's check value: the reader's checks check


def test_metrics_writer_writes_one_event_file_of_the_logged_numbers(tmp_path):
  """The version event, then one event per written step with its numbers, tags exactly as metrics.jsonl's
  (`@` too); strings and nulls stay in the JSONL file only. A second writer (a resumed run in the same process
  and second) gets its own file."""
  writer = metrics.MetricsWriter(str(tmp_path))
  assert writer.tensorboard
  writer.write(1, {'train/loss': np.float32(2.5), 'train/lr': 1e-3})
  writer.write(6, {'eval/loss': 2.25, 'eval/notes': 'why', 'eval/loss@512': None, 'eval/loss@64': 2.75})
  assert [e.step for e in read_events(event_files(tmp_path)[0])] == [0, 1, 6]  # flushed at each write
  writer.close()
  metrics.MetricsWriter(str(tmp_path)).close()
  files = event_files(tmp_path)
  assert len(files) == 2
  events = read_events(files[0])
  assert events[0].file_version == 'brain.Event:2'
  logged = [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in events[1:]]
  assert logged == [
    (1, [('train/loss', 2.5), ('train/lr', np.float32(1e-3))]),
    (6, [('eval/loss', 2.25), ('eval/loss@64', 2.75)]),
  ]
  assert [e.file_version for e in read_events(files[1])] == ['brain.Event:2']


def test_without_tensorboard_in_loggers_no_event_file(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), loggers=('jsonl',))
  writer.write(1, {'train/loss': 2.5})
  writer.close()
  assert not writer.tensorboard and event_files(tmp_path) == []
  assert os.path.exists(tmp_path / 'metrics.jsonl')


def test_the_writer_does_not_import_pytorch_where_it_is_installed(tmp_path):
  """tensorboardX's package imports PyTorch when installed (a second per process, for nothing the writer
  needs): the writer hides it, and PyTorch still imports afterwards."""
  pytest.importorskip('torch')
  code = (
    'import sys; from transformer import metrics; '
    f'w = metrics.MetricsWriter({str(tmp_path)!r}, enabled=True); w.write(1, {{"a": 1.0}}); w.close(); '
    'assert "torch" not in sys.modules; import torch; print("ok")'
  )
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == 'ok', result.stderr[-2000:]
  assert len(read_events(event_files(tmp_path)[0])) == 2  # the file version, then the scalar
