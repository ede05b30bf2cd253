"""The Stable Cascade export in diffusers: the exported user branch attached to diffusers' own
StableCascadeUNet by ppd_cascade.py against our PersonalizedCascade on the same tiny random
weights, for the prior pipeline's [cond; uncond] batch (user off in the second half), a batch
without CFG, both projector layouts, and the refusals. The CLI export and the whole prior
pipeline are in test_cascade_end_to_end.py."""
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

import tiny_cascade as tc
from ppd_jax.models import cascade
from ppd_jax.models import personalized
from ppd_jax.models import personalized_cascade as pc
from ppd_jax.weights import convert
from ppd_jax.weights import export_cascade

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

N = 2            # images; the CFG batch has 2N rows
USER_DIM = 12
PARITY = 1e-5    # float32, as test_cascade_unet's


def _processor_module():
  """ppd_cascade.py loaded from its file, as a user does (it is not part of the package API)."""
  spec = importlib.util.spec_from_file_location("ppd_cascade", export_cascade._PROCESSOR_SOURCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ppd_cascade = _processor_module()


def _inputs(rows: int, seed: int = 0) -> dict:
  rng = np.random.RandomState(seed)
  f = lambda *s: rng.randn(*s).astype(np.float32)
  return dict(sample=f(rows, 6, 5, 16),
              timestep_ratio=np.linspace(0.9, 0.2, rows, dtype=np.float32),
              clip_text_pooled=f(rows, 1, 24), clip_text=f(rows, 7, 24), clip_img=f(rows, 1, 16))


def _torch(model, inp) -> np.ndarray:
  kw = {k: tc.nchw(v) if v.ndim == 4 else torch.from_numpy(v) for k, v in inp.items()}
  with torch.no_grad():
    return tc.nhwc(model(**kw).sample)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-token", "two-token"])
def ported(request):
  """TINY_C in torch and in Flax, random user params (to_v_user non-zero), their export."""
  tokens = request.param
  torch_model = tc.patch_r_embedding(tc.torch_unet(tc.TINY_C))
  cfg = cascade.config_from_diffusers(tc.TINY_C, user_embed_dim=USER_DIM, user_tokens=tokens,
                                      user_tokens_per_embedding=3)
  model = pc.PersonalizedCascade(cfg)
  rng = np.random.RandomState(4)
  user = jax.tree.map(lambda a: 0.3 * rng.randn(*a.shape).astype(np.float32),
                      pc.init_user_params(model, jax.random.key(0)))
  params = personalized.merge_params({"unet": tc.flax_params(tc.state_dict(torch_model), cfg)},
                                     user)
  apply = jax.jit(lambda inp, u, s: model.apply({"params": params}, **pc.call_inputs(inp),
                                                user_embedding=u, user_scale=s))
  state_dict = {k: torch.from_numpy(v)
                for k, v in export_cascade.cascade_state_dict(user, cfg).items()}
  return dict(torch=torch_model, cfg=cfg, user=user, apply=apply, state_dict=state_dict,
              embeddings=rng.randn(N, tokens, USER_DIM).astype(np.float32))


def test_keys_are_the_diffusers_attention_modules(ported):
  from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock
  blocks = [name for name, m in ported["torch"].named_modules()
            if isinstance(m, SDCascadeAttnBlock)]
  assert len(blocks) == 6                                     # TINY_C: 3 down, 3 up
  want = {f"{b}.attention.to_{kv}_user.weight" for b in blocks for kv in "kv"}
  keys = set(ported["state_dict"])
  assert {k for k in keys if not k.startswith("user_projector.")} == want
  modules = dict(ported["torch"].named_modules())
  for b in blocks:   # the transposed kernel has the shape of the block's own to_k
    assert ported["state_dict"][f"{b}.attention.to_k_user.weight"].shape == (
        modules[b].attention.to_k.weight.shape[0], tc.TINY_C["conditioning_dim"])


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_cfg_batch_matches_ours_with_the_uncond_half_off(ported, scale):
  """The prior pipeline's batch: [cond; uncond], 2N rows; ours with scale [s, s, 0, 0]."""
  inp = _inputs(2 * N)
  user = ppd_cascade.attach(ported["torch"], ported["state_dict"])
  try:
    user.set(ported["embeddings"], num_images=N, scale=scale)
    theirs = _torch(ported["torch"], inp)
  finally:
    user.detach()
  u = np.concatenate([ported["embeddings"]] * 2)
  s = np.asarray([scale] * N + [0.0] * N, np.float32)
  ours = np.asarray(ported["apply"](inp, u, s))
  base = np.asarray(ported["apply"](inp, u, np.zeros(2 * N, np.float32)))
  assert np.abs(ours[:N] - base[:N]).max() > 1e-2            # the user branch acts
  assert np.abs(theirs - ours).max() < PARITY


def test_batch_without_cfg_has_the_user_on_every_row(ported):
  inp = _inputs(N, seed=1)
  one = ported["embeddings"][0]                               # [T, E]: one user for all images
  user = ppd_cascade.attach(ported["torch"], ported["state_dict"])
  try:
    user.set(one, num_images=N)
    theirs = _torch(ported["torch"], inp)
    user.set(None)
    unset = _torch(ported["torch"], inp)
  finally:
    user.detach()
  plain = _torch(ported["torch"], inp)                        # diffusers' own processors again
  ours = np.asarray(ported["apply"](inp, np.stack([one] * N), np.ones(N, np.float32)))
  assert np.abs(theirs - ours).max() < PARITY
  assert np.abs(unset - plain).max() == 0.0                   # set(None): the base exactly
  assert np.abs(theirs - plain).max() > 1e-2
  assert not any(isinstance(m, ppd_cascade.PPDCascadeAttnProcessor)
                 for m in ported["torch"].modules())


def test_attach_refuses_another_prior_and_a_wrong_batch(ported):
  other = tc.torch_unet(dict(tc.TINY_C, down_num_layers_per_block=[1, 1]))   # 5 blocks, not 6
  with pytest.raises(ValueError, match=r"attach: .*1 layer\(s\) the prior lacks "
                     r"\['down_blocks.1.5.attention'\]"):
    ppd_cascade.attach(other, ported["state_dict"])
  user = ppd_cascade.attach(ported["torch"], ported["state_dict"])
  try:
    user.set(ported["embeddings"], num_images=N)
    with pytest.raises(ValueError, match="batch of 3 rows but the user was set for 2 images"):
      _torch(ported["torch"], _inputs(3))
    with pytest.raises(ValueError, match="needs num_images"):
      user.set(ported["embeddings"][0])
  finally:
    user.detach()


def test_state_dict_names_a_missing_or_misshaped_leaf(ported):
  user = jax.tree.map(np.asarray, ported["user"])
  block = user["unet"]["up_blocks_1_2"]["attention"]
  v = block.pop("to_v_user")
  with pytest.raises(convert.WeightsError, match="missing.*up_blocks_1_2/attention/to_v_user"):
    export_cascade.cascade_state_dict(user, ported["cfg"])
  block["to_v_user"] = {"kernel": v["kernel"][:, :8]}
  with pytest.raises(convert.WeightsError, match=r"wrong shape.*to_v_user/kernel \(32, 8\)"):
    export_cascade.cascade_state_dict(user, ported["cfg"])


def test_printed_usage_runs_in_diffusers(tmp_path, monkeypatch):
  """The script `python -m ppd_jax.export` prints for a Stable Cascade run (its JSON's "usage"),
  run as printed on tiny prior and decoder folders, an exported user branch and a user.npy: the
  decoder pipeline is built from its parts (diffusers 0.42.1's from_pretrained cannot resolve
  PaellaVQModel), and it writes one PNG per prompt."""
  import tiny_cascade_folders
  prior = tiny_cascade_folders.save_prior(str(tmp_path / "prior"))
  decoder = tiny_cascade_folders.save_decoder(str(tmp_path / "decoder"))
  cfg = cascade.config_from_diffusers(tc.TINY_C, user_embed_dim=USER_DIM, user_tokens=1,
                                      user_tokens_per_embedding=3)
  rng = np.random.RandomState(7)
  user = jax.tree.map(lambda a: 0.3 * rng.randn(*a.shape).astype(np.float32),
                      pc.init_user_params(pc.PersonalizedCascade(cfg), jax.random.key(0)))
  out, name = str(tmp_path / "export"), export_cascade.DEFAULT_WEIGHT_NAME
  meta = export_cascade.export_metadata(
      cfg, step=1, variant="test", base=prior, prior_subfolder="prior", decoder=decoder,
      decoder_subfolder="decoder", weight_name=name, folder=out, workdir="runs/cascade")
  export_cascade.save(out, name, export_cascade.cascade_state_dict(user, cfg), meta)
  np.save(tmp_path / "user.npy", rng.randn(1, USER_DIM).astype(np.float32))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", list(sys.path))      # the script puts the export folder first
  monkeypatch.delitem(sys.modules, "ppd_cascade", raising=False)
  exec(compile("\n".join(meta["usage"]), "usage", "exec"), {})   # pylint: disable=exec-used
  sys.modules.pop("ppd_cascade", None)
  assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ppd_")) == [
      "ppd_0.png", "ppd_1.png"]
