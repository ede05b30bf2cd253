"""A tiny random Qwen2-VL checkpoint folder, built offline, for CPU tests of the judge's Qwen2-VL
family (users/qwen2_vl.py). About 48k parameters.

The folder has what Qwen/Qwen2-VL-7B-Instruct has for our purposes: config.json (model_type
"qwen2_vl"), generation_config.json, model.safetensors, tokenizer.json / tokenizer_config.json and
a preprocessor_config.json in the hub's format (min_pixels / max_pixels, image_processor_type
"Qwen2VLImageProcessor"), so Qwen2VLForConditionalGeneration, AutoTokenizer and
Qwen2VLImageProcessorPil load it. No processor: Qwen2VLProcessor needs torchvision here.

The tokenizer is tests/tiny_llava.py's byte-level BPE (its bytes and merges) with Qwen2-VL's
special tokens instead of OneVision's; like the hub tokenizer it names no image_token, so the
wrapper's default "<|image_pad|>" is what is checked against the config. Token ids: bytes 0-255,
merges 256-265, then <|endoftext|> 266 (pad), <|im_start|> 267, <|im_end|> 268 (eos),
<|vision_start|> 269, <|vision_end|> 270, <|image_pad|> 271, <|video_pad|> 272.

Vision: patches of PATCH x PATCH pixels, MERGE x MERGE of them merged into one feature; images
are resized to multiples of PATCH * MERGE = 8 pixels with MIN_PIXELS <= h * w <= MAX_PIXELS, so
a 24 x 32 image is a 6 x 8 patch grid and 6 * 8 / MERGE^2 = 12 <|image_pad|> tokens. The text
model's head is 8 wide: M-RoPE's sections (time, height, width) split its 4 frequencies 2, 1, 1.
"""
import json
import os
import tempfile

from tiny_llava import MERGES, byte_to_unicode

PATCH = 4
MERGE = 2
TEMPORAL_PATCH = 2
MIN_PIXELS = 16 * 16
MAX_PIXELS = 32 * 32
# Weights drawn 10x wider than the hub default (0.02): a random model whose answers move visibly
# with its input, so a wrong position or token shows in p_first.
INIT = 0.2

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_tokenizer():
  """A Qwen2Tokenizer over bytes + tiny_llava's merges + SPECIAL_TOKENS."""
  from transformers import Qwen2Tokenizer
  vocab = {ch: i for i, ch in enumerate(byte_to_unicode().values())}
  for a, b in MERGES:
    vocab.setdefault(a + b, len(vocab))
  for tok in SPECIAL_TOKENS:
    vocab[tok] = len(vocab)
  tokenizer = Qwen2Tokenizer(
      vocab=vocab, merges=list(MERGES), unk_token=None, eos_token="<|im_end|>",
      pad_token="<|endoftext|>", extra_special_tokens=[t for t in SPECIAL_TOKENS[1:]
                                                       if t != "<|im_end|>"],
      model_max_length=8192)
  assert len(tokenizer) == len(vocab), "special tokens should reuse their vocab ids"
  return tokenizer


def build_config(tokenizer):
  """Qwen2VLConfig: a 2-layer text model of width 32, a 2-layer vision tower of width 16."""
  from transformers import Qwen2VLConfig
  ids = tokenizer.convert_tokens_to_ids
  text = dict(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
      bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
      initializer_range=INIT)
  vision = dict(depth=2, embed_dim=16, num_heads=2, mlp_ratio=2, hidden_size=32,
                patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
                initializer_range=INIT)
  return Qwen2VLConfig(
      text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
      video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
      vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


def preprocessor_config() -> dict:
  """The image processor's settings as the hub's Qwen2-VL checkpoints write them."""
  return {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": PATCH,
          "temporal_patch_size": TEMPORAL_PATCH, "merge_size": MERGE,
          "image_mean": [0.48145466, 0.4578275, 0.40821073],
          "image_std": [0.26862954, 0.26130258, 0.27577711],
          "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}


def save_tiny_qwen2vl(folder: str, *, seed: int = 0) -> str:
  """Write the model, tokenizer and image processor config to `folder`; same seed, same
  weights."""
  import torch
  from transformers import Qwen2VLForConditionalGeneration
  from transformers.utils import logging as hf_logging
  tokenizer = build_tokenizer()
  with torch.random.fork_rng(devices=[]):   # leave the caller's RNG state alone
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer)).eval()
  gen = model.generation_config
  gen.eos_token_id = tokenizer.eos_token_id
  gen.pad_token_id = tokenizer.pad_token_id
  gen.bos_token_id = None
  os.makedirs(folder, exist_ok=True)
  bars = hf_logging.is_progress_bar_enabled()
  hf_logging.disable_progress_bar()   # "Writing model shards" would go to stderr
  try:
    model.save_pretrained(folder)
  finally:
    if bars:
      hf_logging.enable_progress_bar()
  tokenizer.save_pretrained(folder)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump(preprocessor_config(), f, indent=2)
  return folder


if __name__ == "__main__":
  print(save_tiny_qwen2vl(tempfile.mkdtemp(prefix="tiny_qwen2vl_")))
