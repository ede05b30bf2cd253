"""Few-shot user embedding from N labelled pairs: the demo's stand-in for the paper's VLM.

In PPD a vision-language model looks at N = 4 pairs of one user (caption, two images, which one won)
and its hidden state becomes the user embedding. Here a fixed, untrained "vision model" summarises
each image by generic statistics (colour moments, the object's mass, centre and spread against the
background estimated from the border, ...), and token k of the embedding is
statistics(winner_k) - statistics(loser_k): what the user chose more of, pair by pair.

The embedder sees only images and captions. It never reads a synthetic user's hidden weights, and
it does not use the synthetic world's reward features either: its statistics are computed from
pixels, so whatever it recovers about a user, it recovers the way a VLM would have to.

The output is [tokens, dim] float32, the same interface as the VLM embedding of users/vlm.py (one
token per kept hidden state), so the model's user projector does not care which produced it.
"""
import numpy as np

# Names of the columns of image_statistics, in order.
STATISTICS = (
    "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
    "luminance", "border_luminance", "object_fraction",
    "object_x", "object_y", "object_spread_x", "object_spread_y",
    "object_luminance", "saturation", "object_saturation",
)

# Typical size of the difference of each statistic between two images, so every token entry is of
# order one: the standard deviation over random same-caption pairs of the demo's shape world
# (demo_world/synthetic.py), measured once and rounded. Fixed constants, never fitted to
# users, so one user's embedding depends on its own pairs only.
_DIFF_SCALE = np.array([
    0.25, 0.25, 0.25, 0.1, 0.1, 0.1,
    0.25, 0.3, 0.1,
    0.15, 0.15, 0.03, 0.03,
    0.1, 0.07, 0.12,
], np.float32)

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_OBJECT_THRESHOLD = 0.1    # colour distance from the border colour that counts as "object"


def image_statistics(images: np.ndarray) -> np.ndarray:
  """[N, S, S, 3] images in [-1, 1] -> [N, len(STATISTICS)] float32 generic image statistics.

  Positions are fractions of the image side, x to the right and y down. The background colour is
  the per-channel median of the border pixels; the object is where pixels differ from it, weighted
  by how much they differ (soft, so anti-aliased edges count in part).
  """
  x = (np.asarray(images, np.float32) + 1.0) * 0.5          # [N, H, W, 3] in [0, 1]
  n, h, w, _ = x.shape
  mean = x.mean(axis=(1, 2))
  std = x.std(axis=(1, 2))
  luma = x @ _LUMA                                            # [N, H, W]
  sat = x.max(-1) - x.min(-1)

  border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
  background = np.median(border, axis=1)                      # [N, 3]
  distance = np.linalg.norm(x - background[:, None, None], axis=-1)
  weight = np.clip(distance / _OBJECT_THRESHOLD - 1.0, 0.0, 1.0)   # soft object mask
  mass = weight.sum(axis=(1, 2))
  safe = np.maximum(mass, 1e-6)

  ys = (np.arange(h, dtype=np.float32) + 0.5) / h
  xs = (np.arange(w, dtype=np.float32) + 0.5) / w
  cx = np.where(mass > 0, (weight * xs[None, None]).sum((1, 2)) / safe, 0.5)
  cy = np.where(mass > 0, (weight * ys[None, :, None]).sum((1, 2)) / safe, 0.5)
  spread_x = np.sqrt((weight * (xs[None, None] - cx[:, None, None]) ** 2).sum((1, 2)) / safe)
  spread_y = np.sqrt((weight * (ys[None, :, None] - cy[:, None, None]) ** 2).sum((1, 2)) / safe)
  object_luma = np.where(mass > 0, (weight * luma).sum((1, 2)) / safe, background @ _LUMA)
  object_sat = np.where(mass > 0, (weight * sat).sum((1, 2)) / safe, 0.0)

  columns = [mean[:, 0], mean[:, 1], mean[:, 2], std[:, 0], std[:, 1], std[:, 2],
             luma.mean((1, 2)), background @ _LUMA, mass / (h * w),
             cx, cy, spread_x, spread_y, object_luma, sat.mean((1, 2)), object_sat]
  return np.stack(columns, axis=1).astype(np.float32)


def embed_user(winners: np.ndarray, losers: np.ndarray, captions: list[str], tokens: int,
               dim: int) -> np.ndarray:
  """N labelled pairs of one user -> [tokens, dim] float32 user embedding.

  winners[k] was preferred over losers[k] for captions[k]. Each pair gives the scaled statistics
  difference winner - loser, zero-padded or truncated to `dim` features. With tokens == N, token k
  is pair k's; with fewer tokens the pairs are split into `tokens` consecutive groups and each token
  is its group's mean (tokens = 1: the mean over all pairs, like a VLM's one final-token state);
  with more, the extra tokens are zero. The captions are accepted for the VLM's interface; these
  statistics do not need them (both images of a pair share the caption).
  """
  winners = np.asarray(winners)
  losers = np.asarray(losers)
  if winners.shape != losers.shape or winners.ndim != 4:
    raise ValueError(f"winners {winners.shape} and losers {losers.shape} must both be [N, S, S, 3]")
  if len(captions) != len(winners):
    raise ValueError(f"{len(captions)} captions for {len(winners)} pairs")
  diff = (image_statistics(winners) - image_statistics(losers)) / _DIFF_SCALE
  groups = [g.mean(axis=0) for g in np.array_split(diff, min(tokens, len(diff))) if len(g)]
  out = np.zeros((tokens, dim), np.float32)
  f = min(dim, diff.shape[1])
  out[:len(groups), :f] = np.stack(groups)[:, :f]
  return out
