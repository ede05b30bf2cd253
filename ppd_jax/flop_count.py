"""Matmul and convolution FLOPs of a jaxpr: a count that needs no backend support.

XLA's cost analysis is not available everywhere: `Lowered.cost_analysis()` is None on the PJRT
C-API backends (CUDA plugin, libtpu; jax/_src/interpreters/pxla.py, MeshComputation.cost_analysis
raises NotImplementedError there). A jaxpr is the same on every backend, so counting its
matmuls and convolutions gives one number everywhere, from tracing alone.

    dot_general:          FLOPs = 2 * prod(output shape) * prod(contracting dims of lhs)
    conv_general_dilated: FLOPs = 2 * N_out * C_out * (C_in / groups) * prod_d taps_d
      taps_d = #{(o, k): 0 <= o*stride + k*rhs_dil - pad_lo <= (in-1)*lhs_dil,
                         (o*stride + k*rhs_dil - pad_lo) % lhs_dil == 0}
      (the kernel taps of spatial dim d that land on a real input element, summed over the
      outputs: a zero-padded or lhs-dilated conv does no multiply-add on padding; XLA's
      HloCostAnalysis counts the same way)
    scan body x length; shard_map body x devices of its manual axes; cond: the costliest branch;
    while body: once (its trip count is not in the jaxpr); work whose result reaches no output:
    none (XLA removes it).

Elementwise work (norms, softmax, activations) is left out: XLA counts it too, and it adds 1% to
an SD 1.5 step (9% at the tiny test config's widths), but MFU measures the matmul units.
"""
import math

from jax.extend import core as jex_core


def jaxpr_flops(jaxpr, live_out=None) -> float:
  """2 x the multiply-adds of every dot_general and convolution that reaches an output (XLA drops
  the rest, e.g. the forward of a loss whose value the gradient does not need), sub-jaxprs
  included. live_out: which outputs are used (all if None)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)          # ClosedJaxpr -> Jaxpr
  live = {v for i, v in enumerate(jaxpr.outvars)
          if isinstance(v, jex_core.Var) and (live_out is None or live_out[i])}
  total = 0.0
  for eqn in reversed(jaxpr.eqns):
    outs_live = [v in live for v in eqn.outvars]
    if not any(outs_live) and not eqn.effects:
      continue
    total += _eqn_flops(eqn, outs_live)
    live.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  return total


def _eqn_flops(eqn, outs_live) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    return _dot_flops(eqn)
  if name == "conv_general_dilated":
    return _conv_flops(eqn)
  subs = []
  for sub in jex_core.jaxprs_in_params(eqn.params):
    # A loop's carry feeds its next iteration, so a dead loop output may still be needed inside.
    one_to_one = name not in ("scan", "while") and len(sub.outvars) == len(eqn.outvars)
    subs.append(jaxpr_flops(sub, outs_live if one_to_one else None))
  if not subs:
    return 0.0
  if name == "cond":
    return max(subs)
  if name == "scan":
    return eqn.params["length"] * sum(subs)
  if name == "shard_map":
    mesh = eqn.params["mesh"]
    return math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"]) * sum(subs)
  return sum(subs)


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def valid_taps(size: int, kernel: int, out: int, stride: int = 1, pad_lo: int = 0,
               lhs_dilation: int = 1, rhs_dilation: int = 1) -> int:
  """Kernel taps landing on a real input element, summed over the outputs of one spatial dim."""
  last = (size - 1) * lhs_dilation          # position of the last input in the dilated input
  count = 0
  for k in range(kernel):
    for o in range(out):
      p = o * stride + k * rhs_dilation - pad_lo
      count += 0 <= p <= last and p % lhs_dilation == 0
  return count


def _conv_flops(eqn) -> float:
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  p = eqn.params
  dn = p["dimension_numbers"]           # specs: (batch | out feature, feature | in feature, *spatial)
  taps = 1
  for i, (l, r, o) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
    taps *= valid_taps(lhs[l], rhs[r], out[o], p["window_strides"][i], p["padding"][i][0],
                       p["lhs_dilation"][i], p["rhs_dilation"][i])
  c_in = rhs[dn.rhs_spec[1]]           # already C_in / feature_group_count
  return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * c_in * taps
