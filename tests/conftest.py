"""Test set-up: 8 fake CPU devices (set before jax is imported) and a persistent compile cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

pytest_plugins = ["compile_report"]   # jax compile seconds per test (tests/compile_report.py)

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
# ...and the CLIs that tests start as subprocesses use the same folder (compile_cache.py).
os.environ.setdefault("PPD_JAX_COMPILATION_CACHE", _CACHE)

# Base-model pools (demo_world/base_pool.py) are cached per config: sampled once per checkout.
os.environ.setdefault("PPD_JAX_CACHE", os.path.join(os.path.dirname(_CACHE), ".ppd_cache"))


# The longest modules (a fresh-clone run's --durations), started first: pytest-xdist's loadscope
# hands modules to idle workers in collection order, so a long module collected late (alphabetical
# order) would run alone at the end while the other worker waits.
_LONGEST_FIRST = ("test_demo", "test_multireward_demo", "test_sd_end_to_end",
                  "test_cascade_end_to_end", "test_gpu_check", "test_gcs_workdir", "test_learning",
                  "test_xla_cpu", "test_fsdp", "test_throughput", "test_compile_cache",
                  "test_multihost", "test_serve")


def pytest_collection_modifyitems(config, items):
  """Longest modules first (above). PPD_TEST_ORDER=reverse runs the suite backwards instead: a
  check that no test needs another to have run first (module fixtures stay grouped, so it costs
  no extra set-up)."""
  del config
  if os.environ.get("PPD_TEST_ORDER") == "reverse":
    items.reverse()
    return
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory) -> str:
  """A tiny demo-world run trained 4 big steps (checkpoints at steps 2 and 4), so that users'
  samples differ visibly; shared by the sampling and Table 1 tests, which only read it."""
  from configs import ppd
  from ppd_jax import trainer
  workdir = str(tmp_path_factory.mktemp("tiny_trained_run"))
  c = ppd.get_config("tiny")
  c.optim.lr = 3e-2
  trainer.train_and_evaluate(c, workdir)
  return workdir
