// The web demo's page: pick 4 pairs -> a new user -> base and personalised images side by side.
// Every model call is a job on the server (one at a time); the page polls its stages.
// The page never claims a user the server does not have: it keeps the user id in localStorage,
// asks the server about it on load and after any "unknown_user" error, and then offers the way
// back (upload the downloaded my_pairs.json, or pick again).
"use strict";

const $ = (id) => document.getElementById(id);
const USER_KEY = "ppd_jax.serve.user";
const FAST_S = 1.0;     // a Generate quicker than this: sliders regenerate when let go
const state = {
  info: null, pairs: null, picks: [], busy: false,
  user: null,           // the server's id of the user Generate uses
  madeFrom: null,       // {pairs, picks} it was made from on this page (null: upload, last visit)
  fast: false, pending: false,
};

class ApiError extends Error {
  constructor(message, code) { super(message); this.code = code || ""; }
}

// Words for an answer without the server's own message (e.g. a proxy's page).
function statusWords(status) {
  if (status === 404) return "the server has no such page or item";
  if (status === 413) return "this request is too large for the server";
  if (status === 429) return "the server is busy; try again shortly";
  if (status >= 500) return "the server failed; its log has the details";
  return "the server refused this request";
}

// JSON in, JSON out; a failure throws ApiError(the contract's `error` sentence, its `code`).
async function api(path, body, raw) {
  let init = {};
  if (raw !== undefined || body !== undefined) {
    init = { method: "POST", headers: { "Content-Type": "application/json" },
             body: raw !== undefined ? raw : JSON.stringify(body) };
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError("the server cannot be reached; is it still running?", "unreachable");
  }
  let data = {};
  try { data = await response.json(); } catch (e) { /* not JSON: words from the status */ }
  if (!response.ok) throw new ApiError(data.error || statusWords(response.status), data.code);
  return data;
}

function showError(message) {
  $("error").textContent = message || "";
}

// The progress box sits in the section whose request runs (in the flow, never over buttons).
function placeJobBox(sectionId) {
  $(sectionId).appendChild($("job"));
}

function setBusy(busy, text) {
  state.busy = busy;
  if (text !== undefined) $("status").textContent = text;
  document.body.classList.toggle("busy", busy);
  $("new-pairs").disabled = busy;
  $("upload").disabled = busy;
  const picked = state.info && state.picks.filter(Boolean).length === state.info.fewshot;
  $("make-user").disabled = busy || !picked;
  $("generate").disabled = busy || !state.user;
}

// A job as a person reads it: "generating: personal: step 4 / 15", and every stage below it
// ("base 15 / 15 · personal 4 / 15"); the bar counts the steps of all stages.
function showProgress(label, s) {
  const stages = s.stages || [];
  const total = stages.reduce((a, st) => a + st.total, 0);
  const done = stages.reduce((a, st) => a + Math.min(st.done, st.total), 0);
  $("progress").value = total ? done / total : 0;
  $("stages").textContent = stages.map((st) => `${st.name} ${st.done} / ${st.total}`).join(" · ");
  let text;
  if (s.state === "queued") {
    text = `waiting: number ${s.place} in the queue`;
  } else if (s.stage === "compiling") {
    text = "compiling (first run only)";
  } else {
    const now = stages.find((st) => st.name === s.stage) ||
                stages.find((st) => st.done < st.total) || stages[stages.length - 1];
    text = now ? `${now.name}: step ${now.done} / ${now.total}` : "running";
  }
  $("status").textContent = label + ": " + text;
}

// Runs a server job to its end; raw: a request body sent as is (an uploaded file's text).
async function runJob(label, path, body, sectionId, raw) {
  if (state.busy) throw new Error("one request at a time: wait for the current one");
  placeJobBox(sectionId);
  showError("");
  setBusy(true, label + ": sending");
  $("progress").value = 0;
  $("stages").textContent = "";
  const start = performance.now();
  try {
    const { job } = await api(path, body, raw);
    for (;;) {
      const s = await api("/api/jobs/" + job);
      showProgress(label, s);
      if (s.state === "done") {
        $("progress").value = 1;
        const seconds = (performance.now() - start) / 1000;
        setBusy(false, `${label}: done in ${seconds.toFixed(1)} s`);
        return s.result;
      }
      if (s.state === "failed") throw new ApiError(s.error, s.code);
      await new Promise((r) => setTimeout(r, 150));
    }
  } catch (e) {
    setBusy(false, label + ": failed");
    throw e;
  }
}

