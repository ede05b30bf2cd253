"""Stable Cascade through the command line on tiny diffusers-format folders (tiny_cascade_folders):
precompute (EfficientNet latents, CLIP text with the mask) -> train (Diffusion-DPO on Stage C)
-> sample (Stage C -> Stage B -> Stage A -> PNG), plus the text path against diffusers' own
StableCascadePriorPipeline.encode_prompt."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pickapic_fixtures
import tiny_cascade_folders

pytest.importorskip("diffusers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.prior_subfolder=prior", "--config.model.decoder_subfolder=decoder",
        "--config.model.sample_size=4", "--config.model.dtype=float32",
        "--config.model.remat=False", "--config.data.text_length=16"]


def _run(*args, cache: str | None = None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if cache:   # the base pool's cache (demo_world/base_pool.py), kept inside the test's folder
    env["PPD_JAX_CACHE"] = cache
  done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
  return done.stdout + done.stderr


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("cascade")
  prior = tiny_cascade_folders.save_prior(str(root / "prior"))
  decoder = tiny_cascade_folders.save_decoder(str(root / "decoder"))
  from ppd_jax.data import make_pickapic
  make_pickapic.write_synthetic_pickapic(str(root / "parquet"), num_users=12,
                                         pairs_per_user=(4, 8), num_files=1, seed=0)
  return {"root": root, "prior": prior, "decoder": decoder,
          "models": [f"--config.model.pretrained={prior}", f"--config.model.decoder={decoder}"]}


@pytest.fixture(scope="module")
def run(folders):
  root = folders["root"]
  config = "--config=configs/ppd.py:pickapic_cascade_lite"
  shards = str(root / "shards")
  _run("ppd_jax.data.precompute", config, *folders["models"], *TINY,
       "--config.data.storage_dtype=float32", f"--input={root / 'parquet'}", f"--output={shards}")
  users = pickapic_fixtures.write_user_store(str(root / "users.safetensors"), shards, dim=16)
  log = _run("ppd_jax.train", config, f"--workdir={root / 'run'}", *folders["models"], *TINY,
             f"--config.data.shards={shards}", f"--config.data.user_embeddings={root}/users"
             ".safetensors", "--config.batch_size=4", "--config.grad_accum_steps=1",
             "--config.total_steps=4", "--config.log_every=1", "--config.checkpoint_every=4",
             "--config.optim.lr=0.02", "--config.optim.warmup_steps=0")
  return {"shards": shards, "log": log, "workdir": str(root / "run"), "users": users}


def test_precompute_writes_stage_c_latents_and_both_text_keys(run):
  with open(os.path.join(run["shards"], "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["model"]["latent_shape"] == [4, 4, 16]
  assert manifest["model"]["resolution"] == 128                       # 4 cells x 32 px
  assert manifest["text"]["shapes"] == {"text_embedding": [16, 24], "pooled_text_embedding": [24]}


def test_train_starts_at_log2_and_learns(run):
  lines = [line for line in run["log"].splitlines() if line.startswith("step ")]
  assert lines[0].startswith("step 1/4  loss 0.6931"), lines   # to_v_user = 0: policy == ref
  assert "params: frozen base 173,584" in run["log"]            # TINY_C, no user branch
  losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
  assert losses[-1] != losses[0]                                 # the user branch moved
  assert os.path.isdir(os.path.join(run["workdir"], "checkpoints", "4"))


def _png(path):
  from PIL import Image
  return np.asarray(Image.open(path).convert("RGB"), np.int16)


def test_sample_runs_stage_c_b_a_and_the_user_changes_the_image(run, tmp_path):
  user = str(next(iter(run["users"])))
  outs = {}
  for scale in ("1", "0"):
    out = tmp_path / scale
    log = _run("ppd_jax.sample", f"--workdir={run['workdir']}", f"--user={user}",
               "--prompt=red circle", f"--out={out}", "--num_steps=3", f"--user_scale={scale}")
    assert "wrote 1 image(s) of 168px" in log                   # int(4 x 10.67) = 42, Paella x4
    (png,) = [p for p in os.listdir(out) if p.endswith(".png")]
    outs[scale] = _png(out / png)
  assert outs["1"].shape == (168, 168, 3) and outs["1"].std() > 1.0
  assert np.abs(outs["1"] - outs["0"]).max() > 0                 # scale 0 is the base: differs


def test_progress_names_stage_c_b_and_the_decode_of_each_image(run):
  """One Generate of the web demo on the trained run: its job reports Stage C's steps, Stage B's
  steps and Stage A's decode, for the base and then the personalised image; the host callbacks
  change no pixel (the same call outside a job compiles without them)."""
  import time
  from ppd_jax import inference
  from ppd_jax.serve import engine as engine_lib
  from ppd_jax.serve import jobs as jobs_lib
  trained = inference.load_trained(run["workdir"])
  engine = engine_lib.Engine(trained)
  user = trained.users.user_embedding(engine.users[0])
  events = []
  with pytest.MonkeyPatch.context() as mp:
    begin, step = jobs_lib.Job.begin, jobs_lib.Job.step
    mp.setattr(jobs_lib.Job, "begin", lambda job, name, total, compiling:
               (events.append([name, total, compiling, 0]), begin(job, name, total, compiling)))
    mp.setattr(jobs_lib.Job, "step", lambda job: (events[-1].__setitem__(3, events[-1][3] + 1),
                                                  step(job)))
    jobs = jobs_lib.Jobs(max_queued=1)
    try:
      job = jobs.submit("generate", lambda: engine.generate("red circle", user, 1.0, seed=3), 1)
      while (out := jobs.status(job.id))["state"] not in ("done", "failed"):
        time.sleep(0.05)
    finally:
      jobs.stop()
  assert out["state"] == "done", out
  c, b = trained.config.sample.num_steps, trained.config.model.decoder_steps
  assert (c, b) == (20, 10)                           # the prior's and the decoder's defaults
  # [name, total, compiling, steps seen]: every step lands in its own stage
  assert events == [["base: stage C", c, True, c], ["base: stage B", b, True, b],
                    ["base: decode", 1, True, 0], ["personal: stage C", c, False, c],
                    ["personal: stage B", b, False, b], ["personal: decode", 1, False, 0]]
  assert [s["name"] for s in out["stages"]] == [e[0] for e in events]
  assert all(s["done"] == s["total"] for s in out["stages"])
  quiet = inference.generate(trained, ["red circle"], user, user_scale=1.0, seed=3)
  np.testing.assert_array_equal(out["result"]["personal"],
                                engine_lib.images_lib.to_uint8(quiet)[0])


def test_text_path_matches_the_prior_pipeline(folders):
  """clip_text = hidden_states[-1] with the mask, pooled = text_embeds, "" encoded (not zeros),
  against diffusers' StableCascadePriorPipeline.encode_prompt on the same folder."""
  import ml_collections
  import torch
  from diffusers import StableCascadePriorPipeline

  from ppd_jax.backbones import stable_cascade
  cfg = ml_collections.ConfigDict({"model": {
      "pretrained": folders["prior"], "prior_subfolder": "prior", "variant": "",
      "sample_size": 4, "decoder": ""}})
  backbone = stable_cascade.StableCascadeBackbone(cfg)
  prompts = ["red circle", "a big dark dog photo of a cat"]
  ours = backbone.encode_captions(prompts + [""])
  pipe = StableCascadePriorPipeline.from_pretrained(folders["prior"])
  with torch.no_grad():
    text, pooled, neg_text, neg_pooled = pipe.encode_prompt(
        device="cpu", batch_size=2, num_images_per_prompt=1, do_classifier_free_guidance=True,
        prompt=prompts, negative_prompt=["", ""])
  want_text = np.concatenate([text.numpy(), neg_text.numpy()[:1]])
  want_pooled = np.concatenate([pooled.numpy(), neg_pooled.numpy()[:1]])[:, 0]
  scale = np.abs(want_text).max()
  assert np.abs(ours["text_embedding"] - want_text).max() <= 1e-5 * scale
  assert np.abs(ours["pooled_text_embedding"] - want_pooled).max() <= 1e-5 * scale
  assert np.abs(ours["text_embedding"][-1]).max() > 0.1          # the empty prompt is encoded


