"""weights/convert_open_clip.py (open_clip checkpoint -> transformers CLIP folder) vs open_clip.

The reference is open_clip's own CLIP class (open-clip-torch 3.3.0, installed without deps). Its
package __init__ and utils.py import torchvision, which must never be installed here, so the
fixture imports open_clip.model alone: a bare `open_clip` package module (its __path__ from
find_spec, which runs nothing) and, only while importing, stub torchvision modules for the one name
utils.py takes (FrozenBatchNorm2d, unused by a ViT). transformers is imported first, so its
torchvision check (lru_cached) never sees the stubs; they are removed again afterwards.
"""
import hashlib
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from ppd_jax.models import clip
from ppd_jax.weights import clip_folder
from ppd_jax.weights import convert
from ppd_jax.weights import convert_open_clip
from ppd_jax.weights import open_clip_config
from ppd_jax.weights import torch_pickle

# embed_dim = both widths: square projections (ViT-H-14's text_projection is 1024 x 1024), so a
# missing transpose shows in the outputs, not just in a shape; 2 vision heads, 4 text heads.
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": 7},
        "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4,
                     "layers": 2}}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 98   # the tiny vocabulary's largest id: open_clip pools at argmax(ids)
_STUBS = ("torchvision", "torchvision.ops", "torchvision.ops.misc")


def _find_open_clip() -> str | None:
  """The installed package's folder. find_spec runs nothing; once the fixture has put a bare
  module in sys.modules it would fail (no __spec__), so this is looked up once, at import."""
  spec = importlib.util.find_spec("open_clip")
  return None if spec is None else list(spec.submodule_search_locations)[0]


OPEN_CLIP_DIR = _find_open_clip()


@pytest.fixture(scope="module")
def oc():
  """open_clip.model, imported without open_clip/__init__.py and without torchvision."""
  where = OPEN_CLIP_DIR
  if where is None:
    pytest.fail("open-clip-torch is not installed: `make test` installs it (pip install "
                "--no-deps open-clip-torch==3.3.0); it is this test's reference")
  import transformers.modeling_outputs  # noqa: F401 - before the stubs (see the docstring)
  from transformers.utils import import_utils
  assert not import_utils.is_torchvision_available()
  before = set(sys.modules)
  package = types.ModuleType("open_clip")
  package.__path__ = [where]
  stubs = {name: types.ModuleType(name) for name in _STUBS}
  stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
  sys.modules["open_clip"] = package
  sys.modules.update(stubs)
  try:
    model = importlib.import_module("open_clip.model")
  finally:
    for name in _STUBS:
      del sys.modules[name]
  yield model
  for name in set(sys.modules) - before:
    if name == "open_clip" or name.startswith("open_clip."):
      del sys.modules[name]


def _build(oc, cfg: dict, seed: int):
  """open_clip's CLIP from an open_clip config dict, with every weight moved off its init."""
  torch.manual_seed(seed)
  model = oc.CLIP(cfg["embed_dim"], oc.CLIPVisionCfg(**cfg["vision_cfg"]),
                  oc.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=cfg.get("quick_gelu", False))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        p.fill_(2.3)
      elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight",
                          "ln_final.weight")):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _inputs(seed: int, batch: int = 3):
  rng = np.random.default_rng(seed)
  size, length = TINY["vision_cfg"]["image_size"], TINY["text_cfg"]["context_length"]
  pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
  ids = rng.integers(0, EOS, (batch, length))
  ids[np.arange(batch), rng.integers(1, length, batch)] = EOS
  return pixels, ids


def _tiny_tokenizer(folder):
  from transformers import CLIPTokenizer
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "a</w>": 4, "b</w>": 5,
           "ab</w>": 6}
  tok = CLIPTokenizer(vocab=vocab, merges=[("a", "b</w>")], model_max_length=16)
  tok.save_pretrained(str(folder))
  assert tok("ab a b").input_ids == [0, 6, 4, 5, 1]
  return str(folder)


def _write(tmp_path, name: str, obj) -> str:
  torch.save(obj, str(tmp_path / name))
  return str(tmp_path / name)


def _tiny_config_file(tmp_path, cfg=TINY) -> str:
  (tmp_path / "tiny.json").write_text(json.dumps(cfg))
  return str(tmp_path / "tiny.json")


