"""TensorBoard event files of scalars, written here: no tensorboardX, TensorFlow or background thread.

An event file (`events.out.tfevents.<time>.<host>.<pid>.<n>`) is a sequence of TFRecords, each one serialized
`tensorboard.Event` protocol buffer: a version event first, then one per step with its scalars
(`Summary.Value.simple_value`). A TFRecord is the length (uint64), its masked CRC-32C, the bytes, and their
masked CRC-32C. Written synchronously in the caller's thread: a full disk is one OSError where the metrics
are written or closed, never a traceback from a writer thread or at exit.
"""

import itertools
import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli's polynomial, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()
_WRITERS = itertools.count()  # this process's writers, so two opened in one second get two files


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def record(data: bytes) -> bytes:
  """One TFRecord holding `data`."""
  length = struct.pack('<Q', len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 as protobuf encodes it: a negative one in ten bytes
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _tag(number, 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, scalars: dict[str, float] | None = None, file_version: str = '') -> bytes:
  """A serialized `Event`: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5
  (`Summary`, whose repeated value = 1 holds tag = 1 (string) and simple_value = 2 (float))."""
  out = _tag(1, 1) + struct.pack('<d', wall_time) + _tag(2, 0) + _varint(step)
  if file_version:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = (_bytes_field(1, tag.encode()) + _tag(2, 5) + struct.pack('<f', value) for tag, value in scalars.items())
    out += _bytes_field(5, b''.join(_bytes_field(1, value) for value in values))
  return out


class EventWriter:
  """Appends scalars to a new event file in `logdir` (one per writer, as TensorBoard expects)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_WRITERS)}'
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'xb')
    self._write(event(time.time(), 0, file_version='brain.Event:2'))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """The scalars of one step, flushed to the file (nothing for none)."""
    if values:
      self._write(event(time.time(), step, values))

  def _write(self, data: bytes) -> None:
    self._file.write(record(data))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
