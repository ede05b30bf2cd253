"""Tiny random CLIP reward models saved the way the real ones are published (a transformers folder
with its tokenizer), plus the aesthetic head as a torch state dict, for reward and CLI tests."""
import os

import numpy as np

import tiny_sd

IMAGE = 28
PROJECTION = 16


def save_clip(folder: str, act: str = "gelu", seed: int = 0, logit_scale: float = 4.2):
  """A CLIPModel (text 2x32, vision 2x48 on 28 px / 7 px patches) + its CLIP tokenizer."""
  import torch
  import transformers
  tok = tiny_sd.tokenizer(folder)
  eos = tok.convert_tokens_to_ids("<|endoftext|>")
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=tiny_sd.TEXT_LENGTH, hidden_act=act,
                       eos_token_id=eos, bos_token_id=eos - 1, pad_token_id=eos),
      vision_config=dict(hidden_size=48, intermediate_size=53, num_hidden_layers=2,
                         num_attention_heads=4, image_size=IMAGE, patch_size=7, hidden_act=act),
      projection_dim=PROJECTION)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():   # init leaves norms at 1 / biases at 0, which would hide mistakes
    for name, p in model.named_parameters():
      if "norm" in name or "layrnorm" in name or name.endswith("bias"):
        p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.logit_scale.fill_(logit_scale)
  model.save_pretrained(folder)
  tok.save_pretrained(folder)
  return model, tok


def aesthetic_head(path: str, input_dim: int = PROJECTION, seed: int = 0):
  """The LAION v2 head as published (an nn.Module whose `layers` is the Linear/Dropout
  Sequential, hence the keys layers.0.weight, ...), random, saved as a .pth state dict."""
  import torch
  torch.manual_seed(seed)
  nn = torch.nn
  head = nn.Module()
  head.layers = nn.Sequential(nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                              nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1),
                              nn.Linear(64, 16), nn.Linear(16, 1))
  head.eval()
  torch.save(head.state_dict(), path)
  return head.layers


def images(n: int, seed: int = 0) -> np.ndarray:
  """uint8 [n, H, W, 3] of a non-square size, so the resize and crop both act."""
  return np.random.default_rng(seed).integers(0, 256, size=(n, 40, 33, 3), dtype=np.uint8)


def folder(tmp_path_factory, name: str) -> str:
  return os.fspath(tmp_path_factory.mktemp(name))
