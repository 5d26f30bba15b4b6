"""TensorBoard event files (transformer/tensorboard.py), read back with a second implementation of the format:
tensorboardX's protocol buffers and CRC-32C."""

import os
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboardX.crc32c import crc32c as reference_crc32c
from tensorboardX.proto import event_pb2

from transformer import metrics, tensorboard


def _unmasked(masked: int) -> int:
  rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
  return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def read_events(path: str) -> list:
  """Every record of an event file, its two checksums verified by tensorboardX's CRC-32C."""
  with open(path, 'rb') as f:
    data = f.read()
  events, at = [], 0
  while at < len(data):
    header = data[at : at + 8]
    (length,) = struct.unpack('<Q', header)
    (length_crc,) = struct.unpack('<I', data[at + 8 : at + 12])
    payload = data[at + 12 : at + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[at + 12 + length : at + 16 + length])
    assert _unmasked(length_crc) == reference_crc32c(header)
    assert _unmasked(payload_crc) == reference_crc32c(payload)
    events.append(event_pb2.Event.FromString(payload))
    at += 16 + length
  return events


def test_crc32c_check_value():
  assert tensorboard.crc32c(b'123456789') == 0xE3069283  # the CRC-32C catalogue's check value


@settings(max_examples=60, deadline=None)
@given(
  data=st.binary(max_size=300),
  step=st.integers(-(2**63), 2**63 - 1),
  scalars=st.dictionaries(st.text(min_size=1, max_size=20), st.floats(width=32, allow_nan=False), max_size=5),
)
def test_events_parse_as_tensorboard_reads_them(data, step, scalars):
  assert tensorboard.crc32c(data) == reference_crc32c(data)
  parsed = event_pb2.Event.FromString(tensorboard.event(1.5, step, scalars))
  assert parsed.wall_time == 1.5 and parsed.step == step
  assert [(v.tag, v.simple_value) for v in parsed.summary.value] == list(scalars.items())


def test_metrics_writer_writes_one_event_file_of_the_logged_numbers(tmp_path):
  """The version event, then one event per written step with its numbers; strings and nulls stay in the
  JSONL file only. A second writer (a resumed run in the same process and second) gets its own file."""
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(1, {'train/loss': np.float32(2.5), 'train/lr': 1e-3})
  writer.write(6, {'eval/loss': 2.25, 'eval/notes': 'why', 'eval/loss@512': None})
  writer.close()
  metrics.MetricsWriter(str(tmp_path)).close()
  files = sorted(name for name in os.listdir(tmp_path) if name.startswith('events.out.tfevents.'))
  assert len(files) == 2
  events = read_events(os.path.join(tmp_path, files[0]))
  assert events[0].file_version == 'brain.Event:2'
  logged = [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in events[1:]]
  assert logged == [(1, [('train/loss', 2.5), ('train/lr', np.float32(1e-3))]), (6, [('eval/loss', 2.25)])]
  assert [e.file_version for e in read_events(os.path.join(tmp_path, files[1]))] == ['brain.Event:2']
