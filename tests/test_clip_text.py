"""Flax CLIP text encoders match transformers' PyTorch CLIPTextModel(WithProjection) on tiny
random configs, and load every key layout transformers writes."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from ppd_jax.models import clip_text  # noqa: E402
from ppd_jax.weights import convert  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, projection_dim=16,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
            bos_token_id=98, eos_token_id=50, pad_token_id=1)
LENGTH = 16


def make_ids(rng: np.random.Generator, batch: int, eos: int) -> np.ndarray:
  """Random ids with an EOS somewhere in each row, then Stable Diffusion-style padding: rows
  alternate padding with EOS (so the *first* EOS must be pooled) and with ids above EOS (so
  argmax(ids) would pick a different position than the EOS rule)."""
  ids = rng.integers(3, 100, size=(batch, LENGTH))
  ids[ids == eos] = eos + 1
  for b in range(batch):
    stop = int(rng.integers(1, LENGTH - 2))
    ids[b, stop] = eos
    ids[b, stop + 1:] = eos if b % 2 == 0 else 99
  return ids


def torch_model(with_projection: bool, **overrides):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(**{**TINY, **overrides})
  cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
  return cls(cfg).eval()


def flax_model(tm, with_projection: bool, dtype=jnp.float32):
  config = clip_text.CLIPTextConfig.from_transformers(tm.config.to_dict())
  return clip_text.CLIPTextModel(config, with_projection=with_projection, dtype=dtype)


def numpy_state(tm) -> dict:
  return {k: v.detach().numpy() for k, v in tm.state_dict().items()}


def load(model, state_dict, what="test"):
  target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))
  return convert.to_flax(state_dict, target["params"], what=what,
                         rename=clip_text.rename_clip_key)


def torch_outputs(tm, ids: np.ndarray, with_projection: bool) -> dict:
  t_ids = torch.from_numpy(ids)
  with torch.no_grad():
    out = tm(t_ids, output_hidden_states=True)
    text = tm.text_model(t_ids) if with_projection else out
  ref = {"last_hidden_state": out.last_hidden_state.numpy(),
         "hidden_states": [h.numpy() for h in out.hidden_states],
         "pooler_output": text.pooler_output.numpy()}
  if with_projection:
    ref["text_embeds"] = out.text_embeds.numpy()
  return ref


def assert_close(actual, expected, name, rel=1e-4):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, name
  tol = rel * max(1.0, float(np.abs(expected).max()))
  err = float(np.abs(actual - expected).max())
  assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


def assert_matches(out, ref, rel=1e-4):
  assert len(out["hidden_states"]) == len(ref["hidden_states"]) == TINY["num_hidden_layers"] + 1
  for i, (a, e) in enumerate(zip(out["hidden_states"], ref["hidden_states"])):
    assert_close(a, e, f"hidden_states[{i}]", rel)
  assert_close(clip_text.penultimate(out), ref["hidden_states"][-2], "penultimate", rel)
  for name in ("last_hidden_state", "pooler_output", "text_embeds"):
    if name in ref:
      assert_close(out[name], ref[name], name, rel)
  assert ("text_embeds" in out) == ("text_embeds" in ref)


@pytest.mark.parametrize("with_projection,act", [(False, "quick_gelu"), (True, "gelu")])
def test_matches_transformers(with_projection, act):
  tm = torch_model(with_projection, hidden_act=act)
  model = flax_model(tm, with_projection)
  assert model.config.hidden_act == act
  params = load(model, numpy_state(tm))
  ids = make_ids(np.random.default_rng(1), 4, TINY["eos_token_id"])
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
  assert_matches(out, torch_outputs(tm, ids, with_projection))
  flat = {"/".join(path) for path in traverse_util.flatten_dict(params)}
  assert "text_model/encoder/layers_0/self_attn/q_proj/kernel" in flat
  assert "text_model/embeddings/position_embedding/embedding" in flat
  assert ("text_projection/kernel" in flat) == with_projection
  assert "text_projection/bias" not in flat


def test_bf16_compute_stays_close():
  tm = torch_model(True, hidden_act="gelu")
  model = flax_model(tm, True, dtype=jnp.bfloat16)
  params = load(model, numpy_state(tm))
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  ids = make_ids(np.random.default_rng(2), 2, TINY["eos_token_id"])
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
  assert out["last_hidden_state"].dtype == jnp.bfloat16
  assert_matches(out, torch_outputs(tm, ids, True), rel=5e-2)


def test_both_key_layouts_and_saved_files_load(tmp_path):
  for with_projection in (False, True):
    tm = torch_model(with_projection)
    model = flax_model(tm, with_projection)
    state = numpy_state(tm)
    # transformers 5: CLIPTextModel unprefixed, CLIPTextModelWithProjection prefixed.
    assert any(k.startswith("text_model.") for k in state) == with_projection
    reference = load(model, state)
    # The other layout (older transformers / Stable Diffusion hub folders keep the prefix, and
    # the position_ids buffer).
    if with_projection:
      other = {k.removeprefix("text_model."): v for k, v in state.items()}
    else:
      other = {f"text_model.{k}": v for k, v in state.items()}
      other["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]
    folder = tmp_path / f"proj{int(with_projection)}"
    tm.save_pretrained(folder)
    saved = load_file(os.path.join(folder, "model.safetensors"))
    for variant in (other, saved):
      jax.tree.map(np.testing.assert_array_equal, load(model, variant), reference)
    with open(folder / "config.json") as f:
      assert clip_text.CLIPTextConfig.from_transformers(json.load(f)) == model.config


def test_missing_and_unexpected_keys_are_named():
  tm = torch_model(False)
  model = flax_model(tm, False)
  state = numpy_state(tm)
  missing = {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc1.weight"}
  # convert names a missing leaf by its Flax path joined with "." (layers_1).
  name = r"text_model\.encoder\.layers[._]1\.mlp\.fc1\.weight"
  with pytest.raises(convert.WeightsError, match=f"missing.*{name}"):
    load(model, missing)
  with pytest.raises(convert.WeightsError, match=r"unexpected.*vision_model\.post_layernorm"):
    load(model, {**state, "vision_model.post_layernorm.weight": np.ones(32, np.float32)})
  # A CLIPTextModel checkpoint has no projection for the projection model.
  with pytest.raises(convert.WeightsError, match=r"missing.*text_projection\.weight"):
    load(flax_model(tm, True), state)


def test_legacy_eos_token_id_2_pools_at_argmax_of_ids():
  tm = torch_model(False, eos_token_id=2)
  model = flax_model(tm, False)
  assert model.config.eos_token_id == 2
  ids = make_ids(np.random.default_rng(3), 4, 50)
  ids[:, 0] = 2   # under the modern rule id 2 would be pooled at position 0
  positions = np.asarray(clip_text.eos_positions(jnp.asarray(ids), 2))
  np.testing.assert_array_equal(positions, ids.argmax(-1))
  assert (positions != 0).all()
  out = jax.jit(model.apply)({"params": load(model, numpy_state(tm))}, jnp.asarray(ids))
  assert_matches(out, torch_outputs(tm, ids, False))
  # The modern rule: first EOS, whatever larger ids follow.
  np.testing.assert_array_equal(clip_text.eos_positions(jnp.asarray(ids), 50),
                                (ids == 50).argmax(-1))


def test_from_transformers_rejects_unsupported_values():
  base = {**TINY, "architectures": ["CLIPTextModel"], "torch_dtype": "float32", "dtype": "float32",
          "_name_or_path": "x", "transformers_version": "4.22.0", "model_type": "clip_text_model",
          "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0}
  cfg = clip_text.CLIPTextConfig.from_transformers(base)
  assert cfg.hidden_size == 32 and cfg.hidden_act == "quick_gelu"
  with pytest.raises(ValueError, match=r"hidden_act.*'relu'"):
    clip_text.CLIPTextConfig.from_transformers({**base, "hidden_act": "relu"})
  with pytest.raises(ValueError, match=r"model_type.*'clip'"):
    clip_text.CLIPTextConfig.from_transformers({**base, "model_type": "clip"})


def test_rename_clip_key():
  r = clip_text.rename_clip_key
  assert r("embeddings.token_embedding.weight") == "text_model.embeddings.token_embedding.weight"
  assert r("text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"
  assert r("text_projection.weight") == "text_projection.weight"
  assert r("text_model.embeddings.position_ids") is None
  assert r("embeddings.position_ids") is None
