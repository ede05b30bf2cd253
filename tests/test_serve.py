"""The web demo (ppd_jax/serve): its handlers without a browser, then the whole flow in Debian's
headless Chromium driven by Selenium against `python -m ppd_jax.serve` on a free local port.

One tiny run is trained for the module (configs/ppd.py:tiny, a large learning rate so that the
user branch visibly moves the images). The screenshot is kept in $PPD_TEST_ARTIFACTS (default
test-artifacts/ in the repository) as serve.png.
"""
import base64
import glob
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("PPD_TEST_ARTIFACTS", os.path.join(ROOT, "test-artifacts"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REBOUND = "rebound.example"   # a name the browser resolves to 127.0.0.1 (_browser)


def _env(cache):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PPD_JAX_CACHE=cache)
  return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The base pool's cache, shared by the training run and the server (sampled once)."""
  return str(tmp_path_factory.mktemp("serve_cache"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache):
  root = tmp_path_factory.mktemp("serve")
  workdir = str(root / "run")
  done = subprocess.run(
      [sys.executable, "-m", "ppd_jax.train", "--config=configs/ppd.py:tiny",
       f"--workdir={workdir}", "--config.total_steps=6", "--config.optim.lr=0.05",
       "--config.optim.warmup_steps=0", "--config.eval_every=0"],
      cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


# 1. The model side and the job queue, in this process ---------------------------------------------

@pytest.fixture(scope="module")
def engine(workdir, cache):
  from ppd_jax import inference
  from ppd_jax.serve import engine as engine_lib
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("PPD_JAX_CACHE", cache)            # the run's pool, not sampled again
    return engine_lib.Engine(inference.load_trained(workdir))


def test_the_page_user_is_the_sample_pairs_user(engine, tmp_path):
  """The embedding the page makes equals `sample --pairs` on the file it offers for download."""
  from ppd_jax.users import new_user
  pairs = engine.make_pairs(seed=3)
  assert pairs.images.shape[:2] == (4, 2) and pairs.images.dtype == np.uint8
  assert all(c in engine.prompts for c in pairs.captions)
  text = engine.pairs_file(pairs, [1, 2, 2, 1])
  path = tmp_path / "mine.json"
  path.write_text(text)
  ours = engine.embed(text)
  theirs, _ = new_user.embed_new_user(engine.run, str(path))
  assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
  other = engine.embed(engine.pairs_file(pairs, [2, 1, 1, 2]))
  assert np.abs(other - ours).max() > 1e-3                       # the picks matter
  rows = json.loads(text)
  assert [r["preferred"] for r in rows] == [1, 2, 2, 1]
  shown = Image.open(io.BytesIO(base64.b64decode(rows[0]["image_2"].split(",", 1)[1])))
  assert np.array_equal(np.asarray(shown.convert("RGB")), pairs.images[0, 1])
  with pytest.raises(ValueError, match="each of the 4 pairs"):
    engine.pairs_file(pairs, [1, 2, 3, 1])


def test_generate_shares_the_noise_and_scale_zero_is_the_base(engine):
  pairs = engine.make_pairs(seed=0)
  user = engine.embed(engine.pairs_file(pairs, [1, 1, 2, 2]))
  on = engine.generate("a red circle", user, 1.0, seed=5)
  off = engine.generate("a red circle", user, 0.0, seed=5)
  assert np.array_equal(on["base"], off["base"]) and np.array_equal(off["personal"], off["base"])
  assert np.abs(on["personal"].astype(int) - on["base"]).max() > 0
  assert on["base_s"] > 0 and on["personal_s"] > 0
  mixed = engine.mix(user, 0.5, [(engine.users[0], 0.5)])
  want = 0.5 * user + 0.5 * engine.run.source.user_embedding(engine.users[0])
  assert np.allclose(mixed, want, atol=1e-6)
  with pytest.raises(ValueError, match="not one of this run's listed users"):
    engine.mix(user, 0.5, [(10_000, 0.5)])


def test_jobs_run_one_at_a_time_report_steps_bound_the_queue_and_fail_with_a_message():
  from ppd_jax.diffusion import progress
  from ppd_jax.serve import jobs as jobs_lib
  jobs = jobs_lib.Jobs(max_queued=2)
  gate, running = threading.Event(), []

  def slow():
    running.append(1)
    gate.wait(10)
    for _ in range(3):
      progress._listener["fn"]()   # what a sampling step does (progress.step_listener)
    return "ok"

  first = jobs.submit("a", slow, 3)
  while not running:
    time.sleep(0.01)
  queued = [jobs.submit("b", lambda: 1, 1), jobs.submit("c", lambda: 2, 1)]
  with pytest.raises(jobs_lib.Busy, match="busy"):
    jobs.submit("d", lambda: 3, 1)
  assert jobs.status(queued[1].id)["ahead"] == 1 and jobs.status(first.id)["state"] == "running"
  gate.set()
  failing = None
  for _ in range(500):
    if jobs.status(queued[1].id)["state"] == "done":
      failing = jobs.submit("boom", lambda: 1 / 0, 1)
      break
    time.sleep(0.01)
  for _ in range(500):
    if jobs.status(failing.id)["state"] == "failed":
      break
    time.sleep(0.01)
  done = jobs.status(first.id)
  assert done["result"] == "ok" and done["steps_done"] == 3
  assert jobs.status(first.id) is None                 # a done job's result is read once
  err = jobs.status(failing.id)["error"]
  assert err == "boom failed: ZeroDivisionError: division by zero" and "Traceback" not in err
  jobs.stop()


def test_pairs_files_take_inline_images_and_name_a_bad_one(tmp_path):
  from ppd_jax.users import shots
  png = io.BytesIO()
  Image.new("RGB", (4, 4), (200, 10, 10)).save(png, format="PNG")
  uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
  rows, problems = shots.parse_rows(json.dumps([
      {"caption": "c", "image_1": uri, "image_2": uri, "preferred": 2},
      {"caption": "c", "image_1": "data:image/png;base64,@@", "image_2": uri, "preferred": 1}]),
      str(tmp_path / "p.json"), as_json_list=True)
  assert len(rows) == 1
  assert np.asarray(shots.decode_image(rows[0]["image_1"], "x"))[0, 0, 0] == 200
  assert len(problems) == 1 and "p.json[1]: image_1 is not a base64 data URI" in problems[0]


# 2. The server over HTTP, then in a real browser --------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(workdir, cache, tmp_path_factory):
  port = _free_port()
  log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "-m", "ppd_jax.serve", f"--workdir={workdir}",
                           f"--port={port}", "--max_queue=2"], cwd=ROOT,
                          env=_env(cache),
                          stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  for _ in range(600):
    try:
      urllib.request.urlopen(url + "/api/info", timeout=1).read()
      break
    except OSError:
      assert proc.poll() is None, log_path.read_text()[-3000:]
      time.sleep(0.2)
  yield {"url": url, "proc": proc, "log": log_path}
  if proc.poll() is None:
    proc.kill()
  log.close()


def _request(url, body=None, raw=None):
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_http_limits_and_errors_are_messages(server):
  url = server["url"]
  status, info = _request(url + "/api/info")
  assert status == 200 and info["fewshot"] == 4 and "a red circle" in info["prompts"]
  assert f"on {url}/" in server["log"].read_text()               # 127.0.0.1 by default
  status, out = _request(url + "/api/generate", raw=b"x" * 20000)
  assert status == 413 and "at most 16384" in out["error"]
  status, out = _request(url + "/api/generate", {"user": "0" * 32, "prompt": "p", "scale": 9})
  assert status == 422 and out["error"].startswith("scale:")
  status, out = _request(url + "/api/generate", {"user": "../../etc/passwd", "prompt": "p"})
  assert status == 404 and "unknown user" in out["error"]
  status, out = _request(url + "/api/generate", {"user": "0" * 32, "prompt": "p" * 301})
  assert status == 422 and out["error"].startswith("prompt:")
  status, out = _request(url + "/api/user/..%2F..%2Fsecret/pairs.json")
  assert status == 404
  status, out = _request(url + "/api/user", {"pairs": "f" * 32, "preferred": [1, 2, 1, 2]})
  assert status == 404 and "new pairs" in out["error"]
  assert "Traceback" not in json.dumps(out)


def _browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.options import Options
  from selenium.webdriver.chrome.service import Service
  assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), (
      "Debian's chromium and chromium-driver are needed (make test installs them)")
  options = Options()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--window-size=1200,1200",
              f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"):   # a DNS rebinding, locally
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _shown(driver, element_id) -> np.ndarray:
  """The pixels an <img> shows (a data URI or a URL of the server's image store)."""
  src = driver.find_element("id", element_id).get_attribute("src")
  if src.startswith("data:"):
    data = base64.b64decode(src.split(",", 1)[1])
  else:
    with urllib.request.urlopen(src, timeout=30) as r:
      data = r.read()
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)


