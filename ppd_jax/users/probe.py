"""User-classification probe (PPD, Fig. 2): can a linear classifier tell users apart from their
frozen embeddings?

If the user embedding carries who the user is (their taste), embeddings of the same user cluster
and a linear softmax classifier on them beats chance (k / C for top-k over C users) by far. The
paper takes the 300 users with the most pairs, several embeddings per user (different few-shot
sets), and splits by embedding, so every test user was seen in training, through other embeddings.

  python -m ppd_jax.users.probe --store=USERS.safetensors --out=DIR \
      [--k=300 --layer=-1 --steps=500 --seed=0 --num_pairs=SHARD_DIR]

writes DIR/probe.json (the result of train_probe) and DIR/probe.png (test top-1/top-5 vs chance).
"""
import functools
import json
import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from PIL import ImageDraw

from ppd_jax import cli_logging
from ppd_jax.data import user_store as store_lib

_STD_FLOOR = 1e-6        # a feature constant over the train split is centred, not blown up
_COLOURS = {"test": (52, 101, 164), "train": (114, 159, 207), "chance": (136, 138, 133)}


class ProbeError(ValueError):
  """Input the probe cannot use; the message names the file or flag."""


def features(embeddings, layer=-1, *, rows=None) -> np.ndarray:
  """[E, T, D] -> [E, D] float32: one token (default the last: the last layer's final-token state)
  or "mean" over tokens. [E, F] passes through. `rows` gathers first, so a memory-mapped store
  only reads the rows (and, for one token, the token) that are used."""
  x = embeddings
  if x.ndim == 2:
    return np.asarray(x if rows is None else x[rows], dtype=np.float32)
  if x.ndim != 3:
    raise ValueError(f"embeddings must be [E, T, D] or [E, F], got shape {x.shape}")
  tokens = x.shape[1]
  if isinstance(layer, str) and layer == "mean":
    sub = x if rows is None else x[rows]
    return np.asarray(sub, dtype=np.float32).mean(axis=1)
  if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
    raise ValueError(f"layer must be an int token index or 'mean', got {layer!r}")
  if not -tokens <= layer < tokens:
    raise ValueError(f"layer {layer} out of range for {tokens} tokens")
  sub = x[:, layer] if rows is None else x[np.asarray(rows), int(layer)]
  return np.asarray(sub, dtype=np.float32)


def _count_table(num_pairs_per_user) -> tuple[np.ndarray, np.ndarray]:
  """{id: n}, {"user_id": [U], "num_pairs": [U]} (an index's users.npz) or (ids, counts)."""
  if isinstance(num_pairs_per_user, Mapping):
    if "user_id" in num_pairs_per_user and "num_pairs" in num_pairs_per_user:
      ids, counts = num_pairs_per_user["user_id"], num_pairs_per_user["num_pairs"]
    else:
      ids, counts = list(num_pairs_per_user.keys()), list(num_pairs_per_user.values())
  else:
    ids, counts = num_pairs_per_user
  ids, counts = np.asarray(ids, dtype=np.int64), np.asarray(counts, dtype=np.int64)
  if ids.shape != counts.shape or ids.ndim != 1:
    raise ValueError(f"pair counts: {ids.shape} user ids for {counts.shape} counts")
  uniq, n = np.unique(ids, return_counts=True)
  if (n > 1).any():
    raise ValueError(f"pair counts: user id {uniq[n > 1][0]} listed more than once")
  return ids, counts


def select_top_users(user_ids, num_pairs_per_user, k: int = 300):
  """-> (rows, users): the rows (ascending) of user_ids that belong to the k users with the most
  pairs, and those users, most pairs first; ties go to the smaller user id. Users with no entry in
  num_pairs_per_user cannot be ranked and are left out."""
  user_ids = np.asarray(user_ids, dtype=np.int64)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  ids, counts = _count_table(num_pairs_per_user)
  present = np.isin(ids, user_ids)
  ids, counts = ids[present], counts[present]
  order = np.lexsort((ids, -counts))           # most pairs first, then smallest id
  users = ids[order[:k]]
  return np.flatnonzero(np.isin(user_ids, users)), users


