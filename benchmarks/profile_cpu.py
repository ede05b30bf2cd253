"""Where the UNet's time goes on this CPU, ours and diffusers', by kind of operation.

  python benchmarks/profile_cpu.py [--size=small] [--batch=2] [--resolution=32] [--calls=3]

The set-up is benchmarks/unet.py's (same architecture, weights, inputs and user branch on both
sides, fp32). Each side is profiled for --calls calls after a warm-up, for the forward and for the
forward+backward over the user branch:

  ours   jax.profiler.trace (perfetto trace): XLA:CPU emits one event per executed HLO
         instruction (a fusion, a YNNPACK/Eigen dot or convolution, a copy). Each event is
         classified from the compiled HLO (compiled.as_text()): the instruction's opcode, the ops
         inside its fusion, and the Flax module path in its op_name metadata.
  theirs torch.profiler: self CPU time of each aten op (no double counting of nested ops).

Kinds: convolution; attention matmuls (q k^T and p v); attention softmax (the elementwise and
reduction work between them); dense matmuls (to_q/k/v/out, feed-forward, time embedding, 1x1
projections); norms (GroupNorm, LayerNorm); copies and transposes; other reductions; elementwise
(SiLU, GELU, adds, scaling). Op events may overlap on the 2 threads of XLA's CPU client, so the
percentages are of the summed op time; the wall time per call is printed beside them.
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

import unet as unet_bench  # pylint: disable=wrong-import-position
from ppd_jax import models  # pylint: disable=wrong-import-position
from ppd_jax.models import unet as unet_lib  # pylint: disable=wrong-import-position
from ppd_jax.weights import convert  # pylint: disable=wrong-import-position
from ppd_jax.weights import export  # pylint: disable=wrong-import-position

# --size, --batch and --resolution are benchmarks/unet.py's flags (defined by its import).
flags.DEFINE_integer("calls", 3, "profiled calls per measurement, after one warm-up call")
FLAGS = flags.FLAGS

KINDS = ("convolution", "attention matmuls", "attention softmax", "dense matmuls", "norms",
         "copies, transposes", "other reductions", "elementwise")


# Ours ---------------------------------------------------------------------------------------------

def hlo_instructions(hlo_text: str) -> dict:
  """name -> (opcode, op_name metadata, body of the called fusion computation)."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      bodies[current] = []
    elif line.startswith("}"):
      current = None
    elif current:
      bodies[current].append(line)
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
    if m:
      op_name = re.search(r'op_name="([^"]*)"', line)
      calls = re.search(r"calls=%([\w.\-]+)", line)
      body = "\n".join(bodies.get(calls.group(1), ())) if calls else ""
      out[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "", body)
  return out


def jax_kind(name: str, opcode: str, op_name: str, body: str) -> str:
  """The kind of one executed HLO instruction (module docstring)."""
  has = lambda op: opcode == op or f" {op}(" in body
  dense_layer = re.search(r"/(to_q|to_k|to_v|to_out_0|to_k_user|to_v_user)/", op_name)
  in_attention = re.search(r"/attn\d/", op_name) and not dense_layer
  if has("convolution"):
    return "convolution"
  if has("dot"):
    return "attention matmuls" if in_attention else "dense matmuls"
  if in_attention:
    return "attention softmax"
  if re.search(r"/norm\d?/", op_name):
    return "norms"
  if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose", "bitcast_copy")):
    return "copies, transposes"
  if has("reduce") or has("reduce-window") or "reduce" in name:
    return "other reductions"
  return "elementwise"


