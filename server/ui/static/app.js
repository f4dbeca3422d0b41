// The search page: form + photo → POST /api/search → grid, facets, timings; card → GET /api/products/{id}.
// Plain DOM code, no build step. Every server string is inserted as text, never as HTML.
"use strict";

const state = { photo: null, filters: {}, searches: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "dataset") Object.assign(node.dataset, v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function photoNode(url, alt) {
  return url ? el("img", { src: url, alt: alt, loading: "lazy" }) : el("div", { class: "no-photo" }, "no photo");
}

async function callApi(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`The page could not reach its own web server (${err.message}). Is \`ecsearch ui\` still running?`);
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status} ${response.statusText}`);
  return body;
}

async function runSearch() {
  const text = $("query-text").value.trim();
  if (!text && !state.photo) { showError("Type a query or add a photo."); return; }
  const form = new FormData();
  form.append("text", text);
  form.append("top_k", $("top-k").value);
  form.append("filters", JSON.stringify(state.filters));
  if (state.photo) form.append("image", state.photo, state.photo.name || "photo");
  const ticket = ++state.searches;
  document.body.dataset.state = "loading";
  try {
    const result = await callApi("/api/search", { method: "POST", body: form });
    if (ticket !== state.searches) return;  // a newer search is on its way
    showError("");
    render(result);
    document.body.dataset.state = "done";
  } catch (err) {
    if (ticket !== state.searches) return;
    showError(err.message);
    document.body.dataset.state = "error";
  }
  document.body.dataset.searches = String(ticket);
}

function render(result) {
  const grid = $("results");
  grid.replaceChildren(...result.hits.map(card));
  if (!result.hits.length) grid.append(el("p", { class: "muted" }, "No product matches this query and these filters."));
  renderFacets(result.facets, result.facet_pool);
  const t = result.timings_ms;
  const ms = (x) => `${x.toFixed(1)} ms`;
  $("stats").textContent = `index version ${result.index_version} · decode ${ms(t.decode)} · queue ${ms(t.queue)} · ` +
    `encode ${ms(t.encode)} · search ${ms(t.search)} · metadata ${ms(t.metadata)} · total ${ms(t.total)} on the server · ` +
    `query tower batch ${result.encode_batch_size} · facet counts over the top ${result.facet_pool} hits`;
}

function card(hit) {
  const attrs = el("dl");
  for (const [k, v] of Object.entries(hit.attributes)) attrs.append(el("dt", {}, k), el("dd", { dataset: { field: k } }, v));
  const node = el("article", { class: "card", dataset: { productId: hit.product_id, rank: hit.rank } },
    photoNode(hit.image_url, hit.title),
    el("div", { class: "rank" }, `#${hit.rank} · ${hit.score.toFixed(3)}`),
    el("div", { class: "title" }, hit.title),
    el("div", { class: "muted" }, `id ${hit.product_id}`), attrs);
  node.addEventListener("click", () => showProduct(hit.product_id));
  return node;
}

function renderFacets(facets, pool) {
  const box = $("facets");
  box.replaceChildren(el("p", { class: "muted" }, `Counts among the top ${pool} hits.`));
  if (Object.keys(state.filters).length) {
    const clear = el("button", { type: "button", id: "clear-filters" }, "clear filters");
    clear.addEventListener("click", () => { state.filters = {}; runSearch(); });
    box.append(clear);
  }
  for (const facet of facets) {
    const set = el("fieldset", { dataset: { field: facet.field } }, el("legend", {}, facet.field));
    for (const v of facet.values) {
      const input = el("input", { type: "checkbox", dataset: { field: facet.field, value: v.value } });
      input.checked = v.selected;
      input.addEventListener("change", () => toggleFilter(facet.field, v.value, input.checked));
      set.append(el("label", {}, input, ` ${v.value} `, el("span", { class: "count" }, `(${v.count})`)));
    }
    box.append(set);
  }
}

function toggleFilter(field, value, on) {
  const values = new Set(state.filters[field] || []);
  if (on) values.add(value); else values.delete(value);
  if (values.size) state.filters[field] = [...values]; else delete state.filters[field];
  runSearch();
}

async function showProduct(productId) {
  const body = $("detail-body");
  try {
    const result = await callApi(`/api/products/${encodeURIComponent(productId)}`);
    const p = result.products[0];
    const rows = Object.entries(p.metadata).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v)));
    body.replaceChildren(photoNode(p.image_url, p.title), el("h2", {}, p.title),
      el("table", {}, ...rows), el("p", { class: "muted" }, `index version ${result.index_version}`));
    $("detail").showModal();
  } catch (err) {
    showError(err.message);
  }
}

function setPhoto(file) {
  state.photo = file;
  $("photo-chosen").hidden = !file;
  $("drop-hint").hidden = !!file;
  if (file) {
    $("photo-preview").src = URL.createObjectURL(file);
    $("photo-name").textContent = file.name || "photo";
    runSearch();
  }
}

$("search-form").addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });
$("photo-input").addEventListener("change", () => setPhoto($("photo-input").files[0] || null));
$("photo-clear").addEventListener("click", () => { $("photo-input").value = ""; setPhoto(null); });
$("detail-close").addEventListener("click", () => $("detail").close());
const zone = $("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) setPhoto(file); else showError("Drop an image file (JPEG, PNG, WebP).");
});
