"""Command-line logging: this package's INFO lines and every library's warnings, no library INFO.

Orbax logs each file it reads, writes or renames at INFO (about 35 lines per checkpoint restore),
and jax, etils, grain and fsspec add more. Lowering absl's verbosity to WARNING hides them, but
hides this package's own INFO lines too. Instead every command calls `setup()` first: absl logs
at INFO, and a filter on the log handler drops INFO and DEBUG records whose source file lies
outside ppd_jax. Warnings and errors pass whatever their origin. `--verbosity=1` (DEBUG) given on
the command line turns the filter off, for debugging a library.
"""
import logging
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class OwnInfoOnly(logging.Filter):
  """Passes WARNING and above from anywhere, lower levels only from files under ppd_jax/."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return os.path.abspath(record.pathname).startswith(_PACKAGE)


def setup() -> None:
  """Call at the start of a command's main (after absl parsed the flags); idempotent."""
  from absl import flags
  from absl import logging as absl_logging
  verbosity = flags.FLAGS["verbosity"]
  if verbosity.present and verbosity.value >= 1:
    return                                    # asked for DEBUG: every library's lines
  if not verbosity.present:
    absl_logging.set_verbosity(absl_logging.INFO)
  handlers = {absl_logging.get_absl_handler(), *logging.root.handlers}
  for handler in handlers:
    if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
      handler.addFilter(OwnInfoOnly())
