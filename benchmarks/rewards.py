"""Images/s of the ViT-H/14 CLIP reward (PickScore / HPS / clip_h14 all have this shape): ours
(Flax, jitted, sharded over the local devices: rewards/) against transformers' PyTorch
CLIPModel on the same random weights and the same inputs, as a ratio, plus the host-side
preprocessing rate.

  python benchmarks/rewards.py                     # ViT-H/14 at batch 4 on this CPU
  python benchmarks/rewards.py --batch=64          # on a GPU (benchmarks/gpu_check.sh runs it)
  python benchmarks/rewards.py --tiny              # a tiny CLIP: checks this script quickly

One reward evaluation = the image tower on a [B, 224, 224, 3] batch + the text tower on B
77-token prompts + the cosine, what `score(images, prompts)` computes for distinct prompts after
preprocessing. Both sides run in float32 (--dtype=bfloat16 runs both in bf16), and the cosines of
the two are compared. Prints a {"piece": "rewards", ...} JSON line for gpu_check.sh.
"""
import argparse
import json
import os
import time

# torch and JAX share the GPU in this process: JAX's default preallocation (75% of the memory at
# its first use) would leave PyTorch too little, so JAX allocates as it goes. Before jax loads.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position

from ppd_jax.rewards import clip_similarity  # pylint: disable=wrong-import-position
from ppd_jax.rewards import preprocess  # pylint: disable=wrong-import-position
from ppd_jax.models import clip  # pylint: disable=wrong-import-position
from ppd_jax.weights import convert  # pylint: disable=wrong-import-position

TINY = dict(projection_dim=16,
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, hidden_act="gelu"),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, patch_size=14, hidden_act="gelu"))


def build(tiny: bool, dtype: str, batch: int):
  """(transformers CLIPModel, our reward on the same weights), random ViT-H/14 or tiny."""
  preset = clip.PRESETS["ViT-H-14"]()
  config = (transformers.CLIPConfig(**TINY) if tiny else transformers.CLIPConfig(
      projection_dim=preset.projection_dim,
      text_config={k: getattr(preset.text, k) for k in (
          "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "hidden_act")},
      vision_config={k: getattr(preset.vision, k) for k in (
          "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "patch_size", "hidden_act")}))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  theirs = random_model(config, device)
  ours_config = clip.CLIPConfig.from_transformers(config.to_dict())
  jdtype = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
  module = clip.CLIPModel(ours_config, dtype=jdtype)
  state = {k: v.detach().cpu().numpy() for k, v in theirs.state_dict().items()
           if not k.endswith("position_ids")}
  params = convert.to_flax(state, clip.init_shapes(module), what="random ViT-H/14")
  del state
  ours = clip_similarity.ClipSimilarityReward("clip_h14", module, params, None,
                                              clip_similarity.cosine, batch_size=batch)
  theirs = theirs.to(dtype=getattr(torch, dtype))
  return theirs, ours, device


def random_model(config, device: str):
  """transformers' CLIPModel with seeded random weights made on `device` (allocated empty from the
  meta device and filled in place: transformers' own init of 1B parameters takes minutes on a
  CPU). Weights ~ N(0, 0.02), LayerNorm scales 1 + N(0, 0.02), the position ids restored."""
  with torch.device("meta"):
    model = transformers.CLIPModel(config)
  model = model.to_empty(device=device).eval()
  g = torch.Generator(device=device).manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.02, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.add_(1.0)
    model.logit_scale.fill_(4.6052)
    for name, b in model.named_buffers():
      if name.endswith("position_ids"):
        b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
  return model


def timed(fn, reps: int, budget_s: float) -> float:
  """Seconds per call after one warm-up (compile) call, over up to `reps` calls in the budget."""
  fn()
  times, start = [], time.perf_counter()
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
    if time.perf_counter() - start > budget_s:
      break
  return float(np.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=None, help="images per call (default 4 on the "
                 "CPU, 64 on a GPU)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--budget_s", type=float, default=600.0, help="stop timing after this long")
  a = p.parse_args()
  start = time.perf_counter()
  batch = a.batch or (64 if torch.cuda.is_available() else 4)
  theirs, ours, device = build(a.tiny, a.dtype, batch)
  rng = np.random.default_rng(0)
  photos = rng.integers(0, 256, size=(batch, 512, 512, 3), dtype=np.uint8)
  prep_s = timed(lambda: preprocess.clip_pixels(photos), 2, a.budget_s)
  pixels = preprocess.clip_pixels(photos)
  ids = rng.integers(1, 49406, size=(batch, 77)).astype(np.int32)
  ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0
  mask = (np.arange(77)[None] <= 20).astype(np.int32).repeat(batch, 0)

  def run_ours():
    v = ours.image_embeddings(pixels)
    t = ours.runner(ours._text_fn, ids, mask)
    return np.sum(v * t, axis=-1)

  t_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(device, theirs.dtype)
  t_ids, t_mask = (torch.from_numpy(x).long().to(device) for x in (ids, mask))

  def run_theirs():
    with torch.inference_mode():
      out = theirs(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pixels)
      cos = (out.image_embeds * out.text_embeds).sum(-1).float().cpu().numpy()
    if device == "cuda":
      torch.cuda.synchronize()
    return cos

  left = lambda: max(a.budget_s - (time.perf_counter() - start), 1.0)
  ours_s = timed(run_ours, a.reps, left() / 2)
  theirs_s = timed(run_theirs, a.reps, left())
  diff = float(np.abs(run_ours() - run_theirs()).max())
  result = {"piece": "rewards", "model": "tiny" if a.tiny else "ViT-H/14", "dtype": a.dtype,
            "device": jax.devices()[0].device_kind, "torch_device": device, "batch": batch,
            "ours_images_per_s": batch / ours_s, "pytorch_images_per_s": batch / theirs_s,
            "ratio_ours_over_pytorch": theirs_s / ours_s,
            "preprocess_images_per_s": batch / prep_s, "max_abs_cos_difference": diff,
            "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}
  print(f"{result['model']} reward, batch {batch}, {a.dtype}, {result['device']}: ours "
        f"{result['ours_images_per_s']:.2f} images/s, PyTorch {result['pytorch_images_per_s']:.2f}"
        f" images/s, ratio ours / PyTorch {result['ratio_ours_over_pytorch']:.2f}; host "
        f"preprocessing (512 px -> 224) {result['preprocess_images_per_s']:.1f} images/s; "
        f"max |cos ours - cos PyTorch| {diff:.2e}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
