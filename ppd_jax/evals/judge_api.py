"""An OpenAI-compatible chat API as the judge (gpt-4o-mini as in the paper, or a local server).

  ApiJudge(model="gpt-4o-mini-2024-07-18", cache="judge_cache.jsonl"
           [, base_url="http://127.0.0.1:8000/v1", key_env="OPENAI_API_KEY",
            cot=True, verdict_from="text"|"logprobs"])

Each request is one chat completion: the paper's system prompt and the judge prompt
(evals/judge_prompt.py, with Table 2's chain of thought unless cot=False) with every image as a
PNG data URL. The answer is the reply's last "Prediction of user preference: 1|2". Where the
verdict comes from:

  verdict_from="text"      the paper: the sampled reply's digit decides, p_first = 1 or 0;
  verdict_from="logprobs"  the digit's top alternatives (logprobs requested) give a soft
                           p_first = exp(l_1) / (exp(l_1) + exp(l_2)), mass = exp(l_1) + exp(l_2).

Invalid (counted, never guessed, never cached, so a rerun asks again): an HTTP error after its
retries, a reply without the answer, a reply cut short (`finish_reason` other than "stop"; a
server that omits the field is taken at its word), and in logprobs mode a reply without logprobs
for its digit. A cached reply that is invalid under these rules (an older cache) is asked again.

HTTP 401/403 before any request of this backend succeeded raises judge.JudgeAuthError, one line
naming the status, the URL and `key_env`: every other request would fail the same way, so no
further request is sent. After a success, a 401/403 is one invalid answer like any other error.

The API key is read from the environment variable `key_env` at each call and goes only into the
Authorization header: it is never logged, never in an error message (not even the server's, which
may echo part of it) and never in the cache. Retries: HTTP 429 and 5xx, timeouts and refused
connections, `retries` times with exponential backoff (`backoff` * 2^k seconds). The cache is a
JSONL file keyed by the SHA-256 of the request's content (model, settings, verdict_from, messages
with images replaced by their hashes), appended and flushed per valid reply, so a rerun or a
resumed job asks nothing twice; on a URL (gs://...) the cache object is rewritten whole per reply
(evals/judge_log.append_lines). HTTP is the standard library's.
"""
import base64
import concurrent.futures
import hashlib
import io
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from ppd_jax import storage
from ppd_jax.evals import judge as judge_lib
from ppd_jax.evals import judge_log
from ppd_jax.evals import judge_prompt
from ppd_jax.users import prompts

_RETRY_STATUS = (429, 500, 502, 503, 504)
_AUTH_STATUS = (401, 403)
VERDICT_FROM = ("text", "logprobs")


class JudgeApiError(RuntimeError):
  """A request that failed for good (after retries, or a status that retrying cannot fix)."""


def png_data_url(image) -> tuple[str, str]:
  """PIL image or [-1, 1] / uint8 array -> (data URL of its PNG, sha256 of the PNG bytes)."""
  if isinstance(image, np.ndarray):
    from ppd_jax import images as image_io
    image = Image.fromarray(image if image.dtype == np.uint8 else image_io.to_uint8(image))
  buf = io.BytesIO()
  image.convert("RGB").save(buf, format="PNG")
  data = buf.getvalue()
  return ("data:image/png;base64," + base64.b64encode(data).decode("ascii"),
          hashlib.sha256(data).hexdigest())


def parse(text: str, logprobs: list | None = None, *, finish_reason: str | None = "stop",
          verdict_from: str = "text") -> judge_lib.Answer:
  """A reply (its text, OpenAI's `choices[0].logprobs.content` and `finish_reason`) -> Answer,
  valid or not by the module docstring's rules."""
  text = text or ""
  if finish_reason not in (None, "stop"):
    return judge_lib.Answer(None, text, problem=f"reply cut short (finish_reason={finish_reason})")
  found = judge_prompt.answer_in(text)
  if found is None:
    return judge_lib.Answer(None, text, problem="no 'Prediction of user preference: 1|2' "
                            f"in the reply ({text[-120:]!r})")
  if verdict_from == "text":
    return judge_lib.Answer(1.0 if found.group(1) == "1" else 0.0, text)
  soft = _soft(text, found.start(1), logprobs) if logprobs else None
  if soft is None or soft[0] is None:
    return judge_lib.Answer(None, text, problem="verdict_from=logprobs but the reply has no "
                            "logprobs for its answer digit (use verdict_from=text)")
  return judge_lib.Answer(soft[0], text, mass=soft[1])