# Every visible element's box inside [0, innerWidth]; every visible control on top at its centre,
# scrolled to the top and to the bottom of the viewport (where fixed bars would cover it).
_LAYOUT_JS = """
const W = document.documentElement.clientWidth, out = {overflow: [], covered: []};
const name = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
                    (e.className ? '.' + e.className : '');
for (const e of document.querySelectorAll('body *')) {
  const r = e.getBoundingClientRect();
  if (r.width && r.height && (r.left < -0.5 || r.right > W + 0.5)) out.overflow.push(name(e));
}
for (const e of document.querySelectorAll('button, a[href], input, select, label.user')) {
  if (!e.getClientRects().length) continue;             // not displayed
  for (const block of ['start', 'end']) {
    e.scrollIntoView({block});
    const r = e.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    if (!hit || !(hit === e || e.contains(hit) || hit.contains(e))) out.covered.push(name(e));
  }
}
out.scrollWidth = document.documentElement.scrollWidth;
out.width = W;                                        // less a scrollbar
out.inner = innerWidth;
return out;
"""


def _check_layout(driver, width, shot):
  """At `width` px nothing overflows or is covered, and the personalised image is whole."""
  driver.set_window_size(width, 800)
  layout = driver.execute_script(_LAYOUT_JS)
  assert layout["inner"] == width and layout["scrollWidth"] <= layout["width"], layout
  assert layout["overflow"] == [] and layout["covered"] == [], layout
  box = driver.execute_script(
      "const e = document.getElementById('img-personal'); e.scrollIntoView({block: 'center'});"
      "const r = e.getBoundingClientRect(); return [r.left, r.right, r.top, r.bottom,"
      " innerWidth, innerHeight, e.naturalWidth, r.width];")
  left, right, top, bottom, inner_w, inner_h, natural, shown_w = box
  assert natural > 0 and shown_w > 50, box                      # loaded, not a sliver
  assert 0 <= left and right <= inner_w and 0 <= top and bottom <= inner_h, box
  driver.set_window_size(width, 2600)           # tall: the whole page in the screenshot
  driver.execute_script("document.querySelector('label.user:has(input:checked)')"
                        ".scrollIntoView({block: 'nearest'}); scrollTo(0, 0);")
  os.makedirs(ARTIFACTS, exist_ok=True)
  driver.save_screenshot(os.path.join(ARTIFACTS, shot))


