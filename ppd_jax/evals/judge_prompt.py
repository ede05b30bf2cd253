"""The judge's prompt: Table 2's "User Preference Prediction" after the user's labelled pairs.

The paper's system prompt (users/prompts.SYSTEM_PROMPT), then the user turn, in the authors' order
(their eval_winrate_gpt4o.py): the introduction, each labelled pair (caption, Image 1, Image 2,
"Prediction of user preference: k"), the instructions (with chain of thought: Table 2's steps,
the per-pair format and the user profile, then the prediction request; without: the prediction
request alone), and the new pair ("Here is Pair 5: ..."). The labelled pairs keep their order
and image order in both calls of a question; only the new pair's images swap. A judge reads the
answer after ANSWER_PREFIX; a written reply's answer is its last "Prediction of user preference:
1|2" (answer_in). Any change to the words changes the verdicts, so the template carries a version
that results record.
"""
import re

from ppd_jax.users import prompts

TEMPLATE_VERSION = "judge-table2-v1"
ANSWER_PREFIX = "Prediction of user preference: "
# The marker as models write it, bold or not ("**Prediction of user preference:** 2").
_ANSWER = re.compile(r"Prediction of user preference:\s*\**\s*([12])")


def answer_in(text: str) -> re.Match | None:
  """The reply's last answer (group 1: the digit), or None: a reply that names several answers
  means the last, as the prompt's format ends with it."""
  found = list(_ANSWER.finditer(text or ""))
  return found[-1] if found else None


def judge_prompt(context, caption: str, first, second, cot: bool = False) -> tuple[list, list]:
  """-> (segments, images): strings and prompts.IMAGE markers, and the images in marker order
  (each context pair's two, then the new pair's first and second)."""
  if not context:
    raise ValueError("the judge needs the user's labelled pairs")
  segments, images = [prompts.INTRO + "\n\n"], []
  for k, p in enumerate(context, start=1):
    segments += [f"Here is Pair {k}: Here is the caption: {p.caption} Here is Image 1: ",
                 prompts.IMAGE, " Here is Image 2: ", prompts.IMAGE,
                 f" {ANSWER_PREFIX}{p.preferred}\n\n"]
    images += [p.image_1, p.image_2]
  if cot:
    lines = list(prompts.STEPS) + [prompts.FORMAT_LEAD]
    lines += [f"Pair {k}: Image 1: [Description] Image 2: [Description] Differences: "
              "[Description]" for k in range(1, len(context) + 1)]
    lines += ["User Profile: [Description]", prompts.PREDICTION_PROMPT]
  else:
    lines = [prompts.PREDICTION_PROMPT]
  segments.append("\n\n".join(lines) + "\n\n")
  n = len(context) + 1
  segments += [f"Here is Pair {n}: Here is the caption: {caption} Here is Image 1: ",
               prompts.IMAGE, " Here is Image 2: ", prompts.IMAGE]
  images += [first, second]
  return prompts.merge_text(segments), images
