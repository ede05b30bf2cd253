"""The web demo's HTTP side (FastAPI): the page, and JSON routes that queue model calls.

    GET  /                        the page (static/index.html, app.js, style.css)
    GET  /api/info                the run: prompts of its world, stored users, steps
    POST /api/pairs {seed}        job: fewshot pairs of base images -> {pairs, captions, images}
    POST /api/user {pairs, preferred}   job: the new user's embedding -> {user}
    GET  /api/user/{user}/pairs.json    the pairs file `sample --pairs` reads (download)
    POST /api/generate {user, prompt, scale, seed, weight, mix}  job -> base and personalised
    GET  /api/jobs/{id}           a job's state, progress, result or error message

Safe by default: nothing the browser sends is a path (pairs, users and jobs are ids this server
made; prompts are text); bodies are capped at MAX_BODY bytes, prompts and lists in length, kept
pair sets, users and jobs in number; a full queue is refused with 429; an error reaches the page
as {"error": message} and the log with its traceback.
"""
import collections
import logging
import os
import re
import threading
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ppd_jax.serve import engine as engine_lib
from ppd_jax.serve import jobs as jobs_lib

log = logging.getLogger("ppd_jax.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY = 16 * 1024          # bytes of a request body (the largest is a prompt + a short list)
MAX_PROMPT = 300              # characters
MAX_MIX = 4                   # stored users in one mix
KEEP_PAIR_SETS, KEEP_USERS = 16, 32
_ID = re.compile(r"^[0-9a-f]{32}$")


class PairsRequest(BaseModel):
  seed: int = Field(0, ge=0, le=2**31 - 1)


class UserRequest(BaseModel):
  pairs: str = Field(..., max_length=64)
  preferred: list[int] = Field(..., max_length=16)


class MixEntry(BaseModel):
  user: int = Field(..., ge=0)
  weight: float = Field(..., ge=0.0, le=1.0)


class GenerateRequest(BaseModel):
  user: str = Field(..., max_length=64)
  prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
  scale: float = Field(1.0, ge=0.0, le=3.0)
  seed: int = Field(0, ge=0, le=2**31 - 1)
  weight: float = Field(1.0, ge=0.0, le=1.0)     # the new user's share of a mix
  mix: list[MixEntry] = Field(default_factory=list, max_length=MAX_MIX)


class _Bounded:
  """The newest `limit` entries under server-made ids; thread-safe (routes and the worker)."""

  def __init__(self, limit: int):
    self._items, self._limit, self._lock = collections.OrderedDict(), limit, threading.Lock()

  def add(self, value) -> str:
    key = uuid.uuid4().hex
    with self._lock:
      self._items[key] = value
      while len(self._items) > self._limit:
        self._items.popitem(last=False)
    return key

  def lookup(self, key: str):
    """The entry, or None for an unknown or malformed id (never a path)."""
    if not _ID.match(key):
      return None
    with self._lock:
      return self._items.get(key)


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def create_app(engine: engine_lib.Engine, jobs: jobs_lib.Jobs) -> FastAPI:
  app = FastAPI(title="ppd_jax demo", docs_url=None, redoc_url=None, openapi_url=None)
  app.mount("/static", StaticFiles(directory=STATIC), name="static")
  pair_sets, users = _Bounded(KEEP_PAIR_SETS), _Bounded(KEEP_USERS)

  @app.middleware("http")
  async def limit_body(request: Request, call_next):
    if request.method == "POST":
      length = request.headers.get("content-length")
      if length is None or not length.isdigit():
        return _error(411, "a request body needs a Content-Length")
      if int(length) > MAX_BODY:
        return _error(413, f"request body of {length} bytes; at most {MAX_BODY}")
    return await call_next(request)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
    return _error(422, f"{field}: {first.get('msg', 'invalid')}")

  @app.exception_handler(Exception)
  async def failed(request: Request, exc: Exception):
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

  def submit(kind, fn, steps):
    try:
      job = jobs.submit(kind, fn, steps)
    except jobs_lib.Busy as e:
      return _error(429, str(e))
    return {"job": job.id}

  @app.get("/")
  def page():
    return FileResponse(os.path.join(STATIC, "index.html"))

  @app.get("/api/info")
  def info():
    return engine.facts()

  @app.post("/api/pairs")
  def make_pairs(req: PairsRequest):
    def run():
      pairs = engine.make_pairs(req.seed)
      return {"pairs": pair_sets.add(pairs), "captions": list(pairs.captions),
              "images": [[engine_lib.data_uri(im) for im in pair] for pair in pairs.images]}
    return submit("pairs", run, engine.num_steps)

  @app.post("/api/user")
  def make_user(req: UserRequest):
    pairs = pair_sets.lookup(req.pairs)
    if pairs is None:
      return _error(404, "those pairs are no longer here; ask for new pairs")
    text = engine.pairs_file(pairs, req.preferred)    # ValueError -> 422 below

    def run():
      embedding = engine.embed(text)
      key = users.add({"embedding": embedding, "pairs_file": text})
      return {"user": key, "embedding_shape": list(np.shape(embedding))}
    return submit("user", run, 0)

  @app.get("/api/user/{user}/pairs.json")
  def pairs_file(user: str):
    entry = users.lookup(user)
    if entry is None:
      return _error(404, "unknown user; make one from 4 picks first")
    return Response(entry["pairs_file"], media_type="application/json",
                    headers={"Content-Disposition": 'attachment; filename="my_pairs.json"'})

  @app.post("/api/generate")
  def generate(req: GenerateRequest):
    entry = users.lookup(req.user)
    if entry is None:
      return _error(404, "unknown user; make one from 4 picks first")
    embedding = engine.mix(entry["embedding"], req.weight,
                           [(m.user, m.weight) for m in req.mix])

    def run():
      out = engine.generate(req.prompt, embedding, req.scale, req.seed)
      return {"base": engine_lib.data_uri(out["base"]),
              "personal": engine_lib.data_uri(out["personal"]),
              "base_s": round(out["base_s"], 3), "personal_s": round(out["personal_s"], 3)}
    return submit("generate", run, 2 * engine.num_steps)

  @app.get("/api/jobs/{job_id}")
  def job(job_id: str):
    status = jobs.status(job_id) if _ID.match(job_id) else None
    if status is None:
      return _error(404, "unknown job")
    return status

  @app.exception_handler(ValueError)
  async def bad_value(_, exc: ValueError):
    return _error(422, str(exc)[:300])

  return app