def _exported_processor(folder):
  """The ppd_cascade.py that export wrote, imported from that folder as a user would."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("ppd_cascade_exported",
                                                os.path.join(folder, "ppd_cascade.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_export_runs_in_the_prior_pipeline_as_ours(run, folders, tmp_path, monkeypatch):
  """export on the command line, then diffusers' StableCascadePriorPipeline (its own text encoder,
  scheduler and [cond; uncond] CFG) with the exported processor against our Stage C chain as
  `python -m ppd_jax.sample` runs it (inference.generate: its conditioning, its user scale in
  each CFG half), from the same x_T and per-step noise: equal, and the user changes the
  pipeline's latents."""
  import torch
  from diffusers import StableCascadePriorPipeline
  from diffusers.schedulers import scheduling_ddpm_wuerstchen
  from safetensors.torch import load_file

  import jax
  import jax.numpy as jnp

  import tiny_cascade as tc
  from ppd_jax import inference
  from ppd_jax.diffusion import generation

  out = tmp_path / "export"
  log = _run("ppd_jax.export", f"--workdir={run['workdir']}", f"--out={out}")
  assert "6 attention blocks" in log and "ppd_cascade.attach" in log
  assert sorted(os.listdir(out)) == ["ppd_cascade.py", "ppd_cascade_user.json",
                                     "ppd_cascade_user.safetensors"]
  with open(out / "ppd_cascade_user.json") as f:
    meta = json.load(f)
  assert (meta["user_embed_dim"], meta["prior_subfolder"], meta["step"]) == (16, "prior", 4)
  assert meta["num_cross_attention_layers"] == 6

  prompts, steps, w, seed = ["red circle", "a big dark dog"], 3, 4.0, 0
  trained = inference.load_trained(run["workdir"])
  assert trained.config.sample.sampler == "ddpm_wuerstchen"
  # generate's noise for `seed`: x_T from generation.initial_noise; the chunk's key
  # fold_in(key(seed), 0) and step i's z = normal(split(key, steps)[i]) (cascade_sampler.sample).
  x_T = generation.initial_noise(seed, len(prompts), trained.config.model)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0), steps)
  noise = np.stack([np.asarray(jax.random.normal(k, x_T.shape, jnp.float32)) for k in keys])
  embedding = next(iter(run["users"].values()))                       # [1, 16]

  pipe = StableCascadePriorPipeline.from_pretrained(folders["prior"])
  tc.patch_r_embedding(pipe.prior)
  user = _exported_processor(str(out)).attach(
      pipe.prior, load_file(str(out / "ppd_cascade_user.safetensors")))

  def theirs(scale):
    draws = iter(noise)
    monkeypatch.setattr(scheduling_ddpm_wuerstchen, "randn_tensor",
                        lambda shape, **kw: tc.nchw(next(draws)))
    user.set(torch.from_numpy(embedding), num_images=len(prompts), scale=scale)
    with torch.no_grad():
      got = pipe(prompts, height=160, width=160, num_inference_steps=steps, guidance_scale=w,
                 latents=tc.nchw(x_T), output_type="pt").image_embeddings
    return tc.nhwc(got)

  stage_c = []   # the shipped chain's Stage C latents, kept before Stage B and A would run

  def keep_latents(latents, text=None, seed=0):
    stage_c.append(np.asarray(latents))
    return np.zeros((len(latents), 1, 1, 3), np.float32)
  monkeypatch.setattr(trained.source.backbone, "to_images", keep_latents)
  inference.generate(trained, prompts, embedding, user_scale=1.0, seed=seed, num_steps=steps,
                     guidance_scale=w)
  ours = np.concatenate(stage_c)
  assert ours.shape == x_T.shape
  with_user, base = theirs(1.0), theirs(0.0)
  err, effect = np.abs(with_user - ours).max(), np.abs(with_user - base).max()
  assert err <= 1e-4 * np.abs(ours).max(), (err, effect)
  assert effect > 100 * err, (err, effect)


