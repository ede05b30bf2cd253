"""Our side of benchmarks/gpu_check.sh: the project's own train step and sampler, timed on one GPU.

  python benchmarks/jax_gpu_check.py --pieces=attention,sd15_train,sample,sdxl_train
  python benchmarks/jax_gpu_check.py --tiny ...     # tiny UNets on the CPU: the same code paths
  python benchmarks/jax_gpu_check.py --dry ...      # full size, trace and lower only (no compile)

Pieces (one JSON line each, `{"piece": NAME, ...}`; a failing piece prints its error and the
next one still runs):
  attention   which kernel attention_impl="auto" picks for every attention call of the SD 1.5
              and SDXL UNets at their training shapes (choose_implementation, observed while
              tracing), with the device facts it decided on.
  sd15_train  configs/ppd.py:sd15 with a random base (model.pretrained=""): bf16 compute,
              64x64 latents, 16 pairs, user_tokens=1 x 3584, 77 text tokens, remat as the config
              says; built by state.create_train_state and step.make_train_step as training does,
              on a synthetic batch made here (no data pipeline). pairs/s (median step), MFU
              (throughput.step_flops: XLA's count of the model FLOPs, over the device's peak).
  sample      50-step DDIM with classifier-free guidance (7.5) through
              diffusion/generation.sample_images (the jitted lax.scan sampler) on the SD 1.5 UNet
              with the user branch on: images/s for a batch of 8 latents. The VAE decode is NOT
              included (random weights have no VAE; it would be one decoder pass per image).
  cascade_lite_train  configs/ppd.py:cascade_lite (Stable Cascade's Stage C lite, 1.0B, the
              paper's backbone), random base, bf16, remat, 24x24x16 latents, 77 CLIP bigG tokens
              + pooled text, 16 pairs: as sd15_train (pairs/s, MFU, memory).
  sdxl_train  configs/ppd.py:sdxl, random base, bf16, 128x128 latents, pooled text + time_ids,
              at the largest batch that fits (capped at --sdxl_max_batch): the step is compiled
              ahead of time at two probe batches (16, 32: compiling allocates no activations,
              so the probes can sit near the answer), compiled.memory_analysis() (arguments +
              outputs - aliased + temporaries) fitted linearly in the batch and extrapolated to
              90% of the device's bytes_limit; that batch is compiled and checked the same way,
              run, and halved on RESOURCE_EXHAUSTED.

Why AOT compile (jit(...).lower(...).compile()): the memory check needs the executable before
running it, and the compile time is reported apart from the step time. A UNet step's GPU
compile is expected to take tens of seconds or more (not measured here), so the probes compile
in parallel threads with XLA's autotuning off (it picks kernels; buffer sizes barely move), the
FLOP count traces in a thread while XLA compiles, and --budget_s makes a piece skip what no
longer fits instead of being killed.
"""
import argparse
import concurrent.futures
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # ppd_jax/, configs/

PIECES = ("attention", "sd15_train", "sample", "sdxl_train", "cascade_lite_train")

