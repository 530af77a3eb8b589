// Hematovision's pages: no framework, no build step, nothing from another site.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;

async function api(method, path, body) {
  const options = {method, headers: {"Accept": "application/json", "X-CSRF-Token": CSRF}, credentials: "same-origin"};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = {error: response.statusText}; }
  return {status: response.status, ok: response.ok, data};
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function specimenPath(id) { return id.split("/").map(encodeURIComponent).join("/"); }

// --- live page ---------------------------------------------------------------------------

const POLL_MS = 1000;

function initLive() {
  let shownFrame = null;
  const frame = document.getElementById("frame");
  const operator = document.getElementById("operator-input");
  operator.value = localStorage.getItem("hv-operator") || "";

  async function poll() {
    if (!document.hidden) {
      try {
        const {ok, data} = await api("GET", "/api/status");
        if (ok) {
          showStatus(data);
          // A new frame only once the last one has loaded: on a slow link a frame asked for every second
          // would otherwise be replaced before it ever shows.
          if (data.live && data.live.index !== shownFrame && frame.complete) {
            shownFrame = data.live.index;
            frame.src = "/api/live.jpg?i=" + shownFrame;
          }
        }
      } catch (e) { document.getElementById("banner").textContent = "The device does not answer."; }
    }
    setTimeout(poll, POLL_MS);
  }

  document.getElementById("start-form").addEventListener("submit", async (event) => {
    event.preventDefault();  // Enter in the id field (a barcode scanner's last key) lands here
    const form = event.target, body = {action: "start"};
    for (const name of ["specimen_id", "accession", "operator"]) if (form[name].value.trim()) body[name] = form[name].value.trim();
    if (form.target.value) body.target = parseInt(form.target.value, 10);
    if (form.wbc.value) body.wbc = parseFloat(form.wbc.value);
    localStorage.setItem("hv-operator", form.operator.value.trim());
    const result = await api("POST", "/api/specimen", body);
    showCommand(result);
    if (result.ok) { form.specimen_id.value = ""; form.accession.value = ""; }
    form.specimen_id.focus();
  });
  document.getElementById("finish-button").addEventListener("click", async () => {
    showCommand(await api("POST", "/api/specimen", {action: "finish"}));
  });
  poll();
}

function showCommand({status, data}) {
  const text = data.error || (data.state === "queued" ? "queued: the device takes it at its next frame" : data.result);
  const out = document.getElementById("command-result");
  out.textContent = text;
  out.className = status >= 400 ? "error" : "ok";
}

function showStatus(s) {
  const banner = document.getElementById("banner");
  const reached = s.state === "target reached";
  banner.className = "banner " + (reached ? "reached" : s.state === "counting" ? "counting" : "idle");
  if (reached) banner.textContent = `Target reached: specimen ${s.last_finished.specimen_id} is finished (${s.last_finished.counted} cells). Review it under Reports.`;
  else if (s.state === "counting") banner.textContent = `Counting specimen ${s.specimen_id}`;
  else banner.textContent = "No specimen open: scan or type a specimen id below to start one.";
  document.getElementById("specimen-id").textContent = s.specimen_id || "–";
  document.getElementById("counted").textContent = s.counted;
  document.getElementById("target").textContent = s.target || "–";
  const progress = document.getElementById("progress");
  progress.max = s.target || 100;
  progress.value = Math.min(s.counted, progress.max);
  const body = document.querySelector("#counts tbody");
  body.replaceChildren(...Object.entries(s.counts || {}).map(([name, n]) => el("tr", {}, el("td", {text: name}), el("td", {class: "n", text: String(n)}))));
  const f = s.frames;
  document.getElementById("frames").textContent = f ? `${f.used} used; skipped: ${f.skipped_blur} blurred, ${f.skipped_motion} moving, ${f.unusable} unusable` : "–";
  const live = s.live;
  if (live) {
    document.getElementById("frame-caption").textContent = `frame ${live.index} (${live.name}): ${live.kind === "used" ? live.cells + " new cell(s)" : "counted nothing: " + live.kind}, ${live.found} found`;
    const focus = document.getElementById("focus");
    focus.textContent = live.in_focus === null ? "focus: not measured" : `focus: ${live.in_focus ? "sharp" : "BLURRED"} (${live.focus})`;
    focus.className = "indicator " + (live.in_focus === false ? "bad" : "good");
    const exposure = document.getElementById("exposure");
    exposure.textContent = `exposure: ${live.exposure} (mean ${live.brightness}, ${(live.clipped * 100).toFixed(1)}% clipped)`;
    exposure.className = "indicator " + (live.exposure === "ok" ? "good" : "bad");
  }
}

