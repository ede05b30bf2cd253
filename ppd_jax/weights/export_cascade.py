"""Trained Stable Cascade user branch -> a safetensors file keyed by diffusers' module paths, plus
the PyTorch processor (ppd_cascade.py) that runs it in diffusers' StableCascadeUNet.

diffusers has no IP-Adapter support for Stable Cascade, so the keys are not IP-Adapter's: each
SDCascadeAttnBlock's weights sit under its own module path, and the projector under ours:

    unet/down_blocks_1_5/attention/to_k_user/kernel [D, C]
                                 -> down_blocks.1.5.attention.to_k_user.weight [C, D]
    unet/<block>/attention/to_v_user/kernel -> <block>.attention.to_v_user.weight
    user_projector/proj/kernel [E, K*D]     -> user_projector.proj.weight [K*D, E]
    user_projector/<m>/bias, <m>/scale      -> user_projector.<m>.bias, .weight

(kernels transposed, as for every Linear). D = conditioning_dim, C the block's channels. The
blocks are cascade.attention_blocks(cfg): the file must hold exactly those, and ppd_cascade.attach
refuses a prior whose attention blocks differ.
"""
import os
from typing import Any, Mapping

import numpy as np

from ppd_jax.models import cascade
from ppd_jax.weights import export
from ppd_jax.weights import export_usage

PROCESSOR_FILE = "ppd_cascade.py"
DEFAULT_WEIGHT_NAME = "ppd_cascade_user.safetensors"
_PROCESSOR_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PROCESSOR_FILE)


def _dotted(name: str) -> str:
  """down_blocks_1_5 -> down_blocks.1.5 (the params' names join diffusers' indices with "_")."""
  head, *indices = name.rsplit("_", 2)
  return ".".join([head, *indices])


def _expected(cfg: cascade.CascadeConfig) -> dict:
  """Every user-branch leaf -> (diffusers key, transpose, our shape), in the file's key order."""
  d = cfg.conditioning_dim
  out = {}
  for path, shape in export.projector_shapes(cfg, d).items():
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    out[path] = (f"user_projector.{path[1]}.{leaf}", path[-1] == "kernel", shape)
  for block, channels in cascade.attention_blocks(cfg):
    for proj in ("to_k_user", "to_v_user"):
      out[("unet", block, "attention", proj, "kernel")] = (
          f"{_dotted(block)}.attention.{proj}.weight", True, (d, channels))
  return out


def cascade_state_dict(user_params: Mapping[str, Any],
                       cfg: cascade.CascadeConfig) -> dict[str, np.ndarray]:
  """User branch (`split_params(params)[1]`) -> {diffusers key: float32 array, PyTorch layout}.
  A missing, unexpected or misshaped leaf is a WeightsError naming it."""
  return export.convert_user_branch(user_params, _expected(cfg), "cascade_state_dict",
                                    "this CascadeConfig's")


