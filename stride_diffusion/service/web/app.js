// The stride playground: plain DOM + fetch against the public API, charts drawn as SVG by hand.
// Generate streams (POST /generate/stream, Server-Sent Events read from fetch): the queue position,
// a step bar, previews as they arrive, then the images; Cancel aborts the fetch, which closes the
// stream, and the server cancels the work.
"use strict";

const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
const COMPARE_STEPS = [1, 2, 4, 8];
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
const DASHES = ["", "5 3", "2 2", "8 3 2 3"];

const state = { models: [], solvers: {}, observed: {}, hidden: {}, busy: false, abort: null };

// -- talking to the API ------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

// The API's own words: /generate's {"detail"}, the OpenAI route's {"error": {"message"}}, else the text.
async function failure(r) {
  let text = await r.text();
  try {
    const d = JSON.parse(text);
    if (d.detail !== undefined) text = typeof d.detail === "string" ? d.detail : JSON.stringify(d.detail);
    else if (d.error && d.error.message) text = d.error.message;
  } catch (_) { /* not JSON: keep the text */ }
  const retry = r.headers.get("Retry-After");
  return new ApiFailure(r.status, `${r.status} ${r.statusText}: ${text || "(no body)"}` +
                                  (retry ? ` (retry after ${retry} s)` : ""));
}

