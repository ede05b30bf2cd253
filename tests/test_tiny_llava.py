"""The tiny LLaVA-OneVision fixture loads like a real checkpoint and runs multi-image prompts."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_llava  # noqa: E402  (tests/ is on sys.path, as for tiny_sd)

N_IMAGES = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_llava.save_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def loaded(folder):
  """The three pieces, each through from_pretrained, as the embedding code loads them."""
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
  proc = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(folder)
  return tok, model, proc


def _images(rng, n):
  """Random RGB images of two shapes, so that padding to a square is exercised too."""
  from PIL import Image
  sizes = [(40, 30), (64, 64)]   # (width, height)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
          for w, h in (sizes[i % 2] for i in range(n))]


def _prompt(question: str) -> str:
  """A chat-style prompt with N_IMAGES placeholders, each expanded to its feature count."""
  images = ("<image>" * tiny_llava.IMAGE_TOKENS_MULTI) * N_IMAGES
  return (f"<|im_start|>user\n{images}\n{question}<|im_end|>\n"
          "<|im_start|>assistant\n")


def test_folder_loads_and_is_tiny(folder, loaded):
  tok, model, proc = loaded
  for name in ("config.json", "generation_config.json", "model.safetensors",
               "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(folder, name)), name
  assert isinstance(tok, transformers.Qwen2Tokenizer)
  assert sum(p.numel() for p in model.parameters()) < 1_000_000
  ids = tok.convert_tokens_to_ids(list(tiny_llava.SPECIAL_TOKENS))
  assert ids == list(range(len(tok) - 5, len(tok)))
  endoftext, _, im_end, image, video = ids
  assert (tok.eos_token_id, tok.pad_token_id) == (im_end, endoftext)
  cfg = model.config
  assert (cfg.image_token_id, cfg.video_token_id) == (image, video)
  assert cfg.text_config.vocab_size == len(tok)
  assert cfg.vision_feature_select_strategy == "full"
  gen = model.generation_config
  assert (gen.eos_token_id, gen.pad_token_id) == (im_end, endoftext)
  assert proc.image_grid_pinpoints == cfg.image_grid_pinpoints
  assert proc.size["height"] == proc.size["width"] == cfg.vision_config.image_size


def test_tokenizer_round_trip(loaded):
  tok = loaded[0]
  text = "the cat is in there\n\n  Hällo wörld, 日本語 🙂\r\n\tend<|im_end|>\n"
  ids = tok(text).input_ids
  assert tok.decode(ids) == text
  assert tok("<image>").input_ids == [tok.convert_tokens_to_ids("<image>")]
  assert tok("the").input_ids == tok.convert_tokens_to_ids(["t", "he"])   # merges in use


def test_same_seed_same_weights(tmp_path):
  from safetensors.torch import load_file

  def weights(name, seed):
    path = tiny_llava.save_tiny_llava(str(tmp_path / name), seed=seed)
    return load_file(os.path.join(path, "model.safetensors"))
  a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
  assert a.keys() == b.keys() == c.keys()
  assert all(torch.equal(a[k], b[k]) for k in a)
  assert not any(torch.equal(a[k], c[k]) for k in a if k.endswith("proj.weight"))
  # save_pretrained writes the hub's key layout, not the in-memory one ("model.language_model.").
  assert "language_model.lm_head.weight" in a and "image_newline" in a


def test_multi_image_generate_left_padded(loaded):
  tok, model, proc = loaded
  rng = np.random.default_rng(0)
  tok.padding_side = "left"
  prompts = [_prompt("Describe."), _prompt("A much longer question, with more words in it?")]
  enc = tok(prompts, padding=True, return_tensors="pt")
  pix = proc([_images(rng, N_IMAGES) for _ in prompts], return_tensors="pt")
  assert pix["pixel_values"].shape == (2 * N_IMAGES, 1, 3, 28, 28)
  assert pix["image_sizes"][:2].tolist() == [[30, 40], [64, 64]]
  assert pix["batch_num_images"].tolist() == [N_IMAGES, N_IMAGES]
  lengths = enc.attention_mask.sum(1)
  assert lengths[0] < lengths[1] == enc.input_ids.shape[1]
  assert enc.input_ids[0, 0] == tok.pad_token_id   # padding is on the left
  with torch.no_grad():
    out = model.generate(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask,
        pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"],
        batch_num_images=pix["batch_num_images"], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 3)
    assert torch.equal(out[:, :enc.input_ids.shape[1]], enc.input_ids)
    # Left padding changes nothing for the shorter prompt: RoPE sees only relative positions.
    alone = model(input_ids=tok(prompts[0], return_tensors="pt").input_ids,
                  pixel_values=pix["pixel_values"][:N_IMAGES],
                  image_sizes=pix["image_sizes"][:N_IMAGES],
                  batch_num_images=pix["batch_num_images"][:1])
    padded = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **pix)
  torch.testing.assert_close(padded.logits[0, -1], alone.logits[0, -1], atol=1e-5, rtol=1e-5)


def test_forward_single_prompt(loaded):
  tok, model, proc = loaded
  rng = np.random.default_rng(1)
  ids = tok(_prompt("What is shown?"), return_tensors="pt").input_ids
  pix = proc([_images(rng, N_IMAGES)], return_tensors="pt")
  n_image = tiny_llava.IMAGE_TOKENS_MULTI * N_IMAGES
  assert int((ids == model.config.image_token_id).sum()) == n_image
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"],
                batch_num_images=pix["batch_num_images"])
    feats = model.get_image_features(
        pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"],
        batch_num_images=pix["batch_num_images"]).pooler_output
    assert [f.shape for f in feats] == [(tiny_llava.IMAGE_TOKENS_MULTI, 32)] * N_IMAGES
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
      short = ids[ids != model.config.image_token_id][None]   # the count must be exact
      model(input_ids=short, pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"],
            batch_num_images=pix["batch_num_images"])
  assert out.logits.shape == (1, ids.shape[1], len(tok))
  assert out.image_hidden_states.shape == (n_image, 32)