# Tiny UNets for --tiny (CPU): the SD 1.5 and SDXL layouts (block types, SDXL's linear
# projections, text_time embedding, several transformer layers) at a few thousand parameters.
TINY_MODEL = {
    "sd15": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                 transformer_layers_per_block=(1, 1), cross_attention_dim=32, norm_num_groups=8,
                 user_embed_dim=64),
    "sdxl": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=32, norm_num_groups=8,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
                 user_embed_dim=64),
    "cascade_lite": dict(sample_size=8, user_embed_dim=64, cascade=dict(
        in_channels=16, out_channels=16, conditioning_dim=32, block_out_channels=(32, 32),
        num_attention_heads=(2, 2), down_num_layers_per_block=(1, 2),
        up_num_layers_per_block=(2, 1), down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1), clip_text_in_channels=24,
        clip_text_pooled_in_channels=24, clip_image_in_channels=16, switch_level=(False,),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock",
                                "SDCascadeAttnBlock"),) * 2)),
}
TINY_TEXT_LENGTH = 8


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pieces", default=",".join(PIECES), help=f"comma list of {PIECES}")
  p.add_argument("--tiny", action="store_true", help="tiny UNets (CPU smoke run)")
  p.add_argument("--dry", action="store_true",
                 help="full size (unless --tiny): build, trace and lower only, no compile or run")
  p.add_argument("--budget_s", type=float, default=1e9,
                 help="wall-clock seconds this process may use; pieces skip what no longer fits")
  p.add_argument("--pairs", type=int, default=None, help="SD 1.5 pairs per step (16; tiny 4)")
  p.add_argument("--steps", type=int, default=None, help="timed train steps (10; tiny 3)")
  p.add_argument("--sample_images", type=int, default=None, help="sampler batch (8; tiny 2)")
  p.add_argument("--sample_steps", type=int, default=None, help="DDIM steps (50; tiny 5)")
  p.add_argument("--sdxl_probes", default=None, help="probe batches (16,32; tiny 1,2)")
  p.add_argument("--sdxl_max_batch", type=int, default=None,
                 help="cap on the SDXL batch (128: a step of ~5 PFLOP, seconds; tiny 8)")
  p.add_argument("--memory_limit_gib", type=float, default=None,
                 help="device memory to plan SDXL for where the device reports none (CPU: 0.5)")
  p.add_argument("--attention_impl", default=None, help="override model.attention_impl")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


# Helpers ------------------------------------------------------------------------------------------

class Clock:
  """The process's wall-clock budget, so a piece can skip a stage rather than be killed."""

  def __init__(self, budget_s: float):
    self.deadline = time.monotonic() + budget_s

  def left(self) -> float:
    return self.deadline - time.monotonic()


def emit(result: dict):
  """One JSON line per piece (non-finite floats as null, so any JSON reader takes it)."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  print(json.dumps(clean(result)), flush=True)


def gib(n):
  return None if n is None else n / 2**30


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def make_config(variant: str, opts, batch: int):
  """configs/ppd.py:VARIANT with a random base, synthetic shapes, and the tiny model if asked."""
  from configs import ppd as ppd_configs
  c = ppd_configs.get_config(variant)
  c.model.pretrained = ""            # no download: the base is the seeded init
  c.model.base = "random"
  c.batch_size = batch
  c.grad_accum_steps = 1
  c.data.text_length = 77
  if opts.tiny:
    for field, value in TINY_MODEL[variant].items():
      setattr(c.model, field, value)
    c.data.text_length = TINY_TEXT_LENGTH
  if opts.attention_impl:
    c.model.attention_impl = opts.attention_impl
  return c


def config_problem(c):
  """config_validation's verdict, recorded rather than fatal: a timing needs no data fields."""
  try:
    from ppd_jax import config_validation
    config_validation.validate(c)
    return None
  except Exception as err:  # pylint: disable=broad-except
    return f"{type(err).__name__}: {err}"


def model_facts(c) -> dict:
  m = c.model
  return {"variant": c.variant, "latent": m.sample_size, "dtype": m.dtype, "remat": m.remat,
          "attention_impl": m.attention_impl, "user_tokens": m.user_tokens,
          "user_tokens_per_embedding": m.user_tokens_per_embedding,
          "user_embed_dim": m.user_embed_dim, "text_length": c.data.text_length}


def batch_shapes(c, b: int) -> dict:
  """{key: shape} of the global batch the step reads (step.batch_keys)."""
  m = c.model
  r = m.sample_size
  cascade = m.get("family") == "cascade"
  text_dim = m.cascade["clip_text_in_channels"] if cascade else m.cross_attention_dim
  shapes = {"preferred": (b, r, r, m.in_channels), "dispreferred": (b, r, r, m.in_channels),
            "text_embedding": (b, c.data.text_length, text_dim),
            "user_embedding": (b, m.user_tokens, m.user_embed_dim)}
  if cascade:
    shapes["pooled_text_embedding"] = (b, m.cascade["clip_text_pooled_in_channels"])
  elif m.addition_embed_type == "text_time":
    shapes["pooled_text_embedding"] = (
        b, m.projection_class_embeddings_input_dim - 6 * m.addition_time_embed_dim)
    shapes["time_ids"] = (b, 6)
  return shapes


