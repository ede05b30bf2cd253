"""The PPD train step written the PyTorch way: diffusers' UNet + IP-Adapter, one Diffusion-DPO step.

  python benchmarks/torch_train_step.py            # GPU: SD 1.5 UNet, bf16, 64x64, 16 pairs
  python benchmarks/torch_train_step.py --tiny     # CPU smoke run: tiny UNet, fp32, 8x8
  python benchmarks/torch_train_step.py --dry      # full size on the meta device: shapes only

Why this script: benchmarks/gpu_check.sh puts our jitted step (benchmarks/jax_gpu_check.py) next
to what a PyTorch user would write for the same training, so docs/performance.md can say how the two
compare on one GPU. "The PyTorch way" here means what diffusers' own training examples do:

  * UNet2DConditionModel with the published SD 1.5 config (configs/sd_architectures.py), random
    weights, frozen (requires_grad False), stored in bf16 (`unet.to(weight_dtype)`);
  * IP-Adapter attention processors (IPAdapterAttnProcessor2_0, num_tokens 4, scale 1) on every
    cross-attention, their to_k_ip / to_v_ip trainable in fp32, and diffusers' ImageProjection
    (Linear(E -> 4 x 768) + LayerNorm, E = 3584) as the projector: the same user branch as ours
    (models/user_projector.py SingleTokenUserProjector, models/attention.py);
  * the forward under torch.autocast(bf16), as accelerate's mixed_precision="bf16" does; SDPA
    attention (AttnProcessor2_0 -> F.scaled_dot_product_attention, flash where it applies);
  * the Diffusion-DPO step of diffusers' train_diffusion_dpo.py: one t and one noise per pair,
    reference with the adapter off (scale 0) under no_grad, policy with it on,
    z = -beta/2 [(e_w - e_ref_w) - (e_l - e_ref_l)], loss = -logsigmoid(z), backward, global-norm
    clip 1.0 (ours clips too), fused AdamW on the adapter parameters only.

Gradient checkpointing (unet.enable_gradient_checkpointing(), off by default in diffusers) is
what our remat is: --gradient_checkpointing=on,off times both on one built model, one JSON line
each, piece torch_sd15_train (on: like for like with our sd15_train, remat on) and
torch_sd15_train_noremat (off: with our sd15_train_noremat). No torch.compile. to_v_ip starts at
zero, as ours does, so the first loss is log 2 on both sides.

Timing per setting: --warmup steps (cuDNN autotuning, allocator growth), then --steps steps, each
bracketed by torch.cuda.synchronize; the median is reported. Peak memory:
torch.cuda.max_memory_allocated over that setting's warm-up and timed steps.
"""
import argparse
import contextlib
import json
import math
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # configs/

import torch  # pylint: disable=wrong-import-position
import torch.nn.functional as F  # pylint: disable=wrong-import-position

from configs import sd_architectures  # pylint: disable=wrong-import-position

PIECE = "torch_sd15_train"          # + "_noremat" without gradient checkpointing
NUM_TOKENS = 4          # IP-Adapter tokens per user embedding (our user_tokens_per_embedding)
BETA = 5000.0           # configs/ppd.py's SD beta; the value changes no timing

# Tiny mode: SD 1.5's layout shrunk so that a step takes a fraction of a second on a CPU.
TINY_UNET = {**sd_architectures.SD15["unet"], "sample_size": 8, "block_out_channels": [32, 64],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8}
TINY_USER_DIM = 64


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny UNet, fp32, 8x8 latents (CPU)")
  p.add_argument("--dry", action="store_true", help="full size on the meta device, no timing")
  p.add_argument("--pairs", type=int, default=None, help="preference pairs per step (16; tiny 4)")
  p.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny 3)")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; tiny 1)")
  p.add_argument("--user_embed_dim", type=int, default=None, help="E (3584; tiny 64)")
  p.add_argument("--gradient_checkpointing", default="off",
                 help="on, off, or a comma list timed in that order (on,off) on one model")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=None,
                 help="CPU intra-op threads (default: torch's; 1 with --tiny, a smoke run)")
  p.add_argument("--text_length", type=int, default=77, help="text tokens per caption")
  p.add_argument("--budget_s", type=float, default=1e9,
                 help="wall-clock seconds for the run: fewer timed steps if they would not fit")
  args = p.parse_args(argv)
  settings = [s.strip() for s in args.gradient_checkpointing.split(",") if s.strip()]
  if not settings or set(settings) - {"on", "off"}:
    p.error("--gradient_checkpointing takes on, off or on,off; got "
            f"{args.gradient_checkpointing!r}")
  args.checkpointing = [s == "on" for s in settings]
  return args