def _split(y: np.ndarray, num_classes: int, test_fraction: float, seed: int) -> np.ndarray:
  """Stratified by user: a user with n >= 2 embeddings puts round(n * f), clipped to [1, n - 1],
  in test; a user with one embedding puts it in train. -> boolean test mask [E]."""
  rng = np.random.default_rng(seed)
  order = np.lexsort((rng.permutation(y.size), y))       # by class, random within a class
  counts = np.bincount(y, minlength=num_classes)
  starts = np.cumsum(counts) - counts
  rank = np.empty(y.size, dtype=np.int64)
  rank[order] = np.arange(y.size) - starts[y[order]]
  n_test = np.where(counts >= 2, np.clip(np.rint(counts * test_fraction), 1, counts - 1), 0)
  return rank < n_test[y]


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "lr", "weight_decay"))
def _fit(x, y, *, num_classes: int, steps: int, lr: float, weight_decay: float):
  """Full-batch AdamW on the mean cross-entropy of logits = x W + b; the problem is convex, so
  zeros are as good a start as any and keep the fit independent of the seed. -> (params, [steps]
  loss before each update). Weight decay on W only."""
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  opt = optax.adamw(lr, weight_decay=weight_decay, mask={"w": True, "b": False})

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    # L = -1/N sum_i log softmax(logits_i)[y_i]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, _):
    p, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params, losses


def _top_k(logits: np.ndarray, y: np.ndarray, k: int) -> float:
  """Hit when fewer than k classes score strictly above the true one (ties count in its favour)."""
  true = logits[np.arange(y.size), y]
  return float(((logits > true[:, None]).sum(axis=1) < k).mean())


def train_probe(embeddings, labels, *, test_fraction: float = 0.25, steps: int = 500,
                lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
                top_k=(1, 5)) -> dict:
  """Linear softmax probe on frozen embeddings [E, F] with user ids [E] (any ints, repeated for
  several embeddings per user), split by embedding. Deterministic given seed (it picks the split).

  -> {"train_top{k}", "test_top{k}", "chance_top{k}" (= min(k, C) / C), "num_users",
  "num_embeddings", "num_train", "num_test", "user_ids" (class c is user_ids[c]),
  "train_only_users" (ids with a single embedding, not tested), "loss" [steps], "final_loss"
  (after the last update), "config"}.
  """
  x = np.asarray(embeddings, dtype=np.float32)
  labels = np.asarray(labels)
  if x.ndim != 2 or labels.shape != (x.shape[0],):
    raise ValueError(f"embeddings must be [E, F] with labels [E], got {x.shape} and "
                     f"{labels.shape}")
  if labels.dtype.kind not in "iu":
    raise ValueError(f"labels must be integer user ids, got dtype {labels.dtype}")
  if not np.isfinite(x).all():
    raise ValueError("embeddings hold non-finite values")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  ks = tuple(int(k) for k in top_k)
  if not ks or min(ks) < 1:
    raise ValueError(f"top_k must be positive ints, got {top_k}")
  user_ids, y = np.unique(labels, return_inverse=True)
  num_classes = user_ids.size
  if num_classes < 2:
    raise ValueError(f"the probe needs at least 2 users, got {num_classes}")
  counts = np.bincount(y, minlength=num_classes)
  if (counts < 2).all():
    raise ValueError(f"every one of the {num_classes} users has a single embedding, so none is "
                     "left to test on; the probe needs several embeddings per user")

  test = _split(y, num_classes, test_fraction, seed)
  train = ~test
  mean = x[train].mean(axis=0)
  std = np.maximum(x[train].std(axis=0), _STD_FLOOR)
  z = (x - mean) / std                        # z = (x - mu_train) / sigma_train
  params, losses = _fit(jnp.asarray(z[train]), jnp.asarray(y[train]), num_classes=num_classes,
                        steps=int(steps), lr=float(lr), weight_decay=float(weight_decay))
  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  logits = z @ w + b
  final = optax.softmax_cross_entropy_with_integer_labels(logits[train], y[train]).mean()

  result = {"num_users": int(num_classes), "num_embeddings": int(x.shape[0]),
            "num_train": int(train.sum()), "num_test": int(test.sum()),
            "user_ids": [int(u) for u in user_ids],
            "train_only_users": [int(u) for u in user_ids[counts < 2]],
            "loss": [float(v) for v in np.asarray(losses)], "final_loss": float(final),
            "config": {"test_fraction": float(test_fraction), "steps": int(steps),
                       "lr": float(lr), "weight_decay": float(weight_decay), "seed": int(seed),
                       "top_k": list(ks), "features": int(x.shape[1]),
                       "optimizer": "adamw, full batch, standardised features"}}
  for k in ks:
    result[f"train_top{k}"] = _top_k(logits[train], y[train], k)
    result[f"test_top{k}"] = _top_k(logits[test], y[test], k)
    result[f"chance_top{k}"] = min(k, num_classes) / num_classes
  return result