def abstract_batch(c, b: int, mesh=None) -> dict:
  import jax
  import jax.numpy as jnp
  from ppd_jax import sharding as shd
  sharding = None if mesh is None else shd.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
          for k, s in batch_shapes(c, b).items()}


def random_batch(c, b: int, mesh, seed: int) -> dict:
  """Synthetic float32 arrays of the loader's layout, placed in the step's batch sharding."""
  import numpy as np
  from ppd_jax import sharding as shd
  rng = np.random.default_rng(seed)
  arrays = {k: rng.standard_normal(s, dtype=np.float32) for k, s in batch_shapes(c, b).items()}
  if "time_ids" in arrays:             # (orig H, W, crop top, left, target H, W) in pixels
    px = 8.0 * c.model.sample_size
    arrays["time_ids"] = np.tile(np.float32([[px, px, 0, 0, px, px]]), (b, 1))
  return shd.global_batch(arrays, mesh)


def memory_need(compiled) -> dict | None:
  """Device bytes the executable needs: arguments + outputs - donated (aliased) + temporaries."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if ma is None:
    return None
  arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  return {"argument": arg, "output": out, "alias": alias, "temp": temp,
          "total": arg + out - alias + temp}


def device_memory() -> tuple[int | None, int | None]:
  """(bytes_limit, peak_bytes_in_use) of device 0; None where the backend keeps no stats."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return stats.get("bytes_limit"), stats.get("peak_bytes_in_use")


def device_facts() -> dict:
  import jax
  dev = jax.devices()[0]
  limit, _ = device_memory()
  return {"device_kind": dev.device_kind, "platform": dev.platform,
          "devices": jax.device_count(), "jax": jax.__version__,
          "bytes_limit_gib": gib(limit)}


def param_count(tree) -> int:
  import jax
  import numpy as np
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def gpu_compile_options(autotune: bool):
  """None (XLA's defaults), or autotuning off for memory probes; CPU takes no GPU options."""
  import jax
  if autotune or jax.default_backend() != "gpu":
    return None
  return {"xla_gpu_autotune_level": 0}


def compile_with(lowered, options):
  """lowered.compile(options), or with XLA's defaults where this XLA refuses an option."""
  if options:
    try:
      return lowered.compile(options)
    except Exception as err:  # pylint: disable=broad-except
      if not any(name in str(err) for name in options):
        raise
  return lowered.compile()


