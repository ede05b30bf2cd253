"""CLIP reward preprocessing matches transformers' CLIPImageProcessorPil (OpenAI ViT-L/14 settings),
scores sampler arrays as their PNGs, and names what it cannot read."""
import numpy as np
import pytest
from PIL import Image

from ppd_jax.rewards import preprocess
from ppd_jax.images import save_png

transformers = pytest.importorskip("transformers")

TOLERANCE = 0.0   # measured: bit-identical (see preprocess.py's docstring)
SIZES = [(300, 517), (517, 300), (225, 331), (333, 227), (97, 150), (150, 97), (224, 224),
         (512, 512)]   # (height, width): landscape, portrait, odd, up-sampled, square


def openai_processor():
  """openai/clip-vit-large-patch14's preprocessor_config.json, written out (nothing downloaded)."""
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  return CLIPImageProcessorPil(
      size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
      do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
      image_mean=list(preprocess.CLIP_MEAN), image_std=list(preprocess.CLIP_STD),
      do_convert_rgb=True)


def random_images(sizes, seed=0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def reference(images) -> np.ndarray:
  out = openai_processor()(images=images, return_tensors="np", input_data_format="channels_last")
  return np.asarray(out["pixel_values"]).transpose(0, 2, 3, 1)   # NCHW -> NHWC


def test_matches_transformers_pil_processor():
  images = random_images(SIZES)
  ours = preprocess.clip_pixels(images)
  assert ours.shape == (len(SIZES), 224, 224, 3) and ours.dtype == np.float32
  ref = reference(images)
  for i, (hw, a, b) in enumerate(zip(SIZES, ours, ref)):
    assert np.abs(a - b).max() <= TOLERANCE, (i, hw, np.abs(a - b).max())


def test_threads_keep_order():
  images = random_images([(40 + i, 30 + 2 * i) for i in range(20)], seed=1)
  serial = preprocess.clip_pixels(images, size=32, workers=1)
  np.testing.assert_array_equal(preprocess.clip_pixels(images, size=32, workers=4), serial)
  np.testing.assert_array_equal(preprocess.clip_pixels(images[3:4], size=32), serial[3:4])


def test_float_arrays_score_as_their_pngs(tmp_path):
  rng = np.random.default_rng(2)
  arrays = rng.uniform(-1.1, 1.1, (3, 64, 80, 3)).astype(np.float32)   # a little outside: clipped
  paths = []
  for i, a in enumerate(arrays):
    paths.append(str(tmp_path / f"{i}.png"))
    save_png(a, paths[-1])
  np.testing.assert_array_equal(preprocess.clip_pixels(arrays, size=48),
                                preprocess.clip_pixels(paths, size=48))


def test_grey_rgba_pil_and_single_inputs():
  rgb = random_images([(50, 70)], seed=3)[0]
  want = preprocess.to_uint8_images([rgb])[0]
  np.testing.assert_array_equal(want, rgb)
  grey = rgb[..., :1]
  rgba = np.concatenate([rgb, np.zeros_like(grey)], axis=-1)   # alpha dropped, not composited
  got = preprocess.to_uint8_images([grey, rgba, Image.fromarray(rgb), Image.fromarray(rgba)])
  np.testing.assert_array_equal(got[0], np.repeat(grey, 3, axis=-1))
  for g in got[1:]:
    np.testing.assert_array_equal(g, rgb)
  single = preprocess.clip_pixels(rgb, size=32)
  assert single.shape == (1, 32, 32, 3)
  np.testing.assert_array_equal(single, preprocess.clip_pixels(rgb[None], size=32))
  assert preprocess.clip_pixels(np.zeros((0, 8, 8, 3), np.uint8), size=32).shape == (0, 32, 32, 3)


def test_unreadable_inputs_are_named(tmp_path):
  missing = str(tmp_path / "missing.png")
  with pytest.raises(preprocess.ImageInputError, match="missing.png"):
    preprocess.clip_pixels([missing])
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(np.random.default_rng(4).bytes(256))
  with pytest.raises(preprocess.ImageInputError, match="corrupt.png"):
    preprocess.clip_pixels([corrupt])
  good = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(preprocess.ImageInputError, match=r"image 1: .*int64"):
    preprocess.to_uint8_images([good, good.astype(np.int64)])
  with pytest.raises(preprocess.ImageInputError, match=r"\(8, 8\)"):
    preprocess.to_uint8_images([good[..., 0]])
  with pytest.raises(preprocess.ImageInputError, match=r"\(1, 1, 8, 8, 3\)"):
    preprocess.clip_pixels(good[None, None])
  with pytest.raises(preprocess.ImageInputError, match="shape"):
    preprocess.to_uint8_images(np.zeros((2, 8, 8, 2), np.uint8))
