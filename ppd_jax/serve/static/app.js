// The web demo's page: pick 4 pairs -> a new user -> base and personalised images side by side.
// Every model call is a job on the server (one at a time); the page polls its progress.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, pairs: null, picks: [], user: null, busy: false };

function showError(message) {
  $("error").textContent = message || "";
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + ")");
  }
  let data = {};
  try { data = await response.json(); } catch (e) { /* not JSON: keep the status */ }
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

function setBusy(busy, text) {
  state.busy = busy;
  $("status").textContent = text;
  document.body.classList.toggle("busy", busy);
  $("new-pairs").disabled = busy;
  $("make-user").disabled = busy || state.picks.filter(Boolean).length !== state.info.fewshot;
  $("generate").disabled = busy || !state.user;
}

// Runs a server job to its end, showing its place in the queue and its sampling steps.
async function runJob(label, path, body) {
  if (state.busy) throw new Error("one request at a time: wait for the current one");
  showError("");
  setBusy(true, label + ": sending");
  $("progress").value = 0;
  try {
    const { job } = await api(path, body);
    for (;;) {
      const s = await api("/api/jobs/" + job);
      if (s.state === "done") {
        $("progress").value = 1;
        setBusy(false, label + ": done in " + s.elapsed_s.toFixed(1) + " s");
        return s.result;
      }
      if (s.state === "failed") throw new Error(s.error);
      if (s.state === "queued") {
        $("status").textContent = label + ": waiting (" + s.ahead + " ahead)";
      } else {
        $("progress").value = s.steps_done / s.steps_total;
        $("status").textContent = label + ": step " + s.steps_done + " / " + s.steps_total +
          " (" + s.elapsed_s.toFixed(1) + " s)";
      }
      await new Promise((r) => setTimeout(r, 150));
    }
  } catch (e) {
    setBusy(false, label + ": failed");
    throw e;
  }
}

function choose(index, choice) {
  state.picks[index] = choice;
  document.querySelectorAll(`.pair[data-index="${index}"] .choice`).forEach((b) => {
    const chosen = Number(b.dataset.choice) === choice;
    b.classList.toggle("chosen", chosen);
    b.setAttribute("aria-pressed", String(chosen));
  });
  countPicks();
}

function countPicks() {
  const n = state.picks.filter(Boolean).length;
  $("picked").textContent = n + " of " + state.info.fewshot + " picked";
  setBusy(state.busy, $("status").textContent);
}

function renderPairs(result) {
  state.pairs = result.pairs;
  state.picks = new Array(result.captions.length).fill(0);
  state.user = null;
  $("download-pairs").classList.add("hidden");
  $("user-status").textContent = "";
  const box = $("pairs");
  box.textContent = "";
  result.captions.forEach((caption, i) => {
    const card = document.createElement("div");
    card.className = "pair";
    card.tabIndex = 0;
    card.dataset.index = i;
    card.setAttribute("aria-label", "pair " + (i + 1) + ": " + caption);
    const text = document.createElement("p");
    text.className = "caption";
    text.textContent = (i + 1) + ". " + caption;
    const choices = document.createElement("div");
    choices.className = "choices";
    [1, 2].forEach((c) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "choice";
      button.dataset.choice = c;
      button.setAttribute("aria-pressed", "false");
      const img = document.createElement("img");
      img.src = result.images[i][c - 1];
      img.alt = "image " + c + " for " + caption;
      button.appendChild(img);
      button.addEventListener("click", () => choose(i, c));
      choices.appendChild(button);
    });
    card.addEventListener("keydown", (e) => {
      const c = { "1": 1, "2": 2, ArrowLeft: 1, ArrowRight: 2 }[e.key];
      if (c) { choose(i, c); e.preventDefault(); }
    });
    card.append(text, choices);
    box.appendChild(card);
  });
  countPicks();
}

async function newPairs() {
  const seed = Number($("pairs-seed").value) || 0;
  renderPairs(await runJob("base pairs", "/api/pairs", { seed }));
}

async function makeUser() {
  const result = await runJob("your user", "/api/user",
                              { pairs: state.pairs, preferred: state.picks });
  state.user = result.user;
  $("user-status").textContent = "your user is ready";
  const link = $("download-pairs");
  link.href = "/api/user/" + result.user + "/pairs.json";
  link.classList.remove("hidden");
  setBusy(false, $("status").textContent);
}

async function generate() {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new Error("type or pick a prompt first");
  const mixUser = $("mix-user").value;
  const weight = Number($("mix-weight").value);
  const body = { user: state.user, prompt, seed: Number($("seed").value) || 0,
                 scale: Number($("scale").value), weight,
                 mix: mixUser === "" ? [] : [{ user: Number(mixUser), weight: 1 - weight }] };
  const r = await runJob("generating", "/api/generate", body);
  for (const [name, seconds] of [["base", r.base_s], ["personal", r.personal_s]]) {
    $("img-" + name).src = r[name];
    $("time-" + name).textContent = "(" + seconds.toFixed(2) + " s)";
    const link = $("download-" + name);
    link.href = r[name];
    link.classList.remove("hidden");
  }
}

function guarded(fn) {
  return () => fn().catch((e) => showError(e.message));
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  const info = state.info;
  $("run-facts").textContent = `Run ${info.variant || ""} at step ${info.step}: ` +
    `${info.num_steps} ${info.sampler} steps, guidance ${info.guidance_scale}.`;
  for (const p of info.prompts) {
    const o = document.createElement("option");
    o.value = p;
    $("prompt-list").appendChild(o);
  }
  $("prompt").value = info.prompts[0] || "";
  for (const u of info.users) {
    const o = document.createElement("option");
    o.value = String(u);
    o.textContent = "user " + u;
    $("mix-user").appendChild(o);
  }
  $("scale").addEventListener("input", () => {
    $("scale-value").textContent = Number($("scale").value).toFixed(1); });
  $("mix-weight").addEventListener("input", () => {
    $("mix-weight-value").textContent = Number($("mix-weight").value).toFixed(2); });
  $("new-pairs").addEventListener("click", guarded(newPairs));
  $("make-user").addEventListener("click", guarded(makeUser));
  $("generate").addEventListener("click", guarded(generate));
  guarded(newPairs)();
}

start();
