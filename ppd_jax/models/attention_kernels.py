"""Attention kernels for the UNet, chosen per layer so that no layer materialises its logits.

    A(q, k, v) = softmax(q k^T / sqrt(H)) v        per batch row and head; logits/softmax in f32
    q [B, T, N, H], k/v [B, S, N, H] -> out [B, T, N, H] in q's dtype     (BTNH, as jax.nn's)

Why: XLA's jax.nn.dot_product_attention builds the float32 logits [B, N, T, S] (and keeps the
probabilities for the backward pass). SD 1.5 at 64x64 latents with 32 images per device is
32 x 8 x 4096^2 x 4 B = 17 GB in one self-attention layer; cuDNN's fused kernel avoids that but
raises on shapes it does not support, so a fixed implementation="cudnn" breaks some layers.

Implementations (`attention(..., implementation=...)`):
  "xla"        jax.nn.dot_product_attention(implementation="xla"), the plain reference.
  "direct"     the per-chunk math below on all T queries at once, no lax.map, no checkpoint:
               the CPU's choice when the full logits fit. Per chunk, the softmax's 1/sum is
               applied to the [B, c, N, H] output, not to the [B, N, c, S] probabilities,

                   e = exp(l - stop_gradient(max_s l)),  A = (e v) / sum_s e,   l = (q / sqrt(H)) k^T

               which saves a pass over the logits (and the max's own backward); the scale is
               applied to q ([B, c, N, H]), not to the logits (docs/cpu_speed.md has the profile).
  "chunked"    any backend: the T queries split into T/c chunks under lax.map, each chunk under
               jax.checkpoint, so at most [B, N, c, S] f32 logits exist at a time, forward and
               backward (the backward recomputes one chunk's logits instead of storing all).
               c is the largest divisor of T with B N c S x 4 B <= logits_budget_bytes (at
               least 1; all of T when the full logits fit). The backward of one chunk holds a
               few such buffers (logits, probabilities, their cotangents): peak ~ 3-4 x budget.
  "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"), cuDNN flash attention.
  "tpu_flash"  jax.experimental.pallas.ops.tpu.flash_attention (layout [B, N, T, H]), 128-blocks.
  "auto"       choose_implementation(...) from the backend, shapes and dtype, per call.

Rules of "auto" (choose_implementation), checked against jax 0.10.2's own code:
  GPU (CUDA)  "cudnn" when jax's cuDNN checks pass, else "chunked". The checks, from
              jax/_src/cudnn/fused_attention_stablehlo.py (check_layout, check_is_flash_attention):
                - dtype float16 or bfloat16 (fp8 aside; no float32 -> "chunked"),
                - head dim a multiple of 8 and <= 128, or <= 256 on compute capability >= 9.0,
                - compute capability 10.3 needs cuDNN >= 9.11 (91100); unknown version -> no,
                - sequence lengths: only constrained with a bias in training (T, S even); we
                  pass no bias or mask, so any T and S (77 text tokens, 4 user tokens) pass.
              GPU without a compute capability (ROCm, or unknown): "chunked".
  TPU         "tpu_flash" when its block constraints hold, else "chunked". From
              jax/experimental/pallas/ops/tpu/flash_attention.py with 128-blocks (its default
              BlockSizes): T and S multiples of 128 (_verify_block: blocks divide T and S; the
              backward tiles m/l by block_k // 128, so block_k must be a multiple of 128), head
              dim <= 128 or a multiple of 128 (the kernel's head_dim_repeats check), dtype
              float32 or bfloat16 (TPUs have no float16 matmul path).
  CPU/other   "direct" when the full f32 logits B N T S x 4 B fit logits_budget_bytes, else
              "chunked".

Shapes are those the function sees: under jit with automatic (GSPMD) sharding they are global, so
the budget test is conservative by the data-parallel factor; inside shard_map they are local.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "direct", "chunked", "cudnn", "tpu_flash")
DEFAULT_LOGITS_BUDGET_BYTES = 1 << 30   # f32 logits of one chunk; ~3-4x that at the backward peak
TPU_BLOCK = 128                         # flash_attention's default (and minimum) block size

_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
_TPU_FLASH_DTYPES = (jnp.float32, jnp.bfloat16)


def logits_bytes(q_shape, k_shape, rows: int | None = None) -> int:
  """Bytes of the f32 logits [B, N, rows, S] (rows = T, the full logits, by default)."""
  b, t, n, _ = q_shape
  return b * n * (t if rows is None else rows) * k_shape[1] * 4


def chunk_size(q_shape, k_shape, logits_budget_bytes: int) -> int:
  """Largest divisor c of T with f32 logits [B, N, c, S] within the budget; at least 1.

  A divisor keeps every chunk the same shape, so lax.map traces one body; a prime T over budget
  falls to c = 1 (correct, just T sequential steps).
  """
  t = q_shape[1]
  per_row = logits_bytes(q_shape, k_shape, rows=1)
  fits = max(1, logits_budget_bytes // max(per_row, 1))
  if fits >= t:
    return t
  return max(c for c in range(1, int(fits) + 1) if t % c == 0)


def _cudnn_supports(compute_capability, cudnn_version, head_dim: int, dtype) -> bool:
  """jax 0.10.2's cuDNN checks (fused_attention_stablehlo.check_layout/check_is_flash_attention)."""
  if compute_capability is None or jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
    return False
  cc = tuple(compute_capability)
  if cc == (10, 3) and (cudnn_version is None or cudnn_version < 91100):
    return False
  h_max = 256 if cc >= (9, 0) else 128   # is_hopper_or_later = check_compute_capability("9.0")
  return head_dim % 8 == 0 and head_dim <= h_max


