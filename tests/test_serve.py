"""The web demo (ppd_jax/serve): its handlers without a browser, then the whole flow in Debian's
headless Chromium driven by Selenium against `python -m ppd_jax.serve` on a free local port.

One tiny run is trained for the module (configs/ppd.py:tiny, a large learning rate so that the
user branch visibly moves the images). The screenshot is kept in $PPD_TEST_ARTIFACTS (default
test-artifacts/ in the repository) as serve.png.
"""
import base64
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
  from ppd_jax.diffusion import generation
  from ppd_jax.serve import jobs as jobs_lib
  jobs = jobs_lib.Jobs(max_queued=2)
  gate, running = threading.Event(), []

  def slow():
    running.append(1)
    gate.wait(10)
    for _ in range(3):
      generation._listener["fn"]()   # what a sampling step does (generation.step_listener)
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
  assert jobs.status(first.id)["result"] == "ok" and jobs.status(first.id)["steps_done"] == 3
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
              "--disable-sync", "--window-size=1200,1200"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _shown(driver, element_id) -> np.ndarray:
  src = driver.find_element("id", element_id).get_attribute("src")
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"),
                    np.int16)


def test_the_whole_flow_in_headless_chromium(server):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import Select, WebDriverWait
  driver = _browser()
  wait = WebDriverWait(driver, 120)
  css = lambda q: driver.find_elements(By.CSS_SELECTOR, q)
  text = lambda i: driver.find_element(By.ID, i).text

  def generate():
    old = driver.find_element(By.ID, "img-personal").get_attribute("src")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "img-personal").get_attribute("src") != old
               and not d.find_element(By.ID, "generate").get_attribute("disabled"))
    assert text("error") == ""
    return _shown(driver, "img-base"), _shown(driver, "img-personal")

  try:
    driver.get(server["url"] + "/")
    wait.until(lambda d: len(css(".pair .choice img")) == 8)
    assert driver.find_element(By.ID, "make-user").get_attribute("disabled")
    css('.pair[data-index="0"] .choice[data-choice="2"]')[0].click()        # mouse
    css('.pair[data-index="1"] .choice[data-choice="1"]')[0].click()
    for i, key in ((2, "2"), (3, Keys.ARROW_LEFT)):                         # keyboard
      css(f'.pair[data-index="{i}"]')[0].send_keys(key)
    assert text("picked") == "4 of 4 picked"
    driver.find_element(By.ID, "make-user").click()
    wait.until(lambda d: "ready" in text("user-status"))

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
    assert "s)" in text("time-base") and "s)" in text("time-personal")
    assert text("status").startswith("generating: done in")
    assert driver.find_element(By.ID, "download-personal").get_attribute("href").startswith(
        "data:image/png")

    driver.execute_script("const s = document.getElementById('scale'); s.value = '0';"
                          "s.dispatchEvent(new Event('input'));")
    assert text("scale-value") == "0.0"
    base0, personal0 = generate()
    assert np.array_equal(personal0, base0) and np.array_equal(base0, base)   # same noise

    driver.execute_script("const s = document.getElementById('scale'); s.value = '1';"
                          "s.dispatchEvent(new Event('input'));")
    Select(driver.find_element(By.ID, "mix-user")).select_by_index(1)
    driver.execute_script("const s = document.getElementById('mix-weight'); s.value = '0.5';"
                          "s.dispatchEvent(new Event('input'));")
    _, mixed = generate()
    assert np.abs(mixed - personal).max() > 0                                # the mix acts

    os.makedirs(ARTIFACTS, exist_ok=True)
    driver.save_screenshot(os.path.join(ARTIFACTS, "serve.png"))

    driver.execute_script("state.user = '0'.repeat(32);")                     # a stale user
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: text("error") != "")
    assert "unknown user" in text("error") and "Traceback" not in text("error")
  finally:
    driver.quit()


def test_ctrl_c_stops_the_server_cleanly(server):
  """Last in the file: it stops the module's server."""
  proc = server["proc"]
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=30) == 0
  log = server["log"].read_text()
  assert "stopped" in log and "Traceback" not in log