def profile_jax(fn, compiled_text: str, calls: int) -> tuple[collections.Counter, float]:
  """(microseconds per kind per call, wall seconds per call) from one jax.profiler trace."""
  jax.block_until_ready(fn())
  instructions = hlo_instructions(compiled_text)
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn())
    wall = (time.perf_counter() - start) / calls
    (path,) = glob.glob(f"{folder}/plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in instructions:
      kinds[jax_kind(e["name"], *instructions[e["name"]])] += e["dur"] / calls
  return kinds, wall


def ours(cfg, base, user, inputs, calls: int) -> dict:
  model = models.PersonalizedUNet(cfg)
  args = jax.device_put((base, user, inputs["x"], inputs["t"], inputs["text"], inputs["user"]))

  def forward(base, user, x, t, text, u):
    return model.apply({"params": models.merge_params(base, user)}, x, t, text, u, 1.0, None)

  def grad(base, user, x, t, text, u):
    loss = lambda user: jnp.mean(jnp.square(forward(base, user, x, t, text, u)))
    return jax.grad(loss)(user)

  out = {}
  for name, f in (("forward", forward), ("forward+backward", grad)):
    compiled = jax.jit(f).lower(*args).compile()
    out[name] = profile_jax(lambda c=compiled: c(*args), compiled.as_text(), calls)
  return out


# Theirs -------------------------------------------------------------------------------------------

def torch_kind(op: str) -> str:
  """The kind of one aten op (self time)."""
  op = op.removeprefix("aten::")
  if "convolution" in op or op in ("conv2d", "_convolution", "mkldnn_convolution"):
    return "convolution"
  if "scaled_dot_product" in op or "attention" in op:
    return "attention softmax" if "softmax" in op else "attention matmuls"
  if op in ("addmm", "mm", "bmm", "baddbmm", "linear", "matmul"):
    return "dense matmuls"
  if "norm" in op:
    return "norms"
  if op in ("copy_", "contiguous", "clone", "_to_copy", "to", "transpose", "permute", "reshape",
            "view", "as_strided", "cat", "empty_like", "t"):
    return "copies, transposes"
  if op in ("sum", "mean", "amax", "max"):
    return "other reductions"
  return "elementwise"


def theirs(unet_cfg, torch_sd, ip_sd, inputs, calls: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_flush_denormal(True)
  unet = unet_bench.diffusers_unet_with_adapter(
      unet_cfg, {k: torch.from_numpy(v) for k, v in torch_sd.items()}, ip_sd)
  unet.eval().requires_grad_(False)
  trainable = [p for n, p in unet.named_parameters()
               if n.startswith("encoder_hid_proj.") or ".to_k_ip." in n or ".to_v_ip." in n]
  for p in trainable:
    p.requires_grad_(True)
  x = torch.from_numpy(np.ascontiguousarray(inputs["x"].transpose(0, 3, 1, 2)))
  t = torch.from_numpy(inputs["t"].astype(np.int64))
  text = torch.from_numpy(inputs["text"])
  added = {"image_embeds": [torch.from_numpy(inputs["user"][:, None])]}
  call = lambda: unet(x, t, text, added_cond_kwargs=added).sample

  def forward():
    with torch.no_grad():
      return call()

  def grad():
    return torch.autograd.grad(call().square().mean(), trainable)

  out = {}
  for name, fn in (("forward", forward), ("forward+backward", grad)):
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      start = time.perf_counter()
      for _ in range(calls):
        fn()
      wall = (time.perf_counter() - start) / calls
    kinds = collections.Counter()
    for avg in prof.key_averages():
      if avg.key.startswith("aten::"):
        kinds[torch_kind(avg.key)] += avg.self_cpu_time_total / calls
    out[name] = (kinds, wall)
  return out


# Main ---------------------------------------------------------------------------------------------

def table(name: str, ours_row, theirs_row) -> str:
  (ok, ow), (tk, tw) = ours_row, theirs_row
  osum, tsum = sum(ok.values()), sum(tk.values())
  lines = [f"{name}: wall ours {ow * 1e3:.0f} ms/call, diffusers {tw * 1e3:.0f} ms/call "
           f"(ratio {tw / ow:.2f}x)",
           "| kind | ours ms | ours % | diffusers ms | diffusers % |",
           "| --- | --- | --- | --- | --- |"]
  for kind in KINDS:
    lines.append(f"| {kind} | {ok[kind] / 1e3:.1f} | {100 * ok[kind] / osum:.0f}% | "
                 f"{tk[kind] / 1e3:.1f} | {100 * tk[kind] / tsum:.0f}% |")
  lines.append(f"| sum of op times | {osum / 1e3:.1f} | | {tsum / 1e3:.1f} | |")
  return "\n".join(lines)


def main(_):
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  diffusers.utils.logging.set_verbosity_error()
  batch, side = FLAGS.batch or 2, FLAGS.resolution or 32
  unet_cfg = unet_bench.unet_config_dict(FLAGS.size)
  cfg = unet_lib.config_from_diffusers(unet_cfg, user_embed_dim=3584, user_tokens=1,
                                       dtype=jnp.float32, attention_impl=None, remat=False)
  base_shapes, user_shapes = models.split_params(jax.eval_shape(
      lambda: models.init_params(models.PersonalizedUNet(cfg), jax.random.key(0))))
  torch.manual_seed(0)
  with torch.no_grad():
    torch_sd = {k: v.numpy() for k, v in
                diffusers.UNet2DConditionModel(**unet_cfg).state_dict().items()}
  base = convert.to_flax({"unet." + k: v for k, v in torch_sd.items()}, base_shapes,
                         what=f"diffusers UNet ({FLAGS.size})")
  user = unet_bench.random_user_params(user_shapes, 0)
  inputs = unet_bench.make_inputs(cfg, batch, side, 0)
  print(f"unet {FLAGS.size}, batch {batch} @ {side}x{side}, fp32; "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; cpu: {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f}", flush=True)
  theirs_rows = theirs(unet_cfg, torch_sd, export.ip_adapter_state_dict(user, cfg), inputs,
                       FLAGS.calls)
  ours_rows = ours(cfg, base, user, inputs, FLAGS.calls)
  for name in ("forward", "forward+backward"):
    print(table(name, ours_rows[name], theirs_rows[name]), flush=True)


if __name__ == "__main__":
  app.run(main)
