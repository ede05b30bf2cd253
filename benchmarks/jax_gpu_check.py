"""Our side of benchmarks/gpu_check.sh: the project's own train step and sampler, timed on one GPU.

  python benchmarks/jax_gpu_check.py --pieces=sd15_train,cascade_lite_train,sdxl_train,...
  python benchmarks/jax_gpu_check.py --tiny ...     # tiny UNets on the CPU: the same code paths
  python benchmarks/jax_gpu_check.py --dry ...      # full size, trace and lower only (no compile)

Pieces (JSON lines `{"piece": NAME, ...}`; a train piece prints a partial line,
`"partial": "compiled"`, as soon as its step is compiled, then its final line; a failing piece
prints its error and the next one still runs):
  sd15_train  configs/ppd.py:sd15 with a random base (model.pretrained=""): bf16 compute,
              64x64 latents, 16 pairs, user_tokens=1 x 3584, 77 text tokens, remat on (the
              config's); built by state.create_train_state and step.make_train_step as training
              does, on a synthetic batch made here (no data pipeline). pairs/s (median step), MFU.
  sd15_train_noremat  the same with model.remat=False (PyTorch without gradient checkpointing
              is its like for like; sd15_train's is PyTorch with it).
  cascade_lite_train  configs/ppd.py:cascade_lite (Stable Cascade's Stage C lite, 1.0B, the
              paper's backbone), random base, bf16, remat, 24x24x16 latents, 77 CLIP bigG tokens
              + pooled text; from --cascade_batch pairs (16), halved until it fits; and the
              attention kernel "auto" picks for each Stage C attention call, in order.
  sdxl_train  configs/ppd.py:sdxl, random base, bf16, remat, 128x128 latents, pooled text +
              time_ids; from --sdxl_batch pairs (4), halved until it fits. Why 4: the CPU
              compiler's buffer assignment (docs/performance.md, memory.py) puts 8 pairs at 139 GiB of
              temporaries, which a GPU's scheduler cuts but hardly by half; a compile that
              does not fit costs a second one.
  sample      50-step DDIM with classifier-free guidance (7.5) through
              diffusion/generation.sample_images (the jitted lax.scan sampler) on the SD 1.5 UNet
              with the user branch on: images/s for a batch of 8 latents. The VAE decode is NOT
              included (random weights have no VAE; it would be one decoder pass per image).
  attention   which kernel attention_impl="auto" picks for every attention call of the SD 1.5
              and SDXL UNets at their training shapes (choose_implementation, observed while
              tracing), with the device facts it decided on.

A train piece, in order (--budget_s makes it cut timed steps rather than be killed):
  1. the random base and optimizer state are initialised in a thread while the main thread
     traces and lowers the step for abstract inputs of the same shapes and shardings;
  2. compile ahead of time; the partial line: lower/compile seconds, compiled.memory_analysis();
  3. probe-and-halve (cascade, sdxl): where memory_analysis() says the step needs more than 95% of
     the device's bytes_limit, or the compile or a step raises RESOURCE_EXHAUSTED, the batch is
     halved (as often as the measured temporaries per pair say) and the step compiled again;
  4. warm-up and timed steps;
  5. only then the FLOP count (throughput.step_flops: traced, no compile, on any backend), so it
     competes with neither the compile nor the timing.
"""
import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import pathlib
import statistics
import sys
import threading
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # ppd_jax/, configs/

