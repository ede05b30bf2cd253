"""The web demo's HTTP side (FastAPI): the page, and JSON routes that queue model calls. The
routes and their JSON are the HTTP contract in docs/serve.md.

Safe by default: nothing the browser sends is a path (pairs, users, jobs and images are ids this
server made; prompts are text); the Host header must name this server (DNS rebinding cannot
drive it); bodies are capped (MAX_BODY, an uploaded pairs file MAX_UPLOAD); every store is
bounded (stores.py); work that grows with image size (sampling, PNG encoding, decoding an
upload) runs in the one worker thread behind a bounded queue, never on a request thread; every
error is {"error": sentence, "code": code}, the log keeps the traceback.
"""
import logging
import math
import os
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ppd_jax.serve import engine as engine_lib
from ppd_jax.serve import jobs as jobs_lib
from ppd_jax.serve import stores

log = logging.getLogger("ppd_jax.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY = 16 * 1024          # bytes of a request body (the largest is a prompt + a short list)
MAX_UPLOAD = 48 * 1024 ** 2   # an uploaded pairs file: 8 PNG data URIs of 1024 px fit (~34 MB)
MAX_PENDING_UPLOADS = 1       # uploads waiting for (or in) the worker: each holds its file
MAX_PROMPT = 300              # characters
MAX_MIX = 4                   # stored users in one mix
KEEP_PAIR_SETS = 8            # pair sets (uint8 images, in memory)
KEEP_USERS, USERS_BYTES = 32, 512 * 1024 ** 2     # users on disk
IMAGE_BYTES = 128 * 1024 ** 2   # PNG files the page may still fetch
KEEP_BASES = 32               # cached base images (ids into the image store)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class PairsRequest(BaseModel):
  seed: int = Field(0, ge=0, le=2**31 - 1)


class UserRequest(BaseModel):
  pairs: str = Field(..., max_length=64)
  preferred: list[int] = Field(..., max_length=16)


class MixEntry(BaseModel):
  user: int = Field(..., ge=0)
  weight: float = Field(..., ge=0.0, le=1.0, allow_inf_nan=False)


class GenerateRequest(BaseModel):
  user: str = Field(..., max_length=64)
  prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
  scale: float = Field(1.0, ge=0.0, le=engine_lib.SCALE_MAX, allow_inf_nan=False)
  seed: int = Field(0, ge=0, le=2**31 - 1)
  weight: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)   # the new user's share
  mix: list[MixEntry] = Field(default_factory=list, max_length=MAX_MIX)


def _error(status: int, code: str, message: str) -> JSONResponse:
  return JSONResponse({"error": message, "code": code}, status_code=status)


def _unknown_user() -> JSONResponse:
  return _error(404, "unknown_user", "unknown user: this server no longer has it (it was "
                "restarted or newer users replaced it); upload your pairs file or make it again")


def _validation_message(err: dict) -> str:
  """One pydantic error in words: the field, then what is wrong with it."""
  loc = [str(x) for x in err.get("loc", ())[1:] if not isinstance(x, int) or x != 0]
  field = ".".join(loc) or "body"
  kind, value = err.get("type", ""), err.get("input")
  if kind == "json_invalid":
    why = (err.get("ctx") or {}).get("error", "")
    return f"body: truncated or malformed JSON ({why})" if why else "body: truncated JSON"
  if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
    return f"{field}: not a number ({value})"
  return f"{field}: {err.get('msg', 'invalid')}"


def host_allowed(header: str, hosts, port: int | None) -> bool:
  """Host: header names one of `hosts` (and `port`, where given): requests from a page that
  reached this server under another name (DNS rebinding) are refused."""
  header = header.strip().lower()
  if header.startswith("["):                       # [::1]:8080
    name, _, rest = header[1:].partition("]")
    given = rest[1:] if rest.startswith(":") else None
  else:
    name, _, given = header.partition(":")
    given = given or None
  if name not in hosts:
    return False
  return port is None or given is None or given == str(port)