def piece_name(checkpointing: bool) -> str:
  return PIECE if checkpointing else PIECE + "_noremat"


def hidden_size(processor_name: str, channels: list[int]) -> int:
  """Channels at an attention processor, from its name (as diffusers' IP-Adapter loader does)."""
  if processor_name.startswith("mid_block"):
    return channels[-1]
  block = int(processor_name.split(".")[1])
  if processor_name.startswith("up_blocks"):
    return list(reversed(channels))[block]
  return channels[block]


def add_ip_adapter(unet, user_embed_dim: int, device, dtype=torch.float32) -> list:
  """IP-Adapter processors on every cross-attention plus the projector; returns their params.

  Mirrors what `unet._load_ip_adapter_weights` sets up (processors, encoder_hid_proj,
  encoder_hid_dim_type), without a weights file: the adapter is trained from its init.
  """
  from diffusers.models.attention_processor import (  # pylint: disable=import-outside-toplevel
      AttnProcessor2_0, IPAdapterAttnProcessor2_0)
  from diffusers.models.embeddings import (  # pylint: disable=import-outside-toplevel
      ImageProjection, MultiIPAdapterImageProjection)
  cross_dim = unet.config.cross_attention_dim
  channels = list(unet.config.block_out_channels)
  procs = {}
  for name in unet.attn_processors:
    if name.endswith("attn1.processor"):            # self-attention: plain SDPA
      procs[name] = AttnProcessor2_0()
      continue
    proc = IPAdapterAttnProcessor2_0(hidden_size=hidden_size(name, channels),
                                     cross_attention_dim=cross_dim, num_tokens=(NUM_TOKENS,),
                                     scale=1.0).to(device=device, dtype=dtype)
    with torch.no_grad():
      for layer in proc.to_v_ip:                    # zero value projection: policy == reference
        layer.weight.zero_()
    procs[name] = proc
  adapter_procs = [p for p in procs.values() if isinstance(p, torch.nn.Module)]
  unet.set_attn_processor(procs)     # (it empties the dict it is given)
  projector = ImageProjection(image_embed_dim=user_embed_dim, cross_attention_dim=cross_dim,
                              num_image_text_embeds=NUM_TOKENS).to(device=device, dtype=dtype)
  unet.encoder_hid_proj = MultiIPAdapterImageProjection([projector])
  unet.config.encoder_hid_dim_type = "ip_image_proj"
  params = list(unet.encoder_hid_proj.parameters())
  for proc in adapter_procs:
    params += list(proc.parameters())
  for p in params:
    p.requires_grad_(True)
  return params


def set_adapter_scale(unet, scale: float):
  """IPAdapterAttnProcessor2_0 skips the adapter's attention entirely at scale 0."""
  for proc in unet.attn_processors.values():
    if hasattr(proc, "to_k_ip"):
      proc.scale = [scale] * len(proc.scale)


def count(params) -> int:
  return sum(p.numel() for p in params)