PIECES = ("sd15_train", "sd15_train_noremat", "cascade_lite_train", "sdxl_train", "sample",
          "attention")

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
FIT_FRACTION = 0.95      # a compiled step needing more of bytes_limit than this is halved


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pieces", default=",".join(PIECES), help=f"comma list of {PIECES}")
  p.add_argument("--tiny", action="store_true", help="tiny UNets (CPU smoke run)")
  p.add_argument("--dry", action="store_true",
                 help="full size (unless --tiny): build, trace and lower only, no compile or run")
  p.add_argument("--budget_s", type=float, default=1e9,
                 help="wall-clock seconds this process may use; pieces skip what no longer fits")
  p.add_argument("--pairs", type=int, default=None, help="SD 1.5 pairs per step (16; tiny 4)")
  p.add_argument("--steps", type=int, default=None, help="timed train steps (10; tiny 2)")
  p.add_argument("--sample_images", type=int, default=None, help="sampler batch (8; tiny 2)")
  p.add_argument("--sample_steps", type=int, default=None, help="DDIM steps (50; tiny 3)")
  p.add_argument("--sdxl_batch", type=int, default=None,
                 help="SDXL pairs to start from, halved until the step fits (4; tiny 2)")
  p.add_argument("--cascade_batch", type=int, default=None,
                 help="Stage C lite pairs to start from, halved until it fits (16; tiny 4)")
  p.add_argument("--memory_limit_gib", type=float, default=None,
                 help="device memory the batch must fit where the device reports none (CPU); "
                      "unset there: no memory check")
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
  """One JSON line (non-finite floats as null, so any JSON reader takes it)."""
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


def make_config(variant: str, opts, batch: int, remat: bool | None = None):
  """configs/ppd.py:VARIANT with a random base, synthetic shapes, and the tiny model if asked."""
  from configs import ppd as ppd_configs
  c = ppd_configs.get_config(variant)
  c.model.pretrained = ""            # no download: the base is the seeded init
  c.model.base = "random"
  c.batch_size = batch
  c.grad_accum_steps = 1             # the batch in one micro-step: what the probe measures
  if "per_device_batch" in c:
    c.per_device_batch = 0           # grad_accum_steps as given, not derived
  c.data.text_length = 77
  if opts.tiny:
    for field, value in TINY_MODEL[variant].items():
      setattr(c.model, field, value)
    c.data.text_length = TINY_TEXT_LENGTH
  if opts.attention_impl:
    c.model.attention_impl = opts.attention_impl
  if remat is not None:
    c.model.remat = remat
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


def memory_limit(opts) -> tuple[int | None, str]:
  """(bytes a step may need, where that figure comes from); None: nothing to check against."""
  limit, _ = device_memory()
  if limit:
    return limit, "device bytes_limit"
  if opts.memory_limit_gib:
    return int(opts.memory_limit_gib * 2**30), "--memory_limit_gib (no device stats)"
  return None, "none (no device stats, no --memory_limit_gib)"


def halved_batch(b: int, need: dict, limit: int) -> int:
  """b halved (at least once) until fixed + temp/b * b' fits FIT_FRACTION of limit; 0: none fits.

  fixed = arguments + outputs - donated (params, optimizer state: not per pair); the temporaries
  are taken as proportional to the batch.
  """
  fixed = need["argument"] + need["output"] - need["alias"]
  per_pair = need["temp"] / b
  b //= 2
  while b >= 1 and fixed + per_pair * b > FIT_FRACTION * limit:
    b //= 2
  return b


def device_facts() -> dict:
  import jax
  dev = jax.devices()[0]
  limit, _ = device_memory()
  return {"device_kind": dev.device_kind, "platform": dev.platform,
          "devices": jax.device_count(), "jax": jax.__version__,
          "bytes_limit_gib": gib(limit),
          # gpu_check.sh's persistent cache, as this process took it from the environment.
          "compilation_cache": {
              "dir": jax.config.jax_compilation_cache_dir,
              "min_compile_time_s": jax.config.jax_persistent_cache_min_compile_time_secs,
              "min_entry_size_bytes": jax.config.jax_persistent_cache_min_entry_size_bytes}}


def param_count(tree) -> int:
  import jax
  import numpy as np
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@contextlib.contextmanager
def observe_attention(calls: list):
  """Appends (q_shape, k_shape, dtype, impl) of each choose_implementation call this thread
  makes (a thread initialising the model meanwhile is not recorded)."""
  import jax.numpy as jnp
  from ppd_jax.models import attention_kernels
  original = attention_kernels.choose_implementation
  me = threading.get_ident()

  def spy(backend, q_shape, k_shape, dtype, **kw):
    impl = original(backend, q_shape, k_shape, dtype, **kw)
    if threading.get_ident() == me:
      calls.append((tuple(q_shape), tuple(k_shape), jnp.dtype(dtype).name, impl))
    return impl

  attention_kernels.choose_implementation = spy
  try:
    yield calls
  finally:
    attention_kernels.choose_implementation = original


