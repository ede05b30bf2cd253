"""Tiny random Stable Diffusion pipelines, built with diffusers/transformers and saved as folders.

What a real checkpoint folder holds (model_index.json, unet/ vae/ text_encoder[_2]/ tokenizer[_2]/
scheduler/), at a few hundred thousand parameters, so loading code is tested on the real format:
    sd15  SD 1.x-like: conv projections, one head count, epsilon, CLIPTextModel
    sd21  SD 2.x-like: linear projections, head counts per block, upcast attention, v-prediction
    sdxl  SDXL-like: text_time add embedding, 2 transformer layers in a block, two text encoders
"""
import json
import os

import numpy as np

# A word-level CLIP BPE vocabulary (whole words carry "</w>"), enough for the synthetic captions.
WORDS = ("a an red orange yellow green blue purple circle square triangle photo of big small "
         "dark bright cat dog").split()
TEXT_LENGTH = 16


def _tokenizer_files(folder: str) -> None:
  """vocab.json + merges.txt for CLIPTokenizer.from_pretrained (PITFALLS: not via vocab_file=)."""
  letters = sorted(set("".join(WORDS)))
  vocab, merges = {}, []
  for ch in letters:
    vocab.setdefault(ch, len(vocab))
    vocab.setdefault(ch + "</w>", len(vocab))
  for word in WORDS:   # merge left to right: "r e d</w>" -> "re d</w>" -> "red</w>"
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
      merges.append(f"{pieces[0]} {pieces[1]}")
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
      vocab.setdefault(pieces[0], len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)     # the largest id, so argmax pooling also finds it
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


def tokenizer(tmp_folder: str):
  from transformers import CLIPTokenizer
  _tokenizer_files(tmp_folder)
  tok = CLIPTokenizer.from_pretrained(tmp_folder, model_max_length=TEXT_LENGTH)
  assert tok("red circle").input_ids[1:3] != [tok.unk_token_id] * 2, "tiny vocab not in use"
  return tok


def _text_encoder(tok, hidden: int, with_projection: bool, act: str, seed: int):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  torch.manual_seed(seed)
  cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=4, projection_dim=16,
                       max_position_embeddings=TEXT_LENGTH, hidden_act=act,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
  cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
  return cls(cfg).eval()


def _vae(seed: int, scaling_factor: float = 0.18215):
  import torch
  from diffusers import AutoencoderKL
  torch.manual_seed(seed)
  return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                       norm_num_groups=4, layers_per_block=1, sample_size=16,
                       scaling_factor=scaling_factor).eval()


def perturb(module, seed: int = 0, std: float = 0.2) -> None:
  """Norm scales and biases start at 1 and 0: make them random so that they are tested too."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(std * torch.randn(p.shape, generator=gen))


UNET_KWARGS = {
    "sd15": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
                                                                "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                 cross_attention_dim=32),
    "sd21": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=(2, 4),
                 cross_attention_dim=32, use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D",
                                                                "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 cross_attention_dim=64, use_linear_projection=True,
                 transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}


def unet(kind: str, seed: int = 0, unet_kwargs: dict | None = None, sample_size: int = 8):
  """unet_kwargs: another architecture than UNET_KWARGS[kind] (block types, heads, channels)."""
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  model = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4,
                               layers_per_block=1, norm_num_groups=8,
                               **(unet_kwargs or UNET_KWARGS[kind])).eval()
  perturb(model, seed)
  return model


def save_pipeline(folder: str, kind: str = "sd15", variant: str | None = None,
                  unet_kwargs: dict | None = None, sample_size: int = 8) -> str:
  """Builds the tiny `kind` pipeline and saves it (safetensors) to `folder`; returns folder.

  unet_kwargs, sample_size: another UNet architecture / latent size (see `unet`)."""
  from diffusers import (DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                         StableDiffusionXLPipeline)
  tok = tokenizer(os.path.join(folder + ".tok"))
  net = unet(kind, unet_kwargs=unet_kwargs, sample_size=sample_size)
  schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1)
  if kind == "sdxl":
    enc1 = _text_encoder(tok, 32, False, "quick_gelu", 1)
    enc2 = _text_encoder(tok, 32, True, "gelu", 2)
    for m in (enc1, enc2):
      perturb(m, 3)
    pipe = StableDiffusionXLPipeline(vae=_vae(4, 0.13025), text_encoder=enc1, text_encoder_2=enc2,
                                     tokenizer=tok, tokenizer_2=tok, unet=net,
                                     scheduler=DDIMScheduler(clip_sample=False, **schedule))
  else:
    enc = _text_encoder(tok, 32, False, "quick_gelu" if kind == "sd15" else "gelu", 1)
    perturb(enc, 3)
    scheduler = (PNDMScheduler(skip_prk_steps=True, **schedule) if kind == "sd15" else
                 DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **schedule))
    pipe = StableDiffusionPipeline(vae=_vae(4), text_encoder=enc, tokenizer=tok,
                                   unet=net, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
  perturb(pipe.vae, 5)
  pipe.save_pretrained(folder, safe_serialization=True, variant=variant)
  return folder


def torch_nchw(x: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))
