// medsearch web page: plain JS over the /v1 API. Every piece of data is inserted with
// textContent (never innerHTML), so report text cannot inject markup.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY = "medsearch.key";
const state = { key: sessionStorage.getItem(KEY) || "", query: null, lastOpener: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function headers() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

async function api(path, opts = {}) {
  const res = await fetch(path, { ...opts, headers: { ...headers(), ...(opts.headers || {}) } });
  if (res.ok) return res.json();
  let err = { message: `${res.status} ${res.statusText}` };
  try { err = (await res.json()).error || err; } catch (_) { /* not JSON */ }
  if (res.status === 401) showKeyForm(err.message);
  const e = new Error(err.message + (err.hint ? ` (${err.hint})` : ""));
  e.status = res.status;
  throw e;
}

// Images need the key too when auth is on: fetch them as blobs then; plain src otherwise.
function setImage(img, url) {
  if (!url) return;
  if (!state.key) { img.src = url; return; }
  fetch(url, { headers: headers() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(r.status)))
    .then((b) => { img.src = URL.createObjectURL(b); })
    .catch(() => { img.alt += " (not available)"; });
}

function setStatus(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

// ---------------------------------------------------------------- key form
function showKeyForm(message) {
  $("#key-form").hidden = false;
  $("#key-button").setAttribute("aria-expanded", "true");
  $("#key-msg").textContent = message || "";
  $("#key-input").focus();
}

$("#key-button").addEventListener("click", () => {
  const form = $("#key-form");
  form.hidden = !form.hidden;
  $("#key-button").setAttribute("aria-expanded", String(!form.hidden));
  if (!form.hidden) $("#key-input").focus();
});
$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("#key-input").value.trim();
  sessionStorage.setItem(KEY, state.key);
  $("#key-input").value = "";
  $("#key-msg").textContent = state.key ? "Key set for this tab." : "";
  loadFacets();
});
$("#key-clear").addEventListener("click", () => {
  state.key = "";
  sessionStorage.removeItem(KEY);
  $("#key-msg").textContent = "Key forgotten.";
});

// ---------------------------------------------------------------- health and facets
async function loadHealth() {
  try {
    const h = await api("/v1/health");
    const sizes = Object.entries(h.indexes).map(([s, i]) => `${s} ${i.count} (gen ${i.generation})`).join(", ");
    $("#health").textContent = h.model ? `model ${h.model} · ${sizes || "no index"}` : "no index built yet";
    $("#draft-button").dataset.available = h.drafts_available ? "1" : "";
  } catch (e) {
    $("#health").textContent = "server not reachable";
  }
}

async function loadFacets() {
  try {
    const f = await api("/v1/facets");
    fillSelect($("#modality"), f.modality);
    fillSelect($("#region"), f.body_region);
  } catch (_) { /* 401 shows the key form */ }
}

function fillSelect(select, values) {
  const keep = select.value;
  select.replaceChildren(el("option", { value: "", text: "Any" }));
  for (const v of values) select.append(el("option", { value: v.value, text: `${v.value} (${v.count})` }));
  select.value = keep;
}

function filters() {
  const f = {};
  if ($("#modality").value) f.modality = [$("#modality").value];
  if ($("#region").value) f.body_region = [$("#region").value];
  return f;
}

// ---------------------------------------------------------------- searches
// Only the newest search may render: an older one that answers late (a filter change, then an
// upload) must not overwrite the newer results.
let searchSeq = 0;

async function textSearch(query) {
  const seq = ++searchSeq;
  state.query = { kind: "text", query };
  setStatus(`Searching for “${query}”…`);
  history.replaceState(null, "", `#q=${encodeURIComponent(query)}`);
  try {
    const r = await api("/v1/search/text", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query, k: Number($("#k").value), filters: filters() }),
    });
    if (seq === searchSeq) showHits(r, `“${query}”`);
  } catch (e) { if (seq === searchSeq) setStatus(e.message, true); }
}

async function imageSearch({ file = null, imageId = null, label }) {
  const seq = ++searchSeq;
  state.query = { kind: "image", file, imageId };
  setStatus(`Finding cases similar to ${label}…`);
  const form = new FormData();
  if (file) form.append("file", file);
  if (imageId) { form.append("image_id", imageId); form.append("exclude_own_case", "true"); }
  form.append("k", $("#k").value);
  const f = filters();
  for (const [name, vals] of Object.entries(f)) for (const v of vals) form.append(name, v);
  try {
    const r = await api("/v1/search/image", { method: "POST", body: form });
    if (seq === searchSeq) showHits(r, label);
  } catch (e) { if (seq === searchSeq) setStatus(e.message, true); }
}

