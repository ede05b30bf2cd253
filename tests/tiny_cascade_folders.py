"""Tiny random Stable Cascade folders laid out as the hub's, saved by diffusers' own pipelines:

    prior/    StableCascadePriorPipeline: prior/ (TINY_C), text_encoder/ (CLIP with projection),
              tokenizer/, scheduler/ (DDPMWuerstchenScheduler)
    decoder/  StableCascadeDecoderPipeline: decoder/ (TINY_B), vqgan/ (Paella), text_encoder/,
              tokenizer/, scheduler/; plus effnet_encoder.safetensors at the root (a small
              EfficientNet of efficientnet_v2_s's layout with random weights and statistics)

At sample_size 4 Stage C's grid is 4 x 4 (128 px effnet input), Stage B's int(4 x 10.67) = 42.
"""
import json
import os

import numpy as np

import tiny_cascade as tc
import tiny_sd

HIDDEN = 24   # the tiny CLIP's width = TINY_C's clip_text_in_channels = its pooled width


def _text_encoder(tok, seed: int = 1):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection
  torch.manual_seed(seed)
  cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                       num_hidden_layers=2, num_attention_heads=4, projection_dim=HIDDEN,
                       max_position_embeddings=tiny_sd.TEXT_LENGTH, hidden_act="gelu",
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
  model = CLIPTextModelWithProjection(cfg).eval()
  tiny_sd.perturb(model, 3)
  return model


def _tokenizer(folder: str):
  """The tiny word vocabulary, padding with <|endoftext|> as bigG's tokenizer does."""
  tok = tiny_sd.tokenizer(folder)
  tok.pad_token = "<|endoftext|>"
  return tok


def save_prior(folder: str) -> str:
  from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline
  tok = _tokenizer(folder + ".tok")
  prior = tc.torch_unet(tc.TINY_C, seed=0)
  pipe = StableCascadePriorPipeline(tokenizer=tok, text_encoder=_text_encoder(tok), prior=prior,
                                    scheduler=DDPMWuerstchenScheduler())
  pipe.save_pretrained(folder, safe_serialization=True)
  return folder


TINY_A = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=1,
              embed_dim=8, latent_channels=4, num_vq_embeddings=8, scale_factor=0.3764)


def save_decoder(folder: str) -> str:
  import torch
  from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline
  from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
  tok = _tokenizer(folder + ".tok")
  decoder = tc.torch_unet(tc.TINY_B, seed=2)
  torch.manual_seed(3)
  vqgan = PaellaVQModel(**TINY_A).eval()
  tiny_sd.perturb(vqgan, 4)
  pipe = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tok, text_encoder=_text_encoder(tok),
                                      scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan)
  pipe.save_pretrained(folder, safe_serialization=True)
  _save_effnet(os.path.join(folder, "effnet_encoder.safetensors"))
  return folder


def _save_effnet(path: str, seed: int = 5) -> None:
  """A small EfficientNetEncoder's state dict under Stability-AI's key names (the Flax tree's
  paths with "_" -> "." and PyTorch's OIHW kernels), random weights and BatchNorm statistics."""
  import jax
  from flax import traverse_util
  from safetensors.numpy import save_file

  from ppd_jax.models import effnet
  s = effnet.Stage
  stages = (s(True, 1, 3, 1, 8, 8, 1), s(True, 2, 3, 2, 8, 8, 1), s(True, 2, 3, 2, 8, 16, 2),
            s(False, 2, 3, 2, 16, 16, 1), s(False, 2, 3, 1, 16, 24, 1),
            s(False, 2, 3, 2, 24, 24, 1))
  module = effnet.EfficientNetEncoder(stages, head_channels=32)
  shapes = jax.eval_shape(lambda k: effnet.init_variables(module, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  names = {"kernel": "weight", "scale": "weight", "bias": "bias", "running_mean": "running_mean",
           "running_var": "running_var"}
  state = {}
  for col in ("params", "batch_stats"):
    for p, x in traverse_util.flatten_dict(shapes[col]).items():
      key = ".".join(part.replace("_", ".") for part in p[:-1]) + "." + names[p[-1]]
      if p[-1] == "kernel":
        fan_in = int(np.prod(x.shape[:-1]))
        value = rng.standard_normal(x.shape) / np.sqrt(fan_in)
        value = value.transpose(3, 2, 0, 1)
      elif p[-1] == "running_var":
        value = 0.5 + rng.random(x.shape)
      elif p[-1] == "scale":
        value = 1.0 + 0.2 * rng.standard_normal(x.shape)
      else:
        value = 0.2 * rng.standard_normal(x.shape)
      state[key] = np.ascontiguousarray(value, np.float32)
  save_file(state, path)


def read_index(folder: str) -> dict:
  with open(os.path.join(folder, "model_index.json")) as f:
    return json.load(f)
