"""A tiny random LLaVA-OneVision checkpoint folder, built offline, for CPU tests.

The folder has what a real llava-hf checkpoint has for our purposes: config.json,
generation_config.json, model.safetensors, tokenizer.json / tokenizer_config.json and
preprocessor_config.json, so `LlavaOnevisionForConditionalGeneration.from_pretrained`,
`AutoTokenizer.from_pretrained` (a Qwen2Tokenizer) and
`LlavaOnevisionImageProcessorPil.from_pretrained` load it. About 74k parameters.

No LlavaOnevisionProcessor (it needs torchvision): callers expand "<image>" by hand.

Multi-image mode (checked in tests/test_tiny_llava.py, transformers 5.23.0): images passed to the
image processor as a nested list, `[[img1, ..., img8], [img1, ..., img8]]`, give
`batch_num_images = [8, 8]`. Each image with n != 1 per sample is not tiled: it is padded to a
square, resized to 28x28 and is one patch, so
  pixel_values      float32 (num_images_total, 1, 3, 28, 28)   e.g. (16, 1, 3, 28, 28)
  image_sizes       int64   (num_images_total, 2)  original (height, width)
  batch_num_images  int64   (batch,)               e.g. [8, 8]
and each image needs IMAGE_TOKENS_MULTI = (28 / 14) ** 2 + 1 = 5 "<image>" ids in input_ids
(4 patch features with strategy "full", SigLIP has no CLS, plus one image_newline), in the same
order as the images. The call is
  model(input_ids=..., attention_mask=..., pixel_values=..., image_sizes=..., batch_num_images=...)
and the same keyword arguments to `model.generate`. A sample with a single image (n == 1) is
tiled ("anyres") instead and needs a size-dependent count; tests here use multi-image mode.

Left padding (tokenizer.padding_side = "left") needs no position_ids: RoPE depends only on
relative positions, so a padded row's logits match the unpadded prompt's. Token ids: bytes 0-255,
merges 256-265, then <|endoftext|> 266 (pad), <|im_start|> 267, <|im_end|> 268 (eos),
<image> 269, <video> 270. model.safetensors holds the hub's key layout
("language_model.model.*", "language_model.lm_head.weight", "vision_tower.*", "image_newline"),
not the in-memory one ("model.language_model.*", "lm_head.weight").
"""
import os
import tempfile

# Sizes shared by the model config and the image processor.
IMAGE_SIZE = 28
PATCH_SIZE = 14
GRID_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
IMAGE_TOKENS_MULTI = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1

# Special tokens, in id order after the byte-level vocabulary and the merges.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# A handful of merges on byte-level symbols ("Ġ" is a space, "Ċ" a newline), so that BPE merging
# is actually exercised rather than every token being one byte.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"),
          ("o", "n"), ("Ġ", "i"), ("Ġi", "s"), ("Ċ", "Ċ")]


def byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters, the base of byte-level BPE."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:   # control bytes, space, etc. move to unused code points from 256 on
      table[b] = chr(256 + extra)
      extra += 1
  return table


def build_tokenizer():
  """A Qwen2Tokenizer over bytes + MERGES + SPECIAL_TOKENS: any text round-trips."""
  from transformers import Qwen2Tokenizer
  vocab = {ch: i for i, ch in enumerate(byte_to_unicode().values())}
  for a, b in MERGES:
    assert a in vocab and b in vocab, (a, b)
    vocab.setdefault(a + b, len(vocab))
  for tok in SPECIAL_TOKENS:
    vocab[tok] = len(vocab)
  # vocab/merges in memory: vocab_file= would be ignored in transformers 5 (see PITFALLS.md).
  tokenizer = Qwen2Tokenizer(
      vocab=vocab, merges=list(MERGES), unk_token=None, eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
      extra_special_tokens={"image_token": "<image>", "video_token": "<video>",
                            "im_start_token": "<|im_start|>"},
      model_max_length=8192)
  assert len(tokenizer) == len(vocab), "special tokens should reuse their vocab ids"
  return tokenizer


def build_config(tokenizer):
  """LlavaOnevisionConfig with a 2-layer Qwen2 and a 2-layer SigLIP of width 32."""
  from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
  ids = tokenizer.convert_tokens_to_ids
  text = Qwen2Config(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
      pad_token_id=ids("<|endoftext|>"))
  vision = SiglipVisionConfig(
      image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, vision_use_head=False)
  return LlavaOnevisionConfig(
      vision_config=vision, text_config=text, image_token_index=ids("<image>"),
      video_token_index=ids("<video>"), vision_feature_select_strategy="full",
      vision_feature_layer=-1, image_grid_pinpoints=GRID_PINPOINTS, tie_word_embeddings=False)


def build_image_processor():
  """The PIL image processor (the torchvision one cannot be imported here)."""
  from transformers import LlavaOnevisionImageProcessorPil
  return LlavaOnevisionImageProcessorPil(
      size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=GRID_PINPOINTS,
      do_pad=True)


def save_tiny_llava(folder: str, *, seed: int = 0) -> str:
  """Write the model, tokenizer and image processor to `folder`; same seed, same weights."""
  import torch
  from transformers import LlavaOnevisionForConditionalGeneration
  from transformers.utils import logging as hf_logging
  tokenizer = build_tokenizer()
  config = build_config(tokenizer)
  with torch.random.fork_rng(devices=[]):   # leave the caller's RNG state alone
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
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
  build_image_processor().save_pretrained(folder)
  return folder


if __name__ == "__main__":
  print(save_tiny_llava(tempfile.mkdtemp(prefix="tiny_llava_")))
