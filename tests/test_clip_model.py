"""The Flax CLIPModel (both towers, projections, logit_scale) matches transformers' PyTorch CLIPModel
built from tiny random configs and saved to disk, and has transformers' parameter count at the
published full sizes."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_clip_text import assert_close as close  # noqa: E402
from ppd_jax.models import clip  # noqa: E402
from ppd_jax.weights import clip_folder  # noqa: E402
from ppd_jax.weights import hf_folder  # noqa: E402

LENGTH, IMAGE, EOS = 16, 28, 98


def tiny_config(act: str) -> "transformers.CLIPConfig":
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=LENGTH, hidden_act=act,
                       eos_token_id=EOS, bos_token_id=97, pad_token_id=0),
      vision_config=dict(hidden_size=48, intermediate_size=53, num_hidden_layers=2,
                         num_attention_heads=4, image_size=IMAGE, patch_size=7, hidden_act=act),
      projection_dim=16, logit_scale_init_value=2.0)


def perturbed(model):
  """Random LayerNorm affine, biases and class token (init leaves them 1/0, hiding swaps)."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "layrnorm" in name or name.endswith("bias") or "class_embedding" in name:
        p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.logit_scale.fill_(2.7)
  return model


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def saved(request, tmp_path_factory):
  torch.manual_seed(0)
  model = perturbed(transformers.CLIPModel(tiny_config(request.param)).eval())
  folder = tmp_path_factory.mktemp(f"clip_{request.param}")
  model.save_pretrained(folder)
  return model, str(folder)


def inputs(batch_text=3, batch_images=2):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, EOS, size=(batch_text, LENGTH))
  mask = np.ones_like(ids)
  for b, stop in enumerate([5, LENGTH - 1, 9][:batch_text]):
    ids[b, 0], ids[b, stop], ids[b, stop + 1:] = 97, EOS, 0
    mask[b, stop + 1:] = 0
  pixels = rng.standard_normal((batch_images, IMAGE, IMAGE, 3)).astype(np.float32)
  return ids, mask, pixels


