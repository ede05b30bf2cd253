"""The evaluation CLIs with their inputs and outputs in a bucket (gs://), against a local GCS
emulator (gcs_emulator.py: every client on 127.0.0.1).

Each CLI runs in a subprocess whose working folder is a fresh tmp folder, so an output path
mistaken for a local one (os.path.abspath("gs://b/x") == "<cwd>/gs:/b/x") shows up there as a
folder named "gs:".
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")

import tiny_clip  # noqa: E402
from gcs_emulator import assert_no_local_gs_folder  # noqa: E402
from gcs_emulator import gcs  # noqa: E402,F401 -- the fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "ppd-evals"
PROMPTS = ["a red circle", "a blue square", "a dark cat", "a small dog"]






def _env(emulator, tmp_path) -> dict:
  # XDG_CACHE_HOME: where a reward folder given as a URL is copied to (rewards/remote.py)
  return {**emulator.client_env(), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
          "XDG_CACHE_HOME": str(tmp_path / "cache"),
          "PPD_JAX_COMPILATION_CACHE": os.path.join(ROOT, ".jax_cache")}




@pytest.fixture(scope="module")
def bucket(gcs):  # noqa: F811
  gcs.create_bucket(BUCKET)
  return gcs


@pytest.fixture(scope="module")
def uploaded(bucket, tmp_path_factory):
  """images/ (PNGs and prompts.jsonl) and weights/clip (a tiny CLIP folder) in the bucket;
  returns the local folder and the images as floats."""
  from ppd_jax import images as image_io
  tmp = tmp_path_factory.mktemp("uploaded")
  model = str(tmp / "clip")
  tiny_clip.save_clip(model)
  floats = tiny_clip.images(len(PROMPTS)).astype(np.float32) / 127.5 - 1
  for i, x in enumerate(floats):
    image_io.save_png(x, str(tmp / "img.png"))
    bucket.upload(BUCKET, f"images/img_{i}.png", (tmp / "img.png").read_bytes())
  bucket.upload(BUCKET, "images/prompts.jsonl", "".join(
      json.dumps({"image": f"img_{i}.png", "prompt": p}) + "\n"
      for i, p in enumerate(PROMPTS)).encode())
  bucket.upload_folder(BUCKET, model, "weights/clip")
  return model, floats


def test_score_reads_images_and_weights_from_the_bucket_and_writes_there(bucket, uploaded,
                                                                         tmp_path):
  """Images, their prompts.jsonl and the reward's weights in the bucket; the scores and the
  summary land there, equal to the reward called directly on the local files."""
  from ppd_jax.rewards import registry
  model, floats = uploaded
  expected = registry.load("pickscore", model=model).score(floats, PROMPTS)

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  done = subprocess.run(
      [sys.executable, "-m", "ppd_jax.evals.score", "--reward=pickscore",
       f"--images=gs://{BUCKET}/images", f"--model=gs://{BUCKET}/weights/clip",
       f"--out=gs://{BUCKET}/scores/pick.jsonl", "--batch_size=2"],
      cwd=cwd, env=_env(bucket, tmp_path), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in
          bucket.read(BUCKET, "scores/pick.jsonl").decode().splitlines()]
  assert [r["image"] for r in rows] == [f"img_{i}.png" for i in range(len(PROMPTS))]
  assert [r["prompt"] for r in rows] == PROMPTS
  np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5)
  summary = json.loads(bucket.read(BUCKET, "scores/pick.summary.json"))
  assert summary["n"] == len(PROMPTS)
  assert summary["mean"] == pytest.approx(float(np.mean(expected.astype(np.float64))), rel=1e-5)
  assert_no_local_gs_folder(cwd, ROOT)


def test_the_aesthetic_head_is_read_from_the_bucket(bucket, uploaded, tmp_path):
  """--aesthetic_head=gs://.../head.safetensors (storage.load_safetensors), --model=gs://..."""
  pytest.importorskip("torch")
  from ppd_jax.rewards import registry
  import safetensors.numpy
  model, floats = uploaded
  layers = tiny_clip.aesthetic_head(str(tmp_path / "head.pth"))
  head = str(tmp_path / "head.safetensors")          # keyed as the .pth, as the converter writes
  safetensors.numpy.save_file({f"layers.{k}": v.numpy() for k, v in layers.state_dict().items()},
                              head)
  bucket.upload(BUCKET, "weights/head.safetensors", (tmp_path / "head.safetensors").read_bytes())
  expected = registry.load("aesthetic", model=model, aesthetic_head=head).score(floats)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  done = subprocess.run(
      [sys.executable, "-m", "ppd_jax.evals.score", "--reward=aesthetic",
       f"--images=gs://{BUCKET}/images", f"--model=gs://{BUCKET}/weights/clip",
       f"--aesthetic_head=gs://{BUCKET}/weights/head.safetensors",
       f"--out=gs://{BUCKET}/scores/aesthetic.jsonl"],
      cwd=cwd, env=_env(bucket, tmp_path), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in
          bucket.read(BUCKET, "scores/aesthetic.jsonl").decode().splitlines()]
  np.testing.assert_allclose([r["score"] for r in rows], expected,
                             atol=1e-5 * max(1.0, np.abs(expected).max()))
  missing = subprocess.run(
      [sys.executable, "-m", "ppd_jax.evals.score", "--reward=aesthetic",
       f"--images=gs://{BUCKET}/images", f"--model=gs://{BUCKET}/weights/clip",
       f"--aesthetic_head=gs://{BUCKET}/weights/nope.safetensors",
       f"--out=gs://{BUCKET}/scores/nope.jsonl"],
      cwd=cwd, env=_env(bucket, tmp_path), capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "Traceback" not in missing.stderr
  assert missing.stderr.strip().splitlines()[-1] == (
      f"ppd_jax.evals.score: --aesthetic_head=gs://{BUCKET}/weights/nope.safetensors: no such file")
  assert_no_local_gs_folder(cwd, ROOT)


def test_winrate_writes_images_verdicts_and_results_to_the_bucket(bucket, tiny_trained_run,
                                                                  tmp_path):
  """--out=gs://... and --prompts=gs://...: the images, the per-user verdict log, winrate.json,
  winrate.md and examples.png land in the bucket; a rerun finds every user done there."""
  bucket.upload(BUCKET, "prompts/two.txt", b"a red circle\na blue square\n")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  out = f"gs://{BUCKET}/winrate"
  cmd = [sys.executable, "-m", "ppd_jax.evals.winrate", f"--run={tiny_trained_run}",
         "--against=base", "--users=unseen", "--max_users=2", "--items=2",
         f"--prompts=gs://{BUCKET}/prompts/two.txt", "--judge=synthetic", f"--out={out}"]
  env = _env(bucket, tmp_path)
  first = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "2 users, 0 done before" in first.stdout

  names = bucket.names(BUCKET, "winrate/")
  for f in ("winrate.json", "winrate.md", "examples.png", "verdicts.jsonl"):
    assert f"winrate/{f}" in names and bucket.read(BUCKET, f"winrate/{f}")
  rows = [json.loads(line) for line in
          bucket.read(BUCKET, "winrate/verdicts.jsonl").decode().splitlines()]
  items = [r for r in rows if "item" in r]
  assert len(items) == 4 and {r["prompt"] for r in items} == {"a red circle", "a blue square"}
  from PIL import Image
  for r in items:                       # every judged image is an object in the bucket
    for key in ("ppd", "opponent"):
      assert r[key].startswith(out + "/images/"), r[key]
      png = bucket.read(BUCKET, r[key][len(f"gs://{BUCKET}/"):])
      assert Image.open(io.BytesIO(png)).format == "PNG"
  # winrate.json's headline is the mean over users of #A / (#A + #B) of the logged verdicts.
  rates = []
  for u in sorted({r["user_id"] for r in items}):
    v = [r["verdict"] for r in items if r["user_id"] == u]
    if v.count("A") + v.count("B"):
      rates.append(v.count("A") / (v.count("A") + v.count("B")))
  result = json.loads(bucket.read(BUCKET, "winrate/winrate.json"))
  assert result["users"] == 2
  assert result["win_rate"] == (pytest.approx(np.mean(rates)) if rates else None)

  again = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "2 users, 2 done before" in again.stdout
  assert_no_local_gs_folder(cwd, ROOT)


def test_judge_agreement_log_and_api_cache_in_the_bucket_resume(bucket, tmp_path):
  """judge_agreement.run with out=gs://...: stopped after its first user, the rerun asks only
  the other users (judgements.jsonl read back from the bucket); the API judge's reply cache on a
  URL keeps every reply."""
  from PIL import Image
  rows = []
  for u in (1, 2):
    for k in range(6):
      names = []
      for side, v in (("a", 200 - 20 * k), ("b", 40 + 10 * k)):
        Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / f"u{u}_{k}_{side}.png")
        names.append(f"u{u}_{k}_{side}.png")
      rows.append({"user_id": u, "caption": f"caption {k}", "image_1": names[0],
                   "image_2": names[1], "preferred": 1})
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  script = """if True:
    import json
    import numpy as np
    from ppd_jax.evals import judge, judge_agreement, judge_api
    from ppd_jax.users import shots

    class Brighter:                  # prefers the brighter image shown
      name = "brighter"
      asked = 0
      def answer(self, requests):
        self.asked += len(requests)
        return [judge.Answer(0.9 if np.mean(r.first) > np.mean(r.second) else 0.1)
                for r in requests]

    class Stop(Exception):
      pass

    def stop(u):
      raise Stop(u)

    pairs = shots.open_pairs("%(pairs)s", 4, split_params={}, log=lambda m: None)
    backend, out = Brighter(), "gs://%(bucket)s/agree"
    try:
      judge_agreement.run(pairs, backend, out, split="all", questions=2, log=print,
                          after_user=stop)
    except Stop:
      pass
    first = backend.asked
    summary = judge_agreement.run(pairs, backend, out, split="all", questions=2, log=print)
    cache = out + "/judge_cache.jsonl"
    judge_api._append_cache(cache, "k1", {"text": "1"})
    judge_api._append_cache(cache, "k2", {"text": "2"})
    print(json.dumps({"first": first, "total": backend.asked, "accuracy": summary["accuracy"],
                      "cache": judge_api._read_cache(cache)}))
  """ % {"pairs": tmp_path / "pairs.jsonl", "bucket": BUCKET}
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=_env(bucket, tmp_path),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "2 users, 1 judged before" in done.stdout
  got = json.loads(done.stdout.strip().splitlines()[-1])
  assert got["first"] == 2 * 2 and got["total"] == 4 * 2     # user 1 was not asked again
  assert got["accuracy"] == 1.0                               # image 1 is brighter and preferred
  assert got["cache"] == {"k1": {"text": "1"}, "k2": {"text": "2"}}
  log = [json.loads(line) for line in
         bucket.read(BUCKET, "agree/judgements.jsonl").decode().splitlines()]
  assert [r["user_id"] for r in log if r.get("user_done")] == [1, 2]
  assert json.loads(bucket.read(BUCKET, "agree/agreement.json"))["questions"] == 4
  assert_no_local_gs_folder(cwd, ROOT)
