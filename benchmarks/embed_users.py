"""VLM user-embedding extraction throughput: batched against one user at a time, and what the
final token's extra forward pass costs next to generation.

  python benchmarks/embed_users.py [--users=8] [--batch=4] [--new_tokens=32]
  python benchmarks/embed_users.py --model=/models/llava-onevision-qwen2-0.5b-ov-hf   # on a GPU

Without --model the VLM is a random LLaVA-OneVision of the test fixture's shape (tests/
tiny_llava.py) widened to --hidden / --layers, so the numbers are about the pipeline (prompt
building, image processing, padding, generate, the second pass), not a real checkpoint's speed.
Each user is 4 random pairs with the Table 2 prompt. Greedy decoding with end-of-turn disabled
makes every row generate exactly --new_tokens, so both runs do the same work. Prints:
  batched / one-by-one   entries/s at --batch over entries/s at batch 1, same run
  forward / generate     the final-token forward pass's time over generate()'s, at --batch
"""
import os
import platform
import sys
import time

import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

flags.DEFINE_string("model", None, "a LLaVA-OneVision checkpoint; default: a random one")
flags.DEFINE_integer("users", 8, "users embedded per run")
flags.DEFINE_integer("batch", 4, "users per generate() call in the batched run")
flags.DEFINE_integer("new_tokens", 32, "tokens generated per user")
flags.DEFINE_integer("hidden", 256, "random model: Qwen2 hidden size")
flags.DEFINE_integer("layers", 4, "random model: Qwen2 layers")


def _random_vlm(hidden: int, layers: int):
  import torch
  import tiny_llava
  import transformers
  from ppd_jax.users import vlm as vlm_lib
  tok = tiny_llava.build_tokenizer()
  cfg = tiny_llava.build_config(tok)
  t = cfg.text_config
  t.hidden_size, t.intermediate_size, t.num_hidden_layers = hidden, 4 * hidden, layers
  t.num_attention_heads, t.num_key_value_heads = max(hidden // 64, 1), max(hidden // 128, 1)
  t.layer_types = ["full_attention"] * layers
  torch.manual_seed(0)
  model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
  return vlm_lib.VLM(model, tok, tiny_llava.build_image_processor(), "random")


def _users(n: int, rng) -> list:
  from PIL import Image
  from ppd_jax.users import prompts
  img = lambda: Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
  return [prompts.user_prompt([prompts.Pair(f"user {u} caption {k}", img(), img(), 1 + k % 2)
                               for k in range(4)]) for u in range(n)]


def _run(vlm, users: list, batch: int, decoding) -> tuple[float, float, float]:
  """-> (seconds in all, in generate, in the final forward)."""
  import torch
  gen = fwd = 0.0
  start = time.perf_counter()
  for i in range(0, len(users), batch):
    inputs = vlm.inputs(users[i:i + batch])
    t0 = time.perf_counter()
    seq = vlm.generate(inputs, decoding, seed=i)
    t1 = time.perf_counter()
    vlm.final_states(inputs, seq, "all")
    if torch.cuda.is_available():
      torch.cuda.synchronize()
    gen, fwd = gen + t1 - t0, fwd + time.perf_counter() - t1
  return time.perf_counter() - start, gen, fwd


def main(argv):
  del argv
  import torch
  import transformers
  from ppd_jax.users import vlm as vlm_lib
  transformers.logging.set_verbosity_error()     # it warns about the disabled end-of-turn id
  f = flags.FLAGS
  vlm = vlm_lib.VLM.load(f.model) if f.model else _random_vlm(f.hidden, f.layers)
  vlm.eos_id = -1                       # never stop early: every row makes new_tokens tokens
  decoding = vlm_lib.Decoding(mode="greedy", max_new_tokens=f.new_tokens)
  users = _users(f.users, np.random.default_rng(0))
  _run(vlm, users[:min(2, f.batch)], min(2, f.batch), decoding)          # warm-up
  one, _, _ = _run(vlm, users, 1, decoding)
  many, gen, fwd = _run(vlm, users, f.batch, decoding)
  device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
  print(f"device: {device or platform.machine()}, {os.cpu_count()} CPUs; model: "
        f"{vlm.model_id}, {vlm.num_layers} layers x {vlm.hidden_size}, "
        f"{sum(p.numel() for p in vlm.model.parameters()) / 1e6:.1f}M params")
  print(f"prompt: {vlm.inputs(users[:1])['input_ids'].shape[1]} tokens, "
        f"{f.new_tokens} generated per user, {f.users} users")
  print(f"batch 1:  {f.users / one:.2f} entries/s")
  print(f"batch {f.batch}:  {f.users / many:.2f} entries/s")
  print(f"batched / one-by-one: {one / many:.2f}x")
  print(f"forward / generate at batch {f.batch}: {fwd / gen:.3f}")


if __name__ == "__main__":
  app.run(main)