class Trainer:
  """A config's model, optimizer, mesh, state and jitted step, built as ppd_jax/train.py does."""

  def __init__(self, c, abstract: bool = False):
    import jax
    from ppd_jax import sharding as shd
    from ppd_jax import state as state_lib
    from ppd_jax import step as step_lib
    from ppd_jax.diffusion import schedules
    from ppd_jax.models import build_model
    self.c = c
    self.model = build_model(c.model)
    self.tx, self.lr = step_lib.make_optimizer(c)
    self.mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp)
    self.schedule = schedules.schedule_from_config(c.diffusion)
    start = time.perf_counter()
    make = lambda: state_lib.create_train_state(self.model, self.tx, self.mesh, c.seed)
    if abstract:   # shapes only: nothing is allocated or compiled
      self.state, self.base = self._abstract_state()
      st_sh, base_sh = state_lib.state_shardings(self.model, self.tx, self.mesh)
    else:
      self.state, self.base, st_sh, base_sh = make()
      jax.block_until_ready((self.state, self.base))
    self.init_s = time.perf_counter() - start
    self._make = make
    self.step = step_lib.make_train_step(self.model, self.schedule, c, self.tx, self.lr,
                                         self.mesh, st_sh, base_sh)
    self.key = jax.random.key(c.seed)

  def _abstract_state(self):
    """(TrainState, base) of ShapeDtypeStructs as create_train_state would make them.

    create_train_state itself cannot run under jax.eval_shape on a CPU (its init jit carries
    compiler_options, which only a top-level jit may), so the same pieces are put together
    here: the base in its frozen storage dtype, the optimizer state of the user params, and
    every other TrainState field (the counters) a scalar int32.
    """
    import dataclasses
    import jax
    import jax.numpy as jnp
    from ppd_jax import state as state_lib
    from ppd_jax import step as step_lib
    from ppd_jax.models import init_params, split_params
    shapes = jax.eval_shape(lambda: init_params(self.model, jax.random.key(self.c.seed)))
    base, user = split_params(shapes)
    base = state_lib.frozen_storage(base, self.model.config.dtype)
    given = {"user_params": user, "opt_state": jax.eval_shape(self.tx.init, user)}
    counter = jax.ShapeDtypeStruct((), jnp.int32)
    fields = {f.name: given.get(f.name, counter) for f in dataclasses.fields(step_lib.TrainState)}
    return step_lib.TrainState(**fields), base

  def reinit(self):
    """A fresh state after a failed run (its donated buffers may be gone); old arrays first."""
    import gc
    del self.state, self.base
    gc.collect()
    self.state, self.base, _, _ = self._make()

  def lower(self, b: int):
    return self.step.lower(self.state, self.base, abstract_batch(self.c, b, self.mesh), self.key)

  def time_steps(self, compiled, batch, steps: int, warmup: int, clock=None) -> dict:
    """Runs warm-up then timed steps (each synchronised); the first step's loss is recorded."""
    import jax
    start = time.perf_counter()
    self.state, metrics = compiled(self.state, self.base, batch, self.key)
    first_loss = float(metrics["loss"])
    first_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
      self.state, metrics = compiled(self.state, self.base, batch, self.key)
    jax.block_until_ready(self.state)
    if clock is not None:   # as many timed steps as the budget allows (at least one)
      steps = max(1, min(steps, int((clock.left() - 10) / max(first_s, 1e-3))))
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = compiled(self.state, self.base, batch, self.key)
      jax.block_until_ready(self.state)
      times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_ms": [round(t * 1e3, 2) for t in times],
            "first_step_s": first_s, "loss_first_step": first_loss,
            "loss_last_step": float(metrics["loss"]),
            "skipped_updates": int(metrics["skipped_updates"])}


def throughput_facts(flops: float | None, median_s: float, pairs: int) -> dict:
  import jax
  from ppd_jax import throughput
  out = {"pairs_per_s": pairs / median_s, "step_ms_median": median_s * 1e3}
  if flops:
    dev = jax.devices()[0]
    tp = throughput.Throughput(flops, jax.device_count(), dev.device_kind)(1.0 / median_s)
    out.update(flops_per_step=flops, tflops_per_device=tp["tflops_per_device"],
               mfu=tp.get("mfu"), peak_tflops=throughput.peak_tflops(dev.device_kind))
  return out


def future_value(future, out: dict):
  """A background result, or None with its error in out["flops_error"]: a failed FLOP count
  must not throw away the timing it was meant to annotate."""
  try:
    return future.result()
  except Exception as err:  # pylint: disable=broad-except
    out["flops_error"] = f"{type(err).__name__}: {err}"[:500]
    return None


def step_flops(c, b: int) -> float:
  import jax
  from ppd_jax import throughput
  return throughput.step_flops(c, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                   for k, v in abstract_batch(c, b).items()})


# Pieces -------------------------------------------------------------------------------------------