def test_the_whole_flow_in_headless_chromium(server):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait
  driver = _browser()
  wait = WebDriverWait(driver, 120)
  css = lambda q: driver.find_elements(By.CSS_SELECTOR, q)
  text = lambda i: driver.find_element(By.ID, i).text
  _, info = _request(server["url"] + "/api/info")

  def generate(click=True, old=None):
    """Waits for a new personalised image; `old`: the src before whatever started it (a slider
    release can finish its regeneration before this function would read the src)."""
    if old is None:
      old = driver.find_element(By.ID, "img-personal").get_attribute("src")
    if click:
      driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "img-personal").get_attribute("src") != old
               and not d.find_element(By.ID, "generate").get_attribute("disabled"))
    assert text("error") == ""
    return _shown(driver, "img-base"), _shown(driver, "img-personal")

  def shown_seconds():
    """What the last Generate took, as the page shows it (a kept base image cost nothing)."""
    times = [text(f"time-{n}") for n in ("base", "personal")]
    return sum(float(t.strip("()").split()[0]) for t in times if "kept" not in t)

  def slide(element_id, value, release):
    driver.execute_script(
        f"const s = document.getElementById('{element_id}'); s.value = '{value}';"
        "s.dispatchEvent(new Event('input'));" +
        ("s.dispatchEvent(new Event('change'));" if release else ""))

  try:
    driver.get(server["url"] + "/")
    wait.until(lambda d: len(css(".pair .choice img")) == 8)
    assert text("run-facts") == info["title"] and "steps" not in text("run-facts")
    assert css('link[rel="icon"]')[0].get_attribute("href").startswith("data:image/svg+xml")
    assert float(driver.find_element(By.ID, "scale").get_attribute("max")) == info["scale_max"]
    assert not driver.find_element(By.ID, "img-personal").is_displayed()   # no broken icon
    assert driver.find_element(By.ID, "make-user").get_attribute("disabled")
    css('.pair[data-index="0"] .choice[data-choice="2"]')[0].click()        # mouse
    css('.pair[data-index="1"] .choice[data-choice="1"]')[0].click()
    for i, key in ((2, "2"), (3, Keys.ARROW_LEFT)):                         # keyboard
      css(f'.pair[data-index="{i}"]')[0].send_keys(key)
    assert text("picked") == "4 of 4 picked"
    driver.find_element(By.ID, "make-user").click()
    wait.until(lambda d: "ready" in text("user-status"))

    css('.pair[data-index="1"] .choice[data-choice="2"]')[0].click()        # a pick changed
    assert "picks changed: make your user again" in text("user-status")
    css('.pair[data-index="1"] .choice[data-choice="1"]')[0].click()        # and back
    assert text("user-status") == "your user is ready"

    href = driver.find_element(By.ID, "download-pairs").get_attribute("href")
    with urllib.request.urlopen(href) as r:
      rows = json.loads(r.read())
    assert [row["preferred"] for row in rows] == [2, 1, 2, 1]
    assert all(row["image_1"].startswith("data:image/png;base64,") for row in rows)

    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a blue square")
    base, personal = generate()
    assert base.shape == personal.shape == (8, 8, 3)                         # tiny: 8 px
    assert base.std() > 1 and personal.std() > 1                             # not blank
    assert np.abs(personal - base).max() > 0                                 # the user acts
    assert text("status").startswith("generating: done in")
    assert driver.find_element(By.ID, "download-personal").get_attribute("href").endswith(".png")
    assert ("regenerate" in text("fast-note")) == (shown_seconds() < 1.0)   # 1st: compiles

    weight = driver.find_element(By.ID, "mix-weight")
    assert weight.get_attribute("disabled")                       # no stored user chosen yet
    cards = css("label.user")
    assert len(cards) > 1 and all(c.text and not c.text.strip().isdigit() for c in cards)
    assert css("label.user .thumbs img") and driver.execute_script(
        "return [...document.querySelectorAll('label.user .thumbs img')]"
        ".every(i => i.complete && i.naturalWidth > 0)")           # shown by their taste
    cards[1].click()
    assert not weight.get_attribute("disabled")
    slide("mix-weight", 0.5, release=False)
    _, mixed = generate()
    assert np.abs(mixed - personal).max() > 0                                # the mix acts
    assert shown_seconds() < 1.0 and "regenerate" in text("fast-note"), (       # compiled: quick
        text("time-base"), text("time-personal"))

    before = driver.find_element(By.ID, "img-personal").get_attribute("src")
    slide("scale", 0, release=True)            # let go: a quick model regenerates, no click
    assert text("scale-value") == "0.0"
    base0, personal0 = generate(click=False, old=before)
    assert np.array_equal(personal0, base0) and np.array_equal(base0, base)   # same noise

    _check_layout(driver, 1280, "serve.png")
    _check_layout(driver, 420, "serve_phone.png")

    # The page's words for a job's stages, and for errors without the server's sentence.
    said = driver.execute_script(
        "showProgress('generating', {state: 'running', stage: 'compiling', stages: ["
        " {name: 'stage C', done: 0, total: 20}, {name: 'stage B', done: 0, total: 10}]});"
        "const a = [document.getElementById('status').textContent,"
        "           document.getElementById('stages').textContent];"
        "showProgress('generating', {state: 'running', stage: 'stage B', stages: ["
        " {name: 'stage C', done: 20, total: 20}, {name: 'stage B', done: 4, total: 10}]});"
        "return a.concat([document.getElementById('status').textContent,"
        "                 document.getElementById('progress').value]);")
    assert said[0] == "generating: compiling (first run only)", said
    assert said[1] == "stage C 0 / 20 · stage B 0 / 10" and said[2].endswith("stage B: step 4 / 10")
    assert abs(said[3] - 24 / 30) < 1e-6                         # every stage counts
    missing = driver.execute_async_script(
        "const done = arguments[0]; api('/api/no/such/route').catch((e) => done(e.message));")
    assert missing and "HTTP" not in missing and "404" not in missing

    driver.execute_script("state.user = '0'.repeat(32);")                     # a stale user
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: text("error") != "")
    assert "Traceback" not in text("error") and "HTTP" not in text("error")
    assert driver.find_element(By.ID, "recover").is_displayed()
    assert driver.find_element(By.ID, "generate").get_attribute("disabled")

    # Another name for 127.0.0.1 (DNS rebinding): the server refuses the page and the API.
    port = server["url"].rsplit(":", 1)[1]
    for path in ("/", "/api/info"):
      driver.get(f"http://{REBOUND}:{port}{path}")
      refused = json.loads(driver.find_element(By.TAG_NAME, "body").text)
      assert refused["code"] == "bad_host" and "Personalise" not in driver.page_source
  finally:
    driver.quit()


