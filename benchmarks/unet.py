"""UNet throughput, ours (Flax PersonalizedUNet) against diffusers' PyTorch UNet2DConditionModel.

  python benchmarks/unet.py [--size=sd15|sd21|sdxl|small] [--batch=8] [--dtype=bfloat16]
  python benchmarks/unet.py --size=small --batch=1 --steps=2     # a CPU smoke run

Both sides get the same architecture (configs/sd_architectures.py; "small" is SD 1.5's layout at
block_out_channels (64, 128, 256, 256), for CPU), the same random weights (diffusers' init,
converted by ppd_jax.weights.convert) and the same user branch: ours as the PersonalizedUNet user
params, theirs as the IP-Adapter ("Full" projection) that ppd_jax.weights.export writes, loaded
with `unet._load_ip_adapter_weights` (what `pipe.load_ip_adapter` calls), at scale 1. Inputs:
random latents [B, r, r, 4], timesteps, 77 text tokens, user embeddings [B, tokens, dim] (theirs
as ip_adapter image_embeds [B, 1, tokens, dim]); SDXL also gets text_embeds and time_ids.

Two measurements, each printed as images/s and as the ratio ours / diffusers (> 1: ours faster):
  forward           ours: the jitted apply with the user branch on. diffusers: unet(...) under
                    torch.no_grad.
  forward+backward  loss = mean(output ** 2); gradient w.r.t. the user branch only. ours: jax.grad
                    over the user params, the base params a non-differentiated argument.
                    diffusers: requires_grad only on the IP-Adapter parameters (image projection,
                    to_k_ip, to_v_ip), torch.autograd.grad of the same loss.
Before timing, the two forward outputs are compared (max |ours - theirs| / max |theirs|; ~1e-5 in
float32 on CPU) and a mismatch stops the run: the ratios then compare the same computation.

Timing: the first call (XLA compile; torch's first-call set-up, cuDNN autotuning) is the warm-up,
printed apart; then --steps calls, synchronized at the end (jax.block_until_ready,
torch.cuda.synchronize). Peak memory: on GPU, torch.cuda.max_memory_allocated (reset before each
measurement) and jax's peak_bytes_in_use (a process-wide high-water mark, so the forward+backward
figure is the larger of the two); on CPU n/a. diffusers runs first and releases its GPU memory
before ours starts; XLA_PYTHON_CLIENT_PREALLOCATE is set to false so that JAX does not take 75% of
the GPU before torch runs.

dtype:
  float32   both sides compute in float32. On GPU, XLA's default precision lets matmuls and
            convolutions use TF32; --tf32 (default on) allows the same in torch.
  bfloat16  ours: compute in bfloat16, params float32 (UNetConfig.dtype). diffusers, by
            --torch_bf16: "autocast" (default) keeps float32 weights and runs the forward under
            torch.autocast(bfloat16), the same float32-params/bf16-compute set-up as ours;
            "weights" casts the whole UNet, IP-Adapter included, to bfloat16 (pure bf16, the usual
            inference set-up; then the trained params are bf16 too).
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory to torch

import gc  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from configs import sd_architectures  # pylint: disable=wrong-import-position
from ppd_jax import models  # pylint: disable=wrong-import-position
from ppd_jax.models import unet as unet_lib  # pylint: disable=wrong-import-position
from ppd_jax.weights import convert  # pylint: disable=wrong-import-position
from ppd_jax.weights import export  # pylint: disable=wrong-import-position

SIZES = ("sd15", "sd21", "sdxl", "small")
TEXT_TOKENS = 77

flags.DEFINE_enum("size", "small", SIZES,
                  "UNet architecture; small = SD 1.5 at block_out_channels (64, 128, 256, 256)")
flags.DEFINE_integer("batch", None, "images per call (default 8 on GPU, 2 on CPU)")
flags.DEFINE_integer("resolution", None,
                     "latent side (default the config's sample_size: sd15 64, sd21 96, sdxl 128, "
                     "small 32)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (see the docstring)")
flags.DEFINE_enum("torch_bf16", "autocast", ["autocast", "weights"],
                  "with --dtype=bfloat16: torch autocast over float32 weights, or bfloat16 weights")
flags.DEFINE_integer("steps", None, "timed calls per measurement (default 20 on GPU, 5 on CPU)")
flags.DEFINE_integer("user_embed_dim", 3584, "user embedding width")
flags.DEFINE_integer("user_tokens", 1, "user tokens per example")
flags.DEFINE_enum("attention_impl", None, ["auto", "xla", "direct", "chunked", "cudnn", "tpu_flash"],
                  "ours: attention kernel, models/attention_kernels.py (default: auto)")
flags.DEFINE_bool("tf32", True, "torch on GPU, float32: allow TF32 matmuls/convs as XLA does")
flags.DEFINE_bool("skip_torch", False, "time ours only (no diffusers run, no output check)")
flags.DEFINE_integer("seed", 0, "weights and inputs")
FLAGS = flags.FLAGS


# Set-up -------------------------------------------------------------------------------------------

def unet_config_dict(size: str) -> dict:
  """diffusers' UNet config for --size."""
  if size == "small":
    return {**sd_architectures.SD15["unet"], "block_out_channels": [64, 128, 256, 256],
            "sample_size": 32}
  return dict(sd_architectures.ARCHITECTURES[size]["unet"])