def piece_attention(opts, clock) -> dict:
  """Traces each UNet's forward at its training shapes and records what "auto" chose per call."""
  del clock
  import jax
  import jax.numpy as jnp
  from ppd_jax.models import attention_kernels, build_model, init_params
  backend, cc, cudnn = attention_kernels._device_facts()  # pylint: disable=protected-access
  out = {"piece": "attention", "backend": backend, "compute_capability": cc,
         "cudnn_version": cudnn, "tiny": opts.tiny}
  for variant, pairs in (("sd15", opts.pairs or (4 if opts.tiny else 16)), ("sdxl", 8)):
    c = make_config(variant, opts, pairs)
    model = build_model(c.model)
    params = jax.eval_shape(lambda m=model: init_params(m, jax.random.key(0)))
    b = 2 * pairs                     # the step's UNet batch: both images of every pair
    shapes = batch_shapes(c, b)
    sds = lambda s, d=jnp.float32: jax.ShapeDtypeStruct(s, d)
    added = None
    if "time_ids" in shapes:
      added = {"text_embeds": sds(shapes["pooled_text_embedding"]),
               "time_ids": sds(shapes["time_ids"])}
    calls = []
    original = attention_kernels.choose_implementation

    def spy(backend, q_shape, k_shape, dtype, **kw):
      impl = original(backend, q_shape, k_shape, dtype, **kw)
      calls.append((tuple(q_shape), tuple(k_shape), jnp.dtype(dtype).name, impl))
      return impl

    attention_kernels.choose_implementation = spy
    try:
      jax.eval_shape(
          lambda p, x, t, text, u, a, m=model: m.apply({"params": p}, x, t, text, u, 1.0, a),
          params, sds(shapes["preferred"]), sds((b,), jnp.int32), sds(shapes["text_embedding"]),
          sds(shapes["user_embedding"]), added)
    finally:
      attention_kernels.choose_implementation = original
    k_user = c.model.user_tokens_per_embedding if c.model.user_tokens == 1 else c.model.user_tokens
    rows = {}
    for q, k, dtype, impl in calls:
      kind = "self" if k[1] == q[1] else ("user" if k[1] == k_user else "text")
      key = (kind, q[1], k[1], q[2], q[3], dtype, impl)
      rows[key] = rows.get(key, 0) + 1
    out[variant] = {
        "unet_batch": b, "calls": len(calls),
        "implementations": sorted({r[-1] for r in rows}),
        "layers": [{"kind": k[0], "q_len": k[1], "k_len": k[2], "heads": k[3], "head_dim": k[4],
                    "dtype": k[5], "impl": k[6], "count": n} for k, n in sorted(rows.items())]}
  return out


def piece_sd15_train(opts, clock, variant: str = "sd15") -> dict:
  """configs/ppd.py:VARIANT's train step (sd15, or cascade_lite for piece_cascade_lite_train)."""
  pairs = opts.pairs or (4 if opts.tiny else 16)
  c = make_config(variant, opts, pairs)
  out = {"piece": f"{variant}_train", "tiny": opts.tiny, "dry": opts.dry, "pairs": pairs,
         **model_facts(c), **device_facts()}
  problem = config_problem(c)
  if problem:
    out["config_warning"] = problem
  tr = Trainer(c, abstract=opts.dry)
  out["init_s"] = tr.init_s
  out["user_params"] = param_count(tr.state.user_params)
  out["base_params"] = param_count(tr.base)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    flops = pool.submit(step_flops, c, pairs)   # traces on the CPU while XLA compiles
    start = time.perf_counter()
    lowered = tr.lower(pairs)
    out["lower_s"] = time.perf_counter() - start
    if opts.dry:
      out["flops_per_step"] = flops.result()
      return out
    start = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - start
    out["memory"] = {k: gib(v) for k, v in (memory_need(compiled) or {}).items()}
    batch = random_batch(c, pairs, tr.mesh, opts.seed)
    steps = opts.steps or (3 if opts.tiny else 10)
    timing = tr.time_steps(compiled, batch, steps, warmup=1 if opts.tiny else 2, clock=clock)
    out.update(timing)
    out.update(throughput_facts(future_value(flops, out), timing["median_s"], pairs))
  out["peak_memory_gib"] = gib(device_memory()[1])
  return out


def piece_cascade_lite_train(opts, clock) -> dict:
  return piece_sd15_train(opts, clock, variant="cascade_lite")