function showHits(r, label) {
  const list = $("#results");
  list.replaceChildren(...r.hits.map(card));
  setStatus(r.count ? `${r.count} cases for ${label} (${Math.round(r.took_ms)} ms)` : `No results for ${label}.`);
}

function describe(h) {
  return [h.modality_type, h.body_region, h.plane].filter(Boolean).join(" · ");
}

function card(h) {
  const dx = h.diagnosis || h.title || "No diagnosis recorded";
  const img = el("img", {
    class: "thumb", loading: "lazy", width: 256, height: 256,
    alt: `${describe(h) || "Image"} from case ${h.case_key}: ${dx}`,
  });
  setImage(img, h.thumbnail_url);
  const open = el("button", { type: "button", class: "open", "aria-label": `Open case ${h.case_key}: ${dx}`,
    onclick: (ev) => openCase(h.case_id, ev.currentTarget) },
  img,
  el("div", { class: "body" },
    el("p", { class: "dx" }, el("span", { class: "score", title: "similarity score", text: h.score.toFixed(3) }), dx),
    el("p", { class: "meta", text: `${describe(h)}${describe(h) ? " · " : ""}${h.case_key}` }),
    h.excerpt ? el("p", { class: "excerpt", text: h.excerpt }) : null));
  const actions = el("div", { class: "actions" });
  if (h.image_id) {
    actions.append(el("button", { type: "button", class: "small ghost", text: "Similar",
      "aria-label": `Find cases similar to the image of case ${h.case_key}`,
      onclick: () => imageSearch({ imageId: h.image_id, label: `image ${h.image_key || h.image_id}` }) }));
  }
  return el("li", { class: "card", "data-case": h.case_id }, open, actions);
}

// ---------------------------------------------------------------- case view
async function openCase(caseId, opener) {
  state.lastOpener = opener || document.activeElement;
  const dlg = $("#case");
  try {
    const c = await api(`/v1/cases/${encodeURIComponent(caseId)}`);
    $("#case-title").textContent = `${c.case_key}: ${c.diagnosis || c.title || "case"}`;
    $("#case-meta").textContent = [c.source, c.split && `split ${c.split}`, c.category].filter(Boolean).join(" · ");
    $("#case-images").replaceChildren(...c.images.map((im) => {
      const img = el("img", { loading: "lazy", alt: `${[im.modality_type, im.plane, im.body_region].filter(Boolean).join(" ") || "Image"} ${im.key}${im.caption ? ": " + im.caption : ""}` });
      setImage(img, im.thumbnail_url);
      return el("figure", {}, img,
        el("figcaption", { text: im.caption || [im.modality, im.plane].filter(Boolean).join(" · ") || im.key }),
        el("div", { class: "fig-actions" },
          el("button", { type: "button", class: "small ghost", text: "Similar",
            onclick: () => { dlg.close(); imageSearch({ imageId: im.image_id, label: `image ${im.key}` }); } }),
          el("button", { type: "button", class: "small", text: "Draft report",
            onclick: () => { dlg.close(); draft({ imageId: im.image_id }); } }),
          el("button", { type: "button", class: "small ghost", text: "Full size",
            "aria-label": `Open image ${im.key} at full size`, onclick: () => openFull(im.image_url) })));
    }));
    // a DICOM study: its series, each with its slices in slice order (thumbnails of the embedded ones)
    const series = $("#case-series");
    series.replaceChildren(...(c.series || []).map((sr) => {
      const embedded = sr.slices.filter((sl) => sl.status === "ok").length;
      const title = `Series ${sr.number ?? "-"}: ${[sr.modality, sr.plane, sr.body_region].filter(Boolean).join(" ")}, ` +
        `${sr.slice_count} slices (${embedded} embedded), ordered by ${(sr.ordered_by || "position").replace("_", " ")}`;
      const strip = el("div", { class: "case-images series-slices" }, ...sr.slices.filter((sl) => sl.status === "ok").map((sl) => {
        const n = (sl.slice_index ?? 0) + 1;
        const img = el("img", { loading: "lazy", alt: `Slice ${n} of ${sr.slice_count}` });
        setImage(img, sl.thumbnail_url);
        return el("figure", {}, img, el("figcaption", { text: `slice ${n}/${sr.slice_count}` +
          (sl.position != null ? ` · ${Number(sl.position).toFixed(1)} mm` : "") }));
      }));
      return el("section", { class: "series", "aria-label": title }, el("h3", { text: title }), strip);
    }));
    if (c.viewer_url) {
      series.append(el("p", {}, el("a", { href: c.viewer_url, target: "_blank", rel: "noopener", text: "Open in the hospital viewer" })));
    }
    const report = $("#case-report");
    report.replaceChildren();
    for (const [name, text] of Object.entries(c.sections)) {
      if (!text) continue;
      report.append(el("h3", { text: name.replace(/_/g, " ") }), el("p", { text }));
    }
    const labels = $("#case-labels");
    labels.replaceChildren();
    for (const [k, v] of Object.entries(c.labels || {})) {
      labels.append(el("dt", { text: k }), el("dd", { text: Array.isArray(v) ? v.join(", ") : String(v) }));
    }
    if (!dlg.open) dlg.showModal();
    $("#case-close").focus();
  } catch (e) { setStatus(e.message, true); }
}