def random_user_params(user_shapes, seed: int) -> dict:
  """Every user leaf non-zero (to_v_user starts at zero in training), kernels ~ 1/sqrt(fan_in)."""
  rng = np.random.RandomState(seed)

  def leaf(path, shape):
    name = path[-1].key
    if name == "kernel":
      return (rng.randn(*shape.shape) / np.sqrt(shape.shape[0])).astype(np.float32)
    if name == "scale":
      return (1.0 + 0.1 * rng.randn(*shape.shape)).astype(np.float32)
    return (0.1 * rng.randn(*shape.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, user_shapes)


def make_inputs(cfg: unet_lib.UNetConfig, batch: int, side: int, seed: int) -> dict:
  """Host numpy inputs, ours' layouts (NHWC)."""
  rng = np.random.RandomState(seed + 1)
  out = dict(x=rng.randn(batch, side, side, cfg.in_channels).astype(np.float32),
             t=rng.randint(0, 1000, size=batch).astype(np.int32),
             text=rng.randn(batch, TEXT_TOKENS, cfg.cross_attention_dim).astype(np.float32),
             user=rng.randn(batch, cfg.user_tokens, cfg.user_embed_dim).astype(np.float32),
             added=None)
  if cfg.addition_embed_type == "text_time":
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    out["added"] = {"text_embeds": rng.randn(batch, pooled).astype(np.float32),
                    "time_ids": np.tile(np.array([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side,
                                                   8.0 * side]], np.float32), (batch, 1))}
  return out


# Timing -------------------------------------------------------------------------------------------

def _time(fn, steps: int, sync):
  """(seconds per call over `steps` calls, warm-up seconds, the warm-up call's result)."""
  start = time.perf_counter()
  first = fn()
  sync(first)
  warm = time.perf_counter() - start
  start = time.perf_counter()
  out = first
  for _ in range(steps):
    out = fn()
  sync(out)
  return (time.perf_counter() - start) / steps, warm, first


def _gib(n) -> str:
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


# diffusers ----------------------------------------------------------------------------------------

def diffusers_unet_with_adapter(unet_cfg: dict, torch_sd, ip_sd):
  """diffusers' UNet (torch state dict) with our exported user branch as its IP-Adapter."""
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  unet = diffusers.UNet2DConditionModel(**unet_cfg)
  unet.load_state_dict(torch_sd)
  unet._load_ip_adapter_weights(   # pylint: disable=protected-access
      [{"image_proj": {k.removeprefix("image_proj."): torch.from_numpy(v)
                       for k, v in ip_sd.items() if k.startswith("image_proj.")},
        "ip_adapter": {k.removeprefix("ip_adapter."): torch.from_numpy(v)
                       for k, v in ip_sd.items() if k.startswith("ip_adapter.")}}],
      low_cpu_mem_usage=False)
  return unet


