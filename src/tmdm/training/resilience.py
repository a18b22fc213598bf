"""What keeps a long run alive or stops it cleanly: preemption signals, non-finite steps, and the
errors that end a run with one clear line."""

import logging
import signal

import jax

from tmdm.errors import RunError

log = logging.getLogger('tmdm')




class NonFiniteError(RunError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Preemption:
  """One stop decision for every process: save, then exit cleanly, all after the same step.

  SIGTERM / SIGINT set this process's flag (`signal`). The flag is this process's vote: it rides in
  the process's rows of the next batch (`vote`), the train step reduces the votes of all rows (its
  'stop' metric, a max), and the loop counts that metric one step late like every other (`count`).
  Every process reads the same reduced value at the same step, so a signal that reached one host
  stops all of them after the same step (on its own it would stop early and leave the others hanging
  in the save's collectives). The price: the stop comes one or two steps after the signal. JAX's
  preemption sync point (TPU / SLURM notices) is consistent across processes by itself and stops
  them too (`reached`)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = None  # This process's signal.
    self.stop = False  # The decision all processes share.
    self.reason = None
    self._previous = {}

  def vote(self) -> int:
    return int(self.signal is not None)

  def count(self, stop_metric):
    """The train step's 'stop' metric (max over every process's vote)."""
    if float(stop_metric) > 0 and not self.stop:
      self.stop, self.reason = True, self.signal or 'a signal to another process'

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals to the caller.
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self.signal = signal.Signals(signum).name
    log.warning('%s received: saving a checkpoint at the end of this step, then stopping', self.signal)

  def reached(self, step: int) -> bool:
    """Whether every process stops after `step`. Call it at every step on every process."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.stop, self.reason = True, self.reason or 'preemption notice'
      except RuntimeError:  # The preemption service is not running (no TPU/SLURM notice).
        pass
    return self.stop


class NonFiniteStreak:
  """Counts consecutive skipped (non-finite) steps, read one step late from the step metrics."""

  def __init__(self, limit: int):
    self.limit, self.count, self.total = limit, 0, 0

  def update(self, nonfinite_flag, step: int):
    if float(nonfinite_flag) > 0:
      self.count += 1
      self.total += 1
      log.warning('step %d: non-finite loss or gradient, update skipped (%d in a row)', step, self.count)
      if self.count >= self.limit:
        raise NonFiniteError(f'{self.count} consecutive steps with a non-finite loss or gradient (last: step '
                             f'{step}); parameters were not updated by them, and no checkpoint was written '
                             'during the streak')
    else:
      self.count = 0

  @property
  def active(self) -> bool:
    return self.count > 0
