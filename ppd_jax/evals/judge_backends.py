"""The judge backends behind command-line flags, shared by judge_agreement and winrate.

  --judge=api --judge_model=gpt-4o-mini-2024-07-18 [--base_url=http://127.0.0.1:8000/v1]
      [--key_env=OPENAI_API_KEY]            (the key only ever from that environment variable)
  --judge=local --judge_model=llava-hf/llava-onevision-qwen2-7b-ov-hf [--judge_batch=4]
      (or a Qwen2-VL checkpoint, e.g. Qwen/Qwen2-VL-7B-Instruct: the family is the checkpoint's
      config.json model_type, evals/judge_local.FAMILIES)
  --judge=synthetic          (winrate on a demo run: the users' hidden rewards answer)
  [--nocot] [--verdict_from=text|logprobs] [--judge_temperature=T] [--min_answer_mass=0.5]

The defaults are the paper's protocol (Section 5.2, Table 2): chain of thought on, the verdict
from the sampled reply's digit, temperature 1 (the API's default; the local judge samples at 1
too). --verdict_from=logprobs reads a soft probability from the answer digit's logprobs instead
(the API's top logprobs; the local judge's next-token distribution, where --min_answer_mass
marks answers with too little mass on "1"/"2" invalid). --judge_temperature unset means each
backend's own default; the synthetic judge's is its own rule (evals/judge_synthetic.py).
"""
import os

from ppd_jax import storage

DEFAULT_MODELS = {"api": "gpt-4o-mini-2024-07-18",
                  "local": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}


def define_flags(synthetic: bool = False, flag_values=None):
  """synthetic: also offer --judge=synthetic (a demo run's users' hidden rewards). flag_values:
  where to define them (absl's global FLAGS by default; tests parse their own). absl's --help
  lists only the main module's flags: a command then calls
  `flags.adopt_module_key_flags(judge_backends)` so that these are listed too."""
  from absl import flags
  fv = {} if flag_values is None else {"flag_values": flag_values}
  flags.DEFINE_enum("judge", "api", ["api", "local"] + (["synthetic"] if synthetic else []),
                    "the judge: an OpenAI-compatible chat API, a local transformers VLM"
                    + (", or the demo users' hidden rewards" if synthetic else ""), **fv)
  flags.DEFINE_string("judge_model", None, "model name (api) or checkpoint (local: "
                      "LLaVA-OneVision or Qwen2-VL, by its config's model_type); default "
                      + ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items()), **fv)
  flags.DEFINE_string("base_url", "https://api.openai.com/v1", "the API's base URL (a local "
                      "server: http://127.0.0.1:PORT/v1)", **fv)
  flags.DEFINE_string("key_env", "OPENAI_API_KEY", "environment variable holding the API key "
                      "(the key itself is never a flag)", **fv)
  flags.DEFINE_bool("cot", True, "ask for Table 2's chain of thought before the answer (the "
                    "paper's protocol; --nocot: the bare prediction request)", **fv)
  flags.DEFINE_enum("verdict_from", "text", ["text", "logprobs"], "where the verdict comes "
                    "from: the sampled reply's digit (the paper) or the digit's logprobs "
                    "(soft)", **fv)
  flags.DEFINE_float("judge_temperature", None, "sampling temperature; unset: the backend's "
                     "default (api and local: 1, the paper's API default; synthetic: its "
                     "own)", **fv)
  flags.DEFINE_float("min_answer_mass", 0.5, "local, --verdict_from=logprobs: answers with less "
                     "probability on '1'+'2' are invalid", **fv)
  flags.DEFINE_integer("judge_batch", 4, "requests per forward pass (local)", **fv)
  flags.DEFINE_integer("judge_workers", 4, "concurrent requests (api)", **fv)


def from_flags(f, out: str, log=print, run=None):
  """The backend the flags name; the API's response cache lives in out/judge_cache.jsonl. The
  synthetic judge answers with the users' hidden rewards of `run`'s demo data."""
  if f.judge == "synthetic":
    from ppd_jax.evals import judge_synthetic      # refuses a run without synthetic users
    seed = getattr(f, "seed", None)
    return judge_synthetic.for_run(run, temperature=f.judge_temperature,
                                   seed=0 if seed is None else seed)
  model = f.judge_model or DEFAULT_MODELS[f.judge]
  temperature = 1.0 if f.judge_temperature is None else f.judge_temperature
  if f.judge == "api":
    from ppd_jax.evals import judge_api
    return judge_api.ApiJudge(model, os.fspath(storage.path(out) / "judge_cache.jsonl"),
                              base_url=f.base_url, key_env=f.key_env, cot=f.cot,
                              temperature=temperature, verdict_from=f.verdict_from,
                              workers=f.judge_workers, log=log)
  from ppd_jax.evals import judge_local
  from ppd_jax.users import vlm as vlm_lib
  decoding = vlm_lib.Decoding(mode="sample", temperature=temperature)
  return judge_local.LocalJudge(judge_local.load_vlm(model), cot=f.cot, decoding=decoding,
                                batch_size=f.judge_batch, verdict_from=f.verdict_from,
                                min_mass=f.min_answer_mass)
