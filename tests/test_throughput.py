"""TFLOP/s and MFU: the step's FLOPs from XLA's cost analysis, checked against a count of the
matmul and convolution FLOPs in the step's own jaxpr, and the device peaks."""
import jax
import jax.extend
import numpy as np
import pytest

from configs import ppd
from ppd_jax import step as step_lib
from ppd_jax import throughput
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model, init_params, split_params


def _config(**overrides):
  c = ppd.get_config("tiny")
  for k, v in overrides.items():
    c[k] = v
  return c


def _shapes(c):
  s, b = c.model.sample_size, c.batch_size
  f = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  return {"preferred": f(b, s, s, 3), "dispreferred": f(b, s, s, 3),
          "text_embedding": f(b, c.data.text_length, c.model.cross_attention_dim),
          "user_embedding": f(b, c.model.user_tokens, c.model.user_embed_dim)}


def _valid_taps(size: int, kernel: int, stride: int, pad: tuple[int, int], out: int) -> int:
  """Kernel taps that land inside the input, summed over the outputs of one spatial dim: the
  multiply-adds a zero-padded convolution really does (XLA counts these)."""
  return sum(sum(0 <= o * stride - pad[0] + k < size for k in range(kernel)) for o in range(out))


def _conv_flops(eqn) -> float:
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]        # lhs/rhs/out specs: (batch|out, feature|in, ...)
  taps = 1
  for i, (l_dim, r_dim, o_dim) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:],
                                                dn.out_spec[2:])):
    taps *= _valid_taps(lhs[l_dim], rhs[r_dim], eqn.params["window_strides"][i],
                        eqn.params["padding"][i], out[o_dim])
  cin = rhs[dn.rhs_spec[1]]
  return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * cin * taps


def _matmul_flops(jaxpr) -> float:
  """2 x (multiply-adds) of every dot_general and conv in a jaxpr, sub-jaxprs included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lc])
    elif eqn.primitive.name == "conv_general_dilated":
      assert set(eqn.params["lhs_dilation"]) == set(eqn.params["rhs_dilation"]) == {1}
      total += _conv_flops(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _matmul_flops(sub)
  return total


def test_step_flops_match_the_matmul_and_conv_count_of_the_step():
  c = _config()
  flops = throughput.step_flops(c, _shapes(c))
  model = build_model({**c.model.to_dict(), "attention_impl": "xla"})
  grads = step_lib.make_grad_fn(model, schedules.schedule_from_config(c.diffusion), c)
  base, user = split_params(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
  b = c.batch_size
  t = jax.ShapeDtypeStruct((b,), np.int32)
  noise = jax.ShapeDtypeStruct(_shapes(c)["preferred"].shape, np.float32)
  jaxpr = jax.make_jaxpr(grads)(user, base, _shapes(c), t, noise).jaxpr
  counted = _matmul_flops(jaxpr)
  # XLA also counts elementwise work (norms, softmax, activations): a little more, never less.
  assert counted <= flops <= 1.25 * counted, (flops, counted)   # measured 1.09


def test_accumulation_and_batch_scale_the_count():
  """Gradient accumulation splits the same work into micro-batches (XLA's count of the loop body
  alone would be 1/accum of it); twice the batch is twice the work."""
  c = _config()
  one = throughput.step_flops(c, _shapes(c))
  accum = _config(grad_accum_steps=2)
  assert throughput.step_flops(accum, _shapes(accum)) == pytest.approx(one, rel=1e-6)
  big = _config(batch_size=16)
  assert throughput.step_flops(big, _shapes(big)) == pytest.approx(2 * one, rel=0.02)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v5 lite", 197.0),
                                        ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
                                        ("cpu", None)])
def test_peaks_by_device_kind(kind, peak):
  assert throughput.peak_tflops(kind) == peak


def test_mfu_is_tflops_over_peak_and_absent_on_cpu():
  t = throughput.Throughput(flops_per_step=2e15, devices=8, device_kind="NVIDIA H100 80GB HBM3")
  got = t(steps_per_second=1.5)
  assert got["tflops_per_device"] == pytest.approx(2e15 * 1.5 / 8 / 1e12)
  assert got["mfu"] == pytest.approx(got["tflops_per_device"] / 989.0)
  assert "mfu" not in throughput.Throughput(1e9, 1, "cpu")(1.0)