def _save_png(img: Image.Image, path: str) -> None:
  tmp = path + ".tmp"
  img.save(tmp, format="PNG")
  os.replace(tmp, path)


def plot_probe(result: dict, path: str) -> None:
  """Grouped bars per top-k: test and train accuracy next to chance, drawn with PIL (the project
  has no plotting library, as in evals/plots.py)."""
  ks = result["config"]["top_k"]
  w, h, left, bottom, top = 120 + 170 * len(ks), 340, 50, 50, 56
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  d.text((left, 10), f"user probe: {result['num_users']} users, {result['num_embeddings']} "
         f"embeddings ({result['num_test']} test)", fill="black")
  x_legend = left
  for name, colour in _COLOURS.items():
    d.rectangle([x_legend, 30, x_legend + 10, 40], fill=colour)
    d.text((x_legend + 14, 29), name, fill="black")
    x_legend += 70
  y = lambda v: h - bottom - v * (h - bottom - top)
  for v in (0.0, 0.25, 0.5, 0.75, 1.0):
    d.line([(left, y(v)), (w - 10, y(v))], fill=(225, 225, 225))
    d.text((8, y(v) - 6), f"{v:.2f}", fill="black")
  slot = (w - left - 10) / len(ks)
  bar = slot * 0.8 / len(_COLOURS)
  for i, k in enumerate(ks):
    x0 = left + i * slot + slot * 0.1
    for j, name in enumerate(_COLOURS):
      v = float(result[f"{name}_top{k}"])
      xb = x0 + j * bar
      d.rectangle([xb + 2, y(v), xb + bar - 2, y(0.0)], fill=_COLOURS[name])
      d.text((xb + 2, y(v) - 14), f"{v:.2f}" if v >= 0.01 else f"{v:.3f}", fill="black")
    d.text((x0 + slot * 0.3, h - bottom + 8), f"top-{k}", fill="black")
  _save_png(img, path)


def summary(result: dict) -> str:
  parts = [f"top-{k} {result[f'test_top{k}']:.2f} (chance {result[f'chance_top{k}']:.4f})"
           for k in result["config"]["top_k"]]
  return (f"probe: {result['num_users']} users, {result['num_embeddings']} embeddings; test "
          + ", ".join(parts))


def _parse_layer(layer):
  if isinstance(layer, int) or layer == "mean":
    return layer
  try:
    return int(layer)
  except (TypeError, ValueError):
    raise ProbeError(f"--layer: expected an integer token index or 'mean', got {layer!r}") from None


