"""The CLIs' persistent compilation cache: where it goes, that a second run reuses the compiles, and
that "off" writes nothing."""
import os
import subprocess
import sys

from ppd_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_flag_then_our_variable_then_jaxs_then_the_user_cache_folder():
  env = {"PPD_JAX_COMPILATION_CACHE": "/a", "JAX_COMPILATION_CACHE_DIR": "/b",
         "XDG_CACHE_HOME": "/x"}
  assert compile_cache.resolve("/f", env) == "/f"
  assert compile_cache.resolve(None, env) == "/a"
  assert compile_cache.resolve(None, {**env, "PPD_JAX_COMPILATION_CACHE": ""}) == "/b"
  assert compile_cache.resolve(None, {"XDG_CACHE_HOME": "/x"}) == "/x/ppd_jax/jax"
  home = os.path.expanduser("~")
  assert compile_cache.resolve(None, {}) == os.path.join(home, ".cache", "ppd_jax", "jax")
  assert compile_cache.resolve("off", env) is None
  assert compile_cache.resolve(None, {**env, "PPD_JAX_COMPILATION_CACHE": "OFF"}) is None
  assert compile_cache.resolve("/f", {**env, "PPD_JAX_COMPILATION_CACHE": "off"}) == "/f"


def _train(workdir, overrides, *flags):
  """One step of the tiny config in a fresh process; returns the persistent-cache hits, which
  jax logs with JAX_LOG_COMPILES (jax/_src/compiler.py, log_persistent_cache_hit)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PPD_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
  result = subprocess.run(
      [sys.executable, "-m", "ppd_jax.train", "--config=configs/ppd.py:tiny",
       f"--workdir={workdir}", "--config.total_steps=1", *flags],
      cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1", **overrides},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr.count("Persistent compilation cache hit")


def _files(folder):
  return {os.path.join(r, n) for r, _, names in os.walk(folder) for n in names}


def test_a_second_run_reuses_the_compiles(tmp_path):
  cache = str(tmp_path / "cache")
  assert _train(tmp_path / "first", {}, f"--compilation_cache={cache}") == 0
  written = _files(cache)
  assert written, "the first run wrote no cache entry"
  assert _train(tmp_path / "second", {}, f"--compilation_cache={cache}") > 0
  assert _files(cache) == written, "the second run compiled something again"


# A CLI's start: setup() as a main calls it, then a compile small enough that only a threshold of
# 0 s caches it (so that the check costs one tiny jit, not a training run).
_SETUP_THEN_COMPILE = (
    "import sys; from absl import flags; from ppd_jax import compile_cache; "
    "flags.FLAGS(sys.argv[:1]); compile_cache.setup(); import jax; "
    "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
    "jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0); "
    "jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()")


def _setup_then_compile(overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ("PPD_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
  subprocess.run([sys.executable, "-c", _SETUP_THEN_COMPILE], cwd=ROOT, check=True, timeout=120,
                 env={**env, "JAX_PLATFORMS": "cpu", **overrides})


def test_off_writes_nothing_even_where_jax_own_variable_points(tmp_path):
  jax_own = str(tmp_path / "jax_own")
  _setup_then_compile({"JAX_COMPILATION_CACHE_DIR": jax_own})
  assert _files(jax_own), "without 'off' the compile is cached there (else this test shows nothing)"
  off = str(tmp_path / "off")
  _setup_then_compile({"PPD_JAX_COMPILATION_CACHE": "off", "JAX_COMPILATION_CACHE_DIR": off})
  assert not _files(off)