def run_torch(unet_cfg: dict, torch_sd, ip_sd, cfg, inputs, steps: int, dtype: str):
  """Times diffusers' UNet. Returns (results, forward output NHWC float32, device name)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda:
    torch.set_flush_denormal(True)   # XLA's CPU runtime flushes denormals to zero too
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = FLAGS.tf32
    torch.backends.cudnn.allow_tf32 = FLAGS.tf32
    torch.backends.cudnn.benchmark = True   # autotuned convolutions, as XLA's
  unet = diffusers_unet_with_adapter(unet_cfg, torch_sd, ip_sd)
  unet.eval().requires_grad_(False)
  bf16_weights = dtype == "bfloat16" and FLAGS.torch_bf16 == "weights"
  unet.to(device=device, dtype=torch.bfloat16 if bf16_weights else torch.float32)
  user_params = [p for n, p in unet.named_parameters()
                 if n.startswith("encoder_hid_proj.") or ".to_k_ip." in n or ".to_v_ip." in n]
  n_expected = (sum(k.startswith("image_proj.") for k in ip_sd)          # the projector's own
                + 2 * len(export.cross_attention_layers(cfg)))          # to_k_ip, to_v_ip
  assert len(user_params) == n_expected, (len(user_params), n_expected)
  for p in user_params:
    p.requires_grad_(True)

  in_dtype = torch.bfloat16 if bf16_weights else torch.float32
  as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
  x = as_t(inputs["x"].transpose(0, 3, 1, 2)).to(in_dtype)
  t = as_t(inputs["t"].astype(np.int64))
  text = as_t(inputs["text"]).to(in_dtype)
  added = {"image_embeds": [as_t(inputs["user"][:, None]).to(in_dtype)]}
  if inputs["added"] is not None:
    added.update({k: as_t(v).to(in_dtype) for k, v in inputs["added"].items()})
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
              if dtype == "bfloat16" and not bf16_weights else contextlib.nullcontext())

  def call():
    with autocast:
      return unet(x, t, text, added_cond_kwargs=added).sample

  def forward():
    with torch.no_grad():
      return call()

  def forward_backward():
    loss = call().float().square().mean()
    return torch.autograd.grad(loss, user_params)

  def sync(_):
    if cuda:
      torch.cuda.synchronize()

  results = {}
  out = None
  for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    per_call, warm, first = _time(fn, steps, sync)
    if name == "forward":
      out = first.float().cpu().numpy().transpose(0, 2, 3, 1)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    results[name] = dict(per_call=per_call, warm=warm, peak=peak)
    del first
  name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
  return results, out, f"torch {torch.__version__} on {name}"


# Ours ---------------------------------------------------------------------------------------------

def run_ours(model, base, user, inputs, steps: int):
  """Times our PersonalizedUNet. Returns (results, forward output NHWC float32)."""
  dev = jax.devices()[0]
  base, user = jax.device_put((base, user))
  x, t, text, u, added = jax.device_put(
      (inputs["x"], inputs["t"], inputs["text"], inputs["user"], inputs["added"]))

  @jax.jit
  def forward(base, user, x, t, text, u, added):
    return model.apply({"params": models.merge_params(base, user)}, x, t, text, u, 1.0, added)

  def loss(user, base, x, t, text, u, added):
    return jnp.mean(jnp.square(forward(base, user, x, t, text, u, added).astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss))   # w.r.t. the user params only

  def peak():
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    return (stats or {}).get("peak_bytes_in_use")

  results = {}
  out = None
  for name, fn in (("forward", lambda: forward(base, user, x, t, text, u, added)),
                   ("forward+backward", lambda: grad(user, base, x, t, text, u, added))):
    per_call, warm, first = _time(fn, steps, jax.block_until_ready)
    if name == "forward":
      out = np.asarray(first, np.float32)
    results[name] = dict(per_call=per_call, warm=warm, peak=peak())
  return results, out


# Main ---------------------------------------------------------------------------------------------

# XLA:CPU (jaxlib 0.10.2) aborts compiling the bfloat16 UNet with its default YNNPACK fusions
# ("ynn_emitter.cc: Check failed: ... (reshape vs. bitcast)" in a "dot" fusion), and with none
# fails the backward ("Dot with multiple contracting dimensions is not implemented"); single dots
# and convolutions alone compile and run. Only set for bfloat16 without a CUDA plugin, and never
# over a value the caller set.
_CPU_BF16_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"


def _cpu_bf16_workaround():
  import importlib.util  # pylint: disable=import-outside-toplevel
  if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    return
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "ynn_fusion_type" not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} {_CPU_BF16_XLA_FLAG}".strip()
    print(f"bfloat16 on XLA:CPU: XLA_FLAGS += {_CPU_BF16_XLA_FLAG}")


def main(_):
  if FLAGS.dtype == "bfloat16":
    _cpu_bf16_workaround()   # before the first jax call creates the backend
  gpu = jax.default_backend() == "gpu"
  batch = FLAGS.batch or (8 if gpu else 2)
  steps = FLAGS.steps or (20 if gpu else 5)
  unet_cfg = unet_config_dict(FLAGS.size)
  side = FLAGS.resolution or unet_cfg["sample_size"]
  cfg = unet_lib.config_from_diffusers(
      unet_cfg, user_embed_dim=FLAGS.user_embed_dim, user_tokens=FLAGS.user_tokens,
      dtype=jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32,
      attention_impl=FLAGS.attention_impl, remat=False)
  model = models.PersonalizedUNet(cfg)
  base_shapes, user_shapes = models.split_params(
      jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))

  # The same weights on both sides: diffusers' init, converted to our tree.
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  diffusers.utils.logging.set_verbosity_error()   # its warning about .to(dtype) on an init model
  torch.manual_seed(FLAGS.seed)
  with torch.no_grad():
    torch_sd = {k: v.numpy() for k, v in
                diffusers.UNet2DConditionModel(**unet_cfg).state_dict().items()}
  base = convert.to_flax({"unet." + k: v for k, v in torch_sd.items()}, base_shapes,
                         what=f"diffusers UNet ({FLAGS.size})")
  user = random_user_params(user_shapes, FLAGS.seed)
  ip_sd = export.ip_adapter_state_dict(user, cfg)
  inputs = make_inputs(cfg, batch, side, FLAGS.seed)

  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  print(f"unet {FLAGS.size}: {count(base) / 1e6:.1f}M base params, {count(user) / 1e6:.1f}M user "
        f"params ({len(export.cross_attention_layers(cfg))} cross-attentions); batch {batch} @ "
        f"{side}x{side} latents, dtype {FLAGS.dtype}"
        + (f" (torch: {FLAGS.torch_bf16})" if FLAGS.dtype == "bfloat16" else "")
        + f", user {FLAGS.user_tokens}x{FLAGS.user_embed_dim}, {steps} timed steps", flush=True)

  theirs, theirs_out, torch_device = None, None, None
  if not FLAGS.skip_torch:
    theirs, theirs_out, torch_device = run_torch(
        unet_cfg, {k: torch.from_numpy(v) for k, v in torch_sd.items()}, ip_sd, cfg, inputs,
        steps, FLAGS.dtype)
  del torch_sd
  if torch.cuda.is_available():
    gc.collect()
    torch.cuda.empty_cache()   # diffusers' UNet is gone: give its GPU memory back for JAX
  ours, ours_out = run_ours(model, base, user, inputs, steps)

  dev = jax.devices()[0]
  print(f"ours: jax {jax.__version__} on {dev.device_kind} ({dev.platform}), attention_impl "
        f"{FLAGS.attention_impl}")
  if torch_device:
    print(f"diffusers {diffusers.__version__}: {torch_device}")
  if not gpu:
    load = os.getloadavg()[0]
    print(f"cpu: {os.cpu_count()} cores, load average {load:.1f} (other work on these "
          "cores slows torch's threads most)")
  if theirs_out is not None:
    err = float(np.abs(ours_out - theirs_out).max())
    scale = float(np.abs(theirs_out).max())
    tol = 1e-4 if FLAGS.dtype == "float32" and not (gpu and FLAGS.tf32) else 5e-2
    if FLAGS.dtype == "bfloat16":
      tol = 1e-1
    print(f"forward outputs agree: max |ours - diffusers| = {err:.3g}, output scale {scale:.3g}, "
          f"relative {err / scale:.2e} (tolerance {tol:g})")
    if not err <= tol * scale:
      raise SystemExit(f"forward outputs differ: relative {err / scale:.3g} > {tol:g}; the two "
                       "sides do not compute the same thing, so their timings do not compare")

  for name in ("forward", "forward+backward"):
    o = ours[name]
    line = (f"{name:<16} batch {batch} @ {side}x{side} latents: ours {batch / o['per_call']:.3g} "
            f"img/s")
    detail = (f"  ours: {o['per_call'] * 1e3:.1f} ms/call, warm-up {o['warm']:.1f} s, peak "
              f"{_gib(o['peak'])}")
    if theirs:
      th = theirs[name]
      line += (f", diffusers {batch / th['per_call']:.3g} img/s, ratio "
               f"{th['per_call'] / o['per_call']:.2f}x")
      detail += (f"; diffusers: {th['per_call'] * 1e3:.1f} ms/call, warm-up {th['warm']:.1f} s, "
                 f"peak {_gib(th['peak'])}")
    print(detail)
    print(line)


if __name__ == "__main__":
  app.run(main)
