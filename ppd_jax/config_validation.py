"""Checks a run configuration before any work starts, naming the field that is wrong."""
import os

import ml_collections

from ppd_jax.models import base_weights


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


_BLOCKS_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_BLOCKS_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _require(ok: bool, field: str, value, why: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _positive_int(c, field: str, allow_zero: bool = False) -> None:
  value = _get(c, field)
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  _require(ok, field, value, "must be a " + ("non-negative" if allow_zero else "positive")
           + " integer")


def _get(c, dotted: str):
  for part in dotted.split("."):
    if part not in c:
      raise ConfigError(f"config.{dotted} is missing")
    c = c[part]
  return c


def prepare(c: ml_collections.ConfigDict, stage: str = "train") -> None:
  """Resolves a pretrained folder into the config (architecture, schedule), then validates.

  stage "precompute": the Pick-a-Pic shards are being made, so they need not exist yet."""
  pretrained = c.model.get("pretrained", "")
  if pretrained:
    _require(c.model.base == "random", "model.base", c.model.base,
             f"set either model.base or model.pretrained (={pretrained!r}), not both")
    from ppd_jax import backbones
    from ppd_jax.weights import hf_folder
    if backbones.is_cascade(c.model):
      from ppd_jax.weights import pretrained_cascade as pretrained_lib
    else:
      from ppd_jax.weights import pretrained as pretrained_lib
    try:
      pretrained_lib.apply_to_config(c)
    except hf_folder.FolderError as e:
      raise ConfigError(f"config.model.pretrained={pretrained!r}: {e}") from e
  if stage == "train":
    _user_shape_from_store(c)
  validate(c, stage)


def _user_shape_from_store(c: ml_collections.ConfigDict) -> None:
  """model.user_tokens / user_embed_dim = 0 mean "what the user store holds" (the pickapic
  configs): a store made by users.embed with its defaults (all layers of the VLM, [L + 1, H]),
  --layers=last ([1, H]) or another VLM trains without flags. A value set by hand is checked
  against the store instead (validate)."""
  m = c.model
  if m.user_tokens and m.user_embed_dim:
    return
  _require(c.data.source == "pickapic", "model.user_tokens", m.user_tokens,
           "0 (take the shape from the user store) needs data.source='pickapic'")
  from ppd_jax.data import pickapic_source
  from ppd_jax.data import shards
  try:
    shape = pickapic_source.user_shape(c.data) if _user_inputs(c.data) != "store" else None
  except shards.ShardsError as e:
    raise ConfigError(f"config.{e}") from e
  if shape is None:
    store = _open_store(c.data)
    shape = (int(store.tokens), int(store.dim))
  with c.unlocked():
    m.user_tokens = m.user_tokens or shape[0]
    m.user_embed_dim = m.user_embed_dim or shape[1]


def _user_inputs(d) -> str:
  """What feeds the user branch of a Pick-a-Pic run: "store", "onehot" or "none"."""
  return "none" if not d.user_conditioning else d.get("user_embedding", "store")


def validate(c: ml_collections.ConfigDict, stage: str = "train") -> None:
  """Raises ConfigError on the first invalid field (a pretrained folder must be resolved first)."""
  from ppd_jax import backbones
  cascade = backbones.is_cascade(c.model)
  unet_only = () if cascade else ("diffusion.num_train_timesteps", "model.layers_per_block",
                                  "model.cross_attention_dim", "model.norm_num_groups")
  for field in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "batch_size",
                "grad_accum_steps", "sample.num_steps", "model.sample_size",
                "model.user_tokens_per_embedding", "data.fewshot", "data.text_length") + unet_only:
    _positive_int(c, field)
  # 0: the user store's shape; resolved by prepare() for training, unknown while precomputing.
  from_store = stage == "precompute" and c.data.source == "pickapic"
  for field in ("model.user_embed_dim", "model.user_tokens"):
    _positive_int(c, field, allow_zero=from_store)
  for field in ("seed", "optim.warmup_steps", "data.worker_count"):
    _positive_int(c, field, allow_zero=True)
  if "per_device_batch" in c:   # 0: grad_accum_steps as given; else derived (batch_plan.py)
    _positive_int(c, "per_device_batch", allow_zero=True)
  _validate_training_safety(c)

  _require(c.loss in ("dpo", "sft"), "loss", c.loss, "must be 'dpo' or 'sft'")
  beta = c.dpo.beta
  _require(isinstance(beta, (int, float)) and beta > 0, "dpo.beta", beta,
           "must be a positive number (Diffusion-DPO uses 5000 with reduction='mean')")
  _require(c.dpo.reduction in ("mean", "sum"), "dpo.reduction", c.dpo.reduction,
           "must be 'mean' or 'sum'")
  _require(c.dpo.get("weighting", "none") in ("none", "p2"), "dpo.weighting",
           c.dpo.get("weighting"), "must be 'none' (Diffusion-DPO) or 'p2' (1 - abar_t)")

  lr = c.optim.lr
  _require(isinstance(lr, (int, float)) and 0 < lr < 1, "optim.lr", lr, "must be in (0, 1)")
  _require(c.optim.weight_decay >= 0, "optim.weight_decay", c.optim.weight_decay, "must be >= 0")
  _require(0 <= c.optim.b1 < 1, "optim.b1", c.optim.b1, "must be in [0, 1)")
  _require(0 <= c.optim.b2 < 1, "optim.b2", c.optim.b2, "must be in [0, 1)")
  _require(c.optim.grad_clip >= 0, "optim.grad_clip", c.optim.grad_clip, "must be >= 0 (0: off)")

  if not c.get("per_device_batch", 0):   # else grad_accum_steps follows from it per device count
    _require(c.batch_size % c.grad_accum_steps == 0, "batch_size", c.batch_size,
             f"must be divisible by grad_accum_steps={c.grad_accum_steps}")
  _require(c.mesh.data == -1 or (isinstance(c.mesh.data, int) and c.mesh.data > 0), "mesh.data",
           c.mesh.data, "must be -1 (all remaining devices) or a positive integer")
  _positive_int(c, "mesh.fsdp")

  d = c.diffusion
  process = d.get("process", "ddpm")
  _require(process == ("cascade" if cascade else "ddpm"), "diffusion.process", process,
           "must be 'cascade' for model.family='cascade' and 'ddpm' otherwise")
  sampler_ok = ("ddpm_wuerstchen",) if cascade else ("ddim", "euler", "dpmpp_2m")
  _require(c.sample.sampler in sampler_ok, "sample.sampler", c.sample.sampler,
           f"must be one of {sampler_ok} for this model")
  if cascade:
    _validate_cascade_model(c)
  else:
    _validate_unet_model(c)
  _validate_data_and_sampling(c, stage)