def attention_calls(c, unet_batch: int) -> list:
  """Every attention call of one forward of c's denoiser at the step's shapes, in call order."""
  import jax
  import jax.numpy as jnp
  from ppd_jax import backbones
  from ppd_jax.diffusion import schedules
  from ppd_jax.models import build_model, init_params
  model = build_model(c.model)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  shapes = batch_shapes(c, unet_batch)
  sds = lambda s, d=jnp.float32: jax.ShapeDtypeStruct(s, d)
  text = {k: sds(shapes[k]) for k in backbones.TEXT_KEYS if k in shapes}
  schedule = schedules.schedule_from_config(c.diffusion)
  t = jax.eval_shape(lambda k: schedule.draw_t(k, unet_batch), jax.random.key(0))

  def forward(p, x, t, text, u):
    ctx, added = backbones.unet_conditioning(text)
    return model.apply({"params": p}, x, t, ctx, u, 1.0, added)

  calls = []
  with observe_attention(calls):
    jax.eval_shape(forward, params, sds(shapes["preferred"]), t, text,
                   sds(shapes["user_embedding"]))
  return calls


def attention_rows(c, calls: list, ordered: bool = False) -> dict:
  """The calls as rows: one per distinct shape with its count, or (ordered) one per call."""
  m = c.model
  k_user = m.user_tokens_per_embedding if m.user_tokens == 1 else m.user_tokens

  def row(q, k, dtype, impl):
    kind = "self" if k[1] == q[1] else ("user" if k[1] == k_user else "text")
    return {"kind": kind, "q_len": q[1], "k_len": k[1], "heads": q[2], "head_dim": q[3],
            "dtype": dtype, "impl": impl}

  if ordered:
    layers = [{"call": i, **row(*call)} for i, call in enumerate(calls)]
  else:
    counts = {}
    for call in calls:
      key = tuple(row(*call).items())
      counts[key] = counts.get(key, 0) + 1
    layers = [{**dict(key), "count": n} for key, n in sorted(counts.items())]
  return {"calls": len(calls), "implementations": sorted({call[-1] for call in calls}),
          "layers": layers}


class Trainer:
  """A config's model, optimizer, mesh and jitted step, built as ppd_jax/train.py does; the state
  starts as shapes (enough to lower the step) until init() makes the arrays."""

  def __init__(self, c):
    import jax
    from ppd_jax import state as state_lib
    from ppd_jax import sharding as shd
    from ppd_jax import step as step_lib
    from ppd_jax.diffusion import schedules
    from ppd_jax.models import build_model
    self.c = c
    self.model = build_model(c.model)
    self.tx, self.lr = step_lib.make_optimizer(c)
    self.mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp)
    self.schedule = schedules.schedule_from_config(c.diffusion)
    st_sh, base_sh = state_lib.state_shardings(self.model, self.tx, self.mesh)
    self.step = step_lib.make_train_step(self.model, self.schedule, c, self.tx, self.lr,
                                         self.mesh, st_sh, base_sh)
    self.key = jax.random.key(c.seed)
    self.state, self.base = self._abstract_state()
    self.init_s = None

  def _abstract_state(self):
    """(TrainState, base) of ShapeDtypeStructs as create_train_state would make them.

    create_train_state itself cannot run under jax.eval_shape on a CPU (its init jit carries
    compiler_options, which only a top-level jit may), so the same pieces are put together
    here: the base in its frozen storage dtype, the optimizer state of the user params, and
    every other TrainState field (the counters) a scalar int32. The step's jit carries its own
    in_shardings, so these lower to the same program as the arrays.
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

  def make_arrays(self):
    """(state, base) as arrays on the device (create_train_state); safe to run in a thread."""
    import jax
    from ppd_jax import state as state_lib
    start = time.perf_counter()
    state, base, _, _ = state_lib.create_train_state(self.model, self.tx, self.mesh, self.c.seed)
    jax.block_until_ready((state, base))
    return state, base, time.perf_counter() - start

  def reinit(self):
    """A fresh state after a failed run (its donated buffers may be gone); old arrays first."""
    import gc
    self.state, self.base = self._abstract_state()
    gc.collect()
    self.state, self.base, _ = self.make_arrays()

  def lower(self, b: int):
    return self.step.lower(self.state, self.base, abstract_batch(self.c, b, self.mesh), self.key)

  def time_steps(self, compiled, batch, steps: int, warmup: int, clock=None,
                 reserve_s: float = 0.0) -> dict:
    """Warm-up then timed steps (each synchronised), as many as the clock allows less
    reserve_s (at least one); the first step's loss is recorded."""
    import jax
    start = time.perf_counter()
    self.state, metrics = compiled(self.state, self.base, batch, self.key)
    first_loss = float(metrics["loss"])
    first_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
      self.state, metrics = compiled(self.state, self.base, batch, self.key)
    jax.block_until_ready(self.state)
    if clock is not None:
      steps = max(1, min(steps, int((clock.left() - reserve_s - 5) / max(first_s, 1e-3))))
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
  """pairs/s, and TFLOP/s and MFU where there is a FLOP count (and a peak for the device)."""
  import jax
  from ppd_jax import throughput
  out = {"pairs_per_s": pairs / median_s, "step_ms_median": median_s * 1e3}
  if flops:
    dev = jax.devices()[0]
    tp = throughput.Throughput(flops, jax.device_count(), dev.device_kind)(1.0 / median_s)
    out.update(flops_per_step=flops, tflops_per_device=tp["tflops_per_device"],
               mfu=tp.get("mfu"), peak_tflops=throughput.peak_tflops(dev.device_kind))
  return out


