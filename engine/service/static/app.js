// The search page. Plain JavaScript, no build step, no network beyond this server.
// Every text that comes from the library (file names, cameras) is set with textContent or as an
// attribute value, never as markup: file names are chosen by whoever put the files there.
"use strict";

const TOKEN_KEY = "engine-token";
const THUMB = 256;
const $ = (id) => document.getElementById(id);

const state = {
  query: null,          // {kind: "upload", file, url, name} or {kind: "id", id, path}
  vector: null,         // base64 float32 query vector returned by the last plain search
  hits: [],
  marks: new Map(),     // id -> "more" | "less"
  history: [],
  busy: false,
};

// -- talking to the API -------------------------------------------------------------------------

function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

function saveToken(value) {
  localStorage.setItem(TOKEN_KEY, value);
  // <img> requests cannot carry a header: the server also accepts this cookie for GET requests.
  document.cookie = `engine_token=${encodeURIComponent(value)}; path=/; SameSite=Strict`;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) {
    askToken(Boolean(token()));
    throw new ApiError(401, "This library needs its token.");
  }
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.error) || `The server answered ${response.status}.`);
  }
  return body;
}

function askToken(rejected) {
  const dialog = $("token-dialog");
  $("token-error").hidden = !rejected;
  if (!dialog.open) dialog.showModal();
  $("token-input").focus();
}

// -- formatting ---------------------------------------------------------------------------------

const number = new Intl.NumberFormat();

function baseName(path) {
  const parts = String(path).split(/[\\/]/);
  return parts[parts.length - 1] || String(path);
}

function bytes(n) {
  if (n == null) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function date(text) {
  if (!text) return "";
  const d = new Date(text);
  return Number.isNaN(d.getTime()) ? String(text) : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function thumbUrl(id, size = THUMB) {
  return `/api/images/${encodeURIComponent(id)}/thumbnail?size=${size}`;
}

// -- status, library size -----------------------------------------------------------------------

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
}

async function refreshLibrary() {
  try {
    const health = await api("/api/health");
    $("library").textContent = `${number.format(health.images)} photos`;
    $("library").title = `Photos in the library (generation ${health.generation})`;
  } catch (err) {
    $("library").textContent = err.status === 401 ? "locked" : "offline";
  }
}

// -- the query ----------------------------------------------------------------------------------

function showQuery(query) {
  const img = $("query-img");
  img.src = query.kind === "upload" ? query.url : thumbUrl(query.id, 512);
  img.hidden = false;
  $("drop").classList.add("has-image");
  const meta = $("query-meta");
  meta.replaceChildren();
  const name = query.kind === "upload" ? query.name : baseName(query.path || "");
  meta.append(el("div", "query-name", name));
  meta.append(el("div", "muted", query.kind === "upload" ? `uploaded · ${bytes(query.file.size)}` : "from the library"));
}

function remember(query) {
  const key = query.kind === "upload" ? `u:${query.name}:${query.file.size}` : `i:${query.id}`;
  state.history = [query, ...state.history.filter((q) => q.key !== key)].slice(0, 12);
  query.key = key;
  const box = $("history");
  box.replaceChildren();
  for (const item of state.history) {
    const button = el("button", "history-item");
    button.type = "button";
    button.title = item.kind === "upload" ? item.name : item.path || `image ${item.id}`;
    const img = el("img");
    img.alt = button.title;
    img.src = item.kind === "upload" ? item.url : thumbUrl(item.id, 128);
    button.append(img);
    button.addEventListener("click", () => run(item));
    box.append(button);
  }
}

async function run(query) {
  if (state.busy) return;
  state.busy = true;
  state.query = query;
  state.marks.clear();
  updateMarks();
  showQuery(query);
  remember(query);
  setStatus("Searching…", "busy");
  const k = Number($("k").value);
  try {
    let answer;
    if (query.kind === "upload") {
      const form = new FormData();
      form.append("image", query.file, query.name);
      answer = await api(`/api/search?k=${k}&vector=true`, { method: "POST", body: form });
    } else {
      answer = await api(`/api/search?id=${encodeURIComponent(query.id)}&k=${k}&vector=true`);
      if (answer.query && answer.query.path) {
        query.path = answer.query.path;
        showQuery(query);
      }
    }
    state.vector = answer.vector || null;
    render(answer.hits);
    setStatus(`${answer.hits.length} most similar of ${number.format(answer.images)} photos · ${answer.took_ms.toFixed(0)} ms`);
  } catch (err) {
    render([]);
    setStatus(err.message, "error");
  } finally {
    state.busy = false;
  }
}

async function refine() {
  const positive = [...state.marks].filter(([, m]) => m === "more").map(([id]) => id);
  const negative = [...state.marks].filter(([, m]) => m === "less").map(([id]) => id);
  if (state.busy || (!positive.length && !negative.length)) return;
  state.busy = true;
  setStatus("Refining…", "busy");
  try {
    const body = JSON.stringify({ positive, negative, k: Number($("k").value), vector: state.vector });
    const answer = await api("/api/search/refine", {
      method: "POST", body, headers: { "Content-Type": "application/json" },
    });
    render(answer.hits);
    setStatus(`Refined with ${positive.length} more and ${negative.length} less like this · ${answer.took_ms.toFixed(0)} ms`);
  } catch (err) {
    setStatus(err.message, "error");
  } finally {
    state.busy = false;
  }
}

// -- results ------------------------------------------------------------------------------------

function card(hit) {
  const figure = el("figure", "card");
  figure.dataset.id = String(hit.id);
  if (state.query && state.query.kind === "id" && state.query.id === hit.id) figure.classList.add("self");

  const open = el("button", "thumb");
  open.type = "button";
  open.title = "Search from this photo";
  const img = el("img");
  img.src = thumbUrl(hit.id);
  img.alt = baseName(hit.path);
  img.loading = "lazy";
  img.decoding = "async";
  open.append(img);
  open.addEventListener("click", () => run({ kind: "id", id: hit.id, path: hit.path }));

  const caption = el("figcaption");
  caption.append(el("span", "name", baseName(hit.path)));
  caption.append(el("span", "score", hit.score.toFixed(3)));
  const meter = el("div", "meter");
  const fill = el("span");
  fill.style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
  meter.append(fill);

  const marks = el("div", "marks");
  for (const [kind, label, title] of [["more", "+", "More like this"], ["less", "−", "Less like this"]]) {
    const button = el("button", `mark ${kind}`, label);
    button.type = "button";
    button.title = title;
    button.setAttribute("aria-label", title);
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      state.marks.get(hit.id) === kind ? state.marks.delete(hit.id) : state.marks.set(hit.id, kind);
      updateMarks();
    });
    marks.append(button);
  }
  if (figure.classList.contains("self")) figure.append(el("span", "badge", "query"));
  figure.append(open, marks, caption, meter);
  figure.addEventListener("mouseenter", () => showTip(figure, hit));
  figure.addEventListener("mouseleave", hideTip);
  return figure;
}

