"""PNG figures of an evaluation, drawn with PIL only (no plotting library in the dependencies).
Each is encoded in memory and written through ppd_jax.storage, so `path` may be a URL."""
import io

import numpy as np
from PIL import Image, ImageDraw

from ppd_jax import images as images_lib
from ppd_jax import storage

_BARS = (("PPD\nvs base", "unseen_user_win_rate", (52, 101, 164)),
         ("PPD train\nvs base", "train_user_win_rate", (114, 159, 207)),
         ("DPO\nvs base", "dpo_baseline_win_rate", (204, 121, 32)),
         ("PPD\nvs DPO", "ppd_vs_dpo_win_rate", (78, 154, 6)),
         ("control\nvs base", "control_win_rate", (136, 138, 133)))


def _save(img: Image.Image, path) -> None:
  buffer = io.BytesIO()
  img.save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())     # atomic locally


def win_rate_chart(results: dict, path: str) -> None:
  """Bars of the win rates (unseen users unless said), with the 0.5 (no effect) line."""
  w, h, left, bottom, top = 520, 340, 50, 60, 40
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  d.text((left, 12), "win rates, unseen users (synthetic judge: hidden per-user rewards)",
         fill="black")
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
    lo, hi = results.get("ci95", {}).get(key, (None, None))
    if lo is not None:                      # the 95% interval over users
      xm = x0 + slot * 0.3
      d.line([(xm, y(lo)), (xm, y(hi))], fill="black", width=2)
      for yy in (y(lo), y(hi)):
        d.line([(xm - 6, yy), (xm + 6, yy)], fill="black", width=2)
    d.text((x0, y(max(v, hi or v)) - 14), f"{v:.2f}", fill="black")
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


def _tile(image: np.ndarray, side: int) -> Image.Image:
  tile = Image.fromarray(images_lib.to_uint8(np.asarray(image)))
  return tile.resize((side, side), Image.NEAREST if tile.width < side else Image.BICUBIC)


def triangle_grid(points: list, n: int, names: list, prompt: str, path: str) -> None:
  """points: (row, position, weights, image) of evals/interpolate.barycentric; row r's r + 1
  tiles centred under each other, so vertex 0 is at the top, 1 bottom left, 2 bottom right."""
  side = int(np.clip(points[0][3].shape[0], 80, 192))
  pad, head, foot = 6, 34, 22
  width = n * (side + pad) + pad
  img = Image.new("RGB", (width, head + n * (side + pad) + foot), "white")
  d = ImageDraw.Draw(img)
  d.text((pad, 4), f"{prompt!r}: mixes of {', '.join(names)}", fill="black")
  d.text((width // 2 - 3 * len(names[0]), 18), names[0], fill="black")
  for r, j, _, image in points:
    x = pad + (n - 1 - r) * (side + pad) // 2 + j * (side + pad)
    img.paste(_tile(image, side), (x, head + r * (side + pad)))
  bottom = head + n * (side + pad) + 2
  d.text((pad, bottom), names[1], fill="black")
  d.text((width - pad - 6 * len(names[2]), bottom), names[2], fill="black")
  _save(img, path)


_COLOURS = ((52, 101, 164), (204, 121, 32), (78, 154, 6), (117, 80, 123), (164, 0, 0))


EDGE_Y_LABEL = "y: each reward scaled 0-1 over all edges"


def edge_scales(curves: list, rewards: list) -> dict:
  """{reward: (lo, span)}: a reward's min and range over the points of every edge, so that a
  value sits at the same height in every panel, and rewards of any units share the one axis
  y = (v - lo) / span."""
  out = {}
  for r in rewards:
    vals = np.array([v for c in curves for v in c["means"][r]], np.float64)
    out[r] = (float(vals.min()), max(float(vals.max() - vals.min()), 1e-12))
  return out


def edge_curves(curves: list, rewards: list, path: str) -> None:
  """One panel per edge k -> l, all on one y axis (EDGE_Y_LABEL, edge_scales): each reward's
  mean against t, with the reward's raw range in the key."""
  w, h, left, bottom, top = 300, 270, 40, 40, 58
  img = Image.new("RGB", (w * len(curves), h), "white")
  d = ImageDraw.Draw(img)
  span = edge_scales(curves, rewards)
  for p, c in enumerate(curves):
    x0 = p * w
    d.text((x0 + left, 4), f"{c['from']} -> {c['to']}", fill="black")
    x = lambda t: x0 + left + t * (w - left - 16)
    y = lambda v: h - bottom - v * (h - bottom - top)
    d.rectangle([x(0), y(1), x(1), y(0)], outline=(200, 200, 200))
    for v in (0.0, 1.0):
      d.text((x0 + left - 12, y(v) - 5), f"{v:.0f}", fill="black")
    for t in (0.0, 0.5, 1.0):
      d.text((x(t) - 8, h - bottom + 4), f"{t:.1f}", fill="black")
    d.text((x0 + left, h - 18), "t (0: first user, 1: second)", fill="black")
    d.text((x0 + left, 43), EDGE_Y_LABEL, fill="black")
    for i, r in enumerate(rewards):
      lo, s = span[r]
      xy = [(x(t), y((v - lo) / s)) for t, v in zip(c["t"], c["means"][r])]
      colour = _COLOURS[i % len(_COLOURS)]
      d.line(xy, fill=colour, width=2)
      for px, py in xy:
        d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
      d.text((x0 + left + 2, 16 + 9 * i), f"{r} [{lo:.3g}, {lo + s:.3g}]", fill=colour)
  _save(img, path)