def count_flops(fn, out: dict, key: str) -> float | None:
  """fn() -> FLOPs, timed into out[key + "_s"]; None with out["flops_error"] when it fails or
  counts nothing: a missing count must not throw away the timing it annotates."""
  start = time.perf_counter()
  try:
    flops = fn()
  except Exception as err:  # pylint: disable=broad-except
    out["flops_error"] = f"{type(err).__name__}: {err}"[:500]
    return None
  finally:
    out[key + "_s"] = time.perf_counter() - start
  if not flops:
    out["flops_error"] = f"the FLOP count gave {flops!r}"
    return None
  return float(flops)


def step_flops(c, b: int) -> float | None:
  """Model FLOPs of one step at b pairs: throughput.step_flops (from the jaxpr, any backend)."""
  import jax
  from ppd_jax import throughput
  return throughput.step_flops(c, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                   for k, v in abstract_batch(c, b).items()})


# Pieces -------------------------------------------------------------------------------------------

def piece_attention(opts, clock) -> dict:
  """Traces each UNet's forward at its training shapes and records what "auto" chose per call."""
  del clock
  from ppd_jax.models import attention_kernels
  backend, cc, cudnn = attention_kernels._device_facts()  # pylint: disable=protected-access
  out = {"piece": "attention", "backend": backend, "compute_capability": cc,
         "cudnn_version": cudnn, "tiny": opts.tiny}
  for variant, pairs in (("sd15", opts.pairs or (4 if opts.tiny else 16)), ("sdxl", 8)):
    c = make_config(variant, opts, pairs)
    b = 2 * pairs                     # the step's UNet batch: both images of every pair
    out[variant] = {"unet_batch": b, **attention_rows(c, attention_calls(c, b))}
  return out


