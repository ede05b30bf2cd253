"""PPD run configurations: `--config=configs/ppd.py:VARIANT`.

Variants:
  demo        tiny pixel-space UNet on synthetic users; the whole demo runs on a laptop CPU in
              minutes (python -m ppd_jax.demo).
  demo_quick  the demo with fewer users and steps, for the test suite.
  tiny        the smallest model (random base), for mechanics tests.
  sd15        Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5)
  sd21        Stable Diffusion 2.1, 768 px, v-prediction (stabilityai/stable-diffusion-2-1)
  sdxl        Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0)
  pickapic_sd15, pickapic_sdxl
              PPD on Pick-a-Pic v2 users: shards from python -m ppd_jax.data.precompute and a
              user-embedding store; set --config.data.shards and --config.data.user_embeddings.
  multireward_sd15 and its Table 1 rows (Section 5.1): reward models as users, labels from
              python -m ppd_jax.data.relabel (--config.data.relabel=RELABEL_DIR):
    multireward_sd15          PPD, the reward users' VLM embeddings (data.user_embeddings)
    multireward_sd15_onehot   PPD with a learned code per reward user (the ablation)
    multireward_sd15_dpo      Diffusion-DPO on the union of the rewards' labels, no user
    multireward_sd15_sft      SFT on the preferred images of the same pairs, no user
    multireward_sd15_dpo_clip_h14 / _aesthetic / _hps_v2
                              DPO on one reward's labels, no user (Table 1's upper bounds)
  The base row is any of these runs sampled with the user branch off (evals/table1.py).
  demo_multireward  the same experiment on a laptop: the demo world with three partly conflicting
              property rewards as the users (python -m ppd_jax.demo.multireward)
  demo_multireward_quick  the same at test size
"""
import ml_collections

from configs import common
from configs import sd_architectures


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.total_steps = 300
  c.log_every = 10
  c.checkpoint_every = 100
  c.eval_every = 100                # validation on 256 pairs of the validation users
  c.batch_size = 32
  c.dpo.beta = 2000.0
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0

  c.diffusion.beta_schedule = "squaredcos_cap_v2"

  m = c.model
  m.base = "demo"                   # ppd_jax/demo/base_16px.npz, made by ppd_jax.demo.pretrain_base
  m.sample_size = 16                # pixel space: 16x16 RGB, no VAE
  m.in_channels = 3
  m.out_channels = 3
  m.block_out_channels = (32, 64)
  m.layers_per_block = 1
  # Attention (and so the user branch) at 8x8 and in the mid block: at 16x16 it would cost more
  # than all the convolutions on a CPU, for global properties that 8x8 sees as well.
  m.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  m.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  m.attention_head_dim = 8
  m.cross_attention_dim = 32
  m.norm_num_groups = 8
  m.user_embed_dim = 16
  m.user_tokens = 4

  d = c.data
  d.source = "synthetic"
  d.num_users = 128                 # training users
  d.num_unseen_users = 48           # held out for evaluation (the reported win rates)
  d.num_validation_users = 16       # held out for choosing the recipe (val/*), never reported
  d.pairs_per_user = 24
  d.pool_per_caption = 32           # 576 base samples that users' pairs are drawn from
  d.fewshot = 4                     # pairs the user embedder sees (the paper's N)
  d.text_length = 8                 # caption tokens
  c.sample.num_steps = 15
  c.sample.guidance_scale = 3.0
  c.sample.clip_sample = True       # pixel space: keeps the first (abar ~ 0) step from exploding
  c.eval.interpolation_pairs = 8
  return c


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = _demo(c)
  c.total_steps = 4
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval_every = 0
  c.batch_size = 8
  c.model.base = "random"
  c.model.sample_size = 8
  c.model.block_out_channels = (16, 32)
  c.model.norm_num_groups = 4
  c.model.cross_attention_dim = 16
  c.data.num_users = 8
  c.data.num_unseen_users = 4
  c.data.num_validation_users = 0   # validation (where a test turns it on) on the unseen users
  c.data.pairs_per_user = 8
  c.data.pool_per_caption = 4
  c.sample.num_steps = 4
  c.eval.num_items = 2
  c.eval.train_users = 2
  c.eval.interpolation_pairs = 1
  return c