def _soft(text: str, at: int, logprobs: list) -> tuple[float, float] | None:
  """The answer digit's token (the one covering character `at`) -> (p("1"), mass)."""
  pos = 0
  for tok in logprobs:
    piece = tok.get("token", "")
    if pos <= at < pos + len(piece) and piece.strip() in ("1", "2"):
      alts = {a["token"].strip(): a["logprob"] for a in tok.get("top_logprobs", [])}
      alts.setdefault(piece.strip(), tok["logprob"])
      l1, l2 = alts.get("1", -math.inf), alts.get("2", -math.inf)
      mass = math.exp(l1) + math.exp(l2)
      return (math.exp(l1) / mass if mass > 0 else None), mass
    pos += len(piece)
  return None


class ApiJudge:
  """judge.Backend over an OpenAI-compatible /chat/completions endpoint (module docstring)."""

  def __init__(self, model: str, cache: str, *, base_url: str = "https://api.openai.com/v1",
               key_env: str = "OPENAI_API_KEY", cot: bool = True, temperature: float = 1.0,
               max_tokens: int = 2048, verdict_from: str = "text", seed: int = 0,
               retries: int = 5, backoff: float = 1.0, timeout: float = 120.0, workers: int = 4,
               log=print):
    if verdict_from not in VERDICT_FROM:
      raise ValueError(f"--verdict_from={verdict_from!r}: one of {', '.join(VERDICT_FROM)}")
    self.name = f"api:{model}"
    self.model, self.base_url, self.key_env = model, base_url.rstrip("/"), key_env
    self.cot, self.temperature, self.max_tokens = cot, temperature, max_tokens
    self.verdict_from, self.seed = verdict_from, seed
    self.retries, self.backoff, self.timeout, self.workers = retries, backoff, timeout, workers
    self.cache_path, self.log = cache, log
    self._cache = _read_cache(cache)
    self._lock = threading.Lock()
    self._succeeded = False              # any request of this backend answered (HTTP 200)
    self._refused = None                 # JudgeAuthError's message once the key was refused
    self.calls = 0                       # HTTP requests made (retries included), for tests

  def describe(self) -> dict:
    return {"backend": "api", "model": self.model, "base_url": self.base_url, "cot": self.cot,
            "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed,
            "verdict_from": self.verdict_from, "template": judge_prompt.TEMPLATE_VERSION}

  def body(self, request: judge_lib.Request) -> tuple[dict, str]:
    """The request JSON and its cache key (images hashed, not inlined, in the key)."""
    q = request.question
    segments, images = judge_prompt.judge_prompt(q.context, q.caption, request.first,
                                                 request.second, self.cot)
    content, keyed, it = [], [], iter(images)
    for s in segments:
      if s is prompts.IMAGE:
        url, digest = png_data_url(next(it))
        content.append({"type": "image_url", "image_url": {"url": url}})
        keyed.append({"image": digest})
      else:
        content.append({"type": "text", "text": s})
        keyed.append({"text": s})
    settings = {"model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": self.seed}
    if self.verdict_from == "logprobs":
      settings.update(logprobs=True, top_logprobs=5)
    body = {**settings, "messages": [{"role": "system", "content": prompts.SYSTEM_PROMPT},
                                     {"role": "user", "content": content}]}
    key = hashlib.sha256(json.dumps({**settings, "base_url": self.base_url, "user": keyed,
                                     "system": prompts.SYSTEM_PROMPT,
                                     "verdict_from": self.verdict_from,
                                     "template": judge_prompt.TEMPLATE_VERSION},
                                    sort_keys=True).encode()).hexdigest()
    return body, key

  def answer(self, requests) -> list[judge_lib.Answer]:
    """All requests, `workers` at a time. After a refused key the queued ones send nothing
    (_post) and the first JudgeAuthError is raised here."""
    with concurrent.futures.ThreadPoolExecutor(max(1, self.workers)) as pool:
      return list(pool.map(self._one, requests))

  def _read(self, reply: dict) -> judge_lib.Answer:
    return parse(reply.get("text"), reply.get("logprobs"),
                 finish_reason=reply.get("finish_reason"), verdict_from=self.verdict_from)

  def _one(self, request) -> judge_lib.Answer:
    body, key = self.body(request)
    with self._lock:
      hit = self._cache.get(key)
    if hit is not None:
      answer = self._read(hit)
      if answer.p_first is not None:
        return answer                    # an invalid cached reply (an older cache) is re-asked
    try:
      reply = self._post(body)
    except JudgeApiError as e:
      return judge_lib.Answer(None, problem=str(e))
    answer = self._read(reply)
    if answer.p_first is not None:       # only valid replies are kept: a rerun re-asks the rest
      with self._lock:
        self._cache[key] = reply
        _append_cache(self.cache_path, key, reply)
    return answer

  def _post(self, body: dict) -> dict:
    data = json.dumps(body).encode()
    url = self.base_url + "/chat/completions"
    for attempt in range(self.retries + 1):
      if self._refused is not None:      # another worker's request was refused: send nothing
        raise judge_lib.JudgeAuthError(self._refused)
      headers = {"Content-Type": "application/json"}
      key = os.environ.get(self.key_env)
      if key:
        headers["Authorization"] = "Bearer " + key
      req = urllib.request.Request(url, data=data, headers=headers, method="POST")
      with self._lock:
        self.calls += 1
      try:
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
          reply = json.loads(r.read().decode())
        choice = reply["choices"][0]
        lp = (choice.get("logprobs") or {}).get("content")
        with self._lock:
          self._succeeded = True
        return {"text": choice["message"].get("content") or "", "logprobs": lp,
                "finish_reason": choice.get("finish_reason"),
                "model": reply.get("model", self.model)}
      except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} from {url}"
        if e.code in _AUTH_STATUS:
          if self._refuse(e.code, url, key):
            raise judge_lib.JudgeAuthError(self._refused) from None
          raise JudgeApiError(why + " (the key was accepted before: this request only)") from None
        if e.code not in _RETRY_STATUS:
          raise JudgeApiError(why + _server_message(e)) from None
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        why = f"{url} unreachable ({getattr(e, 'reason', e)})"
      except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeApiError(f"{url}: not a chat completion reply ({type(e).__name__})") from None
      if attempt < self.retries:
        wait = self.backoff * 2 ** attempt
        self.log(f"judge: {why}; retrying in {wait:.1f}s ({attempt + 1}/{self.retries})")
        time.sleep(wait)
    raise JudgeApiError(f"{why}, after {self.retries} retries")

  def _refuse(self, status: int, url: str, key: str | None) -> bool:
    """Whether a 401/403 ends the run: yes before any success (module docstring). The message
    leaves out the server's own, which may quote part of the key."""
    with self._lock:
      if self._succeeded:
        return False
      if self._refused is None:
        self._refused = (f"HTTP {status} from {url}: the server refused the API key; check the "
                         f"environment variable {self.key_env} ({'set' if key else 'not set'})")
      return True


def _server_message(e: urllib.error.HTTPError) -> str:
  try:
    msg = json.loads(e.read().decode()).get("error", {}).get("message", "")
  except (ValueError, AttributeError, OSError):
    msg = ""
  return f": {msg[:200]}" if msg else ""


def _read_cache(path) -> dict:
  """{key: reply}; a torn last line (a kill mid-write) is ignored."""
  out = {}
  if storage.exists(path):
    for line in storage.read_text(path).splitlines():
      try:
        row = json.loads(line)
        out[row["key"]] = row["reply"]
      except (ValueError, KeyError, TypeError):
        continue
  return out


def _append_cache(path, key: str, reply: dict) -> None:
  """One line; after a torn one (a kill mid-line) on a fresh line."""
  storage.makedirs(storage.path(path).parent)
  judge_log.append_lines(path, json.dumps({"key": key, "reply": reply}) + "\n")
