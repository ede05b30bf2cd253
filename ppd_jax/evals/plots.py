"""PNG figures of an evaluation, drawn with PIL only (no plotting library in the dependencies)."""
import os

import numpy as np
from PIL import Image, ImageDraw

from ppd_jax import images as images_lib

_BARS = (("PPD\nunseen", "unseen_user_win_rate", (52, 101, 164)),
         ("PPD\ntrain", "train_user_win_rate", (114, 159, 207)),
         ("DPO\nbaseline", "dpo_baseline_win_rate", (204, 121, 32)),
         ("control", "control_win_rate", (136, 138, 133)))


def _save(img: Image.Image, path: str) -> None:
  tmp = path + ".tmp"
  img.save(tmp, format="PNG")
  os.replace(tmp, path)


def win_rate_chart(results: dict, path: str) -> None:
  """Bars of the four win rates against the frozen base, with the 0.5 (no effect) line."""
  w, h, left, bottom, top = 520, 340, 50, 60, 40
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  d.text((left, 12), "win rate vs frozen base (hidden per-user rewards)", fill="black")
  y = lambda v: h - bottom - v * (h - bottom - top)
  for v in (0.0, 0.25, 0.5, 0.75, 1.0):
    d.line([(left, y(v)), (w - 10, y(v))], fill=(225, 225, 225))
    d.text((8, y(v) - 6), f"{v:.2f}", fill="black")
  d.line([(left, y(0.5)), (w - 10, y(0.5))], fill=(200, 0, 0), width=1)
  slot = (w - left - 10) / len(_BARS)
  for i, (label, key, colour) in enumerate(_BARS):
    v = float(results[key])
    x0 = left + i * slot + slot * 0.2
    d.rectangle([x0, y(v), x0 + slot * 0.6, y(0.0)], fill=colour)
    d.text((x0, y(v) - 14), f"{v:.2f}", fill="black")
    d.multiline_text((x0, h - bottom + 6), label, fill="black")
  _save(img, path)


def sample_grid(rows: list, captions: list, path: str, scale: int = 5, max_cols: int = 8) -> None:
  """rows: (label, images [items, S, S, 3] in [-1, 1]); one row per model/user, one column per
  item (caption over the column), upscaled `scale`x with nearest neighbours."""
  cols = min(max_cols, len(captions))
  s = rows[0][1].shape[1] * scale
  label_w, head, pad = 110, 28, 4
  img = Image.new("RGB", (label_w + cols * (s + pad), head + len(rows) * (s + pad)), "white")
  d = ImageDraw.Draw(img)
  for j, caption in enumerate(captions[:cols]):
    d.multiline_text((label_w + j * (s + pad), 2), "\n".join(caption.rsplit(" ", 1)),
                     fill="black")
  for i, (label, images) in enumerate(rows):
    top = head + i * (s + pad)
    d.multiline_text((4, top + s // 3), label.replace(" user ", "\nuser "), fill="black")
    for j in range(cols):
      tile = Image.fromarray(images_lib.to_uint8(np.asarray(images[j])))
      img.paste(tile.resize((s, s), Image.NEAREST), (label_w + j * (s + pad), top))
  _save(img, path)
