"""The errors a user can act on, and the set the CLI prints as one line (exit status 2).

The lowest layer: it imports nothing from tmdm. Modules raise these (or subclasses defined beside the
code that raises them, e.g. training/checkpoint.StateMismatch); anything else is a bug and prints a
traceback.
"""


class ConfigError(ValueError):
  """A configuration that cannot run; the message says why in one line."""


class DataError(RuntimeError):
  """Missing or unreadable dataset files; the message names the file."""


class MissingCorpus(RuntimeError):
  """A text source of data.text_sources is not installed on this machine."""


class RunError(RuntimeError):
  """A run cannot go on; the message says why and what is on disk."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (disk full, unwritable folder) or none could be read."""


# What `tmdm <command>` reports in one line instead of a traceback.
USER_ERRORS = (ConfigError, DataError, MissingCorpus, FileNotFoundError, RunError, CheckpointError)
