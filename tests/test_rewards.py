"""Every reward equals its published recipe run in PyTorch (transformers' processor, tokenizer and
CLIPModel, the aesthetic head as a torch module) on tiny random models saved to disk; the batch is
sharded over the 8 fake devices in the compiled program; the demo's users answer the same call."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_clip  # noqa: E402
from ppd_jax import images as image_io  # noqa: E402
from ppd_jax.rewards import hidden  # noqa: E402
from ppd_jax.rewards import registry  # noqa: E402

PROMPTS = ["a red circle", "a big blue square", "a red circle", "photo of a dark cat",
           "a small green triangle", "a red circle", "a bright yellow dog", "an orange square",
           "a big blue square", "a purple circle", "a dark dog"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  folder = tiny_clip.folder(tmp_path_factory, "reward_clip")
  model, tok = tiny_clip.save_clip(folder)
  return folder, model, tok


def reference_cosines(model, tok, images, prompts):
  """The PickScore README / Diffusion-DPO recipe: processor -> CLIPModel -> normalised dot."""
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  size = tiny_clip.IMAGE
  proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size,
                                                                        "width": size})
  pixels = proc([np.asarray(x) for x in images], return_tensors="pt")["pixel_values"]
  text = tok(prompts, padding=True, truncation=True, max_length=tiny_clip.tiny_sd.TEXT_LENGTH,
             return_tensors="pt")
  with torch.no_grad():
    out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                pixel_values=pixels)
  cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
  return cos, float(model.logit_scale.detach().exp())


@pytest.mark.parametrize("name", ["pickscore", "hps_v2", "hps_v21", "clip_l14", "clip_h14"])
def test_clip_rewards_match_the_pytorch_recipe(clip_folder, name):
  folder, model, tok = clip_folder
  pics = tiny_clip.images(len(PROMPTS))
  cos, scale = reference_cosines(model, tok, pics, PROMPTS)
  expected = {"pickscore": scale * cos, "hps_v2": cos, "hps_v21": cos, "clip_h14": cos,
              "clip_l14": 100 * np.maximum(cos, 0)}[name]
  reward = registry.load(name, model=folder, batch_size=4)
  got = reward.score(pics, PROMPTS)
  assert got.shape == (len(PROMPTS),) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
  cosines = reward.cosines(pics, PROMPTS)             # what the formula is applied to
  np.testing.assert_allclose(cosines, cos, atol=1e-5)
  assert np.ptp(cosines) > 1e-3                       # not a constant


def test_the_score_follows_the_prompt_and_the_image(clip_folder):
  """One image under every prompt, and every image under one prompt, both vary, and swapping
  which prompt goes with which image changes the scores (a reward ignoring either would not)."""
  folder, _, _ = clip_folder
  reward = registry.load("pickscore", model=folder)
  pics = tiny_clip.images(6)
  same_image = reward.score(np.repeat(pics[:1], 6, axis=0), PROMPTS[:6])
  same_prompt = reward.score(pics, ["a red circle"] * 6)
  assert np.ptp(same_image) > 1e-3 and np.ptp(same_prompt) > 1e-3
  assert not np.allclose(reward.score(pics, PROMPTS[:6]), reward.score(pics, PROMPTS[5::-1]))


def test_inputs_files_arrays_and_sampler_floats_agree(clip_folder, tmp_path):
  folder, _, _ = clip_folder
  reward = registry.load("clip_h14", model=folder)
  floats = tiny_clip.images(3).astype(np.float32) / 127.5 - 1.0
  paths = []
  for i, x in enumerate(floats):
    paths.append(os.fspath(tmp_path / f"{i}.png"))
    image_io.save_png(x, paths[-1])
  np.testing.assert_array_equal(reward.score(floats, PROMPTS[:3]), reward.score(paths, PROMPTS[:3]))
  with pytest.raises(ValueError, match="3 image.*2 prompt"):
    reward.score(paths, PROMPTS[:2])


def test_the_batch_is_sharded_over_the_devices(clip_folder):
  """The compiled image program takes the batch split 8 ways (1 row per device of an 8-row batch)
  and the replicated params whole; 11 images (a padded last batch) score as one by one."""
  import jax
  folder, _, _ = clip_folder
  reward = registry.load("hps_v2", model=folder, batch_size=5)
  runner = reward.runner
  assert len(jax.local_devices()) == 8 and runner.batch_size == 8
  pixels = reward.pixels(tiny_clip.images(8))
  compiled = jax.jit(reward._image_fn, out_shardings=runner.rows).lower(
      runner.params, jax.device_put(pixels, runner.rows)).compile()
  hlo = compiled.as_text()
  assert f"f32[1,{tiny_clip.IMAGE},{tiny_clip.IMAGE},3]" in hlo
  assert f"f32[8,{tiny_clip.IMAGE},{tiny_clip.IMAGE},3]" not in hlo
  pics = tiny_clip.images(len(PROMPTS))
  one_by_one = np.concatenate([reward.score(pics[i:i + 1], PROMPTS[i:i + 1])
                               for i in range(len(PROMPTS))])
  np.testing.assert_allclose(reward.score(pics, PROMPTS), one_by_one, atol=1e-6)


def test_aesthetic_matches_the_pytorch_recipe(clip_folder, tmp_path):
  """head(v / |v|) with v = the CLIP image features, as simple_inference.py computes it."""
  folder, model, tok = clip_folder
  head = tiny_clip.aesthetic_head(os.fspath(tmp_path / "head.pth"))
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  size = tiny_clip.IMAGE
  pics = tiny_clip.images(5)
  proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size,
                                                                        "width": size})
  with torch.no_grad():
    v = model.get_image_features(pixel_values=proc(list(pics), return_tensors="pt")[
        "pixel_values"]).pooler_output
    expected = head(v / v.norm(dim=-1, keepdim=True))[:, 0].numpy()
  reward = registry.load("aesthetic", model=folder, aesthetic_head=os.fspath(tmp_path / "head.pth"))
  got = reward.score(pics, PROMPTS[:5])
  np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
  np.testing.assert_array_equal(got, reward.score(pics, None))   # the prompt plays no part


def test_configuration_errors_name_the_flag(clip_folder, tmp_path):
  folder, _, _ = clip_folder
  cases = [(dict(name="pick"), "--reward='pick': unknown reward"),
           (dict(name="hps_v2"), "pass --model=FOLDER.*convert_open_clip"),
           (dict(name="hps_v2", model="HPS_v2_compressed.pt"), "pickle-format file"),
           (dict(name="aesthetic", model=folder), "needs --aesthetic_head"),
           (dict(name="pickscore", model=folder, aesthetic_head="x.pth"), "only for --reward=aes")]
  for kwargs, message in cases:
    with pytest.raises(registry.RewardConfigError, match=message):
      registry.load(**kwargs)
  from ppd_jax.weights import hf_folder
  with pytest.raises(hf_folder.FolderError, match="nor a hub id"):
    registry.load("pickscore", model=os.fspath(tmp_path / "nowhere"))


def test_demo_users_are_rewards_too():
  """The demo's hidden rewards behind the same call: arrays, uint8 and PNG-like input agree with
  the source's own user_reward."""
  from configs import ppd
  from ppd_jax.demo_world import synthetic_users
  source = synthetic_users.SyntheticPreferences(ppd.get_config("tiny"))
  pics = source.pool_images[:6]
  user = int(source.unseen_user_ids[0])
  reward = hidden.HiddenPropertyReward(source, user)
  np.testing.assert_array_equal(reward.score(pics, [""] * 6), source.user_reward(user, pics))
  as_u8 = image_io.to_uint8(pics)
  np.testing.assert_allclose(reward.score(as_u8, None),
                             source.user_reward(user, as_u8.astype(np.float32) / 127.5 - 1), atol=0)
  with pytest.raises(KeyError, match="unknown user"):
    hidden.HiddenPropertyReward(source, 10 ** 6)