@pytest.fixture(scope="module")
def restarted():
  """Servers a test started again; stopped at the end of the module if still running."""
  procs = []
  yield procs
  for proc in procs:
    if proc.poll() is None:
      proc.kill()


def _restart(server, cache, restarted, before_start):
  """Stops the module's server (Ctrl-C), calls before_start(), starts it again on its port."""
  old = server["proc"]
  old.send_signal(signal.SIGINT)
  assert old.wait(timeout=30) == 0
  before_start()
  with open(server["log"], "a") as log:
    proc = subprocess.Popen(old.args, cwd=ROOT, env=_env(cache), stdout=log,
                            stderr=subprocess.STDOUT)
  restarted.append(proc)
  server["proc"] = proc
  for _ in range(600):
    try:
      urllib.request.urlopen(server["url"] + "/api/info", timeout=1).read()
      return
    except OSError:
      assert proc.poll() is None, server["log"].read_text()[-3000:]
      time.sleep(0.2)


def test_a_restart_under_an_open_page_and_recovery_by_upload(server, workdir, cache, restarted,
                                                             tmp_path):
  """The server loses the page's user (a restart without its saved file, as after eviction):
  the page says so on the next request and on load, and the downloaded pairs file brings the
  same user back."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  driver = _browser()
  wait = WebDriverWait(driver, 120)
  css = lambda q: driver.find_elements(By.CSS_SELECTOR, q)
  text = lambda i: driver.find_element(By.ID, i).text
  shown = lambda e: driver.find_element(By.ID, e).is_displayed()

  def generate():
    old = driver.find_element(By.ID, "img-personal").get_attribute("src")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "img-personal").get_attribute("src") != old
               and not d.find_element(By.ID, "generate").get_attribute("disabled"))
    assert text("error") == ""
    return _shown(driver, "img-personal")

  try:
    driver.get(server["url"] + "/")
    wait.until(lambda d: len(css(".pair .choice img")) == 8)
    for i in range(4):
      css(f'.pair[data-index="{i}"] .choice[data-choice="{1 + i % 2}"]')[0].click()
    driver.find_element(By.ID, "make-user").click()
    wait.until(lambda d: "ready" in text("user-status"))
    user = driver.execute_script("return state.user;")
    assert driver.execute_script("return localStorage.getItem(USER_KEY);") == user
    with urllib.request.urlopen(driver.find_element(By.ID, "download-pairs").get_attribute(
        "href")) as r:
      pairs_file = tmp_path / "my_pairs.json"
      pairs_file.write_bytes(r.read())
    before = generate()

    saved = glob.glob(os.path.join(workdir, "**", user + ".*"), recursive=True)
    assert saved                                                   # kept beside the run
    _restart(server, cache, restarted, lambda: [os.remove(p) for p in saved])

    driver.find_element(By.ID, "generate").click()                 # the page is still open
    wait.until(lambda d: shown("recover"))
    assert "no longer has your user" in text("recover-text")
    assert text("error") and "HTTP" not in text("error")
    assert "ready" not in text("user-status") and not shown("download-pairs")
    assert driver.find_element(By.ID, "generate").get_attribute("disabled")

    driver.find_element(By.ID, "upload").send_keys(str(pairs_file))
    wait.until(lambda d: "back" in text("user-status"))
    assert not shown("recover") and shown("download-pairs")
    assert np.array_equal(generate(), before)                      # the same user again

    driver.refresh()                                               # checked on load
    wait.until(lambda d: "last visit" in text("user-status"))
    wait.until(lambda d: not d.find_element(By.ID, "generate").get_attribute("disabled"))
    driver.execute_script("localStorage.setItem(USER_KEY, '0'.repeat(32));")
    driver.refresh()
    wait.until(lambda d: shown("recover"))
    assert driver.find_element(By.ID, "generate").get_attribute("disabled")
    os.makedirs(ARTIFACTS, exist_ok=True)
    driver.save_screenshot(os.path.join(ARTIFACTS, "serve_lost_user.png"))
  finally:
    driver.quit()


def test_ctrl_c_stops_the_server_cleanly(server):
  """Last in the file: it stops the module's server."""
  proc = server["proc"]
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=30) == 0
  log = server["log"].read_text()
  assert "stopped" in log and "Traceback" not in log