def piece_sample(opts, clock) -> dict:
  import jax
  import numpy as np
  from ppd_jax.diffusion import generation
  from ppd_jax.models import build_model, init_params, merge_params
  n = opts.sample_images or (2 if opts.tiny else 8)
  num_steps = opts.sample_steps or (5 if opts.tiny else 50)
  c = make_config("sd15", opts, opts.pairs or 16)
  out = {"piece": "sample", "tiny": opts.tiny, "dry": opts.dry, "images": n,
         "sampler": "ddim", "num_steps": num_steps, "guidance_scale": 7.5,
         "vae_decode": "not included", **model_facts(c), **device_facts()}
  # The same init program as sd15_train's: a persistent-cache hit when that piece ran first.
  tr = Trainer(c, abstract=opts.dry)
  params = merge_params(tr.base, tr.state.user_params)
  m = c.model
  rng = np.random.default_rng(opts.seed)
  text = rng.standard_normal((n, c.data.text_length, m.cross_attention_dim), dtype=np.float32)
  null_text = np.zeros((1,) + text.shape[1:], np.float32)
  user = rng.standard_normal((n, m.user_tokens, m.user_embed_dim), dtype=np.float32)
  noise = generation.initial_noise(opts.seed, n, m)

  # FLOPs of one guided step: the UNet at 2n (cond + uncond), XLA's count, plain attention.
  def forward_flops():
    plain = build_model({**m.to_dict(), "attention_impl": "xla", "remat": False})
    shapes = jax.eval_shape(lambda: init_params(plain, jax.random.key(0)))
    sds = jax.ShapeDtypeStruct
    lowered = jax.jit(lambda p, x, t, ctx, u: plain.apply({"params": p}, x, t, ctx, u, 1.0)).lower(
        shapes, sds((2 * n,) + noise.shape[1:], np.float32), sds((2 * n,), np.float32),
        sds((2 * n,) + text.shape[1:], np.float32), sds((2 * n,) + user.shape[1:], np.float32))
    return float(lowered.cost_analysis()["flops"])

  if opts.dry:
    lowered = generation._generate.lower(  # pylint: disable=protected-access
        tr.model, tr.schedule, params, noise, {"text_embedding": text},
        {"text_embedding": np.broadcast_to(null_text, text.shape)}, user, np.float32(1.0),
        np.float32(7.5), jax.random.key(0), num_steps=num_steps, eta=0.0, clip_sample=False,
        sampler="ddim")
    out["lowered"] = bool(lowered)
    out["flops_per_guided_step"] = forward_flops()
    return out

  def run():
    return generation.sample_images(tr.model, tr.schedule, params, text, null_text, noise, user,
                                    guidance_scale=7.5, num_steps=num_steps, sampler="ddim",
                                    batch_size=n)

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    flops = pool.submit(forward_flops)
    start = time.perf_counter()
    first = run()                          # compiles (lax.scan over the steps) and runs once
    out["first_call_s"] = time.perf_counter() - start
    out["finite"] = bool(np.isfinite(first).all())
    reps = 1 if opts.tiny else 3
    times = []
    for _ in range(reps):
      if times and clock.left() < 2 * times[-1] + 5:
        break
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    median = statistics.median(times)
    out.update(images_per_s=n / median, call_s_median=median, call_s=times,
               unet_evals_per_s=2 * n * num_steps / median)
    try:
      f = flops.result()
      from ppd_jax import throughput
      kind = jax.devices()[0].device_kind
      tflops = f * num_steps / median / jax.device_count() / 1e12
      peak = throughput.peak_tflops(kind)
      out.update(flops_per_guided_step=f, tflops_per_device=tflops,
                 mfu=tflops / peak if peak else None)
    except Exception as err:  # pylint: disable=broad-except
      out["flops_error"] = f"{type(err).__name__}: {err}"[:500]
  out["init_s"] = tr.init_s
  out["peak_memory_gib"] = gib(device_memory()[1])
  return out