def _open_clip_tokenizer_module():
  """open_clip/tokenizer.py loaded as a file: it imports only ftfy, regex, numpy and torch, so
  the package's __init__ (which needs torchvision) never runs. Its module level builds the real
  CLIP BPE tokenizer from bpe_simple_vocab_16e6.txt.gz, shipped in the wheel."""
  import importlib.util
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.fail("open-clip-torch is not installed: `make test` installs it (pip install "
                "--no-deps open-clip-torch==3.3.0); its tokenizer is this test's reference")
  path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
  file_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_reference", path)
  module = importlib.util.module_from_spec(file_spec)
  file_spec.loader.exec_module(module)
  return module


def _clip_bpe_in_transformers(oc):
  """transformers' CLIPTokenizer over the same BPE file (ids: 256 bytes, 256 bytes + </w>, the
  merges in rank order, then the two special tokens, as the published vocab.json has them)."""
  import gzip
  lines = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")
  merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
  chars = list(oc.bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return transformers.CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def test_open_clip_rewards_tokenise_as_open_clip():
  """The open_clip rewards' ids equal open_clip's own tokenizer (real CLIP BPE) on curly quotes,
  HTML entities (also where a "<" stops ftfy unescaping them), whitespace runs, mojibake and a
  prompt past 77 tokens; transformers' tokenizer alone differs on them (so the cleaning is what
  makes them equal)."""
  from ppd_jax.rewards import clip_similarity
  oc = _open_clip_tokenizer_module()
  reference, tok = oc.SimpleTokenizer(), _clip_bpe_in_transformers(oc)
  texts = ["a cat’s hat on Tom’s “red” chair", "Tom &amp; Jerry &lt;3", "a   red\t\n circle  ",
           "café crème, cafÃ© au lait", "&amp;amp; twice", "A plain prompt, in Capitals.",
           "“" + "word " * 90 + "”", "<b>Tom &amp;amp; Jerry</b>"]
  expected = reference(texts, context_length=77).numpy()
  got = clip_similarity.tokenize(tok, texts, 77, clip_similarity.open_clip_text)
  ids, mask = got["input_ids"], got["attention_mask"]
  assert ids.shape == mask.shape == expected.shape == (len(texts), 77)
  # open_clip pads with 0 after the EOS; ours pads under a zero attention mask.
  np.testing.assert_array_equal(mask, (expected != 0).astype(mask.dtype))
  np.testing.assert_array_equal(np.where(mask == 1, ids, 0), expected)
  raw = clip_similarity.tokenize(tok, texts, 77)["input_ids"]
  differs = [not np.array_equal(raw[i], ids[i]) for i in range(len(texts))]
  assert differs == [True, True, False, True, True, False, True, True]
  assert clip_similarity.open_clip_text(" Tom &amp;amp;  Jerry’s\n") == "Tom & Jerry's"


@pytest.mark.parametrize("name,cleans", [("hps_v2", True), ("hps_v21", True), ("clip_h14", True),
                                         ("pickscore", False), ("clip_l14", False)])
def test_which_rewards_clean_their_prompts(clip_folder, name, cleans):
  """open_clip models (HPS, LAION CLIP-H) see "&#97; ｒｅｄ circle" (an HTML entity and
  full-width letters, which ftfy folds) as "a red circle"; the transformers models do not."""
  folder, _, _ = clip_folder
  reward = registry.load(name, model=folder)
  text = reward.text_embeddings(["a red circle", "&#97; ｒｅｄ circle"])
  assert np.allclose(text[0], text[1], atol=1e-6) == cleans