// --- the user ----------------------------------------------------------------------------------

function userStatus(text, stale) {
  $("user-status").textContent = text;
  $("user-status").classList.toggle("stale", Boolean(stale));
}

function setUser(id, text) {
  state.user = id;
  if (id) localStorage.setItem(USER_KEY, id); else localStorage.removeItem(USER_KEY);
  const link = $("download-pairs");
  link.classList.toggle("hidden", !id);
  link.href = id ? "/api/user/" + encodeURIComponent(id) + "/pairs.json" : "";
  if (id) $("recover").classList.add("hidden");
  $("new-pairs-note").textContent = id ?
    "New pairs keeps your current user for Generate until you make a new one from the new picks." : "";
  userStatus(text || "");
  setBusy(state.busy);
}

// The server does not have the user (restart, eviction): say so and offer the way back.
function lostUser() {
  state.madeFrom = null;
  setUser(null, "");
  $("recover").classList.remove("hidden");
}

async function checkUser(id) {
  try {
    await api("/api/user/" + encodeURIComponent(id));
    return true;
  } catch (e) {
    if (e.code === "unknown_user") { lostUser(); return false; }
    throw e;
  }
}

function samePicks() {
  const m = state.madeFrom;
  return Boolean(m) && m.pairs === state.pairs && m.picks.join() === state.picks.join();
}

// After a pick: a user made from other picks is stale until made again.
function followPicks() {
  if (!state.user) return;
  if (samePicks()) userStatus("your user is ready");
  else userStatus("picks changed: make your user again (Generate still uses the earlier one)", true);
}

async function makeUser() {
  const picks = state.picks.slice();
  const result = await runJob("your user", "/api/user",
                              { pairs: state.pairs, preferred: picks }, "s-pick");
  state.madeFrom = { pairs: state.pairs, picks };
  setUser(result.user, "your user is ready");
  followPicks();      // picks changed while it was made
}

async function uploadPairs() {
  const file = $("upload").files[0];
  if (!file) return;
  const text = await file.text();
  $("upload").value = "";
  const result = await runJob("your user from " + file.name, "/api/user/upload", undefined,
                              "s-pick", text);
  state.madeFrom = null;
  setUser(result.user, "your user is back, made again from " + file.name);
}

// --- the pairs ---------------------------------------------------------------------------------

function choose(index, choice) {
  state.picks[index] = choice;
  document.querySelectorAll(`.pair[data-index="${index}"] .choice`).forEach((b) => {
    const chosen = Number(b.dataset.choice) === choice;
    b.classList.toggle("chosen", chosen);
    b.setAttribute("aria-pressed", String(chosen));
  });
  countPicks();
  followPicks();
}

function countPicks() {
  const n = state.picks.filter(Boolean).length;
  $("picked").textContent = n + " of " + state.info.fewshot + " picked";
  setBusy(state.busy);
}

function renderPairs(result) {
  state.pairs = result.pairs;
  state.picks = new Array(result.captions.length).fill(0);
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
  renderPairs(await runJob("base pairs", "/api/pairs", { seed }, "s-pick"));
  if (state.user) {
    userStatus("new pairs: Generate keeps your current user until you make one from these picks",
               true);
  }
}

// --- stored users to mix with, shown by their taste ---------------------------------------------

function userCard(value, name, thumbnails, profile) {
  const label = document.createElement("label");
  label.className = "user";
  const input = document.createElement("input");
  input.type = "radio";
  input.name = "mix-user";
  input.value = value;
  input.checked = value === "";
  input.addEventListener("change", followMix);
  label.appendChild(input);
  if (thumbnails.length) {
    const thumbs = document.createElement("span");
    thumbs.className = "thumbs";
    for (const url of thumbnails.slice(0, 4)) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = "an image " + name + " preferred";
      thumbs.appendChild(img);
    }
    label.appendChild(thumbs);
  }
  const text = document.createElement("span");
  text.className = "profile";
  text.textContent = profile ? name + ": " + profile : name;
  label.appendChild(text);
  return label;
}