def train_piece(opts, clock, name: str, variant: str, batch: int, remat: bool | None = None,
                halve: bool = False, attention_layers: bool = False) -> dict:
  """One variant's train step: partial line after compile, then pairs/s and MFU (module doc).

  halve: probe-and-halve the batch (memory_analysis over the limit, or RESOURCE_EXHAUSTED).
  attention_layers: also record the kernel "auto" picks for each attention call, in order.
  """
  c = make_config(variant, opts, batch, remat)
  out = {"piece": name, "tiny": opts.tiny, "dry": opts.dry, "start_batch": batch,
         **model_facts(c), **device_facts()}
  problem = config_problem(c)
  if problem:
    out["config_warning"] = problem
  tr = Trainer(c)
  out["user_params"] = param_count(tr.state.user_params)
  out["base_params"] = param_count(tr.base)
  limit, limit_from = memory_limit(opts)
  out.update(memory_limit_gib=gib(limit), memory_limit_from=limit_from)
  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    arrays = None if opts.dry else pool.submit(tr.make_arrays)   # device init beside the trace
    if attention_layers:
      start = time.perf_counter()
      out["attention"] = attention_rows(c, attention_calls(c, 2 * batch), ordered=True)
      out["attention_trace_s"] = time.perf_counter() - start
    b, attempts = batch, []
    while True:
      start = time.perf_counter()
      lowered = tr.lower(b)
      out["lower_s"] = time.perf_counter() - start
      if opts.dry:
        out["pairs"] = b
        out["flops_per_step"] = count_flops(lambda: step_flops(c, b), out, "flops")
        return out
      start = time.perf_counter()
      try:
        compiled = lowered.compile()
      except Exception as err:  # pylint: disable=broad-except
        if not (halve and is_oom(err) and b > 1):
          raise
        attempts.append({"batch": b, "error": "RESOURCE_EXHAUSTED at compile"})
        b //= 2
        continue
      del lowered
      need = memory_need(compiled)
      out.update(pairs=b, compile_s=time.perf_counter() - start,
                 memory_gib={k: gib(v) for k, v in (need or {}).items()})
      attempts.append({"batch": b, "compile_s": out["compile_s"],
                       "need_gib": gib(need["total"]) if need else None})
      emit({**out, "attempts": attempts, "partial": "compiled"})
      if halve and need and limit and need["total"] > FIT_FRACTION * limit:
        b = halved_batch(b, need, limit)
        if b < 1:
          raise RuntimeError(f"not even one pair fits {gib(limit):.1f} GiB: {attempts}")
        del compiled
        continue
      if arrays is not None:
        tr.state, tr.base, out["init_s"] = arrays.result()
        arrays = None
      try:
        batch_arrays = random_batch(c, b, tr.mesh, opts.seed)
        # Left for the FLOP count after the timing: about what tracing the step took.
        timing = tr.time_steps(compiled, batch_arrays, opts.steps or (2 if opts.tiny else 10),
                               warmup=1 if opts.tiny else 2, clock=clock,
                               reserve_s=out["lower_s"])
        break
      except Exception as err:  # pylint: disable=broad-except
        if not (halve and is_oom(err) and b > 1):
          raise
        attempts.append({"batch": b, "error": "RESOURCE_EXHAUSTED at run"})
        batch_arrays = compiled = None
        tr.reinit()             # donated buffers may be gone
        b //= 2
    out["attempts"] = attempts
    out["peak_memory_gib"] = gib(device_memory()[1])
    out.update(timing)
    flops = count_flops(lambda: step_flops(c, b), out, "flops")
    out.update(throughput_facts(flops, timing["median_s"], b))
    return out
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def piece_sd15_train(opts, clock) -> dict:
  return train_piece(opts, clock, "sd15_train", "sd15", opts.pairs or (4 if opts.tiny else 16))


def piece_sd15_train_noremat(opts, clock) -> dict:
  return train_piece(opts, clock, "sd15_train_noremat", "sd15",
                     opts.pairs or (4 if opts.tiny else 16), remat=False)


def piece_cascade_lite_train(opts, clock) -> dict:
  return train_piece(opts, clock, "cascade_lite_train", "cascade_lite",
                     opts.cascade_batch or (4 if opts.tiny else 16), halve=True,
                     attention_layers=True)


def piece_sdxl_train(opts, clock) -> dict:
  return train_piece(opts, clock, "sdxl_train", "sdxl",
                     opts.sdxl_batch or (2 if opts.tiny else 4), halve=True)