def _load_counts(path: str) -> dict:
  """users.npz of a Pick-a-Pic shard folder (DIR/index/users.npz), or that file itself."""
  npz = path if path.endswith(".npz") else os.path.join(path, "index", "users.npz")
  try:
    with np.load(npz) as f:
      return {"user_id": f["user_id"], "num_pairs": f["num_pairs"]}
  except FileNotFoundError:
    raise ProbeError(f"--num_pairs: {npz} not found (expected a shard folder with "
                     "index/users.npz)") from None
  except (OSError, ValueError, KeyError) as e:
    raise ProbeError(f"--num_pairs: {npz}: unreadable user table ({e})") from None


def run(store_path: str, out_dir: str, *, k: int = 300, layer=-1, steps: int = 500,
        seed: int = 0, num_pairs: str | None = None, log=print) -> dict:
  """The CLI's work: read the store, keep the k users with the most pairs (or, without a pair
  table, the most embeddings), probe, write out_dir/probe.json and probe.png, print a summary.
  Every entry of the store counts: a user's several embeddings (`users/embed.py --samples`)
  are what the split by embedding divides."""
  layer = _parse_layer(layer)
  if k < 2:
    raise ProbeError(f"--k: the probe needs at least 2 users, got {k}")
  users = store_lib.UserEmbeddingStore(store_path)
  user_ids = np.asarray(users.user_ids, dtype=np.int64)
  if num_pairs is not None:
    table, by = _load_counts(num_pairs), "num_pairs"
  else:
    uniq, n = np.unique(user_ids, return_counts=True)
    table, by = (uniq, n), "embeddings"
  rows, chosen = select_top_users(user_ids, table, k)
  if chosen.size < 2:
    raise ProbeError(f"{store_path}: the probe needs at least 2 users, found {chosen.size}"
                     + (f" with pair counts in {num_pairs}" if num_pairs is not None else ""))
  labels = user_ids[rows]
  if np.unique(labels).size == labels.size:
    raise ProbeError(f"{store_path}: each of the {chosen.size} chosen users has a single "
                     "embedding; the probe splits a user's embeddings into train and test, so "
                     "it needs several per user")
  try:
    x = features(users.embeddings, layer, rows=rows)
  except ValueError as e:
    raise ProbeError(f"--layer: {e}") from None
  result = train_probe(x, labels, steps=steps, seed=seed)
  result["config"].update({"store": os.path.abspath(store_path), "k": int(k), "layer": layer,
                           "selected_by": by, "num_pairs": num_pairs})
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, "probe.json.tmp")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, "probe.json"))
  plot_probe(result, os.path.join(out_dir, "probe.png"))
  log(summary(result))
  return result


def _define_flags() -> None:
  """Defined only when run as a script: other CLIs' --out must not clash in one process."""
  from absl import flags
  flags.DEFINE_string("store", None, "user-embedding store (.safetensors)")
  flags.DEFINE_string("out", None, "folder for probe.json and probe.png")
  flags.DEFINE_integer("k", 300, "users with the most pairs to classify")
  flags.DEFINE_string("layer", "-1", "token of each embedding to use (int index) or 'mean'")
  flags.DEFINE_integer("steps", 500, "full-batch AdamW steps")
  flags.DEFINE_integer("seed", 0, "seed of the train/test split")
  flags.DEFINE_string("num_pairs", None,
                      "Pick-a-Pic shard folder (index/users.npz) to rank users by pair count; "
                      "default: by number of embeddings")
  flags.mark_flags_as_required(["store", "out"])


def _main(argv) -> None:
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import app
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    run(f.store, f.out, k=f.k, layer=f.layer, steps=f.steps, seed=f.seed, num_pairs=f.num_pairs)
  except (ValueError, OSError) as e:     # ProbeError, StoreError and the readers' own errors
    sys.exit(f"ppd_jax.users.probe: {e}")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(_main)
