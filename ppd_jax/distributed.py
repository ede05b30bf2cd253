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