async function openFull(url) {
  const r = await fetch(url, { headers: headers() });
  if (r.ok) window.open(URL.createObjectURL(await r.blob()), "_blank", "noopener");
}

$("#case-close").addEventListener("click", () => $("#case").close());
$("#case").addEventListener("close", () => { if (state.lastOpener) state.lastOpener.focus(); });

// ---------------------------------------------------------------- drafts
async function draft({ file = null, imageId = null }) {
  const box = $("#draft");
  box.hidden = false;
  $("#draft-meta").textContent = "Drafting…";
  $("#draft-body").replaceChildren();
  $("#draft-evidence").replaceChildren();
  const form = new FormData();
  if (file) form.append("file", file);
  if (imageId) form.append("image_id", imageId);
  form.append("generator", "extractive");
  try {
    const d = await api("/v1/drafts", { method: "POST", body: form });
    $("#draft-meta").textContent = `${d.generator} generator · ${d.evidence.length} evidence cases · ${Math.round(d.took_ms)} ms`;
    for (const section of ["findings", "impression"]) {
      const sents = d.sentences.filter((s) => s.section === section);
      if (!sents.length) continue;
      const p = el("div", {}, el("h3", { text: section }));
      for (const s of sents) {
        const line = el("p", { class: "sentence" }, s.text);
        for (const c of s.citations) {
          line.append(el("button", { type: "button", class: "cite", text: c.cite,
            title: `${c.case_key}: ${c.evidence}`, "aria-label": `Citation ${c.cite}: open case ${c.case_key}`,
            onclick: (ev) => openCase(c.case_id, ev.currentTarget) }));
        }
        if (s.flags.length) line.append(el("span", { class: "flag", text: s.flags.join(", ") }));
        p.append(line);
      }
      $("#draft-body").append(p);
    }
    $("#draft-evidence").replaceChildren(...d.evidence.map((e) => {
      const img = el("img", { alt: `${[e.modality_type, e.body_region].filter(Boolean).join(" ") || "Image"} of case ${e.case_key}` });
      setImage(img, e.thumbnail_url);
      return el("li", {}, el("button", { type: "button", class: "small ghost", onclick: (ev) => openCase(e.case_id, ev.currentTarget),
        "aria-label": `${e.cite}: open case ${e.case_key}` }, img, `${e.cite} ${e.case_key} · ${e.diagnosis || ""}`));
    }));
    box.focus();
  } catch (e) {
    $("#draft-meta").textContent = e.status === 501 ? "Drafting is not available on this server." : e.message;
  }
}

$("#draft-button").addEventListener("click", () => {
  const q = state.query;
  if (q && q.kind === "image") draft({ file: q.file, imageId: q.imageId });
});

// ---------------------------------------------------------------- inputs
$("#text-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("#q").value.trim();
  if (q) textSearch(q);
});

function useFile(file) {
  if (!file) return;
  const preview = $("#query-preview");
  preview.hidden = false;
  const img = $("#query-img");
  img.src = /^image\/(png|jpeg)$/.test(file.type) ? URL.createObjectURL(file) : "";
  img.alt = `Your query image ${file.name}`;
  $("#query-caption").textContent = `${file.name} · ${Math.round(file.size / 1024)} KB`;
  $("#draft-button").hidden = false;
  imageSearch({ file, label: file.name });
}

$("#file").addEventListener("change", (ev) => useFile(ev.target.files[0]));
const drop = $("#drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  useFile(ev.dataTransfer.files[0]);
});

for (const id of ["#modality", "#region", "#k"]) {
  $(id).addEventListener("change", () => {
    const q = state.query;
    if (!q) return;
    if (q.kind === "text") textSearch(q.query);
    else imageSearch({ file: q.file, imageId: q.imageId, label: "the same image" });
  });
}

// ---------------------------------------------------------------- start
loadHealth();
loadFacets();
const m = location.hash.match(/^#q=(.+)$/);
if (m) { $("#q").value = decodeURIComponent(m[1]); textSearch($("#q").value); }