@pytest.mark.parametrize("half,quick_gelu", [(False, False), (True, True)])
def test_matches_open_clip(oc, tmp_path, half, quick_gelu):
  cfg = {**TINY, "quick_gelu": quick_gelu}
  model = _build(oc, cfg, seed=1)
  sd = {k: v.half() if half else v for k, v in model.state_dict().items()}
  if half:   # the reference runs in fp32 on the fp16-rounded weights the file holds
    model.load_state_dict({k: v.float() for k, v in sd.items()})
  src = _write(tmp_path, "x.pt", {"state_dict": sd, "epoch": 1})
  out = str(tmp_path / "out")
  record = convert_open_clip.convert_checkpoint(
      src, out, config_file=_tiny_config_file(tmp_path, cfg),
      tokenizer=_tiny_tokenizer(tmp_path / "tok"))

  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if half else "F32"}
    assert f.metadata()["source_sha256"] == record["source_sha256"]
  assert record["source_sha256"] == hashlib.sha256(open(src, "rb").read()).hexdigest()
  assert json.load(open(os.path.join(out, "conversion.json")))["layout"] == "open_clip"
  tok = clip_folder.load_tokenizer(out)
  assert tok("ab a b").input_ids == [0, 6, 4, 5, 1]
  assert {"vocab.json", "merges.txt"} <= set(os.listdir(out))
  assert sorted(os.listdir(tmp_path)) == ["out", "tiny.json", "tok", "x.pt"]   # no temp left

  module, params = clip_folder.load_clip(out)
  pixels, ids = _inputs(seed=2)
  ours = module.apply({"params": params}, ids, pixels.transpose(0, 2, 3, 1))
  with torch.no_grad():
    ref_img = model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    ref_txt = model.encode_text(torch.from_numpy(ids), normalize=True).numpy()
    ref_scale = model.logit_scale.item()
  err_img = np.abs(np.asarray(ours["image_embeds"]) - ref_img).max()
  err_txt = np.abs(np.asarray(ours["text_embeds"]) - ref_txt).max()
  print(f"half={half} quick_gelu={quick_gelu}: |d image| {err_img:.2e}, |d text| {err_txt:.2e}")
  assert err_img <= 1e-4 * np.abs(ref_img).max(), f"image embeds differ by {err_img:.3g}"
  assert err_txt <= 1e-4 * np.abs(ref_txt).max(), f"text embeds differ by {err_txt:.3g}"
  assert float(params["logit_scale"]) == pytest.approx(ref_scale, abs=1e-3 if half else 1e-7)
  ref_logits = np.exp(ref_scale) * ref_img @ ref_txt.T
  np.testing.assert_allclose(ours["logits_per_image"], ref_logits, atol=1e-4 * np.exp(ref_scale))


def vit_h14_layout() -> dict[str, tuple[int, ...]]:
  """open_clip's ViT-H-14 state dict, written from the architecture (independent of the code)."""
  cv, ct, p, grid = 1280, 1024, 1024, 224 // 14
  out = {"visual.class_embedding": (cv,), "visual.positional_embedding": (grid * grid + 1, cv),
         "visual.conv1.weight": (cv, 3, 14, 14), "visual.proj": (cv, p),
         "token_embedding.weight": (49408, ct), "positional_embedding": (77, ct),
         "text_projection": (ct, p), "logit_scale": ()}
  for name, c in (("visual.ln_pre", cv), ("visual.ln_post", cv), ("ln_final", ct)):
    out.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})
  for prefix, c, layers in (("visual.transformer", cv, 32), ("transformer", ct, 24)):
    block = {"ln_1.weight": (c,), "ln_1.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,),
             "attn.in_proj_weight": (3 * c, c), "attn.in_proj_bias": (3 * c,),
             "attn.out_proj.weight": (c, c), "attn.out_proj.bias": (c,),
             "mlp.c_fc.weight": (4 * c, c), "mlp.c_fc.bias": (4 * c,),
             "mlp.c_proj.weight": (c, 4 * c), "mlp.c_proj.bias": (c,)}
    out.update({f"{prefix}.resblocks.{i}.{k}": v for i in range(layers) for k, v in block.items()})
  return out


def test_vit_h14_full_size_keys_and_shapes():
  """Every key and shape of a real HPS checkpoint, with zero-stride arrays (no memory)."""
  layout = vit_h14_layout()
  state = {k: np.broadcast_to(np.float16(0), s) for k, s in layout.items()}
  config = open_clip_config.to_clip_config(open_clip_config.BUILTIN["ViT-H-14"], "ViT-H-14")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
  mapped = convert_open_clip.check(state, config, "ViT-H-14 layout")
  grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
  assert grown < 1 << 20, f"the check allocated {grown / 2**20:.1f} GiB (a copy of the weights?)"
  assert sum(v.size for v in mapped.values()) == 986_109_441   # open_clip's 986.11M
  assert len(mapped) == len(layout) + 2 * 2 * (32 + 24)   # in_proj w/b -> q, k, v
  assert all(v.dtype == np.float16 and 0 in v.strides for v in mapped.values() if v.ndim)