async function api(path, options = {}) {
  let r;
  try {
    r = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  } catch (e) {
    if (e.name === "AbortError") throw e;  // Cancel
    throw new ApiFailure(0, `cannot reach the server (${path}): ${e.message}`);
  }
  if (!r.ok) throw await failure(r);
  return r;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// -- the model's metadata ------------------------------------------------------------------------

const model = () => state.models.find((m) => m.name === $("model").value) || state.models[0];
const solvers = () => state.solvers[model().name];
const family = (name) => name.replace(/-nfe\d+$/, "");  // a learned solver fitted per step count

function qualityMetric(rows) {
  for (const k of ["fd_ratio", "fd", "rmse"]) if (rows.some((r) => Number.isFinite(r[k]))) return k;
  return null;
}

function formatQuality(metric, v) {
  if (!Number.isFinite(v)) return "";
  return metric === "fd_ratio" ? `${v.toFixed(2)}× reference FD` : `${metric.toUpperCase()} ${v.toPrecision(3)}`;
}

const METRIC_LABEL = { fd_ratio: "FD / reference FD (1 = as good)", fd: "FD (lower is better)", rmse: "RMSE vs reference" };

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

async function load() {
  clearError();
  try {
    const [m, s] = await Promise.all([api("/models").then((r) => r.json()), api("/solvers").then((r) => r.json())]);
    state.models = m.models;
    state.default = m.default;
    state.solvers = s.models;
  } catch (e) {
    showError(e.message);
    if (e.status === 401) $("auth").open = true;
    return;
  }
  const sel = $("model"), keep = sel.value;
  sel.replaceChildren(...state.models.map((x) => option(x.name, `${x.name} (${x.num_classes} classes, ${x.size})`)));
  sel.value = state.models.some((x) => x.name === keep) ? keep : state.default;
  selectModel();
  refreshLatency();
}

function selectModel() {
  const m = model();
  $("class-names").replaceChildren(...m.classes.map((c) => option(c, c)));
  if (!m.classes.includes($("class").value)) $("class").value = m.classes[Math.min(7, m.classes.length - 1)];
  $("class-hint").textContent = `type to search ${m.num_classes} class names, e.g. ${m.classes.slice(0, 3).join(", ")}`;
  const steps = $("steps");
  const prev = Number(steps.value);
  steps.replaceChildren(...m.steps.map((n) => option(n, String(n))));
  steps.value = String(m.steps.includes(prev) ? prev : m.default_steps);
  $("n").max = m.max_images;
  $("compare").textContent = `Compare ${COMPARE_STEPS.filter((n) => m.steps.includes(n)).join(", ")} steps`;
  state.hidden = {};
  state.colors = null;
  fillSolvers();
  drawQuality();
  drawLatency();
}

// Samplers fitted to one step count (learned tables) are offered only at that count.
function fillSolvers() {
  const m = model(), sv = solvers(), n = Number($("steps").value), sel = $("solver"), prev = sel.value;
  const metric = qualityMetric(sv.eval);
  const rows = sv.eval.filter((r) => r.nfe === n && sv.available.includes(r.solver) && Number.isFinite(r[metric]))
    .sort((a, b) => a[metric] - b[metric]);
  const auto = sv.steps[String(n)] || {};
  const autoQ = auto.quality && metric ? formatQuality(metric, auto.quality[metric]) : "";
  const opts = [option("auto", `auto → ${auto.solver || "?"}${autoQ ? ", " + autoQ : ""}`)];
  const measured = document.createElement("optgroup");
  measured.label = `measured at ${n} steps`;
  measured.append(...rows.map((r) => option(r.solver, `${r.solver} — ${formatQuality(metric, r[metric])}`)));
  const nfes = (name) => new Set(sv.eval.filter((r) => r.solver === name).map((r) => r.nfe));
  const other = sv.available.filter((s) => s !== "auto" && !rows.some((r) => r.solver === s) && nfes(s).size !== 1);
  const unmeasured = document.createElement("optgroup");
  unmeasured.label = "not measured at this count";
  unmeasured.append(...other.map((s) => option(s, s)));
  for (const g of [measured, unmeasured]) if (g.children.length) opts.push(g);
  sel.replaceChildren(...opts);
  sel.value = [...sel.options].some((o) => o.value === prev) ? prev : "auto";
  $("solver-hint").textContent = metric ? `quality: ${METRIC_LABEL[metric]}` : "no measurements for this model";
  fillGuidance();
  markSelected();
}

function resolvedSolver() {
  const v = $("solver").value;
  return v === "auto" ? (solvers().steps[$("steps").value] || {}).solver : v;
}

function fillGuidance() {
  const m = model(), g = $("guidance");
  const [lo, hi] = m.guidance_ranges[resolvedSolver()] || [0, 20];
  g.min = lo;
  g.max = hi;
  const v = Number(g.value);
  if (g.value === "" || !(v >= lo && v <= hi)) g.value = Math.min(hi, Math.max(lo, m.default_guidance));
  $("guidance-hint").textContent = `${lo} to ${hi} for ${resolvedSolver()}; 1 = no guidance`;
}

// -- generating ------------------------------------------------------------------------------------

function numberOrRaw(v) {  // the API names the problem with a value it cannot use, so send it as typed
  const t = v.trim();
  if (t === "") return undefined;
  return Number.isFinite(Number(t)) ? Number(t) : t;
}

function requestBody(overrides = {}) {
  const body = {
    model: model().name, class_label: $("class").value.trim(), steps: Number($("steps").value),
    solver: $("solver").value, guidance: numberOrRaw($("guidance").value), seed: numberOrRaw($("seed").value),
    n: numberOrRaw($("n").value), format: "json", ...overrides,
  };
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

function timings(headers, roundTrip) {
  return {
    solver: headers.get("X-Stride-Solver"), nfe: Number(headers.get("X-Stride-NFE")),
    queue: Number(headers.get("X-Stride-Queue-Ms")), compute: Number(headers.get("X-Stride-Compute-Ms")),
    seed: headers.get("X-Stride-Seed"), total: roundTrip,
  };
}

const ms = (v) => `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`;

async function post(body) {
  const t0 = performance.now();
  const r = await api("/generate", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await r.json();
  const t = timings(r.headers, performance.now() - t0);
  (state.observed[model().name] ||= []).push(t);
  return { data, t };
}

function figure(src, alt, captionNodes) {
  const f = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  const c = document.createElement("figcaption");
  c.append(...captionNodes);
  f.append(img, c);
  return f;
}

function setBusy(busy) {
  state.busy = busy;
  for (const id of ["generate", "compare"]) $(id).disabled = busy;
  document.querySelector(".output").setAttribute("aria-busy", String(busy));
}

// Server-Sent Events from a fetch response: [event, data] pairs as they arrive.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    for (let end = buf.indexOf("\n\n"); end >= 0; end = buf.indexOf("\n\n")) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) yield [name, JSON.parse(data.join("\n"))];
    }
  }
}

