"""The diffusers script `python -m ppd_jax.export` prints for a Stable Diffusion run (and its
JSON's `usage`): from the user's embedding file to PNGs, with the scheduler, steps and guidance
the run samples with, so the script makes ppd_jax's images (tests/test_sample.py runs it as
printed). Stable Cascade's script is weights/export_cascade.py's usage_snippet.
"""
from typing import Any, Mapping


EMBEDDING_FILE = "user.npy"


def embedding_lines(workdir: str) -> str:
  """The snippets' first lines: one user's embedding from the file users/embedding.py writes."""
  return ("import numpy as np\n"
          "# one user's embedding [tokens, dim], written by\n"
          f"#   python -m ppd_jax.users.embedding --workdir={workdir} --user=ID "
          f"--out={EMBEDDING_FILE}\n"
          f"user_embedding = np.load({EMBEDDING_FILE!r})\n"
          "prompts = ['a photo of a dog', 'a watercolour of a lighthouse']\n")


# ppd_jax's timesteps (diffusion/generation.py, `_generate`): every sampler runs "trailing" spacing
# with steps_offset 0, whatever the base folder's scheduler config says (SD 1.5: "leading", 1).
TIMESTEP_SPACING, STEPS_OFFSET = "trailing", 0

# config.sample.sampler -> the diffusers scheduler that steps as ours does from the same x_T
# (tests/test_sampler_parity.py), and the options that pin it to ours where diffusers' class
# defaults or a base's scheduler config could differ: DDIMScheduler's class defaults are
# clip_sample=True and set_alpha_to_one=True; ours are config.sample.clip_sample and False.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "euler": ("EulerDiscreteScheduler", {"final_sigmas_type": "zero", "use_karras_sigmas": False}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
                  "use_karras_sigmas": False}),
}


def default_sample() -> Mapping[str, Any]:
  """configs/common.py's `config.sample` (what a run without its own settings samples with)."""
  from configs import common  # pylint: disable=import-outside-toplevel
  return common.get_base_config().sample


def scheduler_lines(sample: Mapping[str, Any]) -> tuple[str, str, str]:
  """(scheduler class, the line(s) that install it, the pipeline call's sampling arguments) for a
  run's `config.sample`: the scheduler `from_config(pipe.scheduler.config)` keeps the base's noise
  schedule and prediction type (what the run's schedule was built from, weights/pretrained.py) and
  sets ppd_jax's timesteps and options; the call sets num_steps, guidance_scale and DDIM's eta."""
  sampler = sample.get("sampler", "ddim")
  if sampler not in SCHEDULERS:
    raise ValueError(f"config.sample.sampler={sampler!r}: no diffusers scheduler for it; expected "
                     f"one of {tuple(SCHEDULERS)}")
  name, options = SCHEDULERS[sampler]
  options = dict(options)
  if sampler == "ddim":
    options["clip_sample"] = bool(sample.get("clip_sample", False))
  extra = ", ".join(f"{k}={v!r}" for k, v in options.items())
  install = ("# the run's sampler (config.sample) on the base's noise schedule, "
             "ppd_jax's timesteps\n"
             f"pipe.scheduler = {name}.from_config(\n"
             f"    pipe.scheduler.config, timestep_spacing={TIMESTEP_SPACING!r}, "
             f"steps_offset={STEPS_OFFSET},\n"
             f"    {extra})\n")
  call = (f"num_inference_steps={int(sample['num_steps'])}, "
          f"guidance_scale={float(sample['guidance_scale'])!r}")
  if sampler == "ddim":
    call += f", eta={float(sample.get('eta', 0.0))!r}"
  return name, install, call


def usage_snippet(folder: str, weight_name: str, user_scale: float = 1.0,
                  pipeline: str = "StableDiffusionPipeline", single_token: bool = False,
                  base: str = "BASE", workdir: str = "W",
                  sample: Mapping[str, Any] | None = None) -> str:
  """The diffusers code that generates for one user with the exported file (docs/sampling.md, CLI, JSON):
  a whole script, from the embedding file to PNGs (tests run it as printed). It samples as the
  run does (`sample`, the run's config.sample; None: configs/common.py's): the same scheduler,
  timesteps, steps and guidance, so from the same x_T it makes ppd_jax's images.

  CFG: the pipeline splits each ip_adapter_image_embeds tensor into [negative; positive] halves
  along the batch. PPD's sampler has the user branch off in the unconditional half; the per-row
  ip_adapter_masks [0; 1] reproduce that exactly (no negative embedding can; module docstring).
  With guidance_scale <= 1 diffusers runs the conditional half alone (do_classifier_free_guidance
  is guidance_scale > 1), so embeds has p rows and no mask: ppd_jax's image at guidance 1 exactly
  (below 1 ppd_jax still mixes in the unconditional branch, which diffusers cannot).
  single_token: the file holds ImageProjection (embeds [rows, 1, dim]), else the Full projection
  (embeds [rows, 1, tokens, dim]).
  """
  sample = default_sample() if sample is None else sample
  scheduler, install, call = scheduler_lines(sample)
  cfg = float(sample["guidance_scale"]) > 1
  rows, note = ("2 * p", "  # [negative; positive], negative masked") if cfg else ("p", "")
  if single_token:
    shape = ("# user_embedding: [1, dim]; ImageProjection makes its tokens\n"
             "user = torch.as_tensor(user_embedding, dtype=pipe.dtype).reshape(1, 1, -1)\n"
             f"embeds = user.expand({rows}, -1, -1){note}\n")
  else:
    shape = ("# user_embedding: [tokens, dim]\n"
             "user = torch.as_tensor(user_embedding, dtype=pipe.dtype)[None, None]\n"
             f"embeds = user.expand({rows}, -1, -1, -1){note}\n")
  if cfg:
    rows_note = ("# p prompts; the pipeline repeats embeds per image, the mask covers all n "
                 "UNet rows\n")
    mask = "mask = torch.cat([torch.zeros(n), torch.ones(n)]).view(2 * n, 1, 1, 1)\n"
    masks = "              cross_attention_kwargs={'ip_adapter_masks': [mask]},\n"
  else:
    rows_note = "# p prompts; guidance_scale <= 1: no CFG half, so no negative rows and no mask\n"
    mask = masks = ""
  return (
      embedding_lines(workdir) +
      "import torch\n"
      f"from diffusers import {scheduler}, {pipeline}\n"
      f"pipe = {pipeline}.from_pretrained({base!r})  # the base the run was trained on\n"
      + install +
      f"pipe.load_ip_adapter({folder!r}, subfolder='', weight_name={weight_name!r},\n"
      "                      image_encoder_folder=None)\n"
      f"pipe.set_ip_adapter_scale({user_scale})  # ppd_jax's user_scale\n"
      + rows_note +
      "p, per_prompt = len(prompts), 1\n"
      "n = p * per_prompt\n"
      + shape + mask +
      "images = pipe(prompts, num_images_per_prompt=per_prompt, ip_adapter_image_embeds=[embeds],\n"
      + masks +
      f"              {call}).images\n"
      "for i, image in enumerate(images):\n"
      "  image.save(f'ppd_{i}.png')\n")
