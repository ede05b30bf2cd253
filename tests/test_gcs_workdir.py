"""A run folder in a bucket (gs://) through ppd_jax.storage, against a local GCS emulator.

The CLIs run in subprocesses whose every GCS client is pointed at the emulator on 127.0.0.1
(gcs_emulator.py); their working folder is a fresh tmp folder, so a path mistaken for a local one
(os.path.abspath("gs://b/run") == "<cwd>/gs:/b/run") shows up there as a folder named "gs:".
"""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ppd_jax import storage
from gcs_emulator import assert_no_local_gs_folder
from gcs_emulator import emulator_env
from gcs_emulator import free_port
from gcs_emulator import gcs  # noqa: F401 -- the fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "ppd-runs"


def _train_cmd(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "ppd_jax.train", f"--config={ROOT}/configs/ppd.py:tiny",
          f"--workdir={workdir}", "--config.log_every=1", "--config.async_checkpointing=True",
          *overrides]


def _env(client_env: dict) -> dict:
  return {**client_env, "PYTHONPATH": ROOT,
          "PPD_JAX_COMPILATION_CACHE": os.path.join(ROOT, ".jax_cache")}


def _steps_saved(gcs, prefix: str) -> list[int]:
  """Checkpoint steps that Orbax has finished in the bucket (it commits with commit_success.txt
  where renames are not atomic, as in GCS)."""
  done = re.compile(re.escape(prefix) + r"checkpoints/(\d+)/commit_success\.txt$")
  return sorted(int(m.group(1)) for n in gcs.names(BUCKET, prefix) if (m := done.match(n)))




@pytest.fixture(scope="module")
def bucket(gcs):  # noqa: F811
  gcs.create_bucket(BUCKET)
  return gcs


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(storage.path("gs://b/run")) == "gs://b/run"
  assert str(storage.path("s3://b/x/y")) == "s3://b/x/y"
  assert str(storage.path("run")) == str(tmp_path / "run")
  assert storage.is_url("gs://b") and not storage.is_url("gs:/b") and not storage.is_url("/a/b")


