"""The data and user commands with their inputs and outputs in a bucket (gs://), against a local
GCS emulator (gcs_emulator.py), as tests/test_gcs_workdir.py does for train.

Every command runs in a subprocess whose GCS clients all point at the emulator on 127.0.0.1, in a
fresh working folder: a URL mistaken for a local path (os.path.abspath("gs://b/x") ==
"<cwd>/gs:/b/x") shows up there as a folder named "gs:".
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gcs_emulator import assert_no_local_gs_folder
from gcs_emulator import gcs  # noqa: F401 -- the fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "ppd-data"






def _run(bucket, cwd, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**bucket.client_env(), "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}",
         "JAX_PLATFORMS": "cpu", "PPD_JAX_COMPILATION_CACHE": os.path.join(ROOT, ".jax_cache"),
         "TMPDIR": str(cwd), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)




@pytest.fixture(scope="module")
def bucket(gcs):  # noqa: F811
  gcs.create_bucket(BUCKET)
  return gcs


@pytest.fixture(scope="module")
def parquet(bucket, tmp_path_factory):
  """Synthetic Pick-a-Pic parquet (a corrupt JPEG, an empty file, a file with a wrong schema),
  locally and copied to gs://BUCKET/parquet/."""
  from ppd_jax.data import make_pickapic
  local = str(tmp_path_factory.mktemp("pickapic") / "parquet")
  make_pickapic.write_synthetic_pickapic(
      local, num_users=6, pairs_per_user=(4, 7), num_files=2, corrupt_jpegs=1, empty_file=True,
      bad_schema_file=True, row_group_size=4, seed=0)
  bucket.upload_folder(BUCKET, local, "parquet/")
  return local


def test_a_pickapic_index_from_a_bucket_equals_the_local_one(bucket, parquet, tmp_path):
  """--input=gs://...: the same files are listed, skipped and indexed, and a pair's JPEGs are
  read back from the bucket's parquet, as from the local copy."""
  script = """if True:
    import json, sys
    from ppd_jax.data import pickapic
    out = {}
    for name, where in (("url", "gs://%s/parquet"), ("local", sys.argv[1])):
      index = pickapic.build_index(where, fewshot=4, log=lambda m: None)
      rows = pickapic.read_pairs(index, index.users["fewshot"][0])
      out[name] = {"paths": index.paths, "report": index.report, "pairs": len(index.pairs["row"]),
                   "jpg": [r["jpg_0"].hex()[:64] + r["jpg_1"].hex()[-64:] for r in rows]}
    print(json.dumps(out))
  """ % BUCKET
  result = _run(bucket, tmp_path, ["-c", script, parquet])
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  url, local = got["url"], got["local"]
  assert url["paths"] and all(p.startswith(f"gs://{BUCKET}/parquet/") for p in url["paths"])
  assert [os.path.basename(p) for p in url["paths"]] == [os.path.basename(p)
                                                         for p in local["paths"]]
  assert url["report"]["counts"] == local["report"]["counts"]
  assert url["report"]["inputs"] == local["report"]["inputs"]    # names, sizes, tail hashes
  assert url["report"]["counts"]["files_skipped"] == 2           # the empty and bad-schema files
  assert url["pairs"] == local["pairs"] > 0 and url["jpg"] == local["jpg"]
  assert_no_local_gs_folder(tmp_path, ROOT)


def test_precompute_refuses_a_bucket_output_in_one_line(bucket, tmp_path):
  result = _run(bucket, tmp_path, [
      "-m", "ppd_jax.data.precompute", f"--config={ROOT}/configs/ppd.py:pickapic_sd15",
      f"--input=gs://{BUCKET}/parquet", f"--output=gs://{BUCKET}/shards"], timeout=120)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ppd_jax.data.precompute: --output=gs://") and "local" in last, \
      result.stderr[-2000:]
  assert not bucket.names(BUCKET, "shards")
  assert_no_local_gs_folder(tmp_path, ROOT)