def round_batch(b: float) -> int:
  """Kernels like round sizes: multiples of 8 from 16 up, powers of two below."""
  b = int(b)
  if b >= 16:
    return b - b % 8
  return 1 << max(0, b.bit_length() - 1) if b >= 1 else 0


def fit_memory(points: list[tuple[int, dict]]) -> tuple[float, float]:
  """(bytes fixed, bytes per pair) of the step's memory need, from (batch, memory_need) probes.

  Two or more probes: a least-squares line through their totals. One probe: the arguments and
  outputs (params, optimizer state, minus what is donated) as the fixed part and all of the
  temporaries as per-pair, which over-states the slope, so the extrapolated batch errs small.
  """
  if len(points) >= 2:
    xs = [b for b, _ in points]
    ys = [m["total"] for _, m in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope > 0:
      return my - slope * mx, slope
  b, m = points[-1]
  return m["argument"] + m["output"] - m["alias"], m["temp"] / b


def piece_sdxl_train(opts, clock) -> dict:
  probes = [int(x) for x in (opts.sdxl_probes or ("1,2" if opts.tiny else "16,32")).split(",")]
  cap = opts.sdxl_max_batch or (8 if opts.tiny else 128)
  c = make_config("sdxl", opts, probes[0])
  out = {"piece": "sdxl_train", "tiny": opts.tiny, "dry": opts.dry, "probes": probes,
         **model_facts(c), **device_facts()}
  tr = Trainer(c, abstract=opts.dry)
  out["init_s"] = tr.init_s
  out["user_params"] = param_count(tr.state.user_params)
  out["base_params"] = param_count(tr.base)
  pool = concurrent.futures.ThreadPoolExecutor(len(probes) + 1)
  try:
    if len(probes) > 1 and not opts.dry and clock.left() < 240:
      probes = [max(probes)]    # short of time: one probe, fitted conservatively (fit_memory)
      out["probes"] = probes
    flops = pool.submit(step_flops, c, probes[0])     # FLOPs are linear in the batch
    start = time.perf_counter()
    lowered = {b: tr.lower(b) for b in probes}
    out["lower_s"] = time.perf_counter() - start
    if opts.dry:
      out["flops_per_pair"] = flops.result() / probes[0]
      return out

    # Probes: compiled side by side, autotuning off; only their memory analysis is wanted.
    start = time.perf_counter()
    options = gpu_compile_options(autotune=False)
    futures = {b: pool.submit(compile_with, low, options) for b, low in lowered.items()}
    probe_exec = {b: f.result() for b, f in futures.items()}
    probe_s = time.perf_counter() - start
    points = [(b, memory_need(ex)) for b, ex in sorted(probe_exec.items())]
    out["probe_compile_s"] = probe_s
    out["probe_memory_gib"] = {b: gib(m["total"]) if m else None for b, m in points}
    limit, _ = device_memory()
    limit_from = "device bytes_limit"
    if limit is None:
      limit = (opts.memory_limit_gib or 0.5) * 2**30
      limit_from = "--memory_limit_gib (no device stats)"
    out.update(memory_limit_gib=gib(limit), memory_limit_from=limit_from)
    if any(m is None for _, m in points):
      raise RuntimeError("compiled.memory_analysis() gave nothing: cannot plan the batch")
    fixed, per_pair = fit_memory(points)
    planned = round_batch(min(cap, (0.9 * limit - fixed) / per_pair))
    out.update(fixed_gib=gib(fixed), per_pair_gib=gib(per_pair), planned_batch=planned)
    if planned < 1:
      raise RuntimeError(f"not even one pair fits: {out}")
    emit({**out, "partial": "planned"})

    # The planned batch, compiled with XLA's defaults and checked before it runs.
    b, compiled, attempts = planned, None, []
    while b >= 1 and compiled is None:
      # Time for one more compile (with autotuning), its lowering and a few steps? Else run
      # the largest probe's executable as it is.
      if clock.left() < 1.5 * probe_s + out["lower_s"] / len(probes) + 45:
        b = max([p for p in probe_exec if p <= planned] or [min(probe_exec)])
        compiled = probe_exec[b]
        out["note"] = "budget: ran the largest probe's executable (autotuning off)"
        break
      start = time.perf_counter()
      try:
        candidate = tr.lower(b).compile()
      except Exception as err:  # pylint: disable=broad-except
        if not is_oom(err) or b == 1:
          raise
        attempts.append({"batch": b, "error": "RESOURCE_EXHAUSTED at compile"})
        b = round_batch(b / 2)
        continue
      need = memory_need(candidate)
      attempts.append({"batch": b, "compile_s": time.perf_counter() - start,
                       "need_gib": gib(need["total"]) if need else None})
      if need and need["total"] > 0.95 * limit and b > 1:
        b = round_batch(min(b / 2, b * (0.9 * limit - fixed) / max(need["total"] - fixed, 1)))
        continue
      compiled = candidate
    out["attempts"] = attempts
    if compiled is None:
      raise RuntimeError(f"no batch fits the memory limit: {attempts}")

    # Run it; on RESOURCE_EXHAUSTED halve the batch (a fresh state: donated buffers may be gone).
    steps = opts.steps or (2 if opts.tiny else 5)
    while True:
      batch = None
      try:
        batch = random_batch(c, b, tr.mesh, opts.seed)
        timing = tr.time_steps(compiled, batch, steps, warmup=1, clock=clock)
        break
      except Exception as err:  # pylint: disable=broad-except
        if not is_oom(err) or b == 1 or clock.left() < 60:
          raise
        attempts.append({"batch": b, "error": "RESOURCE_EXHAUSTED at run"})
        del batch, compiled
        tr.reinit()
        b = round_batch(b / 2)
        compiled = tr.lower(b).compile()
    out.update(batch=b, **timing)
    per_probe = future_value(flops, out)
    out.update(throughput_facts(per_probe and per_probe * b / probes[0], timing["median_s"], b))
    out["peak_memory_gib"] = gib(device_memory()[1])
    return out
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


RUNNERS = {"attention": piece_attention, "sd15_train": piece_sd15_train, "sample": piece_sample,
           "sdxl_train": piece_sdxl_train, "cascade_lite_train": piece_cascade_lite_train}


def main(argv=None):
  opts = parse_args(argv)
  clock = Clock(opts.budget_s)
  names = [p for p in opts.pieces.split(",") if p]
  unknown = set(names) - set(PIECES)
  if unknown:
    raise SystemExit(f"unknown pieces {sorted(unknown)}; choose from {PIECES}")
  if opts.tiny and not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"       # tiny is the CPU smoke run, wherever it runs
  # Importing the package first guards XLA:CPU against its bf16 abort (ppd_jax/xla_cpu.py).
  import ppd_jax  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  failed = 0
  for name in names:
    start = time.perf_counter()
    result = run_piece(name, opts, clock)
    if "error" in result and "cudnn" in result["error"].lower() and not opts.attention_impl \
        and clock.left() > 90:
      # "auto" follows jax 0.10.2's cuDNN rules; should another jax refuse a layer, the figure
      # is still worth having with the portable kernel, marked as such.
      print(f"{name}: cuDNN attention failed; again with attention_impl=chunked", flush=True)
      retry = run_piece(name, argparse.Namespace(**{**vars(opts), "attention_impl": "chunked"}),
                        clock)
      retry["attention_fallback"] = {"from": "auto", "error": result["error"][:500]}
      result = retry
    failed += "error" in result
    result["wall_s"] = time.perf_counter() - start
    emit(result)
  sys.exit(1 if failed else 0)


def run_piece(name, opts, clock) -> dict:
  """The piece's result, or its error and traceback: one piece never stops the next."""
  try:
    return RUNNERS[name](opts, clock)
  except Exception as err:  # pylint: disable=broad-except
    return {"piece": name, "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-3000:]}


if __name__ == "__main__":
  main()
