"""The results pages' HTML, CSS and JavaScript (no build step: served as they are by
`lits.serve.results_page`, filled with `string.Template`: $title, $nonce and the page's own fields).

The pages hold no data when served: their script reads the JSON API with the browser's session cookie
and builds what they show from its answers, every name and reason written as text (never as HTML), so
what a page shows is what the API says. The job page reads GET /v1/jobs/{id} every REFRESH_MS while the
job runs, then GET /v1/jobs/{id}/volumes (its table, totals and histogram); the watch page reads
GET /v1/watches/{id}?entries=N every REFRESH_MS while the watch runs (its summary and a table of its
first N keys, each linked to its job's page).
"""

from __future__ import annotations

from string import Template

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } code { font-size: 0.95em; }
.bar { width: 30em; max-width: 100%; height: 1em; background: #eee; border-radius: 3px; overflow: hidden; }
#bar-fill { height: 100%; width: 0; background: #3a7; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; vertical-align: middle; }
th[data-key] { cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { color: #a22; }
button.preview { border: 0; padding: 0; background: none; cursor: zoom-in; }
button.preview img { height: 48px; }
dialog img { max-width: 90vw; max-height: 80vh; display: block; }
.error { color: #a22; } .muted { color: #777; }
form.login { display: flex; gap: 0.5em; align-items: center; }
"""

LOGIN = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>$title: sign in</title>
<style nonce="$nonce">$style</style></head>
<body><h1>$title</h1>
<p>Sign in with the server's API token (LITS_API_TOKEN) to see $what.</p>
<p class="error" id="login-error">$error</p>
<form class="login" method="post" action="/login">
<input type="hidden" name="next" value="$next">
<label>API token <input type="password" name="token" id="token" autocomplete="current-password" required autofocus></label>
<button type="submit" id="sign-in">Sign in</button>
</form></body></html>
""")

PAGE_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style nonce="$nonce">$style</style></head>
<body>
"""

# The pages' shared script: strict mode, the refresh period, $ (an element by id), api (a JSON answer of
# this server, read with the session cookie; a 401 reloads into the login), el (an element whose text is
# set as text, never parsed as HTML), fmt (a number to `digits` places, '–' for none) and sortable (a
# table whose <th data-key data-type> headers sort its rows, blanks last, on click).
COMMON_JS = """"use strict";
const REFRESH_MS = %d;
const $ = (id) => document.getElementById(id);

async function api(path) {
  const r = await fetch(path, {credentials: "same-origin", headers: {Accept: "application/json"}});
  if (r.status === 401) { location.reload(); throw new Error("signed out"); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || ("HTTP " + r.status));
  return body;
}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }

function sortable(table, row) {
  let rows = [], key = null, dir = 1;
  const blank = (v) => v === null || v === undefined;
  function render() {
    const sorted = rows.slice();
    if (key) {
      const numeric = table.querySelector('th[data-key="' + key + '"]').dataset.type === "num";
      sorted.sort((a, b) => blank(a[key]) ? (blank(b[key]) ? 0 : 1) : blank(b[key]) ? -1 :
        dir * (numeric ? a[key] - b[key] : String(a[key]).localeCompare(String(b[key]))));
    }
    table.tBodies[0].replaceChildren(...sorted.map(row));
  }
  for (const th of table.querySelectorAll("th[data-key]")) th.addEventListener("click", () => {
    dir = key === th.dataset.key ? -dir : 1;
    key = th.dataset.key;
    for (const other of table.querySelectorAll("th[data-key]")) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    render();
  });
  return (newRows) => { rows = newRows; render(); };
}
"""


def common_js(refresh_ms: int) -> str:
    """COMMON_JS with the pages' refresh period (milliseconds)."""
    return COMMON_JS % int(refresh_ms)


JOB_PAGE = Template(PAGE_HEAD + """<h1>Job <code id="job-id">$job_id</code> <span id="state" class="muted">loading…</span></h1>
<p class="muted"><span id="paths"></span> · <a href="/v1/jobs/$job_id">status (JSON)</a> ·
<a href="/v1/jobs/$job_id/volumes">volumes (JSON)</a> · <a href="/logout">sign out</a></p>
<p class="error" id="error"></p>
<section id="progress"><div class="bar"><div id="bar-fill"></div></div><p id="progress-text"></p></section>
<section id="results" hidden>
<h2>Totals</h2>
<table id="totals"><tbody></tbody></table>
<h2>Tumour burden</h2>
<div id="histogram"></div>
<h2>Volumes</h2>
<table id="volumes"><thead><tr>
<th data-key="name" data-type="text">volume</th>
<th data-key="status" data-type="text">status</th>
<th data-key="liver_volume_ml" data-type="num">liver mL</th>
<th data-key="tumour_volume_ml" data-type="num">tumour mL</th>
<th data-key="lesion_count" data-type="num">lesions</th>
<th data-key="burden" data-type="num">tumour burden %</th>
<th data-key="seconds" data-type="num">time s</th>
<th>preview</th><th>files</th>
</tr></thead><tbody></tbody></table>
</section>
<dialog id="viewer"><img id="viewer-img" alt=""><form method="dialog"><button id="viewer-close">close</button></form></dialog>
<script nonce="$nonce">
$common
const JOB = "$job_id", FINAL = ["succeeded", "failed", "cancelled"];

function output(kind, name) {
  return "/v1/jobs/" + JOB + "/outputs/" + kind + "?name=" + encodeURIComponent(name);
}

function showProgress(job) {
  const c = job.counts, finished = c.done + c.skipped + c.failed;
  $$("state").textContent = job.state;
  $$("state").dataset.state = job.state;
  $$("paths").textContent = job.input + " → " + job.output;
  $$("bar-fill").style.width = Math.round(100 * job.progress) + "%";
  $$("progress-text").textContent = finished + " of " + (c.total || "?") + " volumes (done " + c.done +
    ", skipped " + c.skipped + ", failed " + c.failed + ")" + (job.slices_per_s ? ", " + job.slices_per_s +
    " slices/s" : "") + (job.error ? " · " + job.error : "");
}

function withBurden(v) {
  const liver = v.liver_volume_ml, tumour = v.tumour_volume_ml;
  return {...v, burden: liver > 0 && tumour !== undefined && tumour !== null ? 100 * tumour / liver : null};
}

function showTotals(job, vols) {
  const done = vols.filter((v) => v.status === "done"), sum = (k) => done.reduce((s, v) => s + (v[k] || 0), 0);
  const burdens = done.map((v) => v.burden).filter((b) => b !== null);
  const items = [["volumes", job.counts.total, "total"], ["done", job.counts.done, "done"],
    ["skipped", job.counts.skipped, "skipped"], ["failed", job.counts.failed, "failed"],
    ["liver mL (done)", sum("liver_volume_ml").toFixed(1), "liver_volume_ml"],
    ["tumour mL (done)", sum("tumour_volume_ml").toFixed(1), "tumour_volume_ml"],
    ["lesions (done)", sum("lesion_count"), "lesion_count"],
    ["mean tumour burden %", burdens.length ? (burdens.reduce((a, b) => a + b, 0) / burdens.length).toFixed(2) : "–", "burden"],
    ["slices segmented", job.slices_segmented, "slices"], ["elapsed s", job.elapsed_s, "elapsed_s"]];
  const body = $$("totals").tBodies[0];
  body.replaceChildren(...items.map(([label, value, key]) => {
    const tr = el("tr", null, {"data-total": key});
    tr.append(el("th", label), el("td", value, {class: "num"}));
    return tr;
  }));
}

function showHistogram(vols) {
  const burdens = vols.filter((v) => v.status === "done" && v.burden !== null).map((v) => v.burden);
  const box = $$("histogram");
  if (!burdens.length) { box.replaceChildren(el("p", "no volume with a liver", {class: "muted"})); return; }
  const bins = 10, top = Math.max(1, Math.ceil(Math.max(...burdens))), width = top / bins;
  const counts = new Array(bins).fill(0);
  for (const b of burdens) counts[Math.min(bins - 1, Math.floor(b / width))] += 1;
  const ns = "http://www.w3.org/2000/svg", W = 420, H = 160, pad = 24, most = Math.max(...counts);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + pad); svg.id = "burden-histogram";
  counts.forEach((n, i) => {
    const h = most ? (H - 10) * n / most : 0, bw = (W - 2 * pad) / bins;
    const rect = document.createElementNS(ns, "rect");
    for (const [k, v] of Object.entries({x: pad + i * bw + 1, y: H - h, width: bw - 2, height: h, fill: "#3a7",
        "data-count": n, "data-from": (i * width).toFixed(2), "data-to": ((i + 1) * width).toFixed(2)})) rect.setAttribute(k, v);
    const title = document.createElementNS(ns, "title");
    title.textContent = n + " volume(s) at " + (i * width).toFixed(1) + "–" + ((i + 1) * width).toFixed(1) + " %";
    rect.append(title); svg.append(rect);
  });
  for (const [x, text] of [[pad, "0 %"], [W - pad, top + " %"]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x); label.setAttribute("y", H + 16); label.setAttribute("text-anchor", "middle");
    label.textContent = text; svg.append(label);
  }
  box.replaceChildren(svg);
}

function row(v) {
  const tr = el("tr", null, {"data-name": v.name, class: v.status});
  const reason = v.status === "failed" ? "failed: " + v.reason : v.status;
  tr.append(el("td", v.name, {"data-key": "name"}), el("td", reason, {"data-key": "status"}));
  for (const [key, digits] of [["liver_volume_ml", 1], ["tumour_volume_ml", 2], ["lesion_count", 0], ["burden", 2], ["seconds", 2]]) {
    const value = v[key] === undefined ? null : v[key];
    tr.append(el("td", fmt(value, digits), {class: "num", "data-key": key, "data-value": value === null ? "" : value}));
  }
  const preview = el("td"), files = el("td");
  if (v.status === "done" || v.status === "skipped") {
    const button = el("button", null, {class: "preview", title: "open the preview", "data-src": output("preview", v.name)});
    button.append(el("img", null, {src: output("preview", v.name), alt: "preview of " + v.name, loading: "lazy"}));
    button.addEventListener("click", () => { $$("viewer-img").src = button.dataset.src; $$("viewer").showModal(); });
    preview.append(button);
    files.append(el("a", "mask", {href: output("mask", v.name), class: "mask"}), " ",
                 el("a", "report", {href: output("report", v.name), class: "report", target: "_blank"}));
  }
  tr.append(preview, files);
  return tr;
}

const showVolumes = sortable($$("volumes"), row);

async function refresh() {
  try {
    const job = await api("/v1/jobs/" + JOB);
    showProgress(job);
    if (!FINAL.includes(job.state)) { setTimeout(refresh, REFRESH_MS); return; }
    const found = await api("/v1/jobs/" + JOB + "/volumes");
    const rows = found.volumes.map(withBurden);
    showTotals(job, rows);
    showHistogram(rows);
    showVolumes(rows);
    $$("results").hidden = false;
    document.body.dataset.loaded = "true";
  } catch (e) {
    $$("error").textContent = e.message;
    document.body.dataset.loaded = "error";
  }
}

refresh();
</script></body></html>
""")

WATCH_PAGE = Template(PAGE_HEAD + """<h1>Watch <code id="watch-id">$watch_id</code> <span id="state" class="muted">loading…</span></h1>
<p class="muted"><span id="paths"></span> · <a href="/v1/watches/$watch_id?entries=$rows&amp;order=recent">status (JSON)</a> ·
<a href="/logout">sign out</a></p>
<p class="error" id="error"></p>
<table id="summary"><tbody></tbody></table>
<h2>Objects</h2>
<p class="muted" id="entries-note"></p>
<table id="entries"><thead><tr>
<th data-key="key" data-type="text">key</th>
<th data-key="state" data-type="text">state</th>
<th data-key="changed_at" data-type="num">changed</th>
<th data-key="lag_s" data-type="num">lag s</th>
<th data-key="reason" data-type="text">failure</th>
<th data-key="job_id" data-type="text">job</th>
</tr></thead><tbody></tbody></table>
<script nonce="$nonce">
$common
const WATCH = "$watch_id", ROWS = $rows, ENDED = ["stopped", "deleted"];
const showEntries = sortable($$("entries"), entryRow);

function fields(w) {
  const c = w.counts, seen = c.pending + c.submitted + c.done + c.failed;
  return [["state", w.state], ["error", w.error || "–"], ["poll_s", w.poll_s], ["polls", w.polls],
    ["listing_keys", w.listing ? w.listing.keys : null], ["listing_s", w.listing ? w.listing.seconds : null],
    ["seen", seen], ["pending", c.pending], ["submitted", c.submitted], ["done", c.done], ["failed", c.failed],
    ["lag_p50", w.lag_s.p50], ["lag_p95", w.lag_s.p95], ["jobs_submitted", w.jobs_submitted],
    ["takeovers", w.takeovers]];
}

function entryRow(e) {
  const tr = el("tr", null, {"data-key": e.key, class: e.state});
  const job = el("td", null, {"data-field": "job"});
  if (e.job_id) job.append(el("a", e.job_id, {href: "/jobs/" + e.job_id, class: "job"}));
  const changed = e.changed_at ? new Date(e.changed_at * 1000).toISOString().slice(0, 19).replace("T", " ") : "–";
  tr.append(el("td", e.key, {"data-field": "key"}), el("td", e.state, {"data-field": "state"}),
            el("td", changed, {"data-field": "changed_at"}),
            el("td", fmt(e.lag_s, 1), {class: "num", "data-field": "lag_s", "data-value": e.lag_s === null ? "" : e.lag_s}),
            el("td", e.reason || "", {"data-field": "reason"}), job);
  return tr;
}

function show(w) {
  $$("state").textContent = w.state;
  $$("paths").textContent = w.input + " → " + w.output;
  $$("summary").tBodies[0].replaceChildren(...fields(w).map(([key, value]) => {
    const tr = el("tr", null, {"data-field": key});
    tr.append(el("th", key.replace(/_/g, " ")), el("td", value === undefined || value === null ? "–" : value, {class: "num"}));
    return tr;
  }));
  const rows = w.entries || [];
  showEntries(rows);
  const seen = fields(w).find(([k]) => k === "seen")[1];
  $$("entries-note").textContent = rows.length < seen ? "the latest " + rows.length + " of " + seen +
    " keys to move (done, failed, submitted or seen)" : seen + " keys";
}

async function refresh() {
  try {
    const w = await api("/v1/watches/" + WATCH + "?entries=" + ROWS + "&order=recent");
    show(w);
    $$("error").textContent = "";
    document.body.dataset.loaded = "true";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    if (!ENDED.includes(w.state)) setTimeout(refresh, REFRESH_MS);
  } catch (e) {
    $$("error").textContent = e.message;
    document.body.dataset.loaded = document.body.dataset.loaded || "error";
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
</script></body></html>
""")
