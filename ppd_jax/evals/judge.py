"""The VLM judge of Section 5.2: which of two images a user prefers, given the user's 4 pairs.

A question is a user's 4 labelled pairs (the context), a caption and two images A and B. The judge
is asked twice, with A shown first and with B shown first (the few-shot context the same both
times); a backend (evals/judge_api.py, evals/judge_synthetic.py, ...) answers each with
P(the first-shown image is preferred). From the two answers

    p_AB = P("1" | A, B)       p_BA = P("2" | B, A)          (both are P(A preferred))
    verdict  = A if p_AB > 1/2 and p_BA > 1/2;  B if both < 1/2;  else inconsistent (dropped)
    soft     = (p_AB + p_BA) / 2                                (position-debiased P(A))
    bias     = (p_AB - p_BA) / 2 = mean P(first shown chosen) - 1/2

The verdict rule is the paper's (supplement B.3): a pair whose two verdicts disagree is dropped and
counted. A backend that cannot answer (a malformed reply, a server error after retries) returns
no probability: the question is "invalid", counted, never guessed.
"""
import dataclasses
from typing import Protocol, Sequence

import numpy as np

from ppd_jax.users import prompts

VERDICTS = ("A", "B", "inconsistent", "invalid")


@dataclasses.dataclass(frozen=True)
class Question:
  """context: the user's labelled pairs (users/prompts.Pair); image_a / image_b: PIL images or
  arrays. user_id is what a synthetic judge answers for (a VLM never sees it)."""
  context: tuple
  caption: str
  image_a: object
  image_b: object
  user_id: int | None = None

  def __post_init__(self):
    if len(self.context) < 1 or not all(isinstance(p, prompts.Pair) for p in self.context):
      raise ValueError("a judge question needs the user's labelled pairs (users/prompts.Pair)")


@dataclasses.dataclass(frozen=True)
class Request:
  """One call: the question with its two images in the order shown."""
  question: Question
  first: object
  second: object


@dataclasses.dataclass(frozen=True)
class Answer:
  """P(the first-shown image is preferred), or None when the backend could not answer
  (`problem` says why). mass: the probability the model put on "1" and "2" together.
  reward_gap: r(first) - r(second) under the user's own reward, where the judge knows it (the
  synthetic judge; None for a VLM), so a report can count sub-threshold gaps as ties."""
  p_first: float | None
  text: str = ""
  mass: float | None = None
  problem: str = ""
  reward_gap: float | None = None


class JudgeAuthError(RuntimeError):
  """The judge's server refused the credentials (HTTP 401/403) before any request succeeded:
  every further request would fail the same way, so the run stops."""


class Backend(Protocol):
  name: str

  def answer(self, requests: Sequence[Request]) -> list[Answer]: ...


@dataclasses.dataclass(frozen=True)
class Judgement:
  verdict: str                 # one of VERDICTS
  p_ab: float | None
  p_ba: float | None
  soft: float | None
  bias: float | None
  problems: tuple = ()
  reward_gap: float | None = None      # r(A) - r(B) where the judge knows it (Answer.reward_gap)
  mass: tuple = (None, None)           # each order's probability mass on "1" + "2" (Answer.mass)


def context_from_pairs(winners, losers, captions) -> tuple:
  """A user's labelled pairs as the judge's context: the winner shown as Image 1 in even pairs and
  as Image 2 in odd ones, so that "preferred" carries no position cue."""
  return tuple(prompts.Pair(c, w, l, 1) if k % 2 == 0 else prompts.Pair(c, l, w, 2)
               for k, (w, l, c) in enumerate(zip(winners, losers, captions)))


def requests_for(question: Question) -> tuple[Request, Request]:
  """(A first, B first)."""
  return (Request(question, question.image_a, question.image_b),
          Request(question, question.image_b, question.image_a))


def combine(a_first: Answer, b_first: Answer) -> Judgement:
  """The two orders' answers -> the verdict, soft score and bias (module docstring)."""
  mass = (a_first.mass, b_first.mass)
  if a_first.p_first is None or b_first.p_first is None:
    return Judgement("invalid", None, None, None, None,
                     tuple(x.problem for x in (a_first, b_first) if x.p_first is None),
                     mass=mass)
  p_ab, p_ba = float(a_first.p_first), 1.0 - float(b_first.p_first)
  if p_ab > 0.5 and p_ba > 0.5:
    verdict = "A"
  elif p_ab < 0.5 and p_ba < 0.5:
    verdict = "B"
  else:
    verdict = "inconsistent"
  return Judgement(verdict, p_ab, p_ba, (p_ab + p_ba) / 2, (p_ab - p_ba) / 2,
                   reward_gap=a_first.reward_gap, mass=mass)


def judge(backend: Backend, questions: Sequence[Question]) -> list[Judgement]:
  """Each question in both orders, all requests in one backend call."""
  reqs = [r for q in questions for r in requests_for(q)]
  answers = backend.answer(reqs)
  if len(answers) != len(reqs):
    raise RuntimeError(f"judge backend {backend.name} gave {len(answers)} answers for "
                       f"{len(reqs)} requests")
  return [combine(answers[2 * i], answers[2 * i + 1]) for i in range(len(questions))]


def summarise(judgements: Sequence[Judgement]) -> dict:
  """Counts of each verdict and, over the questions that have them:

      win_rate_a   = #A / (#A + #B)               (the paper's win rate: inconsistent dropped)
      consistency  = (#A + #B) / (N - #invalid)
      tie_counted  = (#A + #inconsistent / 2) / (N - #invalid)
      soft_mean    = mean soft,  position_bias = mean bias   (over the valid questions)
  """
  counts = {v: sum(j.verdict == v for j in judgements) for v in VERDICTS}
  valid = [j for j in judgements if j.verdict != "invalid"]
  decided = counts["A"] + counts["B"]
  n = len(valid)
  return {"n": len(judgements), "counts": counts,
          "win_rate_a": counts["A"] / decided if decided else None,
          "consistency": decided / n if n else None,
          "tie_counted": (counts["A"] + 0.5 * counts["inconsistent"]) / n if n else None,
          "soft_mean": float(np.mean([j.soft for j in valid])) if n else None,
          "position_bias": float(np.mean([j.bias for j in valid])) if n else None}
