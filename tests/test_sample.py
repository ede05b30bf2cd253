"""Sampling from a trained run: the CLI's files and listing, user mixing, the user scale, unknown
users and --list_users, a Pick-a-Pic run sampled without its shards, and the embedding file in the
exported diffusers script, whose images from our x_T are ours."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ppd_jax import inference
from ppd_jax import sample
from ppd_jax.users import embedding as embedding_lib
from ppd_jax.users import new_user
from ppd_jax.users import shots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tiny_trained_run):
  return tiny_trained_run, inference.load_trained(tiny_trained_run)


def test_mix_of_one_user_with_weight_one_equals_that_user(run):
  _, trained = run
  e0, e1 = (trained.source.user_embedding(u) for u in (0, 1))
  np.testing.assert_array_equal(inference.mix_users([e0, e1], [1.0, 0.0]), e0)
  prompts = ["a red circle", "a blue square"]
  alone = inference.generate(trained, prompts, e0, seed=3)
  mixed = inference.generate(trained, prompts, inference.mix_users([e0, e1], [1, 0]), seed=3)
  np.testing.assert_array_equal(alone, mixed)
  other = inference.generate(trained, prompts, e1, seed=3)
  assert np.abs(other - alone).max() > 1e-4, "two users' samples should differ"


def test_user_scale_zero_is_the_base_model_for_every_user(run):
  _, trained = run
  a = inference.generate(trained, ["a green triangle"], trained.source.user_embedding(0),
                         user_scale=0.0, seed=1)
  b = inference.generate(trained, ["a green triangle"], trained.source.user_embedding(5),
                         user_scale=0.0, seed=1)
  np.testing.assert_array_equal(a, b)


def test_bad_user_weights_are_rejected():
  with pytest.raises(ValueError, match="weights"):
    inference.mix_users([np.zeros((2, 2))] * 2, [0.0, 0.0])
  with pytest.raises(ValueError, match="weights"):
    inference.mix_users([np.zeros((2, 2))] * 2, [1.0])


def _sample(workdir, *args):
  cmd = [sys.executable, "-m", "ppd_jax.sample", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sample_cli_writes_images_of_the_configured_size(run, tmp_path):
  """Then the base (--user_scale=0) into the same folder: both kinds kept, each row of
  prompts.jsonl with the settings its image was made with."""
  workdir, trained = run
  out = tmp_path / "images"
  result = _sample(workdir, f"--out={out}", "--prompt=a red circle", "--prompt=a yellow square",
                   "--users=0:0.7,1:0.3", "--num_images=2", "--num_steps=3", "--guidance_scale=2")
  assert result.returncode == 0, result.stderr[-3000:]
  files = sorted(f for f in os.listdir(out) if f != "prompts.jsonl")
  assert len(files) == 4 and all(f.endswith(".png") for f in files)
  size = trained.config.model.sample_size
  for f in files:
    with Image.open(out / f) as im:
      assert im.size == (size, size) and im.mode == "RGB"
  base = _sample(workdir, f"--out={out}", "--prompt=a red circle", "--prompt=a yellow square",
                 "--users=0:0.7,1:0.3", "--num_images=2", "--num_steps=3", "--guidance_scale=2",
                 "--user_scale=0")
  assert base.returncode == 0, base.stderr[-3000:]
  both = sorted(f for f in os.listdir(out) if f != "prompts.jsonl")
  assert len(both) == 8 and set(files) < set(both)
  sampler = trained.config.sample.sampler
  assert f"a-red-circle_0x0.7+1x0.3_scale0_cfg2_{sampler}3_ckpt4_s1_1.png" in both
  assert f"a-red-circle_0x0.7+1x0.3_scale1_cfg2_{sampler}3_ckpt4_s1_1.png" in both
  with open(out / "prompts.jsonl") as f:
    rows = {r["image"]: r for r in map(json.loads, f)}
  assert sorted(rows) == both
  for name, row in rows.items():
    assert (row["user_scale"], row["guidance_scale"], row["num_steps"], row["step"],
            row["sampler"], row["eta"]) == (0.0 if "_scale0_" in name else 1.0, 2.0, 3, 4,
                                            sampler, trained.config.sample.eta)
    assert row["seed"] == int(name.rsplit("_s", 1)[1].split("_")[0])
    assert row["users"] == "0x0.7+1x0.3"
  pairs = [(n, n.replace("_scale1_", "_scale0_")) for n in rows if "_scale1_" in n]
  assert len(pairs) == 4 and all(  # the base differs from the personalised image of each pair
      np.abs(np.asarray(Image.open(out / a), np.float32)
             - np.asarray(Image.open(out / b), np.float32)).max() > 0 for a, b in pairs)
  # The listing the scoring CLI reads: each PNG with its prompt.
  from ppd_jax.evals import score_files
  items = score_files.read_items(str(out))
  assert sorted(it.key for it in items) == both
  assert {it.prompt for it in items if "yellow" in it.key} == {"a yellow square"}


def test_the_listing_merges_reruns(tmp_path):
  sample.update_listing(str(tmp_path), [{"image": "a.png", "prompt": "x"},
                                        {"image": "b.png", "prompt": "y"}])
  sample.update_listing(str(tmp_path), [{"image": "b.png", "prompt": "z"}])
  with open(tmp_path / "prompts.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{"image": "a.png", "prompt": "x"}, {"image": "b.png", "prompt": "z"}]


def test_sample_cli_names_an_unknown_user_and_lists_all(run, tmp_path):
  workdir, trained = run
  result = _sample(workdir, f"--out={tmp_path}", "--prompt=a red circle", "--user=999")
  assert result.returncode != 0
  n = len(trained.source.user_weights)
  assert f"unknown user 999: this synthetic data set has users 0..{n - 1}" in result.stderr
  assert f"--workdir={workdir} --list_users" in result.stderr
  listed = _sample(workdir, "--list_users")
  assert listed.returncode == 0, listed.stderr[-3000:]
  rows = [line.split("\t") for line in listed.stdout.splitlines()]
  src = trained.source
  want = sorted([(int(u), "train") for u in src.train_user_ids]
                + [(int(u), "unseen") for u in src.unseen_user_ids]
                + [(int(u), "validation") for u in src.validation_user_ids])
  assert [(int(u), g) for u, g in rows] == want and len(want) == n


def _write_pairs(folder, source, user_id, n=4) -> str:
  """A new user's pairs as files, winner first or second by turns, as a user would give them."""
  p = source.fewshot_pairs(user_id)
  rows = []
  for k in range(n):
    names = []
    for side, img in (("w", p["winners"][k]), ("l", p["losers"][k])):
      name = f"{k}{side}.png"
      Image.fromarray(np.round((np.asarray(img) + 1) * 127.5).clip(0, 255).astype(np.uint8)
                      ).save(os.path.join(folder, name))
      names.append(name)
    first, second = names if k % 2 == 0 else names[::-1]
    rows.append({"caption": p["captions"][k], "image_1": first, "image_2": second,
                 "preferred": 1 if k % 2 == 0 else 2})
  path = os.path.join(folder, "new_user.json")
  with open(path, "w") as f:
    json.dump(rows, f)
  return path