def _tpu_flash_supports(q_shape, k_shape, dtype) -> bool:
  """flash_attention's constraints at 128-blocks (see the module docstring for the source)."""
  t, h, s = q_shape[1], q_shape[3], k_shape[1]
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _TPU_FLASH_DTYPES]:
    return False
  return t % TPU_BLOCK == 0 and s % TPU_BLOCK == 0 and (h <= 128 or h % 128 == 0)


def choose_implementation(backend: str, q_shape, k_shape, dtype, *,
                          logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES,
                          compute_capability: tuple[int, int] | None = None,
                          cudnn_version: int | None = None) -> str:
  """The implementation "auto" runs; pure, so the rules are testable without a GPU or TPU.

  backend: "cpu", "gpu" (or "cuda"/"rocm"), "tpu", ...; compute_capability: (major, minor) of a
  CUDA GPU, None elsewhere; cudnn_version as jax reports it (e.g. 91100 for 9.11).
  """
  head_dim = q_shape[3]
  if backend in ("gpu", "cuda", "rocm"):
    cc = None if backend == "rocm" else compute_capability
    return "cudnn" if _cudnn_supports(cc, cudnn_version, head_dim, dtype) else "chunked"
  if backend == "tpu":
    return "tpu_flash" if _tpu_flash_supports(q_shape, k_shape, dtype) else "chunked"
  return "direct" if logits_bytes(q_shape, k_shape) <= logits_budget_bytes else "chunked"


def _device_facts() -> tuple[str, tuple[int, int] | None, int | None]:
  """(backend, CUDA compute capability or None, cuDNN version or None) of the default device."""
  dev = jax.devices()[0]
  backend, cc, cudnn_version = dev.platform, None, None
  if backend == "gpu":
    if "cuda" not in str(dev.client.platform_version).lower():
      return "rocm", None, None
    cc = tuple(int(x) for x in str(dev.compute_capability).split("."))[:2]
    try:   # the same module jax's own cuDNN check reads the version from
      from jax._src.lib import cuda_versions  # pylint: disable=C0415
      cudnn_version = None if cuda_versions is None else int(cuda_versions.cudnn_get_version())
    except Exception:  # pylint: disable=broad-except
      cudnn_version = None
  return backend, cc, cudnn_version


