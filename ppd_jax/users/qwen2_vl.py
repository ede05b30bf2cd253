"""Qwen2-VL (transformers, PyTorch) as the local judge's other model family: the interface of
users/vlm.ChatVLM, so evals/judge_local.py reads it exactly as it reads LLaVA-OneVision; only how
an image is spelt and fed differs, and that is this file.

Qwen2-VL sees each image at its own resolution. The image processor resizes it to multiples of
patch_size * merge_size (within its min/max pixel count) and cuts a grid of t x h x w patches
(t = 1 for a still image, repeated over temporal_patch_size frames); the vision tower merges each
merge x merge block into one feature, so one image is written

    <|vision_start|> + N x <|image_pad|> + <|vision_end|>,      N = t * h * w / merge^2

with (t, h, w) its row of image_grid_thw. The language model's rotary positions are 3-D (M-RoPE:
time, height, width); the model computes them itself from input_ids, attention_mask,
image_grid_thw and mm_token_type_ids (1 where an <|image_pad|> stands, else 0), leaving padded
positions out, so a left-padded row gets the positions of its unpadded prompt.

The turns are ChatML (users/vlm.chat_turn), written here: Qwen2VLProcessor cannot be built in an
environment without torchvision (transformers 5.23 builds its video processor with it), so only
the PIL image processor, Qwen2VLImageProcessorPil, is used (Qwen2VLImageProcessor needs
torchvision too and falls back to it). Torch and transformers are imported lazily.
"""
from ppd_jax.users import prompts
from ppd_jax.users import vlm as vlm_lib

MODEL_TYPE = "qwen2_vl"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class Qwen2VL(vlm_lib.ChatVLM):
  """A loaded Qwen2-VL checkpoint with its tokenizer and PIL image processor (a judge model; the
  user encoder of users/embed.py stays OneVision, the paper's). The config's *_token_id keys make
  <|vision_start|> and <|vision_end|> placeholders too: generate() never writes them."""

  IMAGE_TOKEN = "<|image_pad|>"

  def __init__(self, model, tokenizer, image_processor, model_id: str):
    super().__init__(model, tokenizer, image_processor, model_id)
    cfg = model.config
    for token, tid in ((VISION_START, cfg.vision_start_token_id),
                       (VISION_END, cfg.vision_end_token_id)):
      ids = tokenizer.encode(token, add_special_tokens=False)
      if ids != [tid]:
        raise ValueError(f"{model_id}: the tokenizer spells {token!r} as {ids}, the model "
                         f"expects the single token {tid}")
    vision = cfg.vision_config
    for name, want in (("merge_size", vision.spatial_merge_size),
                       ("patch_size", vision.patch_size),
                       ("temporal_patch_size", vision.temporal_patch_size)):
      if getattr(image_processor, name) != want:
        raise ValueError(f"{model_id}: the image processor's {name} is "
                         f"{getattr(image_processor, name)}, the vision tower's {want}")
    self.merge_size = vision.spatial_merge_size

  @classmethod
  def load(cls, model_id: str, *, dtype: str = "auto", device: str | None = None) -> "Qwen2VL":
    """From a hub id or a local folder in transformers' format (e.g. Qwen/Qwen2-VL-7B-Instruct);
    bfloat16 on a GPU, float32 on the CPU by default."""
    import torch
    import transformers
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
      model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
          model_id, dtype=vlm_lib._torch_dtype(dtype, device))
      tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
      processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(model_id)
    except (OSError, ValueError) as e:
      raise ValueError(f"--judge_model={model_id}: not a loadable Qwen2-VL checkpoint: "
                       f"{e}") from e
    if model.config.model_type != MODEL_TYPE:
      raise ValueError(f"--judge_model={model_id}: model_type {model.config.model_type!r} is not "
                       f"{MODEL_TYPE!r}")
    return cls(model.to(device).eval(), tokenizer, processor, model_id)

  def describe(self) -> dict:
    """The base record plus the family and the pixel range images are resized into (the number
    of image tokens, hence the verdicts, depend on it)."""
    size = self.image_processor.size
    return {**super().describe(), "family": MODEL_TYPE,
            "image_pixels": [size["shortest_edge"], size["longest_edge"]]}

  def image_tokens(self, image_grid_thw) -> list[int]:
    """N = t * h * w / merge^2 <|image_pad|> tokens per image (module docstring)."""
    return [t * h * w // self.merge_size**2 for t, h, w in image_grid_thw.tolist()]

  def image_text(self, n: int) -> str:
    return VISION_START + self.image_token * n + VISION_END

  def inputs(self, prompt_list: list[tuple[list, list]], suffixes=None) -> dict:
    """[(segments, PIL images)] -> the model's tensors, left-padded to one length. suffixes:
    text already written in each assistant turn (a judge's answer prefix). The images of all
    prompts go through the processor as one flat list, in prompt order: pixel_values and
    image_grid_thw rows follow the placeholders' order in the batch, as the model reads them."""
    images = [im.convert("RGB") for _, imgs in prompt_list for im in imgs]
    pix = self.image_processor(images, return_tensors="pt")
    counts = iter(self.image_tokens(pix["image_grid_thw"]))
    texts = []
    for segments, imgs in prompt_list:
      if sum(s is prompts.IMAGE for s in segments) != len(imgs):
        raise ValueError(f"a prompt has {sum(s is prompts.IMAGE for s in segments)} image "
                         f"markers and {len(imgs)} images")
      user = "".join(self.image_text(next(counts)) if s is prompts.IMAGE else s
                     for s in segments)
      texts.append(vlm_lib.chat_turn(user))
    if suffixes is not None:
      texts = [t + s for t, s in zip(texts, suffixes, strict=True)]
    enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"]
    out = {"input_ids": ids, "attention_mask": enc["attention_mask"],
           "mm_token_type_ids": (ids == self.model.config.image_token_id).int(),
           "pixel_values": pix["pixel_values"].to(self.model.dtype),
           "image_grid_thw": pix["image_grid_thw"]}
    return {k: v.to(self.device) for k, v in out.items()}