@pytest.mark.parametrize("masked", [True, False])
def test_both_towers_match_transformers(saved, masked):
  model, folder = saved
  module, params = clip_folder.load_clip(folder)
  ids, mask, pixels = inputs()
  mask_or_none = mask if masked else None
  t = lambda a: None if a is None else torch.from_numpy(a)
  with torch.no_grad():
    ref = model(input_ids=t(ids), attention_mask=t(mask_or_none),
                pixel_values=t(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
  out = module.apply({"params": params}, ids, pixels, mask_or_none)
  for key in ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text"):
    close(out[key], getattr(ref, key).numpy(), key)
  variables = {"params": params}
  with torch.no_grad():   # transformers 5: the projected features are the pooler_output
    text_features = model.get_text_features(input_ids=t(ids), attention_mask=t(mask_or_none))
    image_features = model.get_image_features(pixel_values=t(pixels.transpose(0, 3, 1, 2).copy()))
  close(module.apply(variables, ids, mask_or_none, method=clip.CLIPModel.get_text_features),
        text_features.pooler_output.numpy(), "text features")
  close(module.apply(variables, pixels, method=clip.CLIPModel.get_image_features),
        image_features.pooler_output.numpy(), "image features")
  close(module.apply(variables, method=clip.CLIPModel.get_logit_scale), 2.7, "logit_scale")
  # Every position of the text tower (padding rows too), and every vision layer's output.
  text = module.apply(variables, ids, mask_or_none,
                      method=lambda m, i, a: m.text_model(i, a))["last_hidden_state"]
  close(text, ref.text_model_output.last_hidden_state.numpy(), "text last_hidden_state")
  vision = module.apply(variables, pixels, method=lambda m, p: m.vision_model(p))
  for i, h in enumerate(ref.vision_model_output.hidden_states):
    close(vision["hidden_states"][i], h.numpy(), f"vision hidden_states[{i}]")


def test_the_mask_hides_padding_keys(saved):
  """Padded rows of the text tower change with the mask, the EOS-pooled output does not (causal
  attention: the EOS never attends to later positions)."""
  model, folder = saved
  module, params = clip_folder.load_clip(folder)
  ids, mask, _ = inputs()
  run = lambda a: module.apply({"params": params}, ids, a,
                               method=lambda m, i, a: m.text_model(i, a))
  with_mask, without = run(mask), run(None)
  close(with_mask["pooler_output"], without["pooler_output"], "pooled")
  assert np.abs(with_mask["last_hidden_state"][0, 6:] -
                without["last_hidden_state"][0, 6:]).max() > 1e-3


def test_vision_only_folders_load(saved, tmp_path):
  """The image tower of a CLIPModel folder, and a CLIPVisionModelWithProjection folder (Stable
  Cascade's image encoder layout), both match transformers."""
  model, folder = saved
  _, _, pixels = inputs()
  vision_config = transformers.CLIPVisionConfig(
      **{**model.config.vision_config.to_dict(), "projection_dim": model.config.projection_dim})
  vision = transformers.CLIPVisionModelWithProjection(vision_config).eval()
  vision.vision_model.load_state_dict(model.vision_model.state_dict())
  vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
  vision.save_pretrained(tmp_path)
  with torch.no_grad():
    ref = vision(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
  for source in (folder, str(tmp_path)):
    module, params = clip_folder.load_vision(source)
    out = module.apply({"params": params}, pixels)
    close(out["image_embeds"], ref.image_embeds.numpy(), f"{source} image_embeds")
    close(out["last_hidden_state"], ref.last_hidden_state.numpy(), f"{source} last_hidden_state")


def test_bad_folders_are_named(saved, tmp_path):
  _, folder = saved
  with pytest.raises(hf_folder.FolderError, match="has no config.json"):
    clip_folder.load_clip(str(tmp_path))
  with pytest.raises(hf_folder.FolderError, match="not a folder here, nor a hub id"):
    clip_folder.load_clip(str(tmp_path / "missing"))
  bad = tmp_path / "text_only"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
  with pytest.raises(hf_folder.FolderError, match=r"config.json.*expected 'clip'"):
    clip_folder.load_clip(str(bad))
  (bad / "config.json").write_text(open(f"{folder}/config.json").read())
  with pytest.raises(hf_folder.FolderError, match="no weights model.safetensors"):
    clip_folder.load_clip(str(bad))


TRANSFORMERS_LAYOUTS = {   # the hub config.json of each published model, as transformers reads it
    "ViT-L-14": dict(projection_dim=768,
                     text_config=dict(hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12),
                     vision_config=dict(hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=24, num_attention_heads=16,
                                        patch_size=14)),
    "ViT-H-14": dict(projection_dim=1024,
                     text_config=dict(hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=24, num_attention_heads=16,
                                      hidden_act="gelu"),
                     vision_config=dict(hidden_size=1280, intermediate_size=5120,
                                        num_hidden_layers=32, num_attention_heads=16,
                                        patch_size=14, hidden_act="gelu")),
    "ViT-bigG-14": dict(projection_dim=1280,
                        text_config=dict(hidden_size=1280, intermediate_size=5120,
                                         num_hidden_layers=32, num_attention_heads=20,
                                         hidden_act="gelu"),
                        vision_config=dict(hidden_size=1664, intermediate_size=8192,
                                           num_hidden_layers=48, num_attention_heads=16,
                                           patch_size=14, hidden_act="gelu")),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_LAYOUTS))
def test_full_size_parameter_counts(name):
  """jax.eval_shape of the preset == transformers' CLIPModel on the meta device, in total and
  tower by tower; the preset also round-trips through transformers' config format."""
  config = transformers.CLIPConfig(**TRANSFORMERS_LAYOUTS[name])
  with torch.device("meta"):
    ref = transformers.CLIPModel(config)
  ref_counts = {"text_model": 0, "vision_model": 0, "text_projection": 0,
                "visual_projection": 0, "logit_scale": 0}
  for key, p in ref.named_parameters():
    ref_counts[key.split(".")[0]] += p.numel()
  preset = clip.PRESETS[name]()
  assert clip.CLIPConfig.from_transformers(config.to_dict()).vision == preset.vision
  shapes = clip.init_shapes(clip.CLIPModel(preset))
  counts = {k: clip_folder.count_params(v) if isinstance(v, dict) else int(np.prod(v.shape))
            for k, v in shapes.items()}
  assert counts == ref_counts
  assert jax.tree.reduce(lambda a, b: a + b, jax.tree.map(lambda x: x.size, shapes)) == sum(
      p.numel() for p in ref.parameters())
