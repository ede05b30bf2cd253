"""attention_kernels: chunked and direct == XLA (values, gradients), direct == numpy, its memory bound in the compiled program,
the "auto" rules, and the Pallas TPU kernel in interpret mode on CPU."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppd_jax.models import attention_kernels as ak


def qkv(b, t, s, n, h, dtype=jnp.float32, seed=0):
  """Inputs of std 2 so the softmax is far from uniform (a missing 1/sqrt(H) shows)."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = 2 * jax.random.normal(kq, (b, t, n, h))
  k = 2 * jax.random.normal(kk, (b, s, n, h))
  v = jax.random.normal(kv, (b, s, n, h))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 4))
def value_and_vjp(impl, q, k, v, budget):
  """Output and (dq, dk, dv) for a fixed random cotangent, so every gradient entry is checked.

  Jitted: one compile per case instead of one per eager op keeps the file fast.
  """
  f = lambda q, k, v: ak.attention(q, k, v, implementation=impl, logits_budget_bytes=budget)
  out, pullback = jax.vjp(f, q, k, v)
  g = jax.random.normal(jax.random.key(7), out.shape).astype(out.dtype)
  return out, pullback(g)


def per_row(b, n, s):
  return ak.logits_bytes((b, 1, n, 8), (b, s, n, 8), rows=1)


# (B, T, S, N, H, budget in query rows, expected chunk): several chunks, one chunk, odd T,
# 77 text tokens as S, S = 1, 4 user tokens, prime T over budget (chunk 1).
CASES = [
    (2, 12, 77, 3, 8, 4, 4),
    (2, 15, 4, 2, 16, 4, 3),
    (1, 9, 1, 2, 8, 3, 3),
    (2, 7, 5, 2, 8, 100, 7),
    (1, 13, 6, 2, 4, 5, 1),
    (2, 64, 64, 2, 8, 16, 16),
]


@pytest.mark.parametrize("b,t,s,n,h,rows,chunk", CASES)
def test_chunked_matches_xla_fp32(b, t, s, n, h, rows, chunk):
  budget = rows * per_row(b, n, s)
  q, k, v = qkv(b, t, s, n, h)
  assert ak.chunk_size(q.shape, k.shape, budget) == chunk
  out_c, grads_c = value_and_vjp("chunked", q, k, v, budget)
  out_x, grads_x = value_and_vjp("xla", q, k, v, budget)
  assert out_c.shape == q.shape and out_c.dtype == jnp.float32
  np.testing.assert_allclose(out_c, out_x, atol=1e-5, rtol=0)
  for name, gc, gx in zip("qkv", grads_c, grads_x):
    np.testing.assert_allclose(gc, gx, atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("b,t,s,n,h", [(2, 12, 77, 3, 8), (1, 9, 1, 2, 8), (2, 64, 4, 2, 16)])
def test_direct_matches_xla_and_numpy_fp32(b, t, s, n, h):
  """The CPU's kernel: values against numpy's softmax(q k^T / sqrt(H)) v, gradients against
  jax.nn.dot_product_attention's (the stop_gradient on the max must not change them)."""
  q, k, v = qkv(b, t, s, n, h)
  out_d, grads_d = value_and_vjp("direct", q, k, v, 0)
  out_x, grads_x = value_and_vjp("xla", q, k, v, 0)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", qn, kn) / np.sqrt(h)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out_d, np.einsum("bnts,bsnh->btnh", probs, vn), atol=1e-5, rtol=0)
  assert out_d.dtype == jnp.float32
  for name, gd, gx in zip("qkv", grads_d, grads_x):
    np.testing.assert_allclose(gd, gx, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_direct_matches_xla_bf16():
  q, k, v = qkv(2, 16, 77, 2, 8, jnp.bfloat16)
  out_d, grads_d = value_and_vjp("direct", q, k, v, 0)
  out_x, grads_x = value_and_vjp("xla", q, k, v, 0)
  f32 = lambda x: np.asarray(x, np.float32)
  assert out_d.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(out_d), f32(out_x), atol=2e-2, rtol=2e-2)
  for gd, gx in zip(grads_d, grads_x):
    assert gd.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(gd), f32(gx), atol=6e-2, rtol=6e-2)


def test_chunked_matches_xla_bf16():
  b, t, s, n, h = 2, 16, 77, 2, 8
  q, k, v = qkv(b, t, s, n, h, jnp.bfloat16)
  budget = 4 * per_row(b, n, s)                          # 4 chunks of 4 queries
  out_c, grads_c = value_and_vjp("chunked", q, k, v, budget)
  out_x, grads_x = value_and_vjp("xla", q, k, v, budget)
  assert out_c.dtype == jnp.bfloat16
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: ak.attention(
      q, k, v, implementation="chunked", logits_budget_bytes=budget))(q, k, v))
  assert f"f32[{b},{n},4,{s}] = dot_general" in jaxpr    # the chunk's logits are f32 from bf16
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out_c), f32(out_x), atol=2e-2, rtol=2e-2)
  for gc, gx in zip(grads_c, grads_x):
    assert gc.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(gc), f32(gx), atol=6e-2, rtol=6e-2)


