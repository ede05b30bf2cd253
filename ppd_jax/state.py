"""Builds the frozen base params and the initial TrainState directly in their shardings.

Nothing is materialised on one device first: shapes come from jax.eval_shape, shardings from the
partition rules, and the init functions run under jit with those out_shardings.
"""
import jax
import jax.numpy as jnp
import optax

from ppd_jax import sharding as shd
from ppd_jax.models import base_weights, init_params, split_params
from ppd_jax.step import TrainState


def _opt_state_shardings(tx, user_shape, user_shardings, mesh):
  """Optimizer moments follow their params' shardings; counters are replicated."""
  opt_shape = jax.eval_shape(tx.init, user_shape)
  return optax.tree_map_params(
      tx, lambda _, s: s, opt_shape, user_shardings,
      transform_non_params=lambda _: shd.replicated(mesh),
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


def frozen_storage(base, compute_dtype):
  """The frozen base as stored: with a bfloat16 model every kernel is kept in bfloat16.

  Dense and Conv cast their kernel to the compute dtype before use, so storing it that way
  changes no number (tests/test_fsdp.py) while halving the base's memory and, under FSDP, its
  all-gather traffic. Norm scales and biases stay float32 (norms compute statistics in float32,
  and they are a rounding error in size). Works on arrays, numpy arrays and ShapeDtypeStructs.
  """
  if jnp.dtype(compute_dtype) == jnp.float32:
    return base

  def cast(path, x):
    if getattr(path[-1], "key", None) != "kernel":
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, compute_dtype, sharding=x.sharding)
    return x.astype(compute_dtype)
  return jax.tree_util.tree_map_with_path(cast, base)


def state_shardings(model, tx, mesh):
  """(TrainState of shardings, base-param shardings) without allocating anything."""
  shapes = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
  base_shape, user_shape = split_params(shapes)
  base_sh = shd.param_shardings(base_shape, mesh)
  user_sh = shd.param_shardings(user_shape, mesh)
  opt_sh = _opt_state_shardings(tx, user_shape, user_sh, mesh)
  counter = shd.replicated(mesh)
  return TrainState(step=counter, user_params=user_sh, opt_state=opt_sh, skipped_updates=counter,
                    nonfinite_streak=counter), base_sh


def load_base(base: str, pretrained: str, variant: str, model, shapes,
              prior_subfolder: str = "prior_lite") -> dict:
  """The frozen base as nested host numpy arrays matching `shapes`: from a diffusers folder
  (pretrained) or a .npz of models/base_weights.py (base)."""
  from ppd_jax.models import personalized_cascade
  if pretrained and isinstance(model, personalized_cascade.PersonalizedCascade):
    from ppd_jax.weights import pretrained_cascade
    prior = pretrained_cascade.open_prior(pretrained, prior_subfolder, variant)
    return {"unet": pretrained_cascade.load_prior(prior, shapes["unet"])}
  if pretrained:
    from ppd_jax.weights import pretrained as pretrained_lib
    pipe = pretrained_lib.open_pipeline(pretrained, variant)
    return {"unet": pretrained_lib.load_unet(pipe, shapes["unet"])}
  return base_weights.load(base, model.config, shapes)[0]


def create_train_state(model, tx, mesh, seed: int, base: str = "random", pretrained: str = "",
                       variant: str = "", frozen_dtype=None, prior_subfolder: str = "prior_lite"):
  """Returns (state, base_params, state_shardings, base_shardings).

  The base comes from a seeded init (base == "random" and no pretrained folder), a weights file
  (models/base_weights.py) or a diffusers folder (weights/pretrained.py), loaded on the host and
  placed in its shardings; the user branch from its own init (zero value projection, so the
  policy starts equal to the reference).

  frozen_dtype: how the base's kernels are stored (frozen_storage); default the compute dtype.
  Sampling and export pass float32 to keep the weights as loaded.
  """
  st_sh, base_sh = state_shardings(model, tx, mesh)
  frozen_dtype = model.config.dtype if frozen_dtype is None else frozen_dtype

  def init(rng):
    base, user = split_params(init_params(model, rng))
    base = frozen_storage(base, frozen_dtype)
    zero = jnp.zeros((), jnp.int32)
    return base, TrainState(step=zero, user_params=user, opt_state=tx.init(user),
                            skipped_updates=zero, nonfinite_streak=zero)

  # On CPU, compiling init is dominated by one RNG program per parameter; LLVM's optimisation
  # level 0 halves that compile and costs nothing that matters for a program run once.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  key = jax.random.key(seed)
  if base == "random" and not pretrained:
    base_params, state = jax.jit(init, out_shardings=(base_sh, st_sh),
                                 compiler_options=options)(key)
    return state, base_params, st_sh, base_sh
  # A loaded base: the jitted init returns only the user state, so XLA drops the base's random
  # init as dead code; the file's arrays go straight to their shardings.
  state = jax.jit(lambda r: init(r)[1], out_shardings=st_sh, compiler_options=options)(key)
  shapes = jax.eval_shape(lambda r: init(r)[0], key)
  loaded = frozen_storage(load_base(base, pretrained, variant, model, shapes, prior_subfolder),
                          frozen_dtype)
  base_params = jax.tree.map(lambda x, s: jax.make_array_from_callback(
      x.shape, s, lambda index: x[index]), loaded, base_sh)
  return state, base_params, st_sh, base_sh


def initial_base_params(model, seed: int, base: str = "random", pretrained: str = "",
                        variant: str = "", prior_subfolder: str = "prior_lite"):
  """The frozen base as host numpy arrays, without a mesh (the synthetic source samples with it)."""
  if base == "random" and not pretrained:
    return jax.device_get(split_params(init_params(model, jax.random.key(seed)))[0])
  shapes = split_params(jax.eval_shape(lambda: init_params(model, jax.random.key(seed))))[0]
  return load_base(base, pretrained, variant, model, shapes, prior_subfolder)