@pytest.mark.parametrize("guidance", [0.0, 2.0])     # the pipeline's default (no CFG), and CFG
def test_stage_b_and_a_match_the_decoder_pipeline(folders, monkeypatch, guidance):
  """Stage C latents -> images: our Stage B loop and Stage A against diffusers'
  StableCascadeDecoderPipeline as a whole (its text encoder, effnet conditioning, [cond; uncond]
  with a zero effnet, scheduler, Paella decode) from the same x_T and per-step noise."""
  import ml_collections
  import torch
  from diffusers import DDPMWuerstchenScheduler
  from diffusers import StableCascadeDecoderPipeline
  from diffusers import StableCascadeUNet
  from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
  from diffusers.schedulers import scheduling_ddpm_wuerstchen
  from transformers import CLIPTextModelWithProjection
  from transformers import CLIPTokenizer

  import tiny_cascade as tc
  from ppd_jax.backbones import stable_cascade
  steps, prompts = 3, ["red circle", "a big dark dog"]
  backbone = stable_cascade.StableCascadeBackbone(ml_collections.ConfigDict({"model": {
      "pretrained": folders["prior"], "prior_subfolder": "prior", "variant": "",
      "sample_size": 4, "decoder": folders["decoder"], "decoder_subfolder": "decoder",
      "decoder_steps": steps, "decoder_guidance_scale": guidance}}))
  rng = np.random.RandomState(1)
  latents = rng.randn(2, 4, 4, 16).astype(np.float32)
  shape = backbone.stage_b_shape(latents.shape)
  assert shape == (42, 42, 4)                                          # int(4 x 10.67)
  x_T = rng.randn(2, *shape).astype(np.float32)
  noise = rng.randn(steps, 2, *shape).astype(np.float32)

  # from_pretrained cannot resolve PaellaVQModel (not top-level in diffusers): parts one by one
  folder = folders["decoder"]
  pipe = StableCascadeDecoderPipeline(
      decoder=StableCascadeUNet.from_pretrained(folder, subfolder="decoder"),
      tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
      text_encoder=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder"),
      scheduler=DDPMWuerstchenScheduler.from_pretrained(folder, subfolder="scheduler"),
      vqgan=PaellaVQModel.from_pretrained(folder, subfolder="vqgan"))
  tc.patch_r_embedding(pipe.decoder)
  draws = iter(noise)
  monkeypatch.setattr(scheduling_ddpm_wuerstchen, "randn_tensor",
                      lambda shape, **kw: tc.nchw(next(draws)))
  with torch.no_grad():
    theirs = pipe(image_embeddings=tc.nchw(latents), prompt=prompts, num_inference_steps=steps,
                  guidance_scale=guidance, latents=tc.nchw(x_T), output_type="np").images
  ours = backbone.decode_from_noise(latents, backbone.encode_captions(prompts), x_T, noise)
  assert ours.shape == theirs.shape == (2, 168, 168, 3)
  assert theirs.std() > 0.05                                           # not a flat image
  assert np.abs((ours + 1) / 2 - theirs).max() < 1e-4