def _validate_cascade_model(c: ml_collections.ConfigDict) -> None:
  m = c.model
  _require(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype,
           "must be 'float32' or 'bfloat16'")
  _require(m.base == "random", "model.base", m.base,
           "must be 'random' for Stable Cascade (the base comes from model.pretrained)")
  try:
    from ppd_jax.models import build_model
    model = build_model({**m.to_dict(), "user_tokens": m.user_tokens or 1,
                         "user_embed_dim": m.user_embed_dim or 1})
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
  _require(m.in_channels == model.config.in_channels, "model.in_channels", m.in_channels,
           f"must equal model.cascade.in_channels={model.config.in_channels}")


def _validate_unet_model(c: ml_collections.ConfigDict) -> None:
  d = c.diffusion
  _require(d.prediction_type in ("epsilon", "v_prediction"), "diffusion.prediction_type",
           d.prediction_type, "must be 'epsilon' or 'v_prediction'")
  _require(d.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
           "diffusion.beta_schedule", d.beta_schedule,
           "must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")

  m = c.model
  _require(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype,
           "must be 'float32' or 'bfloat16'")
  from ppd_jax.models import attention_kernels
  _require(m.get("attention_impl", "") in ("",) + attention_kernels.IMPLEMENTATIONS,
           "model.attention_impl", m.get("attention_impl"),
           f"must be one of {attention_kernels.IMPLEMENTATIONS} ('' is 'auto')")
  n = len(m.block_out_channels)
  _require(n > 0, "model.block_out_channels", m.block_out_channels, "must not be empty")
  _require(len(m.down_block_types) == n, "model.down_block_types", m.down_block_types,
           f"needs one entry per block_out_channels ({n})")
  _require(len(m.up_block_types) == n, "model.up_block_types", m.up_block_types,
           f"needs one entry per block_out_channels ({n})")
  for t in m.down_block_types:
    _require(t in _BLOCKS_DOWN, "model.down_block_types", t, f"must be one of {_BLOCKS_DOWN}")
  for t in m.up_block_types:
    _require(t in _BLOCKS_UP, "model.up_block_types", t, f"must be one of {_BLOCKS_UP}")
  for ch in m.block_out_channels:
    _require(ch % m.norm_num_groups == 0, "model.norm_num_groups", m.norm_num_groups,
             f"must divide every block_out_channels entry ({ch})")
  _require(m.sample_size % (2 ** (n - 1)) == 0, "model.sample_size", m.sample_size,
           f"must be divisible by 2^{n - 1} (one halving per down block)")
  _require(m.base in ("random", "demo") or (str(m.base).endswith(".npz")
                                            and os.path.exists(base_weights.resolve(m.base))),
           "model.base", m.base, "must be 'random' (seeded init), 'demo' (the packaged demo base) "
           "or the path of an existing .npz written by ppd_jax.models.base_weights")
  if m.base != "random":
    trained_for = base_weights.read_meta(base_weights.resolve(m.base))["architecture"]
    for k, v in base_weights.architecture(m).items():
      _require(trained_for.get(k) == v, f"model.{k}", v,
               f"the base weights {base_weights.resolve(m.base)} were trained with "
               f"{trained_for.get(k)!r}")
  try:  # the architecture's own checks (head counts, per-block tuples), before any work
    from ppd_jax.models import build_model
    build_model({**m.to_dict(), "user_tokens": m.user_tokens or 1,
                 "user_embed_dim": m.user_embed_dim or 1})
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e