def test_metrics_in_a_bucket_append_and_drop_rows_past_the_resumed_step(bucket, tmp_path):
  """metrics.jsonl on a URL: rows are appended (an object is rewritten whole), and a resumed run
  drops the rows after its checkpoint and a torn last line; TensorBoard events are copied up."""
  script = """if True:
    from ppd_jax import metrics, storage
    url = "gs://%s/metrics_run"
    w = metrics.MetricsWriter(url, resume_step=0)
    for step in range(1, 6):
      w.write(step, {"loss": float(step)})
    w.close()
    storage.append_text(url + "/metrics.jsonl", '{"step": 6, "lo')   # a run killed mid-line
    import time; time.sleep(1.1)   # event file names carry the second they were opened in
    w = metrics.MetricsWriter(url, resume_step=3)
    w.write(4, {"loss": 40.0})
    w.close()
  """ % BUCKET
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                          env=_env(bucket.client_env()), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "line 6 is not a metrics row" in result.stdout
  rows = [json.loads(line) for line in
          bucket.read(BUCKET, "metrics_run/metrics.jsonl").decode().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  events = [n for n in bucket.names(BUCKET, "metrics_run/tensorboard/") if "tfevents" in n]
  assert len(events) == 2 and all(bucket.read(BUCKET, n) for n in events)
  assert_no_local_gs_folder(tmp_path)


def test_an_unsupported_url_scheme_is_named(tmp_path):
  with pytest.raises(storage.StorageError, match=r"ftp://host/run: unsupported URL scheme"):
    storage.path("ftp://host/run")


@pytest.fixture(scope="module")
def bucket_run(bucket, tmp_path_factory):
  """A tiny run with --workdir=gs://...: started, SIGKILLed once its first checkpoint is in the
  bucket, then the same command run again to the end. Returns what the tests check."""
  cwd = tmp_path_factory.mktemp("cwd")
  workdir, prefix = f"gs://{BUCKET}/run", "run/"
  # TMPDIR: the killed run's local copy of its TensorBoard events (storage.LocalMirror) stays here
  env = {**_env(bucket.client_env()), "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
  with open(cwd / "first.log", "w") as log:
    first = subprocess.Popen(
        _train_cmd(workdir, "--config.total_steps=1000", "--config.checkpoint_every=2"),
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 420
    try:
      while not _steps_saved(bucket, prefix):
        assert first.poll() is None, (cwd / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.5)
    finally:
      first.send_signal(signal.SIGKILL)
      first.wait()
  killed_at = max(_steps_saved(bucket, prefix))
  total = killed_at + 2
  second = subprocess.run(
      _train_cmd(workdir, f"--config.total_steps={total}", "--config.checkpoint_every=2"),
      cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
  assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
  return dict(cwd=cwd, env=env, workdir=workdir, prefix=prefix, first_rc=first.returncode,
              killed_at=killed_at, total=total, log=second.stdout)


def test_train_in_a_bucket_saves_is_killed_and_resumes(bucket, bucket_run):
  """The run saved checkpoints in the bucket, was killed, and the same command resumed from one
  to the end; metrics.jsonl (the killed run's rows past the checkpoint dropped), config.json and
  TensorBoard events are in the bucket, and no local 'gs:' folder was made."""
  r, prefix = bucket_run, bucket_run["prefix"]
  assert r["first_rc"] == -signal.SIGKILL
  resumed_at = int(re.search(r"resuming at step (\d+)", r["log"]).group(1))
  assert resumed_at >= r["killed_at"] >= 2
  assert f"workdir {r['workdir']}" in r["log"]
  assert r["total"] in _steps_saved(bucket, prefix)

  rows = [json.loads(line) for line in
          bucket.read(BUCKET, prefix + "metrics.jsonl").decode().splitlines()]
  assert [row["step"] for row in rows] == list(range(1, r["total"] + 1))
  config = json.loads(bucket.read(BUCKET, prefix + "config.json"))
  assert config["total_steps"] == r["total"]
  events = [n for n in bucket.names(BUCKET, prefix + "tensorboard/") if "tfevents" in n]
  assert len(events) >= 2   # one event file per run (the killed one, the resumed one)
  assert all(bucket.read(BUCKET, n) for n in events)
  assert not [n for n in bucket.names(BUCKET, prefix) if ".write_probe." in n]
  assert_no_local_gs_folder(r["cwd"], ROOT)


def test_sample_and_export_read_a_run_in_the_bucket_and_write_there(bucket, bucket_run):
  r = bucket_run
  sample = subprocess.run(
      [sys.executable, "-m", "ppd_jax.sample", f"--workdir={r['workdir']}", "--prompt=a red circle",
       "--user=3", f"--out=gs://{BUCKET}/samples", "--num_steps=2"],
      cwd=r["cwd"], env=r["env"], capture_output=True, text=True, timeout=300)
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert f"from step {r['total']}" in sample.stdout
  pngs = [n for n in bucket.names(BUCKET, "samples/") if n.endswith(".png")]
  listing = [json.loads(line) for line in
             bucket.read(BUCKET, "samples/prompts.jsonl").decode().splitlines()]
  assert [f"samples/{row['image']}" for row in listing] == pngs and len(pngs) == 1
  from PIL import Image
  side = json.loads(bucket.read(BUCKET, r["prefix"] + "config.json"))["model"]["sample_size"]
  assert Image.open(io.BytesIO(bucket.read(BUCKET, pngs[0]))).size == (side, side)

  export = subprocess.run(
      [sys.executable, "-m", "ppd_jax.export", f"--workdir={r['workdir']}",
       f"--out=gs://{BUCKET}/export"],
      cwd=r["cwd"], env=r["env"], capture_output=True, text=True, timeout=300)
  assert export.returncode == 0, export.stderr[-3000:]
  import safetensors.numpy
  tensors = safetensors.numpy.load(bucket.read(BUCKET, "export/ip-adapter_ppd.safetensors"))
  assert any(k.endswith("to_k_ip.weight") for k in tensors)
  info = json.loads(bucket.read(BUCKET, "export/ip-adapter_ppd.json"))
  assert info["step"] == r["total"] and info["num_tensors"] == len(tensors)
  assert_no_local_gs_folder(r["cwd"], ROOT)


@pytest.mark.parametrize("reachable", [True, False], ids=["missing_bucket", "closed_port"])
def test_an_unreachable_bucket_fails_at_once_naming_it(gcs, reachable, tmp_path):  # noqa: F811
  """No such bucket on the emulator, or no server at all: the run stops before any compile,
  within a minute, and its last line names the gs:// path and what to check."""
  url = gcs.url if reachable else f"http://127.0.0.1:{free_port()}"
  t0 = time.monotonic()
  result = subprocess.run(_train_cmd("gs://missing/run"), cwd=tmp_path,
                          env=_env(emulator_env(url)), capture_output=True, text=True, timeout=90)
  elapsed = time.monotonic() - t0
  assert result.returncode != 0
  assert elapsed < 60, f"took {elapsed:.0f} s"
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ppd_jax.train: ") and "gs://missing/run" in last, result.stderr[-2000:]
  assert "credentials" in last and "bucket gs://missing" in last and "network" in last
  assert_no_local_gs_folder(tmp_path, ROOT)