def test_synthetic_users_world_on_stable_cascade(folders, tmp_path):
  """configs/ppd.py:cascade_lite as it is (data.source = synthetic): the base pool is sampled
  through Stage C -> B -> A, the synthetic users label it, training runs, sample for a user."""
  workdir = tmp_path / "run"
  log = _run("ppd_jax.train", "--config=configs/ppd.py:cascade_lite", f"--workdir={workdir}",
             *folders["models"], *TINY, "--config.total_steps=2",
             "--config.batch_size=4", "--config.checkpoint_every=2", "--config.log_every=1",
             "--config.model.user_embed_dim=8", "--config.sample.num_steps=2",
             "--config.data.num_users=4", "--config.data.num_unseen_users=1",
             "--config.data.pool_per_caption=2", "--config.model.decoder_steps=2",
             cache=str(tmp_path / "cache"))
  assert "sampling the base-model pool: 36 images" in log and "ddpm_wuerstchen" in log
  assert "step 1/2  loss 0.6931" in log
  out = tmp_path / "images"
  log = _run("ppd_jax.sample", f"--workdir={workdir}", "--user=1", "--prompt=red circle",
             f"--out={out}", "--num_steps=2", cache=str(tmp_path / "cache"))
  assert "wrote 1 image(s) of 168px" in log