def _validate_data_and_sampling(c: ml_collections.ConfigDict, stage: str) -> None:
  m = c.model
  _require(c.data.source in ("synthetic", "synthetic_rewards", "pickapic"), "data.source",
           c.data.source, "must be 'synthetic', 'synthetic_rewards' or 'pickapic'")
  _validate_profile_in_caption(c)
  if c.data.source == "pickapic":
    _validate_pickapic(c, stage)
  if c.data.source == "synthetic":
    for field in ("data.num_users", "data.num_unseen_users", "data.pairs_per_user"):
      _positive_int(c, field)
    _require(c.data.pairs_per_user >= c.data.fewshot, "data.pairs_per_user",
             c.data.pairs_per_user, f"must be at least data.fewshot={c.data.fewshot}")
    _require(isinstance(c.data.pool_per_caption, int) and c.data.pool_per_caption >= 2,
             "data.pool_per_caption", c.data.pool_per_caption,
             "must be an integer >= 2 (a pair needs two images of one caption)")
    from ppd_jax.demo_world import shape_properties
    props = tuple(c.data.reward_properties)
    _require(len(props) > 0 and len(set(props)) == len(props)
             and set(props) <= set(shape_properties.PROPERTIES), "data.reward_properties", props,
             f"must be distinct names from {shape_properties.PROPERTIES}")
    _require(c.data.min_reward_gap >= 0, "data.min_reward_gap", c.data.min_reward_gap,
             "must be >= 0")
    _require(c.data.population in ("majority", "opposed"), "data.population", c.data.population,
             "must be 'majority' (a shared taste plus individual deviations) or 'opposed'")
    _require(c.data.taste_deviation > 0, "data.taste_deviation", c.data.taste_deviation,
             "must be > 0")
    _require(c.eval.judge_temperature > 0, "eval.judge_temperature", c.eval.judge_temperature,
             "must be > 0")
    for field in ("eval.num_items", "eval.interpolation_pairs"):
      _positive_int(c, field)
    for field in ("eval.seed", "eval.unseen_users", "eval.train_users"):
      _positive_int(c, field, allow_zero=True)
    _require(m.user_tokens <= c.data.fewshot, "model.user_tokens", m.user_tokens,
             f"the few-shot embedder makes at most one token per pair: at most data.fewshot="
             f"{c.data.fewshot}")

  if c.data.source == "synthetic_rewards":
    _validate_synthetic_rewards(c)

  _require(c.sample.guidance_scale >= 0, "sample.guidance_scale", c.sample.guidance_scale,
           "must be >= 0")
  _require(0 <= c.sample.eta <= 1, "sample.eta", c.sample.eta, "must be in [0, 1]")


