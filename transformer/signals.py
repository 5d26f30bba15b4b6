"""Signal guards: while a guard is active, chosen signals are recorded (and handed to `on_signal`) instead of
stopping the process, so the code can finish what it started (a checkpoint, the children of a sweep).

One home for what the training loop's preemption guard and the sweep's forwarding share: handlers are
installed only on the main thread (Python allows no other; elsewhere a guard is a flag nobody sets), the
previous handlers come back on exit, and a second SIGINT can fall through to the previous handler, so
Ctrl-C twice still stops a stuck process.
"""

import os
import signal
import threading


class Guard:
  """Context manager. `received` is the last guarded signal's number (None before any); subclasses act on
  each signal in `on_signal`. With `second_sigint_falls_through`, a SIGINT after any guarded signal goes to
  the handler that was installed before the guard (Python's KeyboardInterrupt, or the default action)."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), second_sigint_falls_through: bool = True):
    self.signals = tuple(signals)
    self.second_sigint_falls_through = second_sigint_falls_through
    self.received = None
    self._previous = {}

  def on_signal(self, signum: int) -> None:
    """Called in the main thread for each guarded signal, after `received` is set."""

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.received is not None and self.second_sigint_falls_through:
      self._fall_through(signum, frame)
    self.received = signum
    self.on_signal(signum)

  def _fall_through(self, signum, frame):
    previous = self._previous.get(signum, signal.SIG_DFL)
    if callable(previous):
      previous(signum, frame)
    elif previous == signal.SIG_DFL:  # the default action (terminate): restore it and deliver again
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