def usage_snippet(folder: str, weight_name: str, base: str, prior_subfolder: str,
                  decoder: str | None, user_scale: float = 1.0, decoder_subfolder: str = "decoder",
                  workdir: str = "W", num_steps: int = 20, guidance_scale: float = 4.0) -> str:
  """The diffusers code that generates for one user with the exported file (docs/sampling.md, CLI, JSON):
  a whole script, from the embedding file to PNGs (tests run it as printed). The decoder pipeline
  is built from its parts: diffusers 0.42.1 keeps PaellaVQModel in
  diffusers.pipelines.deprecated.wuerstchen only, where
  StableCascadeDecoderPipeline.from_pretrained cannot resolve it. Stage C runs the run's own
  config.sample steps and guidance (num_steps, guidance_scale; 20 and 4.0 are the prior
  pipeline's defaults and the Cascade configs')."""
  decoder = decoder or "stabilityai/stable-cascade"
  return (
      export_usage.embedding_lines(workdir) +
      "import sys, torch\n"
      "from diffusers import (DDPMWuerstchenScheduler, StableCascadeDecoderPipeline,\n"
      "                       StableCascadePriorPipeline, StableCascadeUNet)\n"
      "from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel\n"
      "from safetensors.torch import load_file\n"
      "from transformers import CLIPTextModelWithProjection, CLIPTokenizer\n"
      f"sys.path.insert(0, {folder!r})\n"
      "import ppd_cascade  # the processor file written next to the weights\n"
      f"prior = StableCascadeUNet.from_pretrained({base!r}, subfolder={prior_subfolder!r})\n"
      f"pipe = StableCascadePriorPipeline.from_pretrained({base!r}, prior=prior)\n"
      f"user = ppd_cascade.attach(pipe.prior, load_file({os.path.join(folder, weight_name)!r}))\n"
      "# user_embedding: [tokens, dim]; the user is off in the uncond half ([cond; uncond])\n"
      "per_prompt = 1\n"
      f"user.set(user_embedding, num_images=len(prompts) * per_prompt, scale={user_scale})\n"
      "latents = pipe(prompts, num_images_per_prompt=per_prompt, "
      f"guidance_scale={float(guidance_scale)!r},\n"
      f"               num_inference_steps={num_steps}).image_embeddings\n"
      "# the decoder from its parts (from_pretrained cannot find PaellaVQModel)\n"
      f"dec = {decoder!r}\n"
      "decoder = StableCascadeDecoderPipeline(\n"
      f"    decoder=StableCascadeUNet.from_pretrained(dec, subfolder={decoder_subfolder!r}),\n"
      "    tokenizer=CLIPTokenizer.from_pretrained(dec, subfolder='tokenizer'),\n"
      "    text_encoder=CLIPTextModelWithProjection.from_pretrained(dec, subfolder='text_encoder'),\n"
      "    scheduler=DDPMWuerstchenScheduler.from_pretrained(dec, subfolder='scheduler'),\n"
      "    vqgan=PaellaVQModel.from_pretrained(dec, subfolder='vqgan'))\n"
      "images = decoder(image_embeddings=latents, prompt=prompts * per_prompt,\n"
      "                 guidance_scale=0.0, num_inference_steps=10).images\n"
      "for i, image in enumerate(images):\n"
      "  image.save(f'ppd_{i}.png')\n")


def export_metadata(cfg: cascade.CascadeConfig, *, step: int | None, variant: str | None,
                    base: str, prior_subfolder: str, decoder: str | None, weight_name: str,
                    folder: str, decoder_subfolder: str = "decoder",
                    workdir: str = "W", sample=None) -> dict[str, Any]:
  """The JSON's content: the embedding a caller must pass, where the run came from, the call."""
  single = export.single_token_projector(cfg)
  return {
      "layout": "ppd_jax Stable Cascade user branch (diffusers module paths; ppd_cascade.py)",
      "processor_file": PROCESSOR_FILE,
      "user_embed_dim": cfg.user_embed_dim,
      "user_tokens": cfg.user_tokens,
      "user_tokens_per_embedding": cfg.user_tokens_per_embedding if single else None,
      "conditioning_dim": cfg.conditioning_dim,
      "row_mask": "[cond; uncond] batch: user branch on the first half, off on the second",
      "step": step,
      "variant": variant,
      "base": base,
      "prior_subfolder": prior_subfolder,
      "decoder": decoder,
      "decoder_subfolder": decoder_subfolder,
      "usage": usage_snippet(
          folder, weight_name, base, prior_subfolder, decoder,
          decoder_subfolder=decoder_subfolder, workdir=workdir,
          **({} if sample is None else {"num_steps": int(sample.num_steps),
                                        "guidance_scale": float(sample.guidance_scale)})
      ).splitlines(),
  }


def save(folder: str, weight_name: str, state_dict: Mapping[str, np.ndarray],
         metadata: Mapping[str, Any]) -> tuple[str, str, str]:
  """Writes folder/weight_name, its JSON and ppd_cascade.py (each atomically)."""
  weights, info = export.save_ip_adapter(os.path.join(folder, weight_name), state_dict, metadata,
                                         layer_suffix=".to_k_user.weight")
  processor = os.path.join(folder, PROCESSOR_FILE)
  with open(_PROCESSOR_SOURCE, "rb") as f:
    source = f.read()

  def write(tmp):
    with open(tmp, "wb") as out:
      out.write(source)
  export.atomic_write(processor, write)
  return weights, info, processor