def _validate_synthetic_rewards(c: ml_collections.ConfigDict) -> None:
  """The demo's reward users (demo_world/synthetic_reward_users.py)."""
  from ppd_jax.demo_world import synthetic_reward_users as sru
  d = c.data
  names = tuple(d.reward_users)
  _require(len(names) > 0 and len(set(names)) == len(names) and set(names) <= set(sru.REWARDS),
           "data.reward_users", names, f"must be distinct names from {sorted(sru.REWARDS)}")
  try:
    sru.selected(names, d.get("relabel_rewards", ""))
  except ValueError as e:
    raise ConfigError(f"config.{e}") from e
  _positive_int(c, "data.user_samples")
  _require(d.get("user_sample", "first") in ("first", "random"), "data.user_sample",
           d.get("user_sample"), "must be 'first' or 'random'")
  _require(d.pairs_per_user >= d.fewshot, "data.pairs_per_user", d.pairs_per_user,
           f"must be at least data.fewshot={d.fewshot}")
  _require(d.get("user_embedding", "store") == "store", "data.user_embedding",
           d.get("user_embedding"), "must be 'store' (the few-shot embedder's) for the demo's "
           "reward users")
  _require(c.model.user_tokens <= d.fewshot, "model.user_tokens", c.model.user_tokens,
           f"the few-shot embedder makes at most one token per pair: at most data.fewshot="
           f"{d.fewshot}")


def _validate_training_safety(c: ml_collections.ConfigDict) -> None:
  """Validation while training and the non-finite stop (trainer.py, validation.py)."""
  _positive_int(c, "eval_every", allow_zero=True)
  _positive_int(c, "optim.max_nonfinite_steps")
  _positive_int(c, "eval.val_pairs")
  _positive_int(c, "eval.val_batch_size", allow_zero=True)
  _positive_int(c, "eval.seed", allow_zero=True)