def piece_sample(opts, clock) -> dict:
  import jax
  import numpy as np
  from ppd_jax import flop_count
  from ppd_jax import throughput
  from ppd_jax.diffusion import generation
  from ppd_jax.models import build_model, init_params, merge_params
  n = opts.sample_images or (2 if opts.tiny else 8)
  num_steps = opts.sample_steps or (3 if opts.tiny else 50)
  c = make_config("sd15", opts, opts.pairs or 16)
  out = {"piece": "sample", "tiny": opts.tiny, "dry": opts.dry, "images": n,
         "sampler": "ddim", "num_steps": num_steps, "guidance_scale": 7.5,
         "vae_decode": "not included", **model_facts(c), **device_facts()}
  # The same init program as sd15_train's: a persistent-cache hit when that piece ran first.
  tr = Trainer(c)
  if not opts.dry:
    tr.state, tr.base, out["init_s"] = tr.make_arrays()
  params = merge_params(tr.base, tr.state.user_params)
  m = c.model
  rng = np.random.default_rng(opts.seed)
  text = rng.standard_normal((n, c.data.text_length, m.cross_attention_dim), dtype=np.float32)
  null_text = np.zeros((1,) + text.shape[1:], np.float32)
  user = rng.standard_normal((n, m.user_tokens, m.user_embed_dim), dtype=np.float32)
  noise = generation.initial_noise(opts.seed, n, m)

  def forward_flops():
    """One guided step: the UNet at 2n (cond + uncond), counted from its jaxpr, plain attention."""
    plain = build_model({**m.to_dict(), "attention_impl": "xla", "remat": False})
    shapes = jax.eval_shape(lambda: init_params(plain, jax.random.key(0)))
    sds = jax.ShapeDtypeStruct
    jaxpr = jax.make_jaxpr(lambda p, x, t, ctx, u: plain.apply({"params": p}, x, t, ctx, u, 1.0))(
        shapes, sds((2 * n,) + noise.shape[1:], np.float32), sds((2 * n,), np.float32),
        sds((2 * n,) + text.shape[1:], np.float32), sds((2 * n,) + user.shape[1:], np.float32))
    return flop_count.jaxpr_flops(jaxpr)

  if opts.dry:
    lowered = generation._generate.lower(  # pylint: disable=protected-access
        tr.model, tr.schedule, params, noise, {"text_embedding": text},
        {"text_embedding": np.broadcast_to(null_text, text.shape)}, user, np.float32(1.0),
        np.float32(7.5), jax.random.key(0), num_steps=num_steps, eta=0.0, clip_sample=False,
        sampler="ddim", cfg=True)
    out["lowered"] = bool(lowered)
    out["flops_per_guided_step"] = count_flops(forward_flops, out, "flops")
    return out

  def run():
    return generation.sample_images(tr.model, tr.schedule, params, text, null_text, noise, user,
                                    guidance_scale=7.5, num_steps=num_steps, sampler="ddim",
                                    batch_size=n)

  start = time.perf_counter()
  first = run()                          # compiles (lax.scan over the steps) and runs once
  out["first_call_s"] = time.perf_counter() - start
  out["finite"] = bool(np.isfinite(first).all())
  times = []
  for _ in range(1 if opts.tiny else 3):
    if times and clock.left() < 2 * times[-1] + 15:
      break
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  out.update(images_per_s=n / median, call_s_median=median, call_s=times,
             unet_evals_per_s=2 * n * num_steps / median)
  out["peak_memory_gib"] = gib(device_memory()[1])
  f = count_flops(forward_flops, out, "flops")     # after the timing: it competes with nothing
  if f:
    kind = jax.devices()[0].device_kind
    tflops = f * num_steps / median / jax.device_count() / 1e12
    peak = throughput.peak_tflops(kind)
    out.update(flops_per_guided_step=f, tflops_per_device=tflops,
               mfu=tflops / peak if peak else None)
  return out


RUNNERS = {"sd15_train": piece_sd15_train, "sd15_train_noremat": piece_sd15_train_noremat,
           "cascade_lite_train": piece_cascade_lite_train, "sdxl_train": piece_sdxl_train,
           "sample": piece_sample, "attention": piece_attention}


def main(argv=None):
  opts = parse_args(argv)
  clock = Clock(opts.budget_s)
  names = [p for p in opts.pieces.split(",") if p]
  unknown = set(names) - set(PIECES)
  if unknown:
    raise SystemExit(f"jax_gpu_check.py: unknown --pieces {sorted(unknown)}; choose from {PIECES}")
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
