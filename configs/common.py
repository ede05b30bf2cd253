"""Fields every PPD run has; variants in configs/ppd.py override a few of them.

Every field is documented where it is set. `ppd_jax.config_validation.validate` checks the values
before any work starts.
"""
import math

import ml_collections


def _int_or_tuple(value) -> ml_collections.FieldReference:
  """A field that holds an int or one value per block (diffusers' configs use both)."""
  return ml_collections.FieldReference(value, field_type=object)


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10            # steps between metrics.jsonl / TensorBoard rows
  c.checkpoint_every = 100    # steps between Orbax checkpoints (and one at the end)
  c.keep_checkpoints = 3      # the last K checkpoints are kept
  c.eval_every = 0            # steps between validations on held-out pairs (val/*); 0: none
  c.async_checkpointing = True

  # Global batch in preference pairs per optimizer step, split over the mesh's batch axes and,
  # within each device, over `grad_accum_steps` micro-batches:
  #   batch_size = devices x micro-batch x grad_accum_steps   (checked before any work)
  c.batch_size = 16
  c.grad_accum_steps = 1
  # The most pairs one device takes in one micro-step (what fits its memory). > 0: accumulation
  # follows from it and the device count, the fewest micro-steps of at most this many pairs
  # (ppd_jax/batch_plan.py); 0: grad_accum_steps as given.
  c.per_device_batch = 0

  c.loss = "dpo"              # "dpo" (Diffusion-DPO) or "sft" (plain MSE on preferred images)
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 5000.0         # Diffusion-DPO's beta; see ppd_jax/dpo.py for the convention
  c.dpo.reduction = "mean"    # squared error per sample: "mean" over elements or "sum"
  c.dpo.weighting = "none"    # "none" (Diffusion-DPO) | "p2": z scaled by each pair's 1 - abar_t

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 1e-2
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0     # global-norm clip; 0 turns it off
  # A step whose loss or gradient is not finite is skipped (no update, counted in the metrics);
  # this many in a row stop the run with an error naming the steps, pairs and users.
  c.optim.max_nonfinite_steps = 10

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1            # -1: all devices not used by fsdp
  c.mesh.fsdp = 1

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_train_timesteps = 1000
  c.diffusion.beta_schedule = "scaled_linear"   # "linear" | "scaled_linear" | "squaredcos_cap_v2"
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.prediction_type = "epsilon"       # "epsilon" | "v_prediction"

  c.model = ml_collections.ConfigDict()
  c.model.sample_size = 64          # latent height = width
  c.model.in_channels = 4
  c.model.out_channels = 4
  c.model.block_out_channels = (320, 640, 1280, 1280)
  c.model.layers_per_block = _int_or_tuple(2)
  c.model.down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  c.model.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  c.model.attention_head_dim = _int_or_tuple(8)   # heads per block (diffusers' naming)
  c.model.cross_attention_dim = 768
  c.model.norm_num_groups = 32
  c.model.transformer_layers_per_block = _int_or_tuple(1)
  c.model.use_linear_projection = False
  c.model.upcast_attention = False  # SD 2.x: float32 attention logits (always so here, see unet.py)
  c.model.addition_embed_type = ""  # "text_time": SDXL's pooled-text + size conditioning
  c.model.addition_time_embed_dim = 256
  c.model.projection_class_embeddings_input_dim = 2816
  c.model.user_embed_dim = 3584     # VLM hidden size (Qwen2-7B)
  c.model.user_tokens = 1           # tokens per user embedding
  c.model.user_tokens_per_embedding = 4  # K: tokens made of a one-token embedding (user_tokens=1)
  c.model.dtype = "float32"         # compute dtype of the frozen base: "float32" | "bfloat16"
  c.model.remat = False             # rematerialise blocks in the backward pass
  # Attention kernel per layer, of the UNet and of the SD VAE's mid blocks (precompute, decoding)
  # (ppd_jax/models/attention_kernels.py): "auto" picks cuDNN's fused attention on GPU where it
  # supports the layer, Pallas flash on TPU, else query chunks whose float32 logits fit 1 GiB per
  # device; or force "xla", "direct", "chunked", "cudnn", "tpu_flash".
  c.model.attention_impl = "auto"
  c.model.base = "random"           # source of the frozen base weights ("random": seeded init)
  # A diffusers-format pipeline folder or hub id (SD 1.x / 2.x / SDXL). When set, it is the frozen
  # base: the UNet architecture and noise schedule come from its config files (overriding the
  # fields above), and its VAE, text encoder(s) and tokenizer(s) encode images and captions.
  c.model.pretrained = ""
  c.model.variant = ""              # weights file variant: "fp16" reads *.fp16.safetensors

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"       # "synthetic" (the demo users) or "pickapic" (shards)
  c.data.worker_count = 0           # Grain worker processes (0: read in the main process)
  c.data.num_users = 0              # synthetic source: training users
  c.data.num_unseen_users = 0       # synthetic source: users held out for evaluation
  # synthetic source: users held out for choosing the recipe (val/* while training), neither
  # trained on nor reported; 0: validation scores the unseen users' pairs
  c.data.num_validation_users = 0
  c.data.pairs_per_user = 0         # synthetic source: preference pairs per user
  c.data.fewshot = 4                # pairs that make a user embedding (the paper's N)
  c.data.text_length = 77           # caption tokens
  c.data.pool_per_caption = 32      # synthetic source: frozen-base samples per caption to pair up
  c.data.min_reward_gap = 0.5       # synthetic source: smallest reward gap a user labels
  # synthetic source: what users' hidden rewards weigh (demo_world/shape_properties.py names)
  c.data.reward_properties = ("size", "brightness", "background")
  # synthetic source: "majority" (a shared taste d plus individual deviations sigma z_u; users
  # with w_u . d < 0 are the minority) or "opposed" (couples w, -w: no majority taste)
  c.data.population = "majority"
  c.data.taste_deviation = 1.5      # sigma: the minority is Phi(-1 / sigma) of users (0.25)
  c.data.user_conditioning = True   # False: one constant embedding for all (Diffusion-DPO baseline)
  # pickapic source (ppd_jax/data/pickapic.py, precompute.py, pickapic_source.py):
  c.data.shards = ""                # the folder python -m ppd_jax.data.precompute made
  c.data.user_embeddings = ""       # user-embedding store (ppd_jax/data/user_store.py)
  c.data.profile_in_caption = False  # baseline: caption + its user's profile (profile_caption.py)
  c.data.relabel = ""               # reward users' labels (data/relabel.py) instead of people's
  c.data.relabel_rewards = ""       # with relabel: only these reward users (comma list; "" all)
  c.data.user_embedding = "store"   # pickapic: "store" (data.user_embeddings) | "onehot" (codes)
  c.data.user_sample = "first"      # store entry per pair: "first" (sample 0) | "random" (any)
  # synthetic_rewards source (demo_world/synthetic_reward_users.py): the demo's reward users
  c.data.reward_users = ("vivid", "airy", "contrast")
  c.data.user_samples = 32          # few-shot embeddings per reward user (sample 0: first 4 pairs)
  c.data.missing_user_embeddings = "error"   # pairs of users without one: "error" | "drop"
  c.data.validation_fraction = 0.05  # users held out for choosing hyper-parameters
  c.data.test_fraction = 0.1        # unseen users: never trained on, for evaluation
  c.data.split_seed = 0             # user splits and few-shot choice (a new c.seed keeps them)
  c.data.storage_dtype = "float16"  # latents and text embeddings on disk: "float16" | "float32"
  c.data.precompute_batch = 32      # images per VAE call on each process (split over its devices)
  c.data.text_chunk = 4096          # captions per text-store file

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddim"         # "ddim" | "euler" | "dpmpp_2m"
  c.sample.num_steps = 50
  c.sample.guidance_scale = 7.5
  c.sample.eta = 0.0
  c.sample.clip_sample = False      # clip each step's x0 prediction to [-1, 1] (pixel space)

  # Personalisation evaluation (ppd_jax/evals/personalization.py, synthetic users only), and
  # validation while training.
  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 1234                # the evaluation prompts and starting noise
  c.eval.num_items = 8              # (prompt, noise) items per user, shared by every model
  c.eval.unseen_users = 0           # unseen users evaluated; 0: all of them
  c.eval.train_users = 16           # training users evaluated (the first ones)
  c.eval.interpolation_pairs = 4    # pairs of unseen users mixed at weights 0, 0.25, ..., 1
  # The synthetic judge (evals/judge_synthetic.py) that plays each user in the win rates: each
  # order's answer drawn with P(first) = sigmoid((r(first) - r(second)) / T + position bias logit).
  # T follows the users' own threshold for a clear pair: a gap of data.min_reward_gap is answered
  # right with probability 0.9 per order, T = min_reward_gap / ln 9
  # (judge_synthetic.default_temperature); a value given explicitly is used as it is.
  c.eval.judge_temperature = c.data.get_ref("min_reward_gap") / math.log(9)
  c.eval.judge_position_bias = 0.0
  # Validation while training (ppd_jax/validation.py), every `eval_every` steps: held-out pairs
  # of validation users, each with a fixed timestep and noise (seeded by eval.seed).
  c.eval.val_pairs = 256
  c.eval.val_batch_size = 0         # pairs per validation call; 0: batch_size / grad_accum_steps
  return c


TABLE1_ROWS = ("ppd", "onehot", "dpo", "sft")      # and dpo_<reward>: one reward's labels


def table1_row(c: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
  """A reward-users run turned into one row of Table 1 (Section 5.1), in place: "ppd" as is,
  "onehot" a learned code per reward user, "dpo" no user information, "sft" the same with the SFT
  loss, "dpo_<reward>" no user and only that reward user's pairs (the upper bound)."""
  if row not in TABLE1_ROWS and not row.startswith("dpo_"):
    raise ValueError(f"Table 1 row {row!r}: one of {', '.join(TABLE1_ROWS)} or dpo_<reward>")
  if row == "onehot":
    c.data.user_embedding = "onehot"
  elif row != "ppd":                # the baselines see no user information
    c.data.user_conditioning = False
  if row == "sft":
    c.loss = "sft"
  if row.startswith("dpo_"):
    c.data.relabel_rewards = row[len("dpo_"):]
  return c