def _validate_pickapic(c: ml_collections.ConfigDict, stage: str) -> None:
  """The Pick-a-Pic fields; for training also that the shards and the user store exist and fit."""
  d = c.data
  for field in ("data.precompute_batch", "data.text_chunk"):
    _positive_int(c, field)
  _positive_int(c, "data.split_seed", allow_zero=True)
  for field in ("validation_fraction", "test_fraction"):
    value = d[field]
    _require(isinstance(value, (int, float)) and 0 <= value < 1, f"data.{field}", value,
             "must be a fraction in [0, 1)")
  _require(d.validation_fraction + d.test_fraction < 1, "data.test_fraction", d.test_fraction,
           f"with data.validation_fraction={d.validation_fraction} leaves no training users")
  _require(d.storage_dtype in ("float16", "float32"), "data.storage_dtype", d.storage_dtype,
           "must be 'float16' or 'float32'")
  _require(d.missing_user_embeddings in ("error", "drop"), "data.missing_user_embeddings",
           d.missing_user_embeddings, "must be 'error' or 'drop'")
  if d.get("profile_in_caption", False):     # the precompute encodes the profiles: needs them
    _require_profiles(_open_store(d))
  if stage == "precompute":
    return
  from ppd_jax.data import shards
  _require(bool(d.shards), "data.shards", d.shards,
           "must name the folder made by python -m ppd_jax.data.precompute")
  try:
    manifest = shards.read_manifest(d.shards)
  except shards.ShardsError as e:
    raise ConfigError(f"config.data.shards={d.shards!r}: {e}") from e
  _require(d.get("user_embedding", "store") in ("store", "onehot"), "data.user_embedding",
           d.get("user_embedding"), "must be 'store' (the VLM's) or 'onehot' (a learned code "
           "per reward user)")
  _require(d.get("user_sample", "first") in ("first", "random"), "data.user_sample",
           d.get("user_sample"), "must be 'first' (each user's sample 0) or 'random' (one of "
           "the user's store entries per pair)")
  _require(d.get("user_embedding", "store") != "onehot" or d.get("relabel"),
           "data.user_embedding", "onehot", "needs data.relabel (one-hot codes of reward users)")
  if d.get("relabel"):
    import os
    from ppd_jax.data import reward_users
    labels = os.path.join(d.relabel, reward_users.LABELS)
    _require(os.path.exists(labels), "data.relabel", d.relabel,
             f"has no {reward_users.LABELS}: run python -m ppd_jax.data.relabel "
             f"--shards={d.shards} --out={d.relabel} to the end")
    try:
      reward_users.selected_ids(reward_users.read_summary(d.relabel),
                                d.get("relabel_rewards", ""))
    except ValueError as e:
      raise ConfigError(f"config.{e}") from e
  _require(not d.get("relabel_rewards") or d.get("relabel"), "data.relabel_rewards",
           d.get("relabel_rewards"), "needs data.relabel")
  m = c.model
  made = manifest["model"]
  want = [m.sample_size, m.sample_size, m.in_channels]
  _require(made["latent_shape"] == want, "data.shards", d.shards,
           f"holds latents of shape {made['latent_shape']}, the model takes {want} "
           f"(made with model.pretrained={made['pretrained']!r})")
  from ppd_jax import backbones
  text_dim = manifest["text"]["shapes"]["text_embedding"][-1]
  if backbones.is_cascade(m):
    want_dim, name = m.cascade["clip_text_in_channels"], "model.cascade.clip_text_in_channels"
  else:
    want_dim, name = m.cross_attention_dim, "cross_attention_dim"
  _require(text_dim == want_dim, "data.shards", d.shards,
           f"holds text embeddings of size {text_dim}, the model's {name} is "
           f"{want_dim} (made with model.pretrained={made['pretrained']!r})")
  for key in set(backbones.extra_text_keys(m)) - {"time_ids"}:   # time_ids: per pair
    _require(key in manifest["text"]["keys"], "data.shards", d.shards,
             f"holds no {key}: it was not made for this model family")
  if _user_inputs(d) != "store":
    from ppd_jax.data import pickapic_source
    shape = pickapic_source.user_shape(d)
    _require(tuple(shape) == (m.user_tokens, m.user_embed_dim), "model.user_embed_dim",
             m.user_embed_dim, f"the {_user_inputs(d)} user inputs are [tokens, dim] = "
             f"{list(shape)}; leave model.user_tokens / user_embed_dim at 0")
    return
  store = _open_store(d)
  _require((store.tokens, store.dim) == (m.user_tokens, m.user_embed_dim),
           "data.user_embeddings", d.user_embeddings,
           f"holds [tokens, dim] = [{store.tokens}, {store.dim}] per user, the model takes "
           f"model.user_tokens={m.user_tokens}, model.user_embed_dim={m.user_embed_dim}")


def _validate_profile_in_caption(c: ml_collections.ConfigDict) -> None:
  """The caption-augmentation baseline needs users with profile text: Pick-a-Pic's VLM users."""
  on = c.data.get("profile_in_caption", False)
  _require(isinstance(on, bool), "data.profile_in_caption", on, "must be True or False")
  _require(not on or c.data.source == "pickapic", "data.profile_in_caption", on,
           f"needs data.source='pickapic', not {c.data.source!r}: the synthetic demo users "
           "have no profile text")


def _open_store(d: ml_collections.ConfigDict):
  """The user-embedding store data.user_embeddings names, or a ConfigError naming the field."""
  from ppd_jax.data import user_store as store_lib
  _require(bool(d.user_embeddings), "data.user_embeddings", d.user_embeddings,
           "must name a user-embedding store file (ppd_jax/data/user_store.py)")
  try:
    return store_lib.UserEmbeddingStore(d.user_embeddings)
  except store_lib.StoreError as e:
    raise ConfigError(f"config.data.user_embeddings={d.user_embeddings!r}: {e}") from e


def _require_profiles(store) -> None:
  """A store written without profile text would silently train on plain captions."""
  if store.profile(int(store.user_ids[0])) is None:
    raise ConfigError(
        f"config.data.profile_in_caption=True: the user-embedding store {store.path} holds no "
        "profile text; write it with profiles, or set data.profile_in_caption=False")