def create_app(engine: engine_lib.Engine, jobs: jobs_lib.Jobs, users_dir: str, *,
               host: str = "127.0.0.1", port: int | None = None,
               keep_users: int = KEEP_USERS, image_bytes: int = IMAGE_BYTES) -> FastAPI:
  """The app for one engine; users_dir keeps its users across restarts; host and port: what the
  Host header may name (besides the loopback names)."""
  app = FastAPI(title="ppd_jax demo", docs_url=None, redoc_url=None, openapi_url=None)
  app.mount("/static", StaticFiles(directory=STATIC), name="static")
  pair_sets = stores.Bounded(KEEP_PAIR_SETS)
  users = stores.SavedUsers(users_dir, keep_users, USERS_BYTES)
  images = stores.ImageStore(image_bytes)
  bases = stores.Bounded(KEEP_BASES)     # engine.base_key -> (image id, seconds)
  hosts = {h.lower() for h in (host, *LOOPBACK)}
  uploads = {"pending": 0, "lock": threading.Lock()}
  cards = {}                                    # made once: {"users": [...], "thumbs": {id: png}}
  cards_lock = threading.Lock()

  def url(png: bytes) -> str:
    return f"/api/images/{images.put(png)}.png"

  @app.middleware("http")
  async def guard(request: Request, call_next):
    if not host_allowed(request.headers.get("host", ""), hosts, port):
      return _error(421, "bad_host", f"Host {request.headers.get('host', '')!r} is not this "
                    f"server; open it as http://{host}:{port}/" if port else
                    f"Host {request.headers.get('host', '')!r} is not this server")
    if request.method == "POST":
      limit = MAX_UPLOAD if request.url.path == "/api/user/upload" else MAX_BODY
      length = request.headers.get("content-length")
      if length is None or not length.isdigit():
        return _error(411, "invalid", "a request body needs a Content-Length")
      if int(length) > limit:
        what = "a pairs file" if limit == MAX_UPLOAD else "a request body"
        return _error(413, "too_large", f"{what} of {length} bytes; at most {limit}")
    return await call_next(request)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, exc: RequestValidationError):
    errors = exc.errors()
    return _error(422, "invalid", _validation_message(errors[0]) if errors else "body: invalid")

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, exc: HTTPException):
    if exc.status_code == 404:
      return _error(404, "not_found", f"there is nothing at {request.url.path}")
    if exc.status_code == 405:
      return _error(405, "invalid", f"{request.method} is not allowed on {request.url.path}")
    return _error(exc.status_code, "invalid", str(exc.detail))

  @app.exception_handler(ValueError)
  async def bad_value(_, exc: ValueError):
    return _error(422, "invalid", str(exc)[:300])

  @app.exception_handler(Exception)
  async def failed(request: Request, exc: Exception):
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(500, "failed",
                  f"internal error ({type(exc).__name__}); the server log has the details")

  def submit(kind, fn, steps):
    try:
      job = jobs.submit(kind, fn, steps)
    except jobs_lib.Busy as e:
      return _error(429, "busy", str(e))
    return {"job": job.id}

  @app.get("/")
  def page():
    return FileResponse(os.path.join(STATIC, "index.html"))

  @app.get("/api/info")
  def info():
    return engine.facts()

  @app.get("/api/users")
  def stored_users():
    with cards_lock:
      if not cards:      # small (THUMBNAIL px, MAX_STORED_USERS users): made once
        thumbs, listed = {}, []
        for card in engine.user_cards():
          keys = [stores.new_id() for _ in card["thumbnails"]]
          thumbs.update(zip(keys, (engine_lib.png_bytes(t) for t in card["thumbnails"])))
          listed.append({**card, "thumbnails": [f"/api/images/{k}.png" for k in keys]})
        cards.update(users=listed, thumbs=thumbs)
    return {"users": cards["users"]}

  @app.post("/api/pairs")
  def make_pairs(req: PairsRequest):
    def run():
      pairs = engine.make_pairs(req.seed)
      return {"pairs": pair_sets.add(pairs), "captions": list(pairs.captions),
              "images": [[url(engine_lib.png_bytes(im)) for im in pair] for pair in pairs.images]}
    return submit("pairs", run, engine.num_steps)

  def add_user(text: str) -> dict:
    embedding = engine.embed(text)
    return {"user": users.add(embedding, text), "embedding_shape": list(embedding.shape)}

  @app.post("/api/user")
  def make_user(req: UserRequest):
    pairs = pair_sets.get(req.pairs)
    if pairs is None:
      return _error(404, "unknown_pairs", "those pairs are no longer here; ask for new pairs")
    if len(req.preferred) != engine.fewshot or any(p not in (1, 2) for p in req.preferred):
      return _error(422, "invalid", f"preferred: pick image 1 or 2 of each of the "
                    f"{engine.fewshot} pairs")
    return submit("user", lambda: add_user(engine.pairs_file(pairs, req.preferred)), 0)

  @app.post("/api/user/upload")
  async def upload_user(request: Request):
    with uploads["lock"]:
      if uploads["pending"] >= MAX_PENDING_UPLOADS:
        return _error(429, "busy", "busy: another pairs file is being read; try again shortly")
      uploads["pending"] += 1
    try:
      body = await request.body()
    except BaseException:
      with uploads["lock"]:
        uploads["pending"] -= 1
      raise

    def run():
      try:   # decoding is work that grows with the file: here, in the worker
        text = body.decode("utf-8")
        return add_user(text)
      except UnicodeDecodeError:
        raise ValueError("my_pairs.json: not UTF-8 text; upload the file "
                         "\"Download my pairs\" gave") from None
      finally:
        with uploads["lock"]:
          uploads["pending"] -= 1

    out = submit("upload", run, 0)
    if isinstance(out, JSONResponse):
      with uploads["lock"]:
        uploads["pending"] -= 1
    return out

  @app.get("/api/user/{user}")
  def user_exists(user: str):
    return {"user": user, "exists": True} if user in users else _unknown_user()

  @app.get("/api/user/{user}/pairs.json")
  def pairs_file(user: str):
    text = users.pairs_file(user)
    if text is None:
      return _unknown_user()
    return Response(text, media_type="application/json",
                    headers={"Content-Disposition": 'attachment; filename="my_pairs.json"'})

  @app.post("/api/generate")
  def generate(req: GenerateRequest):
    embedding = users.embedding(req.user)
    if embedding is None:
      return _unknown_user()
    embedding = engine.mix(embedding, req.weight, [(m.user, m.weight) for m in req.mix])

    def run():
      key = engine.base_key(req.prompt, req.seed)
      cached = bases.get(key)      # the base depends on (prompt, seed, steps, guidance) only
      cached = cached if cached is not None and cached[0] in images else None
      out = engine.generate(req.prompt, embedding, req.scale, req.seed,
                            with_base=cached is None)
      if cached is None:
        cached = (images.put(engine_lib.png_bytes(out["base"])), out["base_s"])
        bases.put(key, cached)
      return {"base": f"/api/images/{cached[0]}.png",
              "personal": url(engine_lib.png_bytes(out["personal"])),
              "base_s": round(cached[1], 3), "personal_s": round(out["personal_s"], 3),
              "base_cached": "base" not in out}
    return submit("generate", run, 2 * engine.num_steps)

  @app.get("/api/jobs/{job_id}")
  def job(job_id: str):
    status = jobs.status(job_id) if stores.ID.match(job_id) else None
    if status is None:
      return _error(404, "unknown_job", "unknown job: it finished and was read, or the server "
                    "restarted")
    return status

  @app.get("/api/images/{name}")
  def image(name: str):
    key = name[:-4] if name.endswith(".png") else ""
    png = images.get(key) if stores.ID.match(key) else None
    png = png if png is not None else cards.get("thumbs", {}).get(key)
    if png is None:
      return _error(404, "not_found", "this image is no longer kept; generate it again")
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
  return app