def compiled_grad(impl, q, k, v, budget):
  f = lambda q, k, v: jnp.sum(ak.attention(q, k, v, implementation=impl,
                                           logits_budget_bytes=budget) ** 2)
  return jax.jit(jax.grad(f, (0, 1, 2))).lower(q, k, v).compile()


def largest_f32_buffer(hlo_text):
  """Elements of the largest f32 array in the compiled HLO, whatever its rank or layout."""
  dims = re.findall(r"\bf32\[([\d,]*)\]", hlo_text)
  return max(int(np.prod([int(d) for d in ds.split(",") if d])) for ds in dims)


def test_chunked_never_holds_full_logits_in_compiled_program():
  """Forward+backward: XLA's program holds f32 [B, N, T, S]; chunked's holds at most one chunk.

  H is small so that no other array (q, k, v, outputs) comes near T*S elements; the run with the
  chunk forced to T shows the detector does find the full logits when they are there.
  """
  b, t, s, n, h = 2, 256, 128, 2, 8
  full = b * n * t * s
  q, k, v = qkv(b, t, s, n, h)
  budget = ak.logits_bytes(q.shape, k.shape) // 8       # chunk 32 of 256
  chunk = ak.chunk_size(q.shape, k.shape, budget)
  assert chunk == 32
  xla = compiled_grad("xla", q, k, v, budget)
  chunked = compiled_grad("chunked", q, k, v, budget)
  forced = compiled_grad("chunked", q, k, v, ak.logits_bytes(q.shape, k.shape))   # chunk = T
  assert f"f32[{b},{n},{t},{s}]" in xla.as_text()
  assert largest_f32_buffer(xla.as_text()) >= full
  assert largest_f32_buffer(forced.as_text()) >= full
  # One chunk's logits, the planned [B, N, 32, S], is the largest: bounded, and not smaller
  # (a smaller step would mean more sequential steps than the budget needs).
  assert largest_f32_buffer(chunked.as_text()) == b * n * chunk * s < full
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(chunked) < temp(xla) / 2
  assert temp(chunked) < temp(forced) / 2


def test_choose_implementation_gpu():
  choose = lambda h, dtype, cc, cudnn=91000, t=4096, s=4096: ak.choose_implementation(
      "gpu", (32, t, 8, h), (32, s, 8, h), dtype, compute_capability=cc, cudnn_version=cudnn)
  assert choose(64, jnp.bfloat16, (8, 0)) == "cudnn"
  assert choose(40, jnp.float16, (8, 6), t=4096, s=77) == "cudnn"   # any S: text tokens
  assert choose(80, jnp.bfloat16, (8, 0), t=1023, s=4) == "cudnn"   # odd T, 4 user tokens
  assert choose(160, jnp.bfloat16, (8, 0)) == "chunked"             # H > 128 before Hopper
  assert choose(160, jnp.bfloat16, (9, 0)) == "cudnn"               # H <= 256 on Hopper
  assert choose(264, jnp.bfloat16, (9, 0)) == "chunked"
  assert choose(36, jnp.bfloat16, (9, 0)) == "chunked"              # not a multiple of 8
  assert choose(64, jnp.float32, (9, 0)) == "chunked"               # cuDNN has no fp32 path
  assert choose(64, jnp.bfloat16, (10, 3), cudnn=91000) == "chunked"
  assert choose(64, jnp.bfloat16, (10, 3), cudnn=91100) == "cudnn"
  assert choose(64, jnp.bfloat16, None) == "chunked"                # no CUDA capability
  assert ak.choose_implementation("rocm", (2, 64, 8, 64), (2, 64, 8, 64), jnp.bfloat16,
                                  compute_capability=(9, 0)) == "chunked"


def test_choose_implementation_tpu_and_cpu():
  tpu = lambda t, s, h, dtype=jnp.bfloat16: ak.choose_implementation(
      "tpu", (32, t, 8, h), (32, s, 8, h), dtype)
  assert tpu(4096, 4096, 40) == "tpu_flash"
  assert tpu(1024, 1024, 128, jnp.float32) == "tpu_flash"
  assert tpu(256, 256, 256) == "tpu_flash"
  assert tpu(4096, 77, 40) == "chunked"            # S not a multiple of 128
  assert tpu(64, 64, 160) == "chunked"             # SD 1.5's deepest block at 64x64 latents
  assert tpu(1024, 1024, 160) == "chunked"         # H > 128, not a multiple of 128
  assert tpu(1024, 1024, 64, jnp.float16) == "chunked"
  small, big = ((2, 64, 8, 40), (2, 64, 8, 40)), ((32, 4096, 8, 40), (32, 4096, 8, 40))
  assert ak.choose_implementation("cpu", *small, jnp.float32) == "direct"
  assert ak.choose_implementation("cpu", *big, jnp.float32) == "chunked"    # 17 GB > 1 GiB
  assert ak.choose_implementation("cpu", *small, jnp.float32,
                                  logits_budget_bytes=ak.logits_bytes(*small) - 1) == "chunked"