# 3. The server's contract in this process (uvicorn in a thread, the module's engine) -------------

class _App:
  """create_app on a free 127.0.0.1 port, served from a thread; stop() ends it."""

  def __init__(self, engine, users_dir, **kwargs):
    import uvicorn
    from ppd_jax.serve import app as app_lib
    from ppd_jax.serve import jobs as jobs_lib
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.jobs = jobs_lib.Jobs(max_queued=2)
    self.app = app_lib.create_app(engine, self.jobs, str(users_dir), port=self.port, **kwargs)
    self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(10)
    self.jobs.stop()

  def call(self, path, body=None, raw=None, headers=None, parse=True):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(self.url + path, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
      with urllib.request.urlopen(req, timeout=60) as r:
        raw_out = r.read()
        return r.status, (json.loads(raw_out) if parse and "json" in r.headers["Content-Type"]
                          else raw_out)
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  def job(self, path, body=None, raw=None):
    """POST, then poll the job until it ends: (its last status, the stages seen while running)."""
    status, out = self.call(path, body, raw)
    assert status == 200, out
    seen = []
    for _ in range(3000):
      status, out = self.call(f"/api/jobs/{out.get('job', out.get('id'))}")
      assert status == 200, out
      seen.append(out["stage"])
      if out["state"] in ("done", "failed"):
        return out, seen
      time.sleep(0.02)
    raise AssertionError(f"{path}: job never ended")


@pytest.fixture(scope="module")
def made_user(engine, tmp_path_factory):
  """One app's user on a users folder: (folder, user id, its pairs file)."""
  folder = tmp_path_factory.mktemp("serve_users")
  app = _App(engine, folder)
  try:
    pairs, _ = app.job("/api/pairs", {"seed": 1})
    urls = pairs["result"]["images"]
    assert len(urls) == 4 and all(u.startswith("/api/images/") for pair in urls for u in pair)
    status, png = app.call(urls[0][1])
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    user, _ = app.job("/api/user", {"pairs": pairs["result"]["pairs"], "preferred": [1, 2, 2, 1]})
    key = user["result"]["user"]
    status, text = app.call(f"/api/user/{key}/pairs.json", parse=False)
    assert status == 200 and [r["preferred"] for r in json.loads(text)] == [1, 2, 2, 1]
  finally:
    app.stop()
  return folder, key, text


def test_users_survive_a_restart_and_come_back_from_an_uploaded_pairs_file(engine, made_user):
  folder, key, text = made_user
  app = _App(engine, folder)             # a new server on the same folder
  try:
    assert app.call(f"/api/user/{key}") == (200, {"user": key, "exists": True})
    status, again = app.call(f"/api/user/{key}/pairs.json", parse=False)
    assert status == 200 and again == text
    done, _ = app.job("/api/user/upload", raw=again)
    assert done["state"] == "done", done
    new = done["result"]["user"]
    assert new != key and app.call(f"/api/user/{new}")[0] == 200
    bad, _ = app.job("/api/user/upload", raw=b'[{"caption": "c", "image_1": "x"')
    assert bad["state"] == "failed" and bad["code"] == "invalid"
    assert "not valid JSON" in bad["error"] and "Traceback" not in bad["error"]
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
    conn.putrequest("POST", "/api/user/upload")
    conn.putheader("Content-Length", str(48 * 1024 ** 2 + 1))   # refused before the body
    conn.endheaders()
    r = conn.getresponse()
    status, out = r.status, json.loads(r.read())
    conn.close()
    assert status == 413 and out["code"] == "too_large" and "at most 50331648" in out["error"]
  finally:
    app.stop()


def test_an_evicted_user_is_unknown_and_the_base_is_cached(engine, made_user, tmp_path):
  import shutil
  folder, key, _ = made_user
  shutil.copytree(folder, tmp_path / "users")
  app = _App(engine, tmp_path / "users", keep_users=1)
  try:
    upload, _ = app.job("/api/user/upload", raw=made_user[2])
    assert upload["state"] == "done"
    newest = upload["result"]["user"]
    for path in (f"/api/user/{key}", f"/api/user/{key}/pairs.json"):
      status, out = app.call(path)
      assert status == 404 and out["code"] == "unknown_user", out
    status, out = app.call("/api/generate", {"user": key, "prompt": "a red circle"})
    assert status == 404 and out["code"] == "unknown_user" and "upload" in out["error"]
    ask = {"user": newest, "prompt": "a red circle", "seed": 4, "scale": 1.0}
    first, _ = app.job("/api/generate", ask)
    second, _ = app.job("/api/generate", {**ask, "scale": 2.0})
    assert first["result"]["base_cached"] is False and second["result"]["base_cached"] is True
    assert [s["name"] for s in first["stages"]] == ["base", "personal"]
    assert [s["name"] for s in second["stages"]] == ["personal"]       # no second base
    assert second["result"]["base"] == first["result"]["base"]
    assert all(s["done"] == s["total"] == engine.num_steps for s in first["stages"])
    job_id = app.call("/api/generate", {**ask, "seed": 5})[1]["job"]
    for _ in range(3000):
      status, out = app.call(f"/api/jobs/{job_id}")
      if out["state"] == "done":
        break
      time.sleep(0.02)
    status, out = app.call(f"/api/jobs/{job_id}")                      # read once, then gone
    assert status == 404 and out["code"] == "unknown_job"
  finally:
    app.stop()


def test_a_first_shape_reports_compiling_until_its_first_step(engine):
  from ppd_jax.diffusion import progress
  from ppd_jax.serve import engine as engine_lib
  from ppd_jax.serve import jobs as jobs_lib
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jobs_lib, "stage", lambda name, total, compiling=False:
               calls.append((name, total, compiling)))
    fresh = engine_lib.Engine(engine.run)          # nothing sampled through it yet
    user = np.zeros_like(fresh._zero_user)
    fresh.generate("a red circle", user, 1.0, seed=0)
    fresh.generate("a red circle", user, 1.0, seed=0, with_base=False)
  n = engine.num_steps
  assert calls == [("base", n, True), ("personal", n, False), ("personal", n, False)]
  jobs = jobs_lib.Jobs(max_queued=2)
  gate, at = threading.Event(), []

  def work():
    jobs_lib.stage("stage C", 2, compiling=True)
    at.append(1)
    gate.wait(10)
    progress._listener["fn"]()               # a sampling step (progress.step_listener)
    at.append(2)
    gate.clear()
    gate.wait(10)
    progress.notice_stage("stage B", 10)     # what stable_cascade.to_images notices
    return "ok"

  job = jobs.submit("generate", work, 2)
  try:
    while not at:
      time.sleep(0.01)
    assert jobs.status(job.id)["stage"] == "compiling"
    gate.set()
    while len(at) < 2:
      time.sleep(0.01)
    out = jobs.status(job.id)
    assert out["stage"] == "stage C" and out["stages"] == [{"name": "stage C", "done": 1,
                                                            "total": 2}]
    gate.set()
    for _ in range(500):
      out = jobs.status(job.id)
      if out["state"] == "done":
        break
      time.sleep(0.01)
    assert [s["name"] for s in out["stages"]] == ["stage C", "stage B"]
  finally:
    gate.set()
    jobs.stop()