function render(hits) {
  state.hits = hits;
  hideTip();
  const grid = $("grid");
  grid.replaceChildren(...hits.map(card));
  updateMarks();
}

function updateMarks() {
  for (const figure of document.querySelectorAll(".card")) {
    const mark = state.marks.get(Number(figure.dataset.id));
    figure.classList.toggle("marked-more", mark === "more");
    figure.classList.toggle("marked-less", mark === "less");
  }
  const values = [...state.marks.values()];
  $("n-pos").textContent = values.filter((m) => m === "more").length;
  $("n-neg").textContent = values.filter((m) => m === "less").length;
  $("refine").disabled = values.length === 0;
  $("clear").disabled = values.length === 0;
}

// -- hover details ------------------------------------------------------------------------------

function showTip(figure, hit) {
  const tip = $("tip");
  tip.replaceChildren();
  tip.append(el("div", "tip-path", hit.path));
  const rows = [
    ["size", [hit.width && hit.height ? `${hit.width} × ${hit.height}` : "", bytes(hit.bytes), hit.format || ""]
      .filter(Boolean).join(" · ")],
    ["date", date(hit.taken_at)],
    ["camera", hit.camera || ""],
    ["copies", (hit.aliases || []).join("\n")],
    ["match", `score ${hit.score.toFixed(4)} · distance ${hit.distance.toFixed(4)}`],
  ];
  for (const [label, value] of rows) {
    if (!value) continue;
    const row = el("div", "tip-row");
    row.append(el("span", "muted", label), el("span", null, value));
    tip.append(row);
  }
  tip.hidden = false;
  const box = figure.getBoundingClientRect();
  const width = tip.offsetWidth;
  let left = box.right + 10;
  if (left + width > window.innerWidth - 8) left = Math.max(8, box.left - width - 10);
  tip.style.left = `${left + window.scrollX}px`;
  tip.style.top = `${box.top + window.scrollY}px`;
}

function hideTip() {
  $("tip").hidden = true;
}

// -- picking a photo ----------------------------------------------------------------------------

function pick(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image.`, "error");
    return;
  }
  run({ kind: "upload", file, url: URL.createObjectURL(file), name: file.name || "pasted image" });
}

function wire() {
  $("file").addEventListener("change", (event) => {
    pick(event.target.files[0]);
    event.target.value = "";
  });
  const drop = $("drop");
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    pick(event.dataTransfer.files[0]);
  });
  window.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData ? event.clipboardData.files : [])][0];
    if (file) pick(file);
  });
  $("refine").addEventListener("click", refine);
  $("clear").addEventListener("click", () => {
    state.marks.clear();
    updateMarks();
  });
  $("k").addEventListener("change", () => state.query && run(state.query));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveToken($("token-input").value.trim());
    $("token-dialog").close();
    refreshLibrary();
  });
  window.addEventListener("scroll", hideTip, { passive: true });
}

wire();
refreshLibrary();
setInterval(refreshLibrary, 15000);