async function loadUsers() {
  const { users } = await api("/api/users");
  const box = $("users");
  box.textContent = "";
  box.appendChild(userCard("", "none (only your taste)", [], null));
  for (const u of users) {
    box.appendChild(userCard(String(u.id), u.name, u.thumbnails || [], u.profile));
  }
  followMix();
}

function mixUser() {
  const checked = document.querySelector('input[name="mix-user"]:checked');
  return checked ? checked.value : "";
}

// The weight means something only with a stored user chosen.
function followMix() {
  const none = mixUser() === "";
  $("mix-weight").disabled = none;
  $("mix-note").textContent = none ? "choose a stored user to mix with" :
    "your weight w on your user, 1 - w on theirs";
}

// --- generate ----------------------------------------------------------------------------------

async function generate() {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new Error("type or pick a prompt first");
  state.pending = false;
  const other = mixUser();
  const weight = other === "" ? 1 : Number($("mix-weight").value);
  const body = { user: state.user, prompt, seed: Number($("seed").value) || 0,
                 scale: Number($("scale").value), weight,
                 mix: other === "" ? [] : [{ user: Number(other), weight: 1 - weight }] };
  const r = await runJob("generating", "/api/generate", body, "s-gen");
  for (const [name, seconds] of [["base", r.base_s], ["personal", r.personal_s]]) {
    $("img-" + name).src = r[name];
    const cached = name === "base" && r.base_cached ? ", kept from before" : "";
    $("time-" + name).textContent = "(" + seconds.toFixed(2) + " s" + cached + ")";
    const link = $("download-" + name);
    link.href = r[name];
    link.classList.remove("hidden");
  }
  // What this Generate cost: a base kept from before shows the time it took back then.
  state.fast = (r.base_cached ? 0 : r.base_s) + r.personal_s < FAST_S;
  $("fast-note").textContent = state.fast ? "quick model: the sliders regenerate when let go" : "";
  if (state.pending) await generate();
}

// A slider let go: regenerate at once where the model is quick (after the running job).
function onRelease() {
  if (!state.fast || !state.user || $("img-personal").getAttribute("src") === null) return;
  if (state.busy) { state.pending = true; return; }
  guarded(generate)();
}

// --- wiring ------------------------------------------------------------------------------------

function guarded(fn) {
  return () => fn().catch((e) => {
    if (e.code === "unknown_user") lostUser();
    showError(e.message);
  });
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  const info = state.info;
  $("run-facts").textContent = info.title;
  for (const p of info.prompts) {
    const o = document.createElement("option");
    o.value = p;
    $("prompt-list").appendChild(o);
  }
  $("prompt").value = info.prompts[0] || "";
  $("scale").max = String(info.scale_max);      // what /api/generate accepts
  $("scale").addEventListener("input", () => {
    $("scale-value").textContent = Number($("scale").value).toFixed(1); });
  $("mix-weight").addEventListener("input", () => {
    $("mix-weight-value").textContent = Number($("mix-weight").value).toFixed(2); });
  $("scale").addEventListener("change", onRelease);
  $("mix-weight").addEventListener("change", onRelease);
  $("new-pairs").addEventListener("click", guarded(newPairs));
  $("make-user").addEventListener("click", guarded(makeUser));
  $("generate").addEventListener("click", guarded(generate));
  $("upload").addEventListener("change", guarded(uploadPairs));
  $("download-pairs").addEventListener("click", (e) => {
    // A stale link would download the server's error: check the user first.
    if (e.target.dataset.checked) { delete e.target.dataset.checked; return; }
    e.preventDefault();
    guarded(async () => {
      if (state.user && await checkUser(state.user)) {
        e.target.dataset.checked = "1";
        e.target.click();
      } else {
        showError("the server no longer has your user; upload your pairs file or pick again");
      }
    })();
  });
  await guarded(loadUsers)();
  const saved = localStorage.getItem(USER_KEY);
  if (saved) {
    await guarded(async () => {
      if (await checkUser(saved)) setUser(saved, "your user from your last visit is ready");
    })();
  }
  guarded(newPairs)();
}

start();