def test_errors_in_words_and_a_foreign_host_is_refused(engine, tmp_path):
  from ppd_jax.serve import engine as engine_lib
  app = _App(engine, tmp_path / "users")
  try:
    status, out = app.call("/api/nothing-here")
    assert (status, out["code"]) == (404, "not_found") and "/api/nothing-here" in out["error"]
    status, out = app.call("/api/info", raw=b"{}")
    assert (status, out["code"]) == (405, "invalid") and "POST is not allowed" in out["error"]
    status, out = app.call("/api/generate", raw=b'{"user": "' + b"0" * 32 + b'", "pro')
    assert status == 422 and out["error"].startswith("body: truncated")
    for value in (b"NaN", b"Infinity"):
      status, out = app.call("/api/generate", raw=b'{"user": "' + b"0" * 32 +
                             b'", "prompt": "p", "scale": ' + value + b"}")
      assert status == 422 and out["error"].startswith("scale: not a number"), out
    status, out = app.call("/api/generate", {"user": "0" * 32, "prompt": "p",
                                             "scale": engine_lib.SCALE_MAX + 0.01})
    assert status == 422 and str(engine_lib.SCALE_MAX)[:1] in out["error"]
    assert app.call("/api/info")[1]["scale_max"] == engine_lib.SCALE_MAX
    for host in (f"evil.example:{app.port}", f"127.0.0.1:{app.port + 1}", "attacker"):
      status, out = app.call("/api/info", headers={"Host": host})
      assert (status, out["code"]) == (421, "bad_host"), host
    assert app.call("/api/info", headers={"Host": f"localhost:{app.port}"})[0] == 200
    status, out = app.call("/api/users")
    listed = out["users"]
    assert status == 200 and [u["id"] for u in listed] == engine.users
    assert len(listed[0]["thumbnails"]) == engine.fewshot
    status, png = app.call(listed[0]["thumbnails"][0])
    thumb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    want = engine.run.users.fewshot_pairs(engine.users[0])["winners"][0]
    from ppd_jax import images as images_lib
    assert np.array_equal(thumb, images_lib.to_uint8(want))   # 8 px: kept as it is (<= 64)
  finally:
    app.stop()