def test_auto_on_cpu_dispatches_by_budget():
  q, k, v = qkv(1, 16, 8, 2, 8)
  jaxpr = lambda budget: str(jax.make_jaxpr(lambda q, k, v: ak.attention(
      q, k, v, logits_budget_bytes=budget))(q, k, v))
  full = ak.logits_bytes(q.shape, k.shape)
  assert "scan" not in jaxpr(full) and "remat" not in jaxpr(full)
  assert "scan" in jaxpr(full // 2) and "remat" in jaxpr(full // 2)
  np.testing.assert_allclose(ak.attention(q, k, v, logits_budget_bytes=full // 4),
                             ak.attention(q, k, v, implementation="xla"), atol=1e-5)


def test_bad_arguments_raise():
  q, k, v = qkv(1, 8, 8, 1, 8)
  with pytest.raises(ValueError, match="accepted: auto, xla, direct, chunked, cudnn, tpu_flash"):
    ak.attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="dtypes differ"):
    ak.attention(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match="tpu_flash needs"):
    ak.attention(q, k, v, implementation="tpu_flash")     # T = 8: not a multiple of 128


def test_tpu_flash_matches_xla_in_interpret_mode():
  """The Pallas TPU kernel runs on CPU under pltpu.force_tpu_interpret_mode (jax 0.10.2)."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = qkv(1, 256, 128, 2, 32)            # 2 query blocks, 1 key block of 128
  with pltpu.force_tpu_interpret_mode():
    out_f, grads_f = value_and_vjp("tpu_flash", q, k, v, 0)
  out_x, grads_x = value_and_vjp("xla", q, k, v, 0)
  assert out_f.shape == q.shape
  np.testing.assert_allclose(out_f, out_x, atol=1e-5, rtol=0)
  for name, gf, gx in zip("qkv", grads_f, grads_x):
    np.testing.assert_allclose(gf, gx, atol=1e-4, rtol=0, err_msg=f"d{name}")


def test_tpu_flash_under_shard_map_matches_xla_in_interpret_mode():
  """attention_in_mesh as the UNet calls it in the train step: jit over a ("data", "fsdp") mesh,
  batch split over both axes, the step's abstract mesh as context (step.make_train_step).

  "tpu_flash" then runs under jax.shard_map (Pallas kernels are not partitioned by XLA), whose
  default check_vma=True rejects the kernel's out_shape at trace time unless the shard_map turns
  it off. 2 x 2 devices: the TPU interpreter holds every device at a threading.Barrier per kernel
  (jax/_src/pallas/mosaic/interpret/interpret_pallas_call.py, _barrier), and with 8 fake CPU
  devices and several blocks per kernel the backward stalls there on this 2-core machine.
  """
  from jax.experimental.pallas import tpu as pltpu
  from ppd_jax import sharding as shd
  mesh = shd.make_mesh(2, 2, jax.devices()[:4])
  rows = shd.batch_sharding(mesh)
  q, k, v = (jax.device_put(x, rows) for x in qkv(4, 256, 128, 2, 32))   # 1 row per device

  def value_and_grads(impl, q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      f = lambda q, k, v: ak.attention_in_mesh(q, k, v, implementation=impl)
      out, pullback = jax.vjp(f, q, k, v)
      return out, pullback(jnp.cos(out))

  with pltpu.force_tpu_interpret_mode():
    jaxpr = str(jax.make_jaxpr(functools.partial(value_and_grads, "tpu_flash"))(q, k, v))
    out_f, grads_f = jax.jit(functools.partial(value_and_grads, "tpu_flash"))(q, k, v)
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr     # the kernel, per device
  out_x, grads_x = jax.jit(functools.partial(value_and_grads, "xla"))(q, k, v)
  assert out_f.sharding.is_equivalent_to(rows, out_f.ndim)
  np.testing.assert_allclose(np.asarray(out_f), np.asarray(out_x), atol=1e-5, rtol=0)
  for name, gf, gx in zip("qkv", grads_f, grads_x):
    np.testing.assert_allclose(np.asarray(gf), np.asarray(gx), atol=1e-4, rtol=0,
                               err_msg=f"d{name}")