def test_new_user_from_pairs_is_embedded_like_the_runs_users(run, tmp_path):
  """The demo's unseen user, given as 4 image files, gets (up to 8-bit PNG rounding) the
  embedding the run itself computes for it; fewer pairs than the run's N are refused."""
  _, trained = run
  uid = int(trained.source.unseen_user_ids[0])
  path = _write_pairs(str(tmp_path), trained.source, uid)
  emb, profile = new_user.embed_new_user(trained, path, log=lambda _: None)
  assert profile is None
  np.testing.assert_allclose(emb, trained.source.user_embedding(uid), atol=0.05)
  other = trained.source.user_embedding(int(trained.source.unseen_user_ids[1]))
  assert np.abs(emb - other).max() > 0.2
  with open(path) as f:
    rows = json.load(f)
  with open(path, "w") as f:
    json.dump(rows[:3], f)
  with pytest.raises(shots.PairsError, match=f"--pairs={path}: 3 readable pair"):
    new_user.embed_new_user(trained, path)


def test_sample_cli_generates_for_a_new_users_pairs(run, tmp_path):
  workdir, trained = run
  path = _write_pairs(str(tmp_path), trained.source, int(trained.source.unseen_user_ids[0]))
  out = tmp_path / "images"
  cmd = [sys.executable, "-m", "ppd_jax.sample", f"--workdir={workdir}", f"--out={out}",
         "--prompt=a red circle", f"--pairs={path}", "--num_steps=2"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  c = trained.config.sample
  assert sorted(os.listdir(out)) == [
      f"a-red-circle_new_userx1_scale1_cfg{c.guidance_scale:g}_{c.sampler}2_ckpt4"
      f"{f'_eta{c.eta:g}' if c.eta else ''}_s0_0.png", "prompts.jsonl"]


def test_users_pairs_and_mixes_are_exclusive():
  assert sample.parse_users(None, None, "a/b/mine.json") == [("mine", 1.0)]
  with pytest.raises(ValueError, match="exactly one of"):
    sample.parse_users("3", None, "mine.json")


# A Pick-a-Pic run sampled after its shards and user store moved away -----------------------------

@pytest.fixture(scope="module")
def pickapic_run(tmp_path_factory):
  """A tiny Pick-a-Pic run on the tiny SD 1.5 folder (2 steps at a high learning rate, so users'
  images differ), its images of two users made while its shards and store were in place; then
  both folders are moved away."""
  import pickapic_fixtures
  from ppd_jax import trainer
  from ppd_jax.data import precompute
  root = str(tmp_path_factory.mktemp("pickapic_run"))
  inputs = pickapic_fixtures.make_inputs(root, num_users=10, corrupt_jpegs=0, empty_file=False,
                                         bad_schema_file=False)
  shards, store = os.path.join(root, "shards"), os.path.join(root, "users.safetensors")
  c = pickapic_fixtures.config(inputs["pretrained"], shards=shards, user_embeddings=store)
  c.optim.lr, c.optim.warmup_steps, c.batch_size = 5e-2, 0, 8   # 8: the fake devices
  c.eval_every = 0
  c.sample.num_steps = 3   # what the exported script samples with (dpmpp_2m, guidance 7.5)
  precompute.run(c, inputs["parquet"], shards, log=lambda m: None)
  embeddings = pickapic_fixtures.write_user_store(store, shards, dim=16)
  workdir = os.path.join(root, "run")
  trainer.train_and_evaluate(c, workdir)
  users = sorted(embeddings)[:2]
  trained = inference.load_trained(workdir)
  before = {u: inference.generate(trained, ["a red circle"], trained.source.user_embedding(u),
                                   seed=1, num_steps=3) for u in users}
  splits = dict(np.load(os.path.join(shards, "index", "users.npz")))
  os.rename(shards, shards + "-moved")
  os.rename(store, store + "-moved")
  return dict(workdir=workdir, embeddings=embeddings, users=users, before=before, splits=splits,
              pretrained=inputs["pretrained"])


def test_pickapic_run_samples_for_its_users_without_shards_or_store(pickapic_run):
  trained = inference.load_trained(pickapic_run["workdir"])
  for u in pickapic_run["users"]:
    emb = embedding_lib.embedding_for(trained, [(str(u), 1.0)])[0]
    np.testing.assert_array_equal(emb, pickapic_run["embeddings"][u])
    after = inference.generate(trained, ["a red circle"], emb, seed=1, num_steps=3)
    np.testing.assert_array_equal(after, pickapic_run["before"][u])
  a, b = (pickapic_run["before"][u] for u in pickapic_run["users"])
  assert np.abs(a - b).max() > 1e-3, "two users' images should differ"
  assert "source" not in trained.__dict__   # the shards were never opened


def test_pickapic_unknown_user_names_the_valid_ones_and_lists_all(pickapic_run):
  from ppd_jax import run_users
  from ppd_jax.data import pickapic
  trained = inference.load_trained(pickapic_run["workdir"])
  ids = sorted(pickapic_run["embeddings"])
  assert ids[-1] - ids[0] + 1 > len(ids)                      # not contiguous: no range
  with pytest.raises(KeyError) as e:
    embedding_lib.stored_embedding(trained, "123")
  msg = e.value.args[0]
  more = f", ... ({len(ids)} in all)" if len(ids) > 8 else ""
  assert (f"unknown user 123: this run has {len(ids)} users "
          f"({', '.join(str(u) for u in ids[:8])}{more})") in msg, msg
  assert f"python -m ppd_jax.sample --workdir={trained.workdir} --list_users" in msg
  names = {pickapic.TRAIN: "train", pickapic.VALIDATION: "validation", pickapic.TEST: "unseen"}
  s = pickapic_run["splits"]
  want = sorted((int(u), names[int(k)]) for u, k in zip(s["user_id"], s["split"]))
  assert run_users.groups(inference.run_users_only(pickapic_run["workdir"])) == want
  assert {g for _, g in want} == {"train", "validation", "unseen"}


def test_id_ranges_shows_contiguous_ids_as_a_range():
  from ppd_jax import run_users
  assert run_users.id_ranges([4, 2, 3, 5]) == "2..5"
  assert run_users.id_ranges([1, 3]) == "1, 3"
  assert run_users.id_ranges(list(range(0, 40, 2)), first=3) == "0, 2, 4, ... (20 in all)"


def _run_module(module: str, *args: str) -> str:
  done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_embedding_file_runs_in_the_printed_diffusers_script_and_matches_ours(
    pickapic_run, tmp_path, monkeypatch):
  """users.embedding writes the stored user's [tokens, dim] (what sampling uses); the script
  export prints runs as printed on that file and the tiny base folder and, started from our x_T
  (`latents=`, the one thing added to its pipeline call), makes inference.generate's images for
  the same user, prompts and seed: the run's sampler (dpmpp_2m), 3 steps, guidance 7.5. The
  exported UNet given the file's embedding computes what our model does with it.

  Tolerance 1e-4 in [0, 1] pixels: both sides compute in float32 and differ only in the order of
  operations (XLA vs torch convolutions, attention and reductions), ~1e-6 per op, which 3 steps at
  guidance 7.5 and the VAE decoder leave at ~2e-6 here; a wrong scheduler, timestep spacing,
  step count or guidance moves pixels by 0.15 or more (the folder's PNDM at its defaults: 0.18)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from ppd_jax.diffusion import generation
  workdir, u = pickapic_run["workdir"], pickapic_run["users"][0]
  npy = tmp_path / "user.npy"
  _run_module("ppd_jax.users.embedding", f"--workdir={workdir}", f"--user={u}", f"--out={npy}")
  emb = np.load(npy)
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(emb, pickapic_run["embeddings"][u])
  out = tmp_path / "export"
  printed = _run_module("ppd_jax.export", f"--workdir={workdir}", f"--out={out}")
  script = printed.split("use it in diffusers with:\n\n", 1)[1]
  assert f"--workdir={workdir} --user=ID --out=user.npy" in script

  # Run it as printed, its pipeline call given our x_T [n, C, H, W] and asked for float images.
  trained = inference.load_trained(workdir)
  seed, calls = 3, []
  call = diffusers.StableDiffusionPipeline.__call__

  def from_our_noise(pipe, prompts, **kwargs):
    x_T = generation.initial_noise(seed, len(prompts), trained.config.model).transpose(0, 3, 1, 2)
    images = call(pipe, prompts, latents=torch.from_numpy(np.ascontiguousarray(x_T)),
                  output_type="np", **kwargs).images
    calls.append((list(prompts), images))
    return diffusers.pipelines.stable_diffusion.StableDiffusionPipelineOutput(
        images=pipe.numpy_to_pil(images), nsfw_content_detected=None)

  monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__", from_our_noise)
  monkeypatch.chdir(tmp_path)
  exec(compile(script, "printed by ppd_jax.export", "exec"), {})   # pylint: disable=exec-used
  made = sorted(f for f in os.listdir(tmp_path) if f.startswith("ppd_"))
  assert made == ["ppd_0.png", "ppd_1.png"]
  [(prompts, theirs)] = calls
  ours = (inference.generate(trained, prompts, emb, seed=seed) + 1.0) / 2.0   # [-1, 1] -> [0, 1]
  assert theirs.shape == ours.shape
  err = float(np.abs(theirs - ours).max())
  assert err <= 1e-4, f"the printed script's images differ from ours by {err:.3g}"
  base = (inference.generate(trained, prompts, emb, seed=seed, user_scale=0.0) + 1.0) / 2.0
  assert np.abs(ours - base).max() > 1e-2                      # the user shows in the image

  # The exported UNet with the file's embedding computes what our sampler's model does with it.
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      pickapic_run["pretrained"], safety_checker=None, requires_safety_checker=False)
  pipe.load_ip_adapter(str(out), subfolder="", weight_name="ip-adapter_ppd.safetensors",
                       image_encoder_folder=None)
  x = np.random.RandomState(0).randn(1, 8, 8, 4).astype(np.float32)
  text = trained.backbone.encode_captions(["a red circle"])["text_embedding"]
  ours = np.asarray(trained.model.apply({"params": trained.params}, x, np.array([500]), text,
                                        emb[None], 1.0))
  base = np.asarray(trained.model.apply({"params": trained.params}, x, np.array([500]), text,
                                        None))
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor([500]),
                       torch.from_numpy(text),
                       added_cond_kwargs={"image_embeds": [torch.from_numpy(emb)[None]]}
                       ).sample.numpy().transpose(0, 2, 3, 1)
  assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, float(np.abs(theirs).max()))
  assert np.abs(ours - base).max() > 1e-3                      # the user matters


class _FakeDenoiser:
  """An elementwise stand-in for the UNet (hashable: a static jit argument), the same function as
  _fake_torch: out = a(t) x + b(t) (text + scale * user) F, a(t) = 0.05 + 0.9 t / 1000."""
  fixed = np.random.default_rng(0).standard_normal((1, 4, 4, 2)).astype(np.float32)

  def apply(self, variables, x, t, context, user, scale, added=None):
    del variables, added
    import jax.numpy as jnp
    a = (0.05 + 0.9 * t / 1000.0)[:, None, None, None]
    c = context[:, 0, 0] + scale * user[:, 0, 0]
    return a * x + (0.3 * jnp.sin(t / 150.0) * c)[:, None, None, None] * jnp.asarray(self.fixed)


def _fake_torch(torch, x, t, text, user, scale):
  t = torch.as_tensor(t, dtype=torch.float32)
  c = torch.from_numpy(text + scale * user)[:, None, None, None]
  return (0.05 + 0.9 * t / 1000.0) * x + 0.3 * torch.sin(t / 150.0) * c * torch.from_numpy(
      _FakeDenoiser.fixed.transpose(0, 3, 1, 2))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers'
@pytest.mark.parametrize("sampler,clip_sample", [("ddim", False), ("ddim", True),
                                                 ("euler", False), ("dpmpp_2m", False)])
def test_printed_scheduler_steps_as_our_sampler(sampler, clip_sample):
  """The scheduler lines export prints for a config.sample, run on Stable Diffusion 1.5's own
  scheduler config (PNDM, "leading", steps_offset 1), in diffusers' pipeline loop (x_T *
  init_noise_sigma, [uncond; cond] CFG, scale_model_input, step with eta), land where
  generation.sample_images does from the same x_T; a fake elementwise denoiser stands in for the
  UNet, so every sampler is checked in a second (the whole image: the test above, dpmpp_2m)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  import types
  from ppd_jax.diffusion import generation
  from ppd_jax.diffusion import schedules
  from ppd_jax.weights import export_usage
  steps, g = 4, 5.0
  sample_cfg = {"sampler": sampler, "num_steps": steps, "guidance_scale": g, "eta": 0.0,
                "clip_sample": clip_sample}
  name, install, call = export_usage.scheduler_lines(sample_cfg)
  assert f"num_inference_steps={steps}, guidance_scale={g}" in call
  pipe = types.SimpleNamespace(scheduler=diffusers.PNDMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
      set_alpha_to_one=False, steps_offset=1))
  exec(install, {"pipe": pipe, name: getattr(diffusers, name)})   # pylint: disable=exec-used
  sched = pipe.scheduler
  assert type(sched).__name__ == name

  rng = np.random.default_rng(1)
  x_T = rng.standard_normal((2, 4, 4, 2)).astype(np.float32)
  text, user = np.array([1.0, -0.5], np.float32), np.array([0.7, 0.4], np.float32)
  null = np.array([0.2], np.float32)
  ours = generation.sample_images(
      _FakeDenoiser(), schedules.make_schedule(), None, text[:, None, None], null[:, None, None],
      x_T, user[:, None, None], guidance_scale=g, num_steps=steps, clip_sample=clip_sample,
      sampler=sampler, decode=lambda x0, text, seed: x0 / 100.0)   # scaled below its clip

  sched.set_timesteps(steps)
  x = torch.from_numpy(x_T.transpose(0, 3, 1, 2)) * sched.init_noise_sigma
  for t in sched.timesteps:
    x_in = sched.scale_model_input(torch.cat([x, x]), t)
    out = _fake_torch(torch, x_in, t, np.concatenate([np.repeat(null, 2), text]),
                      np.concatenate([user, user]), np.array([0.0, 0.0, 1.0, 1.0], np.float32))
    out_u, out_c = out.chunk(2)
    x = sched.step(out_u + g * (out_c - out_u), t, x, **({"eta": 0.0} if sampler == "ddim" else {})
                   ).prev_sample
  theirs = x.numpy().transpose(0, 2, 3, 1) / 100.0
  assert np.abs(theirs).max() < 1.0                            # nothing clipped
  err = float(np.abs(ours - theirs).max())
  # float32 rounding: 5e-5 in latent units, whose values here reach ~5
  assert err <= 5e-7, f"{sampler}: the printed scheduler lands {err:.3g} away from ours"
