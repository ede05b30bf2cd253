"""Multi-process start-up: jax.distributed.initialize when launched as several processes."""
import os

import jax
from absl import flags

flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a multi-process run started by hand")
flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")



def _launched_on_several_hosts() -> bool:
  """SLURM, Open MPI and TPU-pod launchers, where jax.distributed.initialize() configures
  itself from the environment."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def maybe_initialize() -> None:
  """Explicit flags win; otherwise a known cluster launcher; otherwise a single process."""
  f = flags.FLAGS
  if f.num_processes and f.num_processes > 1:
    if f.coordinator_address is None or f.process_id is None:
      raise ValueError("--num_processes > 1 needs --coordinator_address and --process_id")
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id,
                               initialization_timeout=120)
  elif _launched_on_several_hosts():
    jax.distributed.initialize()


def barrier(name: str, timeout_s: int = 900) -> None:
  """Waits until every process gets here. CPU (gloo) collectives give up after 30 s, so processes
  meet here after compiling, before their first collective, however unequal their compile times."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the coordination service's client
  client = jax_distributed.global_state.client
  if client is None or not hasattr(client, "wait_at_barrier"):
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