def _demo_quick(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The demo at test scale (tests/test_demo.py): fewer users, steps and evaluation items."""
  c = _demo(c)
  c.total_steps = 120
  c.checkpoint_every = 120
  c.eval_every = 0                  # the test suite's time; test_validation.py covers it
  c.data.num_users = 64
  c.data.num_unseen_users = 16
  c.eval.num_items = 6
  c.eval.train_users = 8
  c.eval.interpolation_pairs = 4
  return c


def _pretrained_run(c: ml_collections.ConfigDict) -> None:
  """What every published-checkpoint variant (SD, Stable Cascade) shares: the training schedule,
  the synthetic users' world at this scale, and a small evaluation."""
  c.total_steps = 2000
  c.log_every = 10
  c.checkpoint_every = 250
  c.eval_every = 250
  c.batch_size = 64
  c.dpo.beta = 5000.0               # Diffusion-DPO's value for SD 1.5 and SDXL
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 100
  d = c.data
  d.source = "synthetic"
  d.num_users = 32
  d.num_unseen_users = 8
  d.pairs_per_user = 8
  d.pool_per_caption = 4
  d.text_length = 77
  c.eval.num_items = 2
  c.eval.train_users = 4
  c.eval.interpolation_pairs = 1


def _pickapic_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's real-user setting on any backbone: Pick-a-Pic v2 pairs, each conditioned on its
  labeller's VLM embedding (data/user_store.py), one epoch at an effective batch of 768."""
  # The paper's 8 GPUs x 16 pairs x 6 accumulation steps. Accumulation follows from the backbone's
  # per_device_batch and the device count (1, 2, 4 or 8 GPUs: 48, 24, 12, 6 micro-steps at 16).
  c.batch_size = 768
  c.optim.lr = 3e-6                 # the paper's real-user learning rate
  c.total_steps = 1000              # about one epoch of Pick-a-Pic v2's ~0.8M kept pairs
  c.checkpoint_every = 100
  c.eval_every = 100                # the validation users' pairs (precompute's validation split)
  d = c.data
  d.source = "pickapic"
  d.shards = ""                     # --config.data.shards=SHARD_DIR
  d.user_embeddings = ""            # --config.data.user_embeddings=USERS.safetensors
  # [tokens, dim] of a user embedding: 0 takes them from the store (users.embed's default keeps
  # every layer, [L + 1, H]; --layers=last gives [1, H], expanded to K user tokens).
  c.model.user_tokens = 0
  c.model.user_embed_dim = 0
  d.worker_count = 0                # one reader gives ~3000 pairs/s (benchmarks/data.py)
  return c


# Pairs per device per micro-step that fit an 80 GB GPU (80e9 B = 74.5 GiB), from the
# ahead-of-time memory figures in docs/performance.md (benchmarks/memory.py, XLA's buffer
# assignment on the CPU, which overstates a GPU's temporaries). A pair is 2 images, each through
# the reference and the policy UNet.
_PER_DEVICE_BATCH = {
    # 16 pairs on one device: 46.9 GiB of temporaries (memory.py --what=attention, chunked
    # attention, bf16, remat, 64x64 latents) + 1.94 GiB of arguments (--what=fsdp, fsdp=1):
    # ~49 GiB. The paper's 16 pairs per GPU.
    "sd15": 16,
    # Not measured: 96x96 latents are 2.25x SD 1.5's tokens, so ~2.25 x 46.9 / 16 = 6.6 GiB per
    # pair; 8 pairs ~53 GiB + ~2 GiB of arguments (an estimate, to confirm with memory.py).
    "sd21": 8,
    # 8 pairs per device: 138.6 GiB of temporaries + 8.93 GiB of arguments (--what=fsdp,
    # fsdp=1): ~17.3 GiB per pair, so 4 pairs (~78 GiB) do not fit and 2 (~44 GiB) do (scaled
    # from the 8-pair figure; some temporaries do not grow with the batch, so this errs high).
    "sdxl": 2,
}


def _stable_diffusion(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """PPD on a published Stable Diffusion checkpoint (`--config.model.pretrained=PATH` for a local
  copy). The fields below mirror its config files; a pretrained folder's own files win."""
  arch = sd_architectures.ARCHITECTURES[name]
  _pretrained_run(c)

  m = c.model
  m.pretrained = arch["model_id"]
  unet = arch["unet"]
  for field in ("sample_size", "in_channels", "out_channels", "block_out_channels",
                "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
                "cross_attention_dim", "norm_num_groups"):
    value = unet[field]
    setattr(m, field, tuple(value) if isinstance(value, list) else value)
  m.transformer_layers_per_block = tuple(unet.get("transformer_layers_per_block", (1,) * len(
      unet["block_out_channels"])))
  m.use_linear_projection = unet.get("use_linear_projection", False)
  m.upcast_attention = unet.get("upcast_attention", False)
  m.addition_embed_type = unet.get("addition_embed_type", "")
  m.user_embed_dim = 3584           # LLaVA-OneVision (Qwen2-7B) hidden size
  m.user_tokens = 1                 # the final token's hidden state
  m.dtype = "bfloat16"              # frozen-base compute; params and the user branch stay float32
  m.remat = True
  c.per_device_batch = _PER_DEVICE_BATCH[name]
  for field, value in arch["scheduler"].items():
    setattr(c.diffusion, field, value)

  c.sample.sampler = "dpmpp_2m"
  c.sample.num_steps = 25
  c.sample.guidance_scale = 7.5
  return c


def _pickapic(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The paper's real-user setting on Stable Diffusion: Pick-a-Pic v2 pairs, each conditioned on
  its labeller's VLM embedding (data/user_store.py), one epoch at an effective batch of 768."""
  return _pickapic_run(_stable_diffusion(c, name))


def _cascade(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """PPD on Stable Cascade, the paper's backbone: the user branch in Stage C (lite: 1.0B, whose
  32 attention blocks' user K/V are the paper's "about 150M" trained parameters; full: 3.6B).
  `--config.model.pretrained=PRIOR` / `--config.model.decoder=DECODER` for local copies of the
  hub folders; the prior's config.json then decides the architecture (weights/pretrained_cascade)."""
  from ppd_jax.models import cascade as cascade_arch
  lite = size == "lite"
  _pretrained_run(c)
  c.dpo.weighting = "none"          # "p2": Stage C's own 1 - abar weight on each pair's z
  m = ml_collections.ConfigDict()
  m.family = "cascade"
  m.cascade = dict(cascade_arch.PRIOR_LITE if lite else cascade_arch.PRIOR)
  m.sample_size = 24                # Stage C's grid: 768 px effnet input (1024 px images)
  m.in_channels = 16
  m.user_embed_dim = 3584           # LLaVA-OneVision (Qwen2-7B) hidden size
  m.user_tokens = 1
  m.user_tokens_per_embedding = 4
  m.dtype = "bfloat16"
  m.remat = True
  # Not measured yet (benchmarks/gpu_check.sh's Stage C piece reports memory_analysis() and
  # halves from 16 until it fits): Stage C works on 24x24 latents (576 tokens, 1/7 of SD 1.5's
  # 4096), so lite takes the paper's 16; the full Stage C (3.6x lite's parameters) half that.
  c.per_device_batch = 16 if lite else 8
  m.attention_impl = "auto"
  m.base = "random"
  m.pretrained = "stabilityai/stable-cascade-prior"
  m.variant = ""                    # "bf16" reads the hub's *.bf16.safetensors
  m.prior_subfolder = "prior_lite" if lite else "prior"
  m.decoder = "stabilityai/stable-cascade"
  m.decoder_subfolder = "decoder_lite" if lite else "decoder"
  m.decoder_steps = 10              # StableCascadeDecoderPipeline's defaults
  m.decoder_guidance_scale = 0.0
  c.model = m
  c.diffusion.process = "cascade"
  c.diffusion.cosine_s = 0.008
  c.sample.sampler = "ddpm_wuerstchen"
  c.sample.num_steps = 20           # StableCascadePriorPipeline's defaults
  c.sample.guidance_scale = 4.0
  return c


def _pickapic_cascade(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """The paper's setting: Pick-a-Pic v2 pairs with their labellers' VLM embeddings on Stage C."""
  return _pickapic_run(_cascade(c, size))


def _multireward(c: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
  """PPD's multi-reward experiment on SD 1.5: one epoch of the relabelled pairs (~1000 steps at
  768 pairs, the real-user schedule). `row` picks the Table 1 row."""
  c = _pickapic(c, "sd15")
  d = c.data
  d.relabel = ""                    # --config.data.relabel=RELABEL_DIR (data/relabel.py)
  # users.embed --pairs=RELABEL_DIR --samples=256 gives each reward user 256 embeddings of
  # different 4-pair samples; each pair is shown with one of them, as people are with their own 4.
  d.user_sample = "random"
  return common.table1_row(c, row)


def _demo_multireward(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Section 5.1 on a laptop (python -m ppd_jax.demo.multireward): the demo's base and pool, three
  partly conflicting property rewards as the users (demo_world/synthetic_reward_users.py).
  The demo trains every Table 1 row from this config (configs.common.table1_row)."""
  c = _demo(c)
  c.total_steps = 140               # 6 runs of 140 x 32 pairs: the 10 minutes allow no more
  c.batch_size = 32
  c.checkpoint_every = 140
  c.eval_every = 0
  d = c.data
  d.source = "synthetic_rewards"
  d.pairs_per_user = 1600           # per reward user: 4800 pairs, each trained on about once
  # Each reward user's one embedding (its first 4 pairs). "random" (one of 32 four-pair samples
  # per pair, the VLM path's setting) learns more slowly here: docs/table1.md, "On a laptop".
  d.user_sample = "first"
  d.user_samples = 32
  c.eval.multireward_repeats = 3    # Table 1 prompts: the 18 captions x 3 held-out seeds
  c.eval.multireward_seed = 10_000  # x_T seeds never used for the pool
  c.eval.grid = 5                   # barycentric grid: 5 rows, 15 mixes
  c.eval.edge_steps = 5             # points along each edge of the triangle
  c.eval.edge_repeats = 1           # edge prompts: the 18 captions, one seed
  return c


def _demo_multireward_quick(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The laptop experiment at test size (tests/test_multireward_demo.py)."""
  c = _demo_multireward(c)
  c.total_steps = 60
  c.checkpoint_every = 60
  c.batch_size = 16
  c.data.pairs_per_user = 320
  c.data.user_samples = 8
  c.eval.multireward_repeats = 1
  c.eval.grid = 3
  c.eval.edge_steps = 3
  c.eval.edge_repeats = 1
  return c


_MULTIREWARD_ROWS = ("ppd", "onehot", "dpo", "sft", "dpo_clip_h14", "dpo_aesthetic", "dpo_hps_v2")


_VARIANTS = {
    "demo": _demo, "demo_quick": _demo_quick, "tiny": _tiny,
    "demo_multireward": _demo_multireward, "demo_multireward_quick": _demo_multireward_quick,
    "sd15": lambda c: _stable_diffusion(c, "sd15"),
    "sd21": lambda c: _stable_diffusion(c, "sd21"),
    "sdxl": lambda c: _stable_diffusion(c, "sdxl"),
    "pickapic_sd15": lambda c: _pickapic(c, "sd15"),
    "pickapic_sdxl": lambda c: _pickapic(c, "sdxl"),
    "cascade_lite": lambda c: _cascade(c, "lite"),
    "cascade": lambda c: _cascade(c, "full"),
    "pickapic_cascade_lite": lambda c: _pickapic_cascade(c, "lite"),
    **{("multireward_sd15" if row == "ppd" else f"multireward_sd15_{row}"):
       (lambda c, row=row: _multireward(c, row)) for row in _MULTIREWARD_ROWS},
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  arg = arg or "demo"
  if arg not in _VARIANTS:
    raise ValueError(f"configs/ppd.py: unknown variant {arg!r}; choose one of {sorted(_VARIANTS)}")
  c = _VARIANTS[arg](common.get_base_config())
  c.variant = arg
  return c