def build(args, device):
  """(unet, adapter params, unet config, latent side, E, weight dtype)."""
  import diffusers  # pylint: disable=import-outside-toplevel
  diffusers.utils.logging.set_verbosity_error()
  cfg = TINY_UNET if args.tiny else dict(sd_architectures.SD15["unet"])
  user_dim = args.user_embed_dim or (TINY_USER_DIM if args.tiny else 3584)
  bf16 = device.type == "cuda" and not args.tiny
  weight_dtype = torch.bfloat16 if bf16 else torch.float32
  torch.manual_seed(args.seed)
  with torch.device(device):                         # random init where the model will live
    unet = diffusers.UNet2DConditionModel(**cfg)
  unet.requires_grad_(False)
  unet.to(dtype=weight_dtype)                        # frozen base in the compute dtype
  adapter = add_ip_adapter(unet, user_dim, device)   # trainable, float32 master weights
  unet.train()
  return unet, adapter, cfg, cfg["sample_size"], user_dim, weight_dtype


def make_step(unet, adapter, cfg, side, user_dim, weight_dtype, pairs, device,
              text_length: int = 77):
  """step() -> loss: one Diffusion-DPO step on fresh random data (drawn inside, as ours does)."""
  from diffusers import DDPMScheduler  # pylint: disable=import-outside-toplevel
  sched_cfg = sd_architectures.SD15["scheduler"]
  scheduler = DDPMScheduler(num_train_timesteps=sched_cfg["num_train_timesteps"],
                            beta_schedule=sched_cfg["beta_schedule"],
                            beta_start=sched_cfg["beta_start"], beta_end=sched_cfg["beta_end"])
  scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)   # add_noise moves it per call
  opt = torch.optim.AdamW(adapter, lr=1e-5, weight_decay=1e-2, fused=device.type == "cuda")
  gen = torch.Generator(device=device).manual_seed(1)
  c = cfg["in_channels"]
  # Fixed "dataset" tensors: the step itself draws t and noise, as a training step would.
  x_w = torch.randn(pairs, c, side, side, device=device, generator=gen)
  x_l = torch.randn(pairs, c, side, side, device=device, generator=gen)
  text = torch.randn(pairs, text_length, cfg["cross_attention_dim"], device=device,
                     generator=gen)
  user = torch.randn(pairs, 1, user_dim, device=device, generator=gen)
  x0 = torch.cat([x_w, x_l])
  text2 = torch.cat([text, text]).to(weight_dtype)
  added = {"image_embeds": [torch.cat([user, user])]}      # [2B, 1 image, E]
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
              if weight_dtype == torch.bfloat16 else contextlib.nullcontext())

  def unet_eps(x_t, t2):
    with autocast:
      return unet(x_t, t2, text2, added_cond_kwargs=added).sample

  def step():
    t = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), device=device,
                      generator=gen)
    noise = torch.randn(pairs, c, side, side, device=device, generator=gen)
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])    # shared per pair
    x_t = scheduler.add_noise(x0, noise2, t2)
    with torch.no_grad():
      set_adapter_scale(unet, 0.0)
      ref = unet_eps(x_t, t2)
      set_adapter_scale(unet, 1.0)
    pred = unet_eps(x_t, t2)
    err = (pred.float() - noise2).pow(2).mean(dim=(1, 2, 3))
    ref_err = (ref.float() - noise2).pow(2).mean(dim=(1, 2, 3))
    e_w, e_l = err.chunk(2)
    r_w, r_l = ref_err.chunk(2)
    z = -0.5 * BETA * ((e_w - r_w) - (e_l - r_l))
    loss = -F.logsigmoid(z).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(adapter, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  return step


def sdpa_flags() -> dict:
  b = torch.backends.cuda
  return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
          "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: None)(), "math": b.math_sdp_enabled()}


def dry_run(args) -> dict:
  """Full-size model on the meta device: the adapter wiring and one step's shapes, no numbers."""
  device = torch.device("meta")
  unet, adapter, cfg, side, user_dim, _ = build(args, device)
  pairs = args.pairs or 16
  c = cfg["in_channels"]
  x = torch.empty(2 * pairs, c, side, side, device=device)
  t = torch.zeros(2 * pairs, dtype=torch.long, device=device)
  text = torch.empty(2 * pairs, 77, cfg["cross_attention_dim"], device=device)
  user = torch.empty(2 * pairs, 1, user_dim, device=device)
  out = unet(x, t, text, added_cond_kwargs={"image_embeds": [user]}).sample
  out.float().square().mean().backward()
  assert all(p.grad is not None for p in adapter), "an adapter parameter got no gradient"
  return {"piece": PIECE, "dry": True, "output_shape": list(out.shape),
          "trainable_params": count(adapter), "frozen_params": count(unet.parameters()) -
          count(adapter), "cross_attention_processors": sum(
              hasattr(p, "to_k_ip") for p in unet.attn_processors.values())}


def run(args):
  """Yields one result per --gradient_checkpointing setting, on one built model and step."""
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda and not args.tiny else "cpu")
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True    # as XLA's default precision on the GPU
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True           # autotuned convolutions, as XLA autotunes
  else:
    torch.set_flush_denormal(True)    # as XLA's CPU runtime does; denormals slow CPU math
    if args.threads:
      torch.set_num_threads(args.threads)
    elif args.tiny:
      # A smoke run on shared cores: with one core busy elsewhere, a second intra-op thread
      # makes every op wait at its barrier (steps seen to go from 40 ms to 4 s).
      torch.set_num_threads(1)
  pairs = args.pairs or (4 if args.tiny else 16)
  warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
  started = t0 = time.perf_counter()
  unet, adapter, cfg, side, user_dim, weight_dtype = build(args, device)
  step = make_step(unet, adapter, cfg, side, user_dim, weight_dtype, pairs, device,
                   args.text_length)
  build_s = time.perf_counter() - t0

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  for i, checkpointing in enumerate(args.checkpointing):
    if checkpointing:
      unet.enable_gradient_checkpointing()
    else:
      unet.disable_gradient_checkpointing()
    if device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    # This setting's share of what is left: the settings after it get theirs.
    share = (args.budget_s - (time.perf_counter() - started)) / (len(args.checkpointing) - i)
    setting_start = t0 = time.perf_counter()
    first_loss = float(step())
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
      step()
    sync()
    left = share - (time.perf_counter() - setting_start) - 5
    steps = max(1, min(args.steps or (3 if args.tiny else 10), int(left / max(first_s, 1e-3))))
    times, loss = [], None
    for _ in range(steps):
      t0 = time.perf_counter()
      loss = step()
      sync()
      times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    out = {
        "piece": piece_name(checkpointing), "tiny": args.tiny, "pairs": pairs, "latent": side,
        "gradient_checkpointing": unet.is_gradient_checkpointing,    # as the model reports it
        "pairs_per_s": pairs / median, "step_ms_median": median * 1e3,
        "step_ms": [round(t * 1e3, 2) for t in times],
        "first_step_s": first_s, "build_s": build_s, "warmup_steps": warmup,
        "loss_first_step": first_loss, "loss_last_step": float(loss),
        "loss_first_expected": math.log(2.0),
        "trainable_params": count(adapter),
        "frozen_params": count(unet.parameters()) - count(adapter),
        "weights": ("frozen bf16, adapter fp32, autocast bf16" if weight_dtype == torch.bfloat16
                    else "fp32"),
        "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
    }
    if device.type == "cuda":
      out.update(device=torch.cuda.get_device_name(),
                 peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, sdpa=sdpa_flags())
    else:
      out.update(device=f"cpu ({torch.get_num_threads()} threads)", peak_memory_gib=None)
    yield out


def main(argv=None):
  args = parse_args(argv)
  done = set()
  try:
    if args.dry:                # shapes only: the same for either checkpointing setting
      result = dry_run(args)
      for checkpointing in args.checkpointing:
        print(json.dumps({**result, "piece": piece_name(checkpointing)}), flush=True)
    else:
      for result in run(args):
        print(json.dumps(result), flush=True)     # each setting as it finishes
        done.add(result["piece"])
  except Exception as err:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    owed = [piece_name(c) for c in args.checkpointing if piece_name(c) not in done] or [PIECE]
    for piece in owed:
      print(json.dumps({"piece": piece, "error": f"{type(err).__name__}: {err}"[:2000],
                        "traceback": traceback.format_exc()[-3000:]}), flush=True)
    sys.exit(1)


if __name__ == "__main__":
  main()