def test_vit_h14_layout_is_open_clips(oc):
  """The hand-written table equals open_clip's own ViT-H-14 (built on the meta device)."""
  cfg = json.load(open(os.path.join(OPEN_CLIP_DIR, "model_configs", "ViT-H-14.json")))
  with torch.device("meta"):
    model = oc.CLIP(cfg["embed_dim"], oc.CLIPVisionCfg(**cfg["vision_cfg"]),
                    oc.CLIPTextCfg(**cfg["text_cfg"]))
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == vit_h14_layout()


def test_builtin_configs_are_open_clips_and_the_presets():
  if OPEN_CLIP_DIR is None:
    pytest.skip("open-clip-torch is not installed")
  for name, cfg in open_clip_config.BUILTIN.items():
    assert json.load(open(os.path.join(OPEN_CLIP_DIR, "model_configs", f"{name}.json"))) == cfg, name
  ours = lambda n: open_clip_config.to_clip_config(open_clip_config.BUILTIN[n], n)
  assert ours("ViT-H-14") == clip.PRESETS["ViT-H-14"]()
  assert ours("ViT-bigG-14") == clip.PRESETS["ViT-bigG-14"]()
  assert ours("ViT-L-14-quickgelu") == clip.PRESETS["ViT-L-14"]()   # OpenAI's: quick_gelu
  assert ours("ViT-L-14").text.hidden_act == "gelu"


class _Evil:
  """Unpickling this creates `path`: what a malicious checkpoint would do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_malicious_missing_and_corrupt_files_are_refused(tmp_path):
  marker = tmp_path / "pwned"
  evil = _write(tmp_path, "evil.pt", {"state_dict": {"w": torch.zeros(2)}, "x": _Evil(str(marker))})
  with pytest.raises(convert.WeightsError, match=r"evil\.pt: .*Unsupported global: GLOBAL io.open"):
    torch_pickle.load_state_dict(evil)
  assert not marker.exists()
  for path in (str(tmp_path / "missing.pt"), str(tmp_path / "noise.pt")):
    if "noise" in path:
      open(path, "wb").write(np.random.default_rng(0).bytes(4096))
    with pytest.raises(convert.WeightsError, match=path.replace(".", r"\.")):
      torch_pickle.load_state_dict(path)


def test_prefix_and_dtypes(tmp_path):
  sd = {"module.a": torch.ones(2, dtype=torch.bfloat16), "module.b": torch.ones(2).half()}
  out = torch_pickle.load_state_dict(_write(tmp_path, "p.pt", sd))
  assert {k: v.dtype for k, v in out.items()} == {"a": np.float32, "b": np.float16}
  with pytest.raises(convert.WeightsError, match=r"p2\.pt: w is a int"):
    torch_pickle.load_state_dict(_write(tmp_path, "p2.pt", {"w": 3}))


def test_bad_keys_and_existing_output_are_refused(oc, tmp_path):
  sd = _build(oc, TINY, seed=3).state_dict()
  config_file, out = _tiny_config_file(tmp_path), str(tmp_path / "out")
  run = lambda src, **kw: convert_open_clip.convert_checkpoint(src, out, config_file=config_file,
                                                               **kw)
  extra = {**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}
  with pytest.raises(convert.WeightsError, match=r"extra\.pt.*resblocks\.0\.ls_1\.gamma"):
    run(_write(tmp_path, "extra.pt", {"state_dict": extra}))
  missing = {k: v for k, v in sd.items() if k != "visual.ln_post.bias"}
  with pytest.raises(convert.WeightsError, match=r"missing\.pt.*post_layernorm\.bias"):
    run(_write(tmp_path, "missing.pt", {"state_dict": missing}))
  assert not os.path.exists(out)
  src = _write(tmp_path, "ok.pt", {"state_dict": {**sd, "attn_mask": torch.zeros(16, 16)}})
  os.makedirs(out)
  open(os.path.join(out, "old.txt"), "w").close()
  with pytest.raises(FileExistsError, match="--overwrite"):
    run(src)
  done = subprocess.run(   # the CLI, once: flags, positional arguments, summary line
      [sys.executable, "-m", "ppd_jax.weights.convert_open_clip", src, out,
       f"--open_clip_config={config_file}", "--overwrite"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert torch_pickle.sha256(src) in done.stdout and "float32" in done.stdout
  assert sorted(os.listdir(out)) == ["config.json", "conversion.json", "model.safetensors"]
  with pytest.raises(ValueError, match=r"vision_cfg\.ls_init_value"):
    open_clip_config.to_clip_config({**TINY, "vision_cfg": {**TINY["vision_cfg"],
                                                            "ls_init_value": 1e-5}}, "x.json")
