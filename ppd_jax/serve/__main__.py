"""python -m ppd_jax.serve --workdir=W [--host=127.0.0.1 --port=8080]: the web demo for one run.

Binds to 127.0.0.1; another --host needs --allow_network (the page runs models on request: do
not expose it to a network you do not trust). Users made on the page are kept in --users_dir
(default W/serve_users, beside the run's checkpoints/, never inside it). Ctrl-C stops it: the
running model call may finish, queued ones are dropped.
"""
import ipaddress
import logging
import os
import sys

from absl import app
from absl import flags

from ppd_jax import cli_logging
from ppd_jax import compile_cache

flags.DEFINE_string("workdir", None, "the training run to serve (holds checkpoints/)")
flags.DEFINE_string("host", "127.0.0.1", "address to bind; anything but loopback is reachable "
                    "from the network")
flags.DEFINE_bool("allow_network", False, "needed for a --host other than loopback")
flags.DEFINE_string("users_dir", None, "where users made on the page are kept across restarts "
                    "(default: WORKDIR/serve_users; never inside WORKDIR/checkpoints)")
flags.DEFINE_integer("port", 8080, "TCP port")
flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
flags.DEFINE_string("prompts", None, "a text file of prompts, one per line, for the pairs and "
                    "the prompt list (default: the run's world, e.g. the demo's captions)")
flags.DEFINE_integer("max_queue", 8, "requests that may wait for the model at once")
flags.mark_flags_as_required(["workdir"])


def _read_prompts(path: str | None) -> list[str] | None:
  if path is None:
    return None
  with open(path, encoding="utf-8") as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f"--prompts={path} holds no prompts")
  return prompts


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def _users_dir(workdir: str, users_dir: str | None) -> str:
  folder = os.path.realpath(users_dir or os.path.join(workdir, "serve_users"))
  checkpoints = os.path.realpath(os.path.join(workdir, "checkpoints"))
  if os.path.commonpath([folder, checkpoints]) == checkpoints:
    raise ValueError(f"--users_dir={users_dir} lies inside the run's checkpoints/ "
                     "(checkpoint tools own that folder); choose another")
  return folder


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  if not _is_loopback(f.host) and not f.allow_network:
    print(f"ppd_jax.serve: --host={f.host} is reachable from the network; add --allow_network "
          "to serve there anyway", file=sys.stderr)
    sys.exit(2)
  # Our lines only: the root logger stays as cli_logging left it (no library INFO lines).
  log = logging.getLogger("ppd_jax.serve")
  log.setLevel(logging.INFO)
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
  try:
    import uvicorn  # pylint: disable=import-outside-toplevel
    from ppd_jax.serve import app as app_lib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    sys.exit(f"ppd_jax.serve: {e}; install the extra: pip install -e \".[serve]\"")
  from ppd_jax import checkpoint, inference  # pylint: disable=import-outside-toplevel
  from ppd_jax.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from ppd_jax.serve import jobs as jobs_lib  # pylint: disable=import-outside-toplevel
  if not 0 < f.port < 65536:
    sys.exit(f"ppd_jax.serve: --port={f.port} is not a TCP port")
  if not os.path.isdir(os.path.join(f.workdir, "checkpoints")):
    sys.exit(f"ppd_jax.serve: --workdir={f.workdir} has no checkpoints/ folder: not a training "
             "run (make serve builds the demo's)")
  try:
    prompts = _read_prompts(f.prompts)
    users_dir = _users_dir(f.workdir, f.users_dir)
    run = inference.load_trained(f.workdir, f.step)
    engine = engine_lib.Engine(run, prompts)
  except (ValueError, KeyError, OSError, checkpoint.CheckpointError) as e:
    sys.exit(f"ppd_jax.serve: {e}")
  if not _is_loopback(f.host):
    print(f"\nWARNING: serving on {f.host}: anyone who can reach this address can use the demo"
          "\n", file=sys.stderr, flush=True)
  jobs = jobs_lib.Jobs(max_queued=f.max_queue)
  server = uvicorn.Server(uvicorn.Config(
      app_lib.create_app(engine, jobs, users_dir, host=f.host, port=f.port), host=f.host,
      port=f.port, log_level="warning", access_log=False))
  log.info("serving %s (step %d) on http://%s:%d/ (users kept in %s)", f.workdir, run.step,
           f.host, f.port, users_dir)
  try:
    server.run()     # on Ctrl-C / SIGTERM: closes connections, then re-raises the signal
  except KeyboardInterrupt:
    pass
  finally:
    jobs.stop()
    log.info("stopped")


if __name__ == "__main__":
  app.run(main)
