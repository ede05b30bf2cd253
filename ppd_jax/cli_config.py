"""Command lines with `--config.FIELD=VALUE` overrides: a mistake in one is a single line.

ml_collections' config_flags raises a misspelt field as an AttributeError from inside absl's flag
parsing, which absl does not catch (a 55-line traceback). `app.run(main,
flags_parser=cli_config.flags_parser("ppd_jax.train"))` turns it, and absl's own flag errors,
into one line naming the override and, where ml_collections has one, the field meant.
"""
import re
import sys

from absl import flags


def _override_message(argv: list[str], error: Exception) -> str:
  # ml_collections wraps a KeyError's repr in an AttributeError: undo the escaping.
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  missing = re.search(r"'([^'\n]+)'", text)
  meant = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    if missing and missing.group(1) in parts:
      i = parts.index(missing.group(1))
      hint = f" (did you mean {'.'.join(parts[:i] + [meant.group(1)])}?)" if meant else ""
      return (f"--config.{'.'.join(parts)}: the config has no field "
              f"{'.'.join(parts[:i + 1])}{hint}")
  return f"a --config override: {text.splitlines()[0] if text else type(error).__name__}"


def define_config_file(prog: str, default: str, help_text: str) -> None:
  """`--config` with a default file. config_flags loads a default, and applies the command line's
  overrides to it, while the flag is defined (at import, before absl parses anything), so a
  misspelt override there is turned into the same one line here."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
  except (AttributeError, KeyError) as e:
    sys.exit(f"{prog}: {_override_message(sys.argv, e)}")
  except (TypeError, ValueError) as e:
    sys.exit(f"{prog}: a --config override: {e}")


def flags_parser(prog: str):
  """An absl `flags_parser` that exits with one line `prog: ...` on a bad flag or override."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:      # absl's own: unknown flag, bad value, missing required flag
      sys.exit(f"{prog}: {e} (--helpfull lists the flags)")
    except (AttributeError, KeyError) as e:   # config_flags: a field the config does not have
      sys.exit(f"{prog}: {_override_message(argv, e)}")
    except (TypeError, ValueError) as e:      # config_flags: a value of the wrong type
      sys.exit(f"{prog}: a --config override: {e}")
  return parse