def test_relabel_scores_and_labels_round_trip_through_a_bucket(bucket, tmp_path):
  """relabel --out=gs://...: score files and done-files are written to the bucket, a unit whose
  object was damaged is redone, scores read back across files, labels written there."""
  script = """if True:
    import numpy as np
    from ppd_jax.data import relabel, shards
    out = "gs://%s/relabel"
    relabel._check_settings(out, {"r": {"model": "m"}})
    for f in (0, 1):
      info = shards.commit_npz(f"{out}/scores/r/file-{f:05d}.npz",
                               {"pair": np.arange(3) + 10 * f,
                                "score": np.full((3, 2), f, np.float32)})
      shards.mark_done(out, relabel._unit("r", f), {"files": [{**info, "dir": "scores/r"}]})
    assert shards.unit_done(out, relabel._unit("r", 0)) is not None
    pairs, scores = relabel.read_scores(out, "r")
    print("PAIRS", pairs.tolist(), scores[:, 0].tolist())
    shards.commit_npz(f"{out}/scores/r/file-00001.npz", {"pair": np.arange(3)})   # damaged
    print("REDO", shards.unit_done(out, relabel._unit("r", 1)) is None)
    try:
      relabel._check_settings(out, {"r": {"model": "other"}})
    except shards.ShardsError as e:
      print("REFUSED", e)
  """ % BUCKET
  result = _run(bucket, tmp_path, ["-c", script])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "PAIRS [0, 1, 2, 10, 11, 12] [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]" in result.stdout
  assert "REDO True" in result.stdout
  assert f"REFUSED gs://{BUCKET}/relabel scored reward 'r'" in result.stdout
  names = bucket.names(BUCKET, "relabel/")
  assert "relabel/settings.json" in names and "relabel/done/r-file-00000.json" in names
  assert not [n for n in names if n.endswith(".tmp")]
  assert_no_local_gs_folder(tmp_path, ROOT)


def _pairs_jsonl(bucket, folder) -> None:
  """Two users of 4 and 5 pairs, their images beside the JSONL (paths relative to it)."""
  rng = np.random.default_rng(0)
  lines = []
  for u, n in ((7, 4), (31, 5)):
    for k in range(n):
      names = []
      for side in (1, 2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        names.append(f"img/u{u}_{k}_{side}.png")
        bucket.upload(BUCKET, folder + names[-1], buf.getvalue())
      lines.append(json.dumps({"user_id": u, "caption": f"caption {k} of {u}",
                               "image_1": names[0], "image_2": names[1],
                               "preferred": 1 + (k % 2)}))
  bucket.upload(BUCKET, folder + "pairs.jsonl", ("\n".join(lines) + "\n").encode())


def test_embed_reads_pairs_from_a_bucket_and_writes_its_store_there(bucket, tmp_path):
  """users.embed --pairs=gs://.../pairs.jsonl --out=gs://.../users.safetensors: the store, its
  responses and progress are in the bucket (no parts left), a rerun finds it complete."""
  from tiny_llava import save_tiny_llava
  from ppd_jax.data import user_store as store_lib
  model = save_tiny_llava(str(tmp_path / "tiny-llava"))
  _pairs_jsonl(bucket, "embed/")
  out = f"gs://{BUCKET}/embed/users.safetensors"
  args = ["-m", "ppd_jax.users.embed", f"--model={model}",
          f"--pairs=gs://{BUCKET}/embed/pairs.jsonl",
          f"--out={out}", "--decoding=greedy", "--max_new_tokens=3", "--layers=last",
          "--batch_size=1"]
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  first = _run(bucket, cwd, args)
  assert first.returncode == 0, first.stderr[-3000:]
  names = bucket.names(BUCKET, "embed/users.safetensors")
  assert set(names) == {"embed/users.safetensors", "embed/users.safetensors.progress.jsonl",
                        "embed/users.safetensors.responses.jsonl"}, names
  (tmp_path / "store.safetensors").write_bytes(bucket.read(BUCKET, "embed/users.safetensors"))
  store = store_lib.UserEmbeddingStore(str(tmp_path / "store.safetensors"))
  assert store.users.tolist() == [7, 31] and store.tokens == 1
  assert store.source["pairs"]["path"] == f"gs://{BUCKET}/embed/pairs.jsonl"
  assert store.shot_ids[0].tolist() == [0, 1, 2, 3]          # user 7's 4 pairs, file order
  progress = bucket.read(BUCKET, "embed/users.safetensors.progress.jsonl").decode().splitlines()
  assert [json.loads(row)["entries_done"] for row in progress] == [1, 2]
  responses = bucket.read(BUCKET, "embed/users.safetensors.responses.jsonl").decode()
  assert [json.loads(r)["user_id"] for r in responses.splitlines()] == [7, 31]

  again = _run(bucket, cwd, args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"embed: {out} is complete (2 users, 2 entries)" in again.stdout
  assert_no_local_gs_folder(cwd, tmp_path, ROOT)