function showProgress(text, value) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  if (value === null) $("step-bar").removeAttribute("value");  // indeterminate while queued
  else $("step-bar").value = value;
}

// One figure per image: a dark square until the first preview, previews as they come, then the image.
function slots(n, seed) {
  const figs = [];
  for (let i = 0; i < n; i++) {
    const f = document.createElement("figure");
    const box = document.createElement("div");
    box.className = "pending";
    const c = document.createElement("figcaption");
    c.textContent = `seed ${seed + i} · waiting`;
    f.append(box, c);
    figs.push(f);
  }
  $("images").replaceChildren(...figs);
  return figs;
}

function show(fig, src, alt, caption, preview) {
  let img = fig.querySelector("img");
  if (!img) {
    img = document.createElement("img");
    fig.querySelector(".pending").replaceWith(img);
  }
  img.src = src;
  img.alt = alt;
  img.classList.toggle("preview", preview);
  fig.querySelector("figcaption").textContent = caption;
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  clearError();
  setBusy(true);
  const controller = new AbortController();
  state.abort = controller;
  $("cancel").disabled = false;
  const t0 = performance.now(), m = model();
  let figs = [], seed = 0, steps = 0;
  showProgress("sending", null);
  try {
    const r = await api("/generate/stream", {
      method: "POST", headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(requestBody({ format: "png", preview: true })), signal: controller.signal,
    });
    for await (const [name, d] of sseEvents(r)) {
      if (name === "queued") {
        seed = d.seed;
        steps = d.steps;
        figs = slots(d.n, d.seed);
        const wait = d.expected_wait_s ? `, about ${d.expected_wait_s.toFixed(1)} s` : "";
        showProgress(d.position ? `queued: ${d.position} ahead${wait}` : "queued: next", null);
      } else if (name === "started") {
        showProgress(`step 0 of ${steps}`, 0);
      } else if (name === "step") {
        showProgress(`step ${d.k} of ${d.n} · ${ms(d.elapsed_ms)}`, d.k / d.n);
      } else if (name === "preview") {
        show(figs[d.index], `data:${d.media_type};base64,${d.data}`, `preview of seed ${seed + d.index} at step ${d.k}`,
             `seed ${seed + d.index} · step ${d.k} of ${d.n}`, true);
      } else if (name === "image") {
        show(figs[d.index], `data:${d.media_type};base64,${d.data}`, `${m.classes[requestLabel(m)] ?? ""}, seed ${d.seed}, ${steps} steps`,
             `seed ${d.seed}`, false);
      } else if (name === "done") {
        const t = { solver: d.solver, nfe: d.nfe, queue: d.queue_ms, compute: d.compute_ms, seed: String(d.seeds[0]),
                    total: performance.now() - t0 };
        (state.observed[d.model] ||= []).push(t);
        showProgress(`done: ${steps} of ${steps} steps`, 1);
        $("status").textContent = `“${m.classes[d.class_label]}” · ${t.solver} · NFE ${t.nfe} · queue ${ms(t.queue)} · ` +
          `compute ${ms(t.compute)} · round trip ${ms(t.total)} · guidance ${d.guidance}`;
      } else if (name === "error") {
        throw new ApiFailure(d.status, `${d.status}: ${d.detail}`);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      showProgress("cancelled", $("step-bar").value);
      $("status").textContent = "Cancelled: the server stopped the work.";
    } else {
      $("progress").hidden = true;
      showError(e.message);
    }
  } finally {
    state.abort = null;
    $("cancel").disabled = true;
    setBusy(false);
  }
  drawLatency();
  refreshLatency();
}

function requestLabel(m) {  // the class typed, as the index the API resolves it to (name or number)
  const v = $("class").value.trim();
  return m.classes.includes(v) ? m.classes.indexOf(v) : Number(v);
}

// One request per step count, one after another, so that each latency is its own.
async function compare() {
  if (state.busy) return;
  clearError();
  if ($("seed").value.trim() === "") $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  const steps = COMPARE_STEPS.filter((n) => model().steps.includes(n));
  const row = $("compare-row");
  row.replaceChildren();
  $("comparison").hidden = false;
  setBusy(true);
  for (const n of steps) {
    try {
      const { data, t } = await post(requestBody({ steps: n, n: 1 }));
      const head = document.createElement("strong");
      head.textContent = `${n} step${n > 1 ? "s" : ""}`;
      row.append(figure("data:image/png;base64," + data.images[0], `${data.class_name}, seed ${data.seed}, ${n} steps`,
        [head, document.createElement("br"), `${t.solver}`, document.createElement("br"),
         `compute ${ms(t.compute)}`, document.createElement("br"), `queue ${ms(t.queue)} · total ${ms(t.total)}`]));
    } catch (e) {
      const f = document.createElement("figure");
      const c = document.createElement("figcaption");
      c.className = "failed";
      c.textContent = `${n} steps: ${e.message}`;
      f.append(c);
      row.append(f);
      showError(e.message);
    }
  }
  setBusy(false);
  drawLatency();
  refreshLatency();
}

// -- charts ------------------------------------------------------------------------------------------

function el(name, attrs = {}, text) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function niceLinearTicks(lo, hi) {
  const span = hi - lo || 1, step0 = Math.pow(10, Math.floor(Math.log10(span / 4)));
  const step = [1, 2, 5, 10].map((k) => k * step0).find((s) => span / s <= 5);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toPrecision(6));
  return out;
}

