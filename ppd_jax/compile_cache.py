"""JAX's persistent compilation cache for the command-line tools, so a restart reuses its compiles.

Where the cache lives, first given wins:
  --compilation_cache=DIR|off                 (a flag of every CLI, defined here once)
  $PPD_JAX_COMPILATION_CACHE=DIR|off
  $JAX_COMPILATION_CACHE_DIR                  (jax's own variable)
  $XDG_CACHE_HOME/ppd_jax/jax, else ~/.cache/ppd_jax/jax
An entry's key hashes the computation, the compile options, the jax/jaxlib versions and the
devices, so one folder serves every run, config and backend without mixing them up.
The threshold stays at jax's default (jax_persistent_cache_min_compile_time_secs = 1 s): a compile
that takes less costs about what reading an entry back does, and the train and sampling steps,
which take 10 s to minutes, are cached either way.
"""
import os

import jax
from absl import flags

OFF = "off"
ENV = "PPD_JAX_COMPILATION_CACHE"

_FLAG = flags.DEFINE_string(
    "compilation_cache", None,
    f"folder of JAX's persistent compilation cache, or '{OFF}'; default ${ENV}, else "
    "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/ppd_jax/jax (~/.cache/ppd_jax/jax)")


def resolve(flag_value: str | None, environ=os.environ) -> str | None:
  """The cache folder the flag and environment ask for; None when it is off."""
  for value in (flag_value, environ.get(ENV), environ.get("JAX_COMPILATION_CACHE_DIR")):
    if value:
      return None if value.strip().lower() == OFF else value
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ppd_jax", "jax")


def setup() -> str | None:
  """Points JAX at the cache (or turns it off); call at the start of a CLI's main, before any
  compile (jax opens the cache once, at the first compile). Returns the folder, or None."""
  folder = resolve(_FLAG.value if flags.FLAGS.is_parsed() else None)
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if "://" not in folder:   # gs:// and other URLs go to jax as they are
    folder = os.path.abspath(os.path.expanduser(folder))
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder
