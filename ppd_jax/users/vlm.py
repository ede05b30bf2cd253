"""LLaVA-OneVision (transformers, PyTorch) as PPD's user encoder: 4 labelled pairs in, a
chain-of-thought profile and the final generated token's hidden state(s) out.

    prompt (users/prompts.py, Table 2)  ──► generate() ──► profile text
    prompt + generated tokens ──► one forward pass ──► final generated token's hidden state:
                                                        every layer [L + 1, H] or the last [1, H]

Why the second pass: the hidden states generate() can return belong to the step that produced
each token, i.e. to the position of the token before it; the final token's own state only exists
once it is fed back in. The pass uses the generation's attention mask and position ids
(cumsum(mask) - 1), so a left-padded row gets exactly the states of its unpadded sequence.

The prompt is the checkpoint's ChatML turn format (Qwen2 language model), written here rather than
by LlavaOnevisionProcessor, which needs torchvision; an image is spelt as the number of <image>
tokens its features fill. With several images per prompt (always: two per pair), OneVision
encodes each image at the base resolution only, (image_size / patch_size)^2 patches plus one
newline feature ("default" feature selection drops one), whatever the image's size.

ChatVLM holds what the families share (users/qwen2_vl.py is the other one, a judge option);
VLM is OneVision. Torch and transformers are imported lazily: the JAX side imports this
package without them.
"""
import dataclasses
import hashlib
import json
import os
import re

import numpy as np

from ppd_jax.users import prompts

LAYERS = ("all", "last")

# Top-level config keys that name token ids but are not placeholders (a multimodal config may
# carry the text model's roles too).
_TEXT_ROLES = ("bos", "eos", "pad", "sep", "unk", "mask", "cls", "decoder_start")
_PLACEHOLDER_KEY = re.compile(r"(\w+)_token_(?:id|index)")


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How the profile is generated. "sample": the paper (temperature 0.7, top-p 1.0, seeded; top-k
  off, where transformers' default would keep the 50 likeliest tokens); "greedy": the authors'
  released code."""
  mode: str = "sample"
  temperature: float = 0.7
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  max_new_tokens: int = 1024

  def __post_init__(self):
    if self.mode not in ("sample", "greedy"):
      raise ValueError(f"--decoding must be 'sample' or 'greedy', got {self.mode!r}")
    if self.mode == "sample" and not (self.temperature > 0 and 0 < self.top_p <= 1
                                      and self.top_k >= 0):
      raise ValueError(f"--temperature must be > 0, --top_p in (0, 1] and --top_k >= 0, got "
                       f"{self.temperature}, {self.top_p}, {self.top_k}")
    if self.max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if self.mode == "greedy":
      for k in ("temperature", "top_p", "top_k", "seed"):
        d.pop(k)
    return d


def placeholder_ids(cfg, tokenizer, model_id: str) -> list[int]:
  """The ids of the config's placeholder tokens (image_token_index, video_token_id, ...): the
  model replaces them with vision features, so they must come only from the prompt. Each must be
  a special token of the tokenizer, and the one the tokenizer names for that role (its
  image_token, video_token) when it names one: a mismatch means tokenizer and model disagree."""
  found = {}
  for key in [*cfg.to_dict(), *getattr(cfg, "attribute_map", {})]:
    m = _PLACEHOLDER_KEY.fullmatch(key)
    value = getattr(cfg, key, None)
    if m is None or m.group(1) in _TEXT_ROLES or not isinstance(value, int):
      continue
    found.setdefault(value, m.group(1))
  for tid, role in found.items():
    if tid not in tokenizer.added_tokens_decoder:
      raise ValueError(f"{model_id}: the config's {role} token {tid} is no special token of "
                       f"the tokenizer")
    named = getattr(tokenizer, f"{role}_token", None)
    if isinstance(named, str) and tokenizer.convert_tokens_to_ids(named) != tid:
      raise ValueError(f"{model_id}: the tokenizer's {role} token {named!r} is not the config's "
                       f"{role} token {tid}")
  return sorted(found)


def batch_seed(seed: int, first_key: str) -> int:
  """The torch seed of one batch, from the run's seed and the batch's first entry: a resumed run
  draws the same tokens for the same batch however many batches came before."""
  digest = hashlib.sha256(f"{seed}:{first_key}".encode()).digest()
  return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def chat_turn(user_text: str) -> str:
  """One user turn with the system prompt, in ChatML (the turn format of both Qwen2-based
  families, OneVision and Qwen2-VL), ready for the assistant's answer."""
  return ("<|im_start|>system\n" + prompts.SYSTEM_PROMPT + "<|im_end|>\n"
          "<|im_start|>user\n" + user_text + "<|im_end|>\n"
          "<|im_start|>assistant\n")


def chat_text(segments: list, image_text: str) -> str:
  """chat_turn with every image spelt as the same image_text (OneVision's fixed count)."""
  return chat_turn(prompts.render(segments, image_text))


def _torch_dtype(name: str, device: str):
  import torch
  if name == "auto":
    return torch.bfloat16 if device.startswith("cuda") else torch.float32
  try:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]
  except KeyError:
    raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


class ChatVLM:
  """What every wrapped family shares (a ChatML chat model with image placeholders): the
  tokenizer checks, the end-of-turn and pad ids, left padding and generate(). A family adds
  load() and inputs() (how its images are spelt and fed); evals/judge_local.py needs no more."""

  IMAGE_TOKEN = "<image>"     # the placeholder, when the tokenizer does not name its image_token

  def __init__(self, model, tokenizer, image_processor, model_id: str):
    self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
    self.model_id = model_id
    self.tokenizer.padding_side = "left"          # batched generation continues on the right
    cfg = model.config
    self.image_token = getattr(tokenizer, "image_token", None) or self.IMAGE_TOKEN
    ids = tokenizer.encode(self.image_token, add_special_tokens=False)
    if ids != [cfg.image_token_id]:
      raise ValueError(f"{model_id}: the tokenizer spells {self.image_token!r} as {ids}, the "
                       f"model expects the single token {cfg.image_token_id}")
    self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if self.eos_id is None or self.eos_id == tokenizer.unk_token_id:
      self.eos_id = tokenizer.eos_token_id
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
    self.num_layers = cfg.text_config.num_hidden_layers
    self.hidden_size = cfg.text_config.hidden_size
    self.placeholder_ids = placeholder_ids(cfg, tokenizer, model_id)

  @property
  def device(self):
    return self.model.device

  def describe(self) -> dict:
    """What the store records about the model."""
    return {"id": self.model_id, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "dtype": str(self.model.dtype).replace("torch.", "")}

  def generate(self, inputs: dict, decoding: Decoding, seed: int):
    """-> [B, prompt + new] token ids; rows that stopped early are padded with pad_id."""
    import torch
    torch.manual_seed(seed)
    kw = ({"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p,
           "top_k": decoding.top_k} if decoding.mode == "sample" else {"do_sample": False})
    with torch.inference_mode():
      return self.model.generate(**inputs, max_new_tokens=decoding.max_new_tokens,
                                 eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                 suppress_tokens=self.suppressed_ids(), **kw)

  def suppressed_ids(self) -> list[int]:
    """Ids generate() must never emit: the placeholders, whose count the final-state forward
    pass checks against the image features (one generated <image> too many and it raises), plus
    whatever the checkpoint's generation config already suppresses (passing ours replaces it)."""
    own = self.model.generation_config.suppress_tokens or []
    return sorted(set(own) | set(self.placeholder_ids))


MODEL_TYPE = "llava_onevision"     # config.json's model_type of a LLaVA-OneVision checkpoint


def check_model_type(model_id: str, model_type: str | None = None) -> None:
  """Raises ValueError naming the folder unless it is a LLaVA-OneVision checkpoint: its
  config.json says model_type "llava_onevision" (read as JSON for a local folder, else passed in
  from the hub's config). Checked before transformers is asked to load it, whose own error for
  another model is a long traceback."""
  if model_type is None:
    path = os.path.join(model_id, "config.json")
    if not os.path.isfile(path):
      raise ValueError(f"--model={model_id}: no config.json in that folder; expected a "
                       "LLaVA-OneVision checkpoint in transformers' format (e.g. "
                       "llava-hf/llava-onevision-qwen2-7b-ov-hf)")
    try:
      with open(path) as f:
        model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f"--model={model_id}: {path} is not readable JSON ({e})") from e
  if model_type != MODEL_TYPE:
    raise ValueError(f"--model={model_id}: a {model_type!r} model, not LLaVA-OneVision "
                     f"(config.json's model_type must be {MODEL_TYPE!r})")


class VLM(ChatVLM):
  """A loaded LLaVA-OneVision checkpoint with its tokenizer and (PIL) image processor."""

  @classmethod
  def load(cls, model_id: str, *, dtype: str = "auto", device: str | None = None) -> "VLM":
    """From a hub id or a local folder in transformers' format (e.g.
    llava-hf/llava-onevision-qwen2-7b-ov-hf); bfloat16 on a GPU, float32 on the CPU by default."""
    import torch
    import transformers
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if os.path.isdir(model_id):
      check_model_type(model_id)
    else:
      try:
        hub_type = transformers.AutoConfig.from_pretrained(model_id).model_type
      except (OSError, ValueError) as e:
        raise ValueError(f"--model={model_id}: no readable config ({e})") from e
      check_model_type(model_id, hub_type)
    try:
      model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
          model_id, dtype=_torch_dtype(dtype, device))
      tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
      processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(model_id)
    except (OSError, ValueError) as e:
      raise ValueError(f"--model={model_id}: not a loadable LLaVA-OneVision checkpoint: "
                       f"{e}") from e
    return cls(model.to(device).eval(), tokenizer, processor, model_id)

  @property
  def tokens_per_image(self) -> int:
    """<image> tokens of one image in a multi-image prompt: base patches + one newline."""
    cfg = self.model.config
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return patches + 1 - (cfg.vision_feature_select_strategy == "default")

  def inputs(self, prompt_list: list[tuple[list, list]], suffixes=None) -> dict:
    """[(segments, PIL images)] -> the model's tensors, left-padded to one length. suffixes:
    text already written in each assistant turn (a judge's answer prefix)."""
    texts = [chat_text(seg, self.image_token * self.tokens_per_image) for seg, _ in prompt_list]
    if suffixes is not None:
      texts = [t + s for t, s in zip(texts, suffixes, strict=True)]
    enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    pix = self.image_processor([[im.convert("RGB") for im in imgs] for _, imgs in prompt_list],
                               return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "pixel_values": pix["pixel_values"].to(self.model.dtype),
           "image_sizes": pix["image_sizes"], "batch_num_images": pix["batch_num_images"]}
    return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in out.items()}

  def final_states(self, inputs: dict, sequences, layers: str) -> tuple[np.ndarray, list[str]]:
    """Hidden state(s) of each row's final generated token, from one forward pass over the
    finished sequences -> ([B, L + 1 or 1, H] float32, generated texts)."""
    import torch
    if layers not in LAYERS:
      raise ValueError(f"--layers must be one of {LAYERS}, got {layers!r}")
    prompt_len = inputs["input_ids"].shape[1]
    new = sequences[:, prompt_len:]
    is_eos = new == self.eos_id
    # Tokens up to and including the first end-of-turn; all of them when it never came.
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
    keep = int(lengths.max())
    steps = torch.arange(keep, device=new.device)[None]
    mask = torch.cat([inputs["attention_mask"], (steps < lengths[:, None]).long()], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
      out = self.model.model(input_ids=sequences[:, :prompt_len + keep], attention_mask=mask,
                             position_ids=positions, pixel_values=inputs["pixel_values"],
                             image_sizes=inputs["image_sizes"],
                             batch_num_images=inputs["batch_num_images"],
                             output_hidden_states=True, use_cache=False)
    last = prompt_len + lengths - 1                                 # [B] the final token
    rows = torch.arange(sequences.shape[0], device=last.device)
    states = out.hidden_states if layers == "all" else out.hidden_states[-1:]
    picked = torch.stack([h[rows, last] for h in states], dim=1)    # [B, L + 1 or 1, H]
    texts = [self.tokenizer.decode(new[b, :lengths[b]], skip_special_tokens=True)
             for b in range(new.shape[0])]
    return picked.float().cpu().numpy(), texts

  def embed(self, prompt_list: list[tuple[list, list]], decoding: Decoding, layers: str,
            seed: int) -> tuple[np.ndarray, list[str]]:
    """[(segments, images)] -> (embeddings [B, T, H] float32, generated responses)."""
    inputs = self.inputs(prompt_list)
    return self.final_states(inputs, self.generate(inputs, decoding, seed), layers)


def embed_pairs(vlm: VLM, pairs: list[prompts.Pair], decoding: Decoding, layers: str,
                seed: int = 0) -> tuple[np.ndarray, str]:
  """One user's labelled pairs -> ([T, H] embedding, generated response)."""
  emb, texts = vlm.embed([prompts.user_prompt(pairs)], decoding, layers, seed)
  return emb[0], texts[0]
