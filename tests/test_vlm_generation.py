"""Profile generation never emits a placeholder token (<image>, <video>): the final-state forward
pass would count a generated <image> as one image too many and stop the extraction with "Image
features and image tokens do not match". The tiny model is biased towards those tokens, so a
plain generate() does emit them and the suppression is what keeps them out."""
import numpy as np
import pytest
import torch
from PIL import Image

from tiny_llava import build_config
from tiny_llava import build_tokenizer
from tiny_llava import save_tiny_llava
from ppd_jax.users import prompts
from ppd_jax.users import vlm as vlm_lib

NEW = 5
DECODINGS = {"greedy": vlm_lib.Decoding(mode="greedy", max_new_tokens=NEW),
             "sample": vlm_lib.Decoding(mode="sample", seed=1, max_new_tokens=NEW)}


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
  """The tiny VLM whose lm_head prefers <image> above all, then <video>, over every other token;
  and one user's prompt tensors (4 pairs, 8 images)."""
  v = vlm_lib.VLM.load(save_tiny_llava(str(tmp_path_factory.mktemp("gen") / "tiny")))
  image, video = v.model.config.image_token_id, v.model.config.video_token_id
  head = v.model.lm_head
  bias = torch.zeros(head.out_features)
  bias[image], bias[video] = 1e4, 5e3
  head.bias = torch.nn.Parameter(bias)
  rng = np.random.default_rng(0)
  pairs = [prompts.Pair(f"caption {k}",
                        *[Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
                          for _ in range(2)], 1 + k % 2) for k in range(4)]
  return v, v.inputs([prompts.user_prompt(pairs)] * 2), (image, video)


def _new_tokens(inputs, sequences) -> set[int]:
  return set(sequences[:, inputs["input_ids"].shape[1]:].flatten().tolist())


def _plain(v, inputs, decoding, **kw):
  """generate() as it was called before the fix: no suppression of ours."""
  torch.manual_seed(0)
  sample = ({"do_sample": True, "temperature": decoding.temperature, "top_k": 0}
            if decoding.mode == "sample" else {"do_sample": False})
  with torch.inference_mode():
    return v.model.generate(**inputs, max_new_tokens=NEW, eos_token_id=v.eos_id,
                            pad_token_id=v.pad_id, **sample, **kw)


@pytest.mark.parametrize("mode", sorted(DECODINGS))
def test_unsuppressed_generation_emits_placeholders_and_breaks_the_pass(biased, mode):
  v, inputs, (image, video) = biased
  seq = _plain(v, inputs, DECODINGS[mode])
  assert image in _new_tokens(inputs, seq)
  with pytest.raises(ValueError, match="Image features and image tokens do not match"):
    v.final_states(inputs, seq, "last")
  # With <image> alone kept out, the bias hands the choice to <video>.
  assert video in _new_tokens(inputs, _plain(v, inputs, DECODINGS[mode], suppress_tokens=[image]))


@pytest.mark.parametrize("mode", sorted(DECODINGS))
def test_extraction_never_emits_placeholders(biased, mode):
  v, inputs, placeholders = biased
  assert sorted(placeholders) == v.placeholder_ids
  seq = v.generate(inputs, DECODINGS[mode], seed=0)
  assert seq.shape[1] > inputs["input_ids"].shape[1]
  assert not _new_tokens(inputs, seq) & set(placeholders)
  states, texts = v.final_states(inputs, seq, "all")
  assert states.shape == (2, v.num_layers + 1, v.hidden_size) and np.isfinite(states).all()
  assert len(texts) == 2


def test_placeholders_come_from_the_config_and_must_match_the_tokenizer():
  tokenizer = build_tokenizer()
  config = build_config(tokenizer)
  ids = tokenizer.convert_tokens_to_ids
  assert vlm_lib.placeholder_ids(config, tokenizer, "m") == [ids("<image>"), ids("<video>")]
  config.video_token_index = ids("<|im_start|>")      # special, but not the tokenizer's <video>
  with pytest.raises(ValueError, match="video token"):
    vlm_lib.placeholder_ids(config, tokenizer, "m")
  config.video_token_index = 65                        # a plain byte token
  with pytest.raises(ValueError, match="no special token"):
    vlm_lib.placeholder_ids(config, tokenizer, "m")
