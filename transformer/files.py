"""Whole-file writes: a reader sees the old file or the whole new one, never half of it."""

import os
import uuid


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` (text or bytes) to a temporary file next to `path`, then renames it over `path`.
  Creates the parent folder. The temporary name is unique, so processes writing the same file do not
  collide; on an error (e.g. an unwritable folder: OSError) `path` is left as it was."""
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp')
  try:
    with open(tmp, 'xb' if isinstance(data, bytes) else 'x') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