function logTicks(lo, hi) {
  const out = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++)
    for (const k of [1, 2, 5]) { const v = k * 10 ** e; if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v); }
  return out;
}

// series: [{name, color, dash, points: [[x, y, label]], dots?, selected?}]; x is a step count (log2 axis).
function drawChart(svg, series, { ylog, yLabel, ref, empty }) {
  const W = 420, H = 260, L = 50, R = 12, T = 12, B = 40;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => x > 0 && Number.isFinite(y) && (!ylog || y > 0));
  if (!pts.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, empty));
    return;
  }
  const xs = pts.map((p) => Math.log2(p[0])), ys = pts.map((p) => p[1]);
  const x0 = Math.min(0, ...xs), x1 = Math.max(x0 + 1, ...xs);
  let y0 = Math.min(...ys, ref ?? Infinity), y1 = Math.max(...ys, ref ?? -Infinity);
  if (ylog) { y0 = y0 / 1.2; y1 = y1 * 1.2; } else { y0 = 0; y1 = y1 * 1.1 || 1; }
  const fy = ylog ? Math.log10 : (v) => v;
  const X = (x) => L + (Math.log2(x) - x0) / (x1 - x0) * (W - L - R);
  const Y = (y) => H - B - (fy(y) - fy(y0)) / (fy(y1) - fy(y0)) * (H - T - B);
  for (let e = Math.ceil(x0); e <= x1; e++) {
    const x = X(2 ** e);
    svg.append(el("line", { class: "gridline", x1: x, x2: x, y1: T, y2: H - B }),
               el("text", { x, y: H - B + 14, "text-anchor": "middle" }, String(2 ** e)));
  }
  for (const v of ylog ? logTicks(y0, y1) : niceLinearTicks(y0, y1)) {
    const y = Y(v);
    svg.append(el("line", { class: "gridline", x1: L, x2: W - R, y1: y, y2: y }),
               el("text", { x: L - 4, y: y + 3, "text-anchor": "end" }, String(+v.toPrecision(3))));
  }
  svg.append(el("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }),
             el("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }),
             el("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "steps (model evaluations, NFE)"),
             el("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(T + H - B) / 2})` }, yLabel));
  if (ref !== undefined) svg.append(el("line", { class: "ref", x1: L, x2: W - R, y1: Y(ref), y2: Y(ref) }));
  for (const s of series) {
    const p = s.points.filter(([x, y]) => x > 0 && Number.isFinite(y) && (!ylog || y > 0)).sort((a, b) => a[0] - b[0]);
    if (!p.length) continue;
    const g = el("g", { "data-series": s.name });
    if (!s.dots && p.length > 1) {
      g.append(el("path", {
        class: "series" + (s.selected ? " selected" : ""), stroke: s.color, "stroke-dasharray": s.dash || "",
        d: p.map(([x, y], i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(""),
      }));
    }
    for (const [x, y, label] of p) {
      const c = el("circle", { cx: X(x).toFixed(1), cy: Y(y).toFixed(1), r: s.dots ? 2.5 : 2.2, fill: s.color,
                               "fill-opacity": s.dots ? 0.55 : 1 });
      c.append(el("title", {}, label || `${s.name}: ${x} steps, ${+y.toPrecision(3)}`));
      g.append(c);
    }
    svg.append(g);
  }
}

function qualitySeries() {
  const sv = solvers(), metric = qualityMetric(sv.eval);
  if (!metric) return { metric, series: [] };
  const fams = new Map();
  for (const r of sv.eval) {
    if (!Number.isFinite(r[metric]) || !Number.isFinite(r.nfe)) continue;
    const f = family(String(r.solver));
    if (!fams.has(f)) fams.set(f, []);
    fams.get(f).push([r.nfe, r[metric], `${r.solver}: ${r.nfe} steps, ${formatQuality(metric, r[metric])}`]);
  }
  const series = [...fams.keys()].map((name) => ({ name, points: fams.get(name) }));
  return { metric, series };
}

// By default: the families that are best at some step count, plus the plain baselines.
function defaultHidden(series, metric) {
  const best = {};
  for (const r of solvers().eval) {
    if (Number.isFinite(r[metric]) && !(best[r.nfe] && best[r.nfe][metric] <= r[metric])) best[r.nfe] = r;
  }
  const shown = new Set(["euler", "dpmpp-2m", ...Object.values(best).map((r) => family(String(r.solver)))]);
  return Object.fromEntries(series.map((s) => [s.name, !shown.has(s.name)]));
}

function drawQuality() {
  const { metric, series } = qualitySeries();
  if (!Object.keys(state.hidden).length) state.hidden = defaultHidden(series, metric);
  // colours: the families shown by default first, so that they get distinct solid lines
  const order = [...series.filter((s) => !state.hidden[s.name]), ...series.filter((s) => state.hidden[s.name])];
  state.colors ||= Object.fromEntries(order.map((s, i) => [s.name, i]));
  for (const s of series) {
    const i = state.colors[s.name] ?? series.indexOf(s);
    s.color = PALETTE[i % PALETTE.length];
    s.dash = DASHES[Math.floor(i / PALETTE.length) % DASHES.length];
  }
  const sel = family(resolvedSolver() || "");
  for (const s of series) s.selected = s.name === sel;
  drawChart($("quality-chart"), series.filter((s) => !state.hidden[s.name]), {
    ylog: true, yLabel: metric ? METRIC_LABEL[metric] : "", ref: metric === "fd_ratio" ? 1 : undefined,
    empty: "this model has no measured quality (eval.json)",
  });
  $("quality-legend").replaceChildren(...series.map((s) => {
    const b = document.createElement("button");
    b.type = "button";
    b.setAttribute("aria-pressed", String(!state.hidden[s.name]));
    const sw = el("svg", { viewBox: "0 0 14 10", "aria-hidden": "true" });
    sw.append(el("line", { x1: 0, x2: 14, y1: 5, y2: 5, stroke: s.color, "stroke-width": 3, "stroke-dasharray": s.dash }));
    b.append(sw, s.name);
    b.addEventListener("click", () => { state.hidden[s.name] = !state.hidden[s.name]; drawQuality(); });
    return b;
  }));
  $("quality-caption").textContent = metric
    ? `Measured quality per sampler family, from the model's evaluation (${METRIC_LABEL[metric]}; dashed: the reference). ` +
      "Learned solvers fitted per step count form one family."
    : "No measured quality for this model.";
}

function markSelected() { if (state.models.length) drawQuality(); }

// Server-wide means from the Prometheus histograms, and this page's own requests as dots.
state.server = {};

async function refreshLatency() {
  try {
    const text = await (await api("/metrics")).text();
    state.server = parseLatency(text);
    state.serverError = "";
  } catch (e) {
    state.serverError = e.message;
  }
  drawLatency();
}

function parseLatency(text) {
  const acc = {};  // model -> metric -> steps -> {sum, count}
  const re = /^stride_(compute_seconds|request_duration_seconds)_(sum|count)\{([^}]*)\}\s+(\S+)$/;
  for (const line of text.split("\n")) {
    const m = re.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...m[3].matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    const slot = ((acc[labels.model] ||= {})[m[1]] ||= {})[labels.steps] ||= { sum: 0, count: 0 };
    slot[m[2]] += Number(m[4]);
  }
  return acc;
}

function drawLatency() {
  if (!state.models.length) return;
  const name = model().name, server = state.server[name] || {}, mine = state.observed[name] || [];
  const mean = (metric) => Object.entries(server[metric] || {}).filter(([, v]) => v.count > 0)
    .map(([n, v]) => [Number(n), 1000 * v.sum / v.count, `server mean: ${n} steps, ${ms(1000 * v.sum / v.count)} over ${v.count} requests`]);
  const series = [
    { name: "server mean compute", color: PALETTE[0], points: mean("compute_seconds") },
    { name: "server mean end to end", color: PALETTE[3], dash: "5 3", points: mean("request_duration_seconds") },
    { name: "this page: compute", color: PALETTE[0], dots: true,
      points: mine.map((t) => [t.nfe, t.compute, `${t.solver}: ${t.nfe} steps, compute ${ms(t.compute)}`]) },
    { name: "this page: round trip", color: PALETTE[2], dots: true,
      points: mine.map((t) => [t.nfe, t.total, `${t.solver}: ${t.nfe} steps, round trip ${ms(t.total)}`]) },
  ];
  drawChart($("latency-chart"), series, { ylog: false, yLabel: "milliseconds", empty: "no requests yet" });
  $("latency-caption").textContent = "Observed latency: lines are the server's means per step count (/metrics: " +
    "blue compute, orange dashed end to end); dots are this page's requests (blue compute, green round trip)." +
    (state.serverError ? ` Server metrics unavailable: ${state.serverError}` : "");
}

// -- wiring --------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("controls").addEventListener("submit", generate);
  $("compare").addEventListener("click", compare);
  $("cancel").addEventListener("click", () => { if (state.abort) state.abort.abort(); });
  $("model").addEventListener("change", selectModel);
  $("steps").addEventListener("change", fillSolvers);
  $("solver").addEventListener("change", () => { fillGuidance(); markSelected(); });
  $("reseed").addEventListener("click", () => { $("seed").value = String(Math.floor(Math.random() * 2 ** 31)); });
  $("key").addEventListener("change", load);
  load();
});