def test_another_host_needs_allow_network(tmp_path):
  done = subprocess.run([sys.executable, "-m", "ppd_jax.serve", f"--workdir={tmp_path}",
                         "--host=0.0.0.0", f"--port={_free_port()}"], cwd=ROOT, env=_env(str(tmp_path)),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "ppd_jax.serve: --host=0.0.0.0 is reachable from the network; add --allow_network to "
      "serve there anyway"]


def test_held_memory_is_bounded_at_1024_px(tmp_path):
  """Every store filled twice over with 1024 px images: the bytes Python holds stay under the
  sum of the limits (tracemalloc counts numpy's buffers too)."""
  import tracemalloc
  from ppd_jax.serve import app as app_lib
  from ppd_jax.serve import engine as engine_lib
  from ppd_jax.serve import stores
  side, fewshot = 1024, 4
  pair_set = fewshot * 2 * side * side * 3                    # uint8 [4, 2, 1024, 1024, 3]
  png = side * side * 3 + 4096                                # a PNG is at most ~ raw + headers
  bound = (app_lib.IMAGE_BYTES + png                          # the byte store, one image over
           + app_lib.KEEP_PAIR_SETS * pair_set
           + app_lib.MAX_PENDING_UPLOADS * app_lib.MAX_UPLOAD
           + 2 * 1024 ** 2)                                   # ids, dicts, small results
  tracemalloc.start()
  try:
    images = stores.ImageStore(app_lib.IMAGE_BYTES)
    pair_sets = stores.Bounded(app_lib.KEEP_PAIR_SETS)
    users = stores.SavedUsers(str(tmp_path), 3, 64 * 1024 ** 2)
    for _ in range(2 * app_lib.IMAGE_BYTES // png + 1):
      images.put(bytes(png))
    for _ in range(2 * app_lib.KEEP_PAIR_SETS):
      pair_sets.add(engine_lib.PairSet(("c",) * fewshot,
                                       np.empty((fewshot, 2, side, side, 3), np.uint8)))
    upload = bytes(app_lib.MAX_UPLOAD)                        # the one pending upload
    for _ in range(6):
      users.add(np.zeros((4, 8), np.float32), "[]")
    held, _ = tracemalloc.get_traced_memory()
    assert images.bytes <= app_lib.IMAGE_BYTES and len(pair_sets) == app_lib.KEEP_PAIR_SETS
    assert len(users) == 3 and len(os.listdir(tmp_path)) == 6
    assert held < bound, (held, bound)
    del upload
  finally:
    tracemalloc.stop()
