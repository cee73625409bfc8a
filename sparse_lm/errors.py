"""The errors a user can fix: a leaf module every other module may import.

Each message is one line that says what to do. The programs (cli.run) print
it as `<program>: <message>` on stderr and exit with status 1, never a
traceback; library callers catch the class they care about.
"""

from __future__ import annotations


class UserError(Exception):
  """An error the user can fix; its message is one line that says how.

  `hard_exit`: end the process with os._exit after printing (for failures
  that leave library threads behind that would never let it exit)."""

  hard_exit = False


class ConfigError(UserError, ValueError):
  """A config value is wrong; the message names the key and what is allowed."""


class RunError(UserError, RuntimeError):
  """A run cannot go on; the message is one line that says what to do."""


class CheckpointWriteError(RunError):
  """A checkpoint could not be written. Orbax's save threads never finish
  after that, so the program exits with os._exit once the message is out."""

  hard_exit = True


class ConvertError(UserError):
  """A checkpoint or config that cannot be converted; one line naming it."""
