"""The chain-of-thought prompt of the paper's Table 2 that turns a user's 4 pairs into a profile.

The VLM is shown each pair's caption, its two images and which one the user preferred, then asked
to describe, compare and summarise them into a "User Profile" (ppd_supplement.txt, B.4, Table 2).
The hidden state of the last token it generates is the user embedding (users/vlm.py).

The text is Table 2's, with its "[...]" filled in for every pair and its placeholders
("[Caption for Pair k]", "[Image 1]", "[1 or 2]") replaced by the pair's data. Any change to the
words changes the embeddings, so the template carries a version that the store records.

A prompt is a list of segments: strings, and IMAGE markers where an image goes, so the model
wrapper (users/vlm.py) decides how an image is spelt in tokens.
"""
import dataclasses

TEMPLATE_VERSION = "table2-cot-v1"

SYSTEM_PROMPT = ("You are an expert in image aesthetics and have been asked to predict which image "
                 "a user would prefer based on the examples provided.")

INTRO = ("You will be shown a few examples of preferred and dispreferred images that a user has "
         "labeled.")

STEPS = (
    "1. Describe each image in terms of style, visual quality, and image aesthetics.",
    "2. Explain the differences between the two images in terms of style, visual quality, and "
    "image aesthetics.",
    "3. After you have described all of the images, summarize the differences between the "
    "preferred and dispreferred images into a user profile.",
)

FORMAT_LEAD = "Format your response as follows for the four pairs of images:"

# Table 2's prompt for the VLM judge (a new, unlabelled pair after the examples); the evaluation
# code asks it, not the embedding extraction.
PREDICTION_PROMPT = (
    "Finally, you are provided with a new pair of images, unlabeled by the user. Your task is to "
    "predict which image the user would prefer based on the previous examples you have seen. "
    "Format your response as follows:\n\nPrediction of user preference: [1 or 2]")


class _Image:
  """Marks where an image goes in a prompt."""

  def __repr__(self) -> str:
    return "IMAGE"


IMAGE = _Image()


@dataclasses.dataclass(frozen=True)
class Pair:
  """One labelled example: the caption, its two images (any object the model wrapper reads, e.g.
  a PIL image) and which one the user preferred, 1 or 2 (Table 2's numbering)."""
  caption: str
  image_1: object
  image_2: object
  preferred: int

  def __post_init__(self):
    if self.preferred not in (1, 2):
      raise ValueError(f"preferred must be 1 or 2 (Image 1 or Image 2), got {self.preferred!r}")


def user_prompt(pairs: list[Pair]) -> tuple[list, list]:
  """-> (segments, images): the user turn as strings and IMAGE markers, and the images in the
  order their markers appear (pair 1 image 1, pair 1 image 2, pair 2 image 1, ...)."""
  if not pairs:
    raise ValueError("the prompt needs at least one labelled pair")
  segments, images = [INTRO + "\n\n"], []
  for k, p in enumerate(pairs, start=1):
    segments += [f"Here is Pair {k}: Here is the caption: {p.caption} Here is Image 1: ", IMAGE,
                 " Here is Image 2: ", IMAGE,
                 f" Prediction of user preference: {p.preferred}\n\n"]
    images += [p.image_1, p.image_2]
  lines = list(STEPS) + [FORMAT_LEAD]
  lines += [f"Pair {k}: Image 1: [Description] Image 2: [Description] Differences: [Description]"
            for k in range(1, len(pairs) + 1)]
  lines.append("User Profile: [Description]")
  segments.append("\n\n".join(lines))
  return merge_text(segments), images


def merge_text(segments: list) -> list:
  """Adjacent strings joined, so a prompt is text, IMAGE, text, IMAGE, ..., text."""
  out = []
  for s in segments:
    if isinstance(s, str) and out and isinstance(out[-1], str):
      out[-1] += s
    else:
      out.append(s)
  return out


def render(segments: list, image_text: str) -> str:
  """Segments as one string, each IMAGE spelt as image_text (e.g. "<image>")."""
  return "".join(image_text if s is IMAGE else s for s in segments)


def profile_of(response: str) -> str:
  """The "User Profile:" section of a response, or the whole response when the model did not
  follow the format (the embedding is taken either way; the text is what the baseline reads)."""
  head, sep, tail = response.rpartition("User Profile:")
  return tail.strip() if sep else response.strip()