def _chunk_attention(qc: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(qc k^T / sqrt(H)) v for one query chunk [B, c, N, H]; logits [B, N, c, S] in f32.

      l = (qc / sqrt(H)) k^T,   e = exp(l - stop_gradient(max_s l)),   A = (e v) / sum_s e

  The max only keeps exp in range (softmax is invariant to it), so no gradient flows through it.
  """
  scale = np.asarray(1.0 / math.sqrt(qc.shape[-1]), qc.dtype)
  logits = jnp.einsum("bqnh,bsnh->bnqs", qc * scale, k, preferred_element_type=jnp.float32)
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  total = jnp.sum(e, axis=-1)                                        # [B, N, c]
  out = jnp.einsum("bnqs,bsnh->bqnh", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / total.transpose(0, 2, 1)[..., None]).astype(qc.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
  """Queries in T/chunk chunks; each under jax.checkpoint so its backward recomputes its logits.

  Queries are independent rows of the softmax, so A(q) = concat_i A(q_i) over query chunks q_i;
  k and v are shared, and their gradients are the sums over chunks (lax.map's transpose).
  """
  b, t, n, h = q.shape
  if chunk < 1 or t % chunk:
    raise ValueError(f"chunk {chunk} must be a positive divisor of T = {t}")
  one_chunk = jax.checkpoint(functools.partial(_chunk_attention, k=k, v=v))
  if chunk == t:
    return one_chunk(q)
  chunks = q.reshape(b, t // chunk, chunk, n, h).swapaxes(0, 1)   # [T/c, B, c, N, H]
  out = jax.lax.map(one_chunk, chunks)                             # [T/c, B, c, N, H]
  return out.swapaxes(0, 1).reshape(b, t, n, h)


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Pallas TPU flash attention; it takes [B, N, T, H], and sm_scale = 1/sqrt(H) explicitly."""
  if not _tpu_flash_supports(q.shape, k.shape, q.dtype):
    raise ValueError(f"tpu_flash needs T, S multiples of {TPU_BLOCK}, head dim <= 128 or a "
                     f"multiple of 128, f32/bf16; got q {q.shape}, k {k.shape}, {q.dtype}")
  # Imported here: the Pallas TPU ops import Mosaic, which GPU-only installs need not load.
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=C0415
  b = TPU_BLOCK
  blocks = fa.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1,
                         block_q_major_dkv=b, block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b,
                         block_k_major_dq=b, block_k_dq=b, block_q_dq=b)
  to_bnth = lambda x: x.swapaxes(1, 2)
  out = fa.flash_attention(to_bnth(q), to_bnth(k), to_bnth(v),
                           sm_scale=1.0 / math.sqrt(q.shape[-1]), block_sizes=blocks)
  return out.swapaxes(1, 2)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto",
              logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v; q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H] in q's dtype.

  "auto" decides per call (per layer, at trace time) with choose_implementation; the budget
  bounds the f32 logits of one "chunked" step and decides "direct" vs "chunked" on CPU.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"accepted: {', '.join(IMPLEMENTATIONS)}")
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"need q [B, T, N, H] and k = v [B, S, N, H]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if not q.dtype == k.dtype == v.dtype:   # as jax.nn.dot_product_attention requires
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  if implementation == "auto":
    backend, cc, cudnn_version = _device_facts()
    implementation = choose_implementation(backend, q.shape, k.shape, q.dtype,
                                           logits_budget_bytes=logits_budget_bytes,
                                           compute_capability=cc, cudnn_version=cudnn_version)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  if implementation == "direct":
    return _chunk_attention(q, k, v)
  if implementation == "tpu_flash":
    return tpu_flash_attention(q, k, v)
  return chunked_attention(q, k, v, chunk_size(q.shape, k.shape, logits_budget_bytes))


def _batch_shards() -> tuple[int, tuple[str, ...]]:
  """(devices the batch is split over, their mesh axes) under the step's abstract mesh; (1, ())
  outside one. The UNet's batch is split over every mesh axis (sharding.BATCH_AXES)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1, ()
  return math.prod(mesh.shape.values()), tuple(mesh.axis_names)


def attention_in_mesh(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto",
                      logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES) -> jax.Array:
  """`attention` as the UNet calls it under jit: per-device shapes decide, kernels stay local.

  Under the train step's mesh the batch is split over all devices, so one device holds B / D
  rows: the budget applies to those (B / D x N x c x S x 4 bytes per device, not the global
  B). XLA partitions "xla", "direct", "chunked" and cuDNN's custom call (jax gives it
  partitioning rules) along the batch by itself; a Pallas kernel it cannot partition, so "tpu_flash" runs under
  shard_map on each device's rows.
  """
  shards, axes = _batch_shards()
  if shards == 1 or q.shape[0] % shards:
    return attention(q, k, v, implementation=implementation,
                     logits_budget_bytes=logits_budget_bytes)
  if implementation == "auto":
    backend, cc, cudnn_version = _device_facts()
    local = (q.shape[0] // shards,) + q.shape[1:]
    implementation = choose_implementation(backend, local, k.shape, q.dtype,
                                           logits_budget_bytes=logits_budget_bytes,
                                           compute_capability=cc, cudnn_version=cudnn_version)
  if implementation == "tpu_flash":
    from jax.sharding import PartitionSpec as P  # pylint: disable=C0415
    spec = P(axes)
    # check_vma=False: jax/_src/shard_map.py (_shard_map_staging) traces the body under
    # config._check_vma(check_vma), and with it on, jax/_src/pallas/core.py
    # (_convert_out_shape_to_aval) raises ValueError for the kernel's out_shape, a
    # ShapeDtypeStruct without manual_axis_type (flash_attention builds it; we cannot set it).
    # Nothing is lost: every operand and the output are split the same way on the batch, each
    # device's rows are independent, so there is no collective or replication for vma to check.
    return jax.shard_map(tpu_flash_attention, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
  return attention(q, k, v, implementation=implementation,
                   logits_budget_bytes=logits_budget_bytes * shards)
