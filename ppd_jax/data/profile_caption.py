"""The caption-augmentation baseline's text: a caption with its user's generated profile appended.

PPD's paper compares against baselines that see the user only through text: the VLM's "User
Profile" appended to the caption (ppd_supplement.txt, B.3). With config.data.profile_in_caption on,
training encodes every pair's caption this way (data/precompute.py) and sampling does the same to
each prompt (inference.py), so both sides join the two texts by this one function.

The text encoder still truncates at its context (77 CLIP tokens), so a long profile is cut; the
caption comes first so it is never the part that is lost.
"""

SEPARATOR = " User profile: "


def with_profile(caption: str, profile: str | None) -> str:
  """caption + SEPARATOR + profile; the caption unchanged when there is no profile text."""
  profile = (profile or "").strip()
  return f"{caption}{SEPARATOR}{profile}" if profile else caption