// --- review page ---------------------------------------------------------------------------

function initReview() {
  const id = document.body.dataset.specimen;
  const labels = JSON.parse(document.body.dataset.labels);
  const byKey = Object.fromEntries(labels.filter(l => l.key).map(l => [l.key, l.name]));
  const reviewer = document.getElementById("reviewer");
  reviewer.value = localStorage.getItem("hv-operator") || "";
  let report = null, order = [], selected = null;

  async function load() {
    const {ok, data} = await api("GET", `/api/specimens/${specimenPath(id)}?thumbnails=0`);
    if (!ok) { document.getElementById("review-state").textContent = data.error; return; }
    show(data);
  }

  function show(data) {
    report = data;
    const verified = typeof report.verification === "object";
    const state = document.getElementById("review-state");
    state.className = "banner " + (verified ? "verified" : "preliminary");
    state.textContent = verified ? `Verified by ${report.verification.operator} at ${report.verification.signed_at}; ${report.verification.changes.length} cell(s) changed` : "Preliminary: not verified. Check every cell, then sign.";
    document.getElementById("sign-form").hidden = verified;
    showDifferential();
    showGallery();
    showDownloads(verified);
  }

  function showDifferential() {
    const rows = report.classes.map(c => el("tr", {"data-class": c.name}, el("td", {text: c.name}), el("td", {class: "n", text: String(c.count)}), el("td", {class: "n", text: c.percent.toFixed(1)})));
    rows.push(el("tr", {}, el("td", {text: "unidentified"}), el("td", {class: "n", text: String(report.unidentified)}), el("td")));
    document.querySelector("#differential tbody").replaceChildren(...rows);
    const beside = [];
    if (report.nrbc) beside.push(`NRBC ${report.nrbc.count} (${report.nrbc.per_100_wbc ?? "n/a"} per 100 WBC)`);
    for (const r of report.rejected || []) beside.push(`${r.name} ${r.count} (not white cells)`);
    document.getElementById("beside").textContent = beside.join("; ");
  }

  function showGallery() {
    const gallery = document.getElementById("gallery");
    const groups = labels.map(l => [l.name, report.cells.filter(c => c.label === l.name)]).filter(([, cells]) => cells.length);
    order = groups.flatMap(([, cells]) => cells.map(c => c.id));
    gallery.replaceChildren(...groups.map(([name, cells]) => el("section", {"data-class": name},
      el("h3", {text: `${name} (${cells.length})`}),
      el("div", {class: "group"}, ...cells.map(cellButton)))));
    if (selected === null || !order.includes(selected)) selected = order[0] ?? null;
    highlight();
  }

  function cellButton(c) {
    const button = el("button", {type: "button", class: "cell" + (c.confidence < 0.6 ? " low" : ""), "data-cell": String(c.id), title: `cell ${c.id}: ${c.label}, ${c.confidence.toFixed(2)}${c.field ? ", " + c.field : ""}`},
      el("img", {src: `/api/specimens/${specimenPath(id)}/cells/${c.id}.jpg`, alt: `cell ${c.id}`, loading: "lazy", width: "96", height: "96"}),
      el("span", {text: `#${c.id} ${c.confidence.toFixed(2)}`}));
    button.addEventListener("click", () => { selected = c.id; highlight(); });
    button.addEventListener("dblclick", () => { selected = c.id; enlarge(); });
    return button;
  }

  function highlight() {
    for (const b of document.querySelectorAll("#gallery .cell")) {
      const on = Number(b.dataset.cell) === selected;
      b.classList.toggle("selected", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
      if (on) b.scrollIntoView({block: "nearest"});
    }
  }

  async function relabel(label) {
    if (selected === null || typeof report.verification === "object") return;
    const cell = report.cells.find(c => c.id === selected);
    if (!cell || cell.label === label) { move(1); return; }
    const operator = reviewer.value.trim();
    const body = operator ? {label, operator} : {label};
    const {ok, data} = await api("POST", `/api/specimens/${specimenPath(id)}/cells/${selected}?thumbnails=0`, body);
    if (!ok) { document.getElementById("sign-result").textContent = data.error; return; }
    const next = order[order.indexOf(selected) + 1];
    show(data);
    if (next !== undefined) { selected = next; highlight(); }
  }

  function move(step) {
    if (!order.length) return;
    const i = Math.max(0, Math.min(order.length - 1, order.indexOf(selected) + step));
    selected = order[i];
    highlight();
  }

  function enlarge() {
    const cell = report.cells.find(c => c.id === selected);
    if (!cell) return;
    document.getElementById("enlarged-img").src = `/api/specimens/${specimenPath(id)}/cells/${cell.id}.jpg`;
    const [x, y] = cell.slide_xy_um;
    document.getElementById("enlarged-caption").textContent = `cell ${cell.id}: ${cell.label} (${cell.confidence.toFixed(2)}), field ${cell.field || "not named"}, at x ${x.toFixed(0)} µm, y ${y.toFixed(0)} µm`;
    fieldMap(cell);
    document.getElementById("relabel-buttons").replaceChildren(...labels.map(l => {
      const b = el("button", {type: "button", "data-label": l.name, text: `${l.key ? "[" + l.key + "] " : ""}${l.name}`});
      b.addEventListener("click", async () => { await relabel(l.name); document.getElementById("enlarged").close(); });
      return b;
    }));
    document.getElementById("enlarged").showModal();
  }

  function fieldMap(cell) {
    // The cells found in the same field at their places in it, this one ringed: where it sat in its field.
    const same = report.cells.filter(c => c.field === cell.field && cell.field);
    const cells = same.length ? same : [cell];
    const xs = cells.map(c => c.slide_xy_um[0]), ys = cells.map(c => c.slide_xy_um[1]);
    const pad = 15, x0 = Math.min(...xs) - pad, y0 = Math.min(...ys) - pad;
    const w = Math.max(...xs) - x0 + pad, h = Math.max(...ys) - y0 + pad;
    const svg = document.getElementById("field-map");
    svg.setAttribute("viewBox", `${x0} ${y0} ${w} ${h}`);
    const ns = "http://www.w3.org/2000/svg";
    svg.replaceChildren(...cells.map(c => {
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", c.slide_xy_um[0]); dot.setAttribute("cy", c.slide_xy_um[1]);
      dot.setAttribute("r", c.id === cell.id ? 6 : 4);
      dot.setAttribute("class", c.id === cell.id ? "this" : "other");
      return dot;
    }));
  }

  function showDownloads(verified) {
    const links = [];
    for (const kind of verified ? ["preliminary", "verified"] : ["preliminary"]) {
      for (const fmt of ["html", "json", "csv"]) links.push(el("a", {href: `/download/${kind}/${fmt}/${specimenPath(id)}`, text: `${kind} ${fmt}`}), " ");
    }
    document.getElementById("downloads").replaceChildren(...links);
  }

  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, textarea, dialog") || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "ArrowRight" || event.key === "ArrowDown") { move(1); event.preventDefault(); }
    else if (event.key === "ArrowLeft" || event.key === "ArrowUp") { move(-1); event.preventDefault(); }
    else if (event.key === "Enter") { enlarge(); event.preventDefault(); }
    else if (byKey[event.key.toLowerCase()]) { relabel(byKey[event.key.toLowerCase()]); event.preventDefault(); }
  });
  document.getElementById("enlarged").addEventListener("keydown", (event) => {
    const label = byKey[event.key.toLowerCase()];
    if (label) { event.preventDefault(); relabel(label).then(() => document.getElementById("enlarged").close()); }
  });

  document.getElementById("sign-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const operator = reviewer.value.trim();
    localStorage.setItem("hv-operator", operator);
    const {ok, data} = await api("POST", `/api/specimens/${specimenPath(id)}/sign?thumbnails=0`, {operator});
    document.getElementById("sign-result").textContent = ok ? "Signed: the verified report is written and sent." : data.error;
    if (ok) show(data);
  });
  load();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "live") initLive();
  if (page === "review") initReview();
});
