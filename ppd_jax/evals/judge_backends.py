"""The judge backends behind command-line flags, shared by judge_agreement and winrate.

  --judge=api --judge_model=gpt-4o-mini-2024-07-18 [--base_url=http://127.0.0.1:8000/v1]
      [--key_env=OPENAI_API_KEY]            (the key only ever from that environment variable)
  --judge=local --judge_model=llava-hf/llava-onevision-qwen2-7b-ov-hf [--judge_batch=4]
      (or a Qwen2-VL checkpoint, e.g. Qwen/Qwen2-VL-7B-Instruct: the family is the checkpoint's
      config.json model_type, evals/judge_local.FAMILIES)
  --judge=synthetic          (winrate on a demo run: the users' hidden rewards answer)
  [--cot] [--judge_temperature=1.0]
"""
import os

from ppd_jax import storage

DEFAULT_MODELS = {"api": "gpt-4o-mini-2024-07-18",
                  "local": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}


def define_flags(synthetic: bool = False):
  """synthetic: also offer --judge=synthetic (a demo run's users' hidden rewards)."""
  from absl import flags
  flags.DEFINE_enum("judge", "api", ["api", "local"] + (["synthetic"] if synthetic else []),
                    "the judge: an OpenAI-compatible chat API, a local transformers VLM"
                    + (", or the demo users' hidden rewards" if synthetic else ""))
  flags.DEFINE_string("judge_model", None, "model name (api) or checkpoint (local: "
                      "LLaVA-OneVision or Qwen2-VL, by its config's model_type); default "
                      + ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items()))
  flags.DEFINE_string("base_url", "https://api.openai.com/v1", "the API's base URL (a local "
                      "server: http://127.0.0.1:PORT/v1)")
  flags.DEFINE_string("key_env", "OPENAI_API_KEY", "environment variable holding the API key "
                      "(the key itself is never a flag)")
  flags.DEFINE_bool("cot", False, "ask for Table 2's chain of thought before the answer")
  flags.DEFINE_float("judge_temperature", 1.0, "sampling temperature (the paper: API default 1)")
  flags.DEFINE_integer("judge_batch", 4, "requests per forward pass (local)")
  flags.DEFINE_integer("judge_workers", 4, "concurrent requests (api)")


def from_flags(f, out: str, log=print, run=None):
  """The backend the flags name; the API's response cache lives in out/judge_cache.jsonl. The
  synthetic judge answers with the users' hidden rewards of `run`'s demo data."""
  if f.judge == "synthetic":
    from ppd_jax.evals import judge_synthetic
    from ppd_jax.evals.rewards import hidden
    if run is None or not hasattr(run.source, "user_reward"):
      raise ValueError("--judge=synthetic needs a run on the demo's synthetic users")
    return judge_synthetic.SyntheticJudge(lambda u: hidden.HiddenPropertyReward(run.source, u))
  model = f.judge_model or DEFAULT_MODELS[f.judge]
  if f.judge == "api":
    from ppd_jax.evals import judge_api
    return judge_api.ApiJudge(model, os.fspath(storage.path(out) / "judge_cache.jsonl"),
                              base_url=f.base_url, key_env=f.key_env, cot=f.cot,
                              temperature=f.judge_temperature, workers=f.judge_workers, log=log)
  from ppd_jax.evals import judge_local
  from ppd_jax.users import vlm as vlm_lib
  decoding = vlm_lib.Decoding(mode="sample", temperature=f.judge_temperature)
  return judge_local.LocalJudge(judge_local.load_vlm(model), cot=f.cot, decoding=decoding,
                                batch_size=f.judge_batch)
