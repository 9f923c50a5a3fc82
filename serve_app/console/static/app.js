// The serve-router operator console: plain JS, no build step, no outside files.
// Every URL is relative (the page may sit under a path prefix); the admin token is kept for
// this tab only (sessionStorage) and sent as the admin API's bearer token.
"use strict";

const TOKEN_KEY = "serve-router-admin-token";
const POLL_MS = { overview: 2000, adapters: 5000 };
const $ = (sel) => document.querySelector(sel);

// --- small DOM helper: text is always set as text, never parsed as HTML -------------------
function h(tag, attrs, ...children) {
  const el = document.createElementNS(
    tag === "svg" || tag === "polyline" || tag === "text" || tag === "line"
      ? "http://www.w3.org/2000/svg"
      : "http://www.w3.org/1999/xhtml",
    tag,
  );
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// --- the admin API ---------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const resp = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (resp.status === 401 || resp.status === 403) {
    signOut("The admin token was refused.");
    throw new ApiError(resp.status, "signed out");
  }
  if (options.raw) return resp;
  const doc = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, (doc.error && doc.error.message) || resp.statusText);
  return doc;
}

// --- formatting and charts -------------------------------------------------------------------
const fmt = {
  num: (v, d = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(d).replace(/\.0+$/, "")),
  pct: (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`),
  ms: (v) => (v === null || v === undefined ? "–" : `${Math.round(v * 1000)} ms`),
  time: (t) => (t ? new Date(t * 1000).toLocaleString() : "–"),
};

// A small line chart of one or two series (null: no value at that point), right-aligned in
// `slots` points so that a young series does not stretch over the whole window.
function chart(title, series, format, slots = 0) {
  const w = 220, hgt = 60, colors = ["#0b5cad", "#cf222e"];
  const values = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const top = Math.max(...values, 0);
  const max = top || 1;
  const svg = h("svg", { class: "chart", width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}` });
  series.forEach((s, i) => {
    const n = Math.max(s.values.length, slots);
    const skip = n - s.values.length;
    const pts = s.values
      .map((v, j) => (v === null || v === undefined ? null
        : `${(((j + skip) / Math.max(n - 1, 1)) * (w - 2) + 1).toFixed(1)},${(hgt - 2 - (v / max) * (hgt - 14)).toFixed(1)}`))
      .filter(Boolean);
    if (pts.length) svg.append(h("polyline", { points: pts.join(" "), stroke: colors[i] }));
  });
  svg.append(h("text", { x: 3, y: 10, "font-size": 9, fill: "#6b7385" }, `max ${format(top)}`));
  const last = series.map((s) => format(s.values.length ? s.values[s.values.length - 1] : null));
  const legend = series.map((s, i) => `${s.label} ${last[i]}`.trim()).join(" · ");
  return h("figure", {}, svg, h("figcaption", {}, `${title}: ${legend}`));
}

// --- views: each has one poll (or none) while it is shown ------------------------------------
let timer = null;
let generation = 0;

const views = {
  async overview(root) {
    const doc = await api("api/v1/overview");
    const series = doc.series.models || {};
    const slots = Math.round(900 / doc.series.interval_s); // the last 15 minutes
    const out = [];
    for (const [type, models] of Object.entries(doc.types)) {
      for (const [model, providers] of Object.entries(models)) {
        const s = series[model];
        const rows = providers.map((p) => {
          const state = providerState(p);
          return h("tr", { "data-provider": p.provider },
            h("td", {}, p.provider), h("td", {}, p.api_type),
            h("td", {}, h("span", { class: `badge ${state.cls}`, "data-state": state.cls }, state.text),
              p.reason ? h("div", { class: "muted" }, p.reason) : null),
            h("td", {}, fmt.num(p.in_flight, 0)), h("td", {}, fmt.num(p.running)),
            h("td", {}, fmt.num(p.waiting)), h("td", {}, fmt.pct(p.kv_usage)));
        });
        out.push(h("section", { class: "card", "data-model": model },
          h("h2", {}, model, " ", h("span", { class: "muted" }, `${type} · charts: last 15 minutes`)),
          h("table", {},
            h("tr", {}, ["provider", "type", "state", "in flight", "running", "waiting", "KV use"]
              .map((c) => h("th", {}, c))),
            rows),
          s ? h("div", { class: "charts" },
            chart("requests/s", [{ label: "", values: s.rps }], (v) => fmt.num(v, 2), slots),
            chart("5xx share", [{ label: "", values: s.error_rate }], fmt.pct, slots),
            chart("latency", [{ label: "p50", values: s.p50 }, { label: "p99", values: s.p99 }], fmt.ms, slots),
            chart("TTFT", [{ label: "p50", values: s.ttft_p50 }, { label: "p99", values: s.ttft_p99 }], fmt.ms, slots))
            : h("p", { class: "muted" }, "no traffic in the last 15 minutes")));
      }
    }
    root.replaceChildren(...out);
  },

  async adapters(root) {
    const doc = await api("api/v1/adapters");
    if (!doc.data.length) {
      root.replaceChildren(h("p", { class: "muted" }, "No LoRA adapters registered."));
      return;
    }
    root.replaceChildren(...doc.data.map((a) => h("section", { class: "card", "data-adapter": a.name },
      h("h2", {}, a.name, " ", h("span", { class: "muted" }, `on ${a.base_model}, version ${a.version}`)),
      a.retiring_versions.length
        ? h("p", { class: "half_open" }, `Rolling update in progress: retiring version(s) ${a.retiring_versions.join(", ")}`)
        : null,
      h("p", { class: "muted" }, `source ${a.source} · created ${fmt.time(a.created)}`),
      h("table", {}, h("tr", {}, ["provider", "status", "versions loaded"].map((c) => h("th", {}, c))),
        a.providers.map((p) => h("tr", {}, h("td", {}, p.provider), h("td", {}, p.status),
          h("td", {}, (p.loaded_versions || []).join(", ") || p.detail || "–")))))));
  },

  async keys(root) {
    const created = h("div", { id: "created-key" });
    const form = keyForm({}, "Create key", async (body) => {
      const made = await api("api/v1/keys", { method: "POST", body });
      created.replaceChildren(h("div", { class: "card" },
        h("p", {}, `Key ${made.name} made. Copy it now: it is shown this once.`),
        h("div", { class: "secret", "data-secret": "" }, made.key)));
      await refreshList();
    });
    const list = h("div", {});
    const detail = h("div", {});
    async function refreshList() {
      const keys = (await api("api/v1/keys")).data;
      list.replaceChildren(h("table", {},
        h("tr", {}, ["name", "id", "models", "rpm", "tpm", "budget", "expires", ""].map((c) => h("th", {}, c))),
        keys.map((k) => keyRow(k, detail, refreshList))));
    }
    await refreshList();
    root.replaceChildren(h("section", { class: "card" }, h("h2", {}, "New key"), form, created),
      h("section", { class: "card" }, h("h2", {}, "Keys"), list), detail);
  },

  async provisioning(root) {
    const doc = await api("api/v1/models");
    const results = h("table", { id: "provision-results" });
    const log = h("div", { class: "log", id: "provision-log" });
    const roles = Object.entries(doc.roles);
    const run = h("button", { class: "primary", type: "button" }, "Ensure models");
    run.addEventListener("click", async () => {
      run.disabled = true;
      log.replaceChildren();
      results.replaceChildren(h("tr", {}, ["role", "model", "provider", "action", "detail"].map((c) => h("th", {}, c))));
      try {
        await streamProvision((event) => {
          if (event.event === "status") {
            results.append(h("tr", { "data-action": event.action }, h("td", {}, event.role), h("td", {}, event.name),
              h("td", {}, event.provider_id || event.provider), h("td", {}, event.action), h("td", {}, event.detail || "")));
          }
          const what = event.event === "progress" ? `${event.status || ""} ${event.completed || ""}/${event.total || ""}`
            : event.event === "done" ? `done: ${event.statuses.length} status line(s)`
              : `${event.action || ""} ${event.detail || event.name || ""}`;
          log.append(h("div", { "data-event": event.event }, `${event.event} ${event.role || ""} ${event.provider_id || ""} ${what}`));
          log.scrollTop = log.scrollHeight;
        });
      } catch (err) {
        log.append(h("div", { class: "error" }, err.message));
      } finally {
        run.disabled = false;
      }
    });
    root.replaceChildren(h("section", { class: "card" },
      h("h2", {}, "Profile ", h("span", { "data-profile": "" }, doc.active_profile || "–")),
      h("p", { class: "muted" }, `profiles: ${doc.profiles.join(", ") || "none"} · ${doc.source || "no profiles file"}`),
      h("table", {}, h("tr", {}, ["role", "model", "provider", "served by", "auto download"].map((c) => h("th", {}, c))),
        roles.map(([key, r]) => h("tr", {}, h("td", {}, key), h("td", {}, r.name), h("td", {}, r.provider),
          h("td", {}, r.model || "– (no configured model)"), h("td", {}, r.auto_download ? "yes" : "no"))))),
    h("section", { class: "card" }, h("h2", {}, "Ensure"), run,
      h("p", { class: "muted" }, "Per provider: whether each role's model is present (exists) or was pulled now."),
      results, log));
  },

  async config(root) {
    const doc = await api("api/v1/config");
    const outcome = h("p", { id: "reload-result" });
    const reload = h("button", { class: "primary", type: "button" }, "Reload from file");
    reload.addEventListener("click", async () => {
      outcome.className = "";
      outcome.textContent = "reloading…";
      try {
        const r = await api("api/v1/config/reload", { method: "POST" });
        outcome.textContent = `version ${r.version}${r.changed ? ", changed" : ", unchanged"}`
          + (r.needs_redeploy.length ? `; needs redeploy: ${r.needs_redeploy.join(", ")}` : "");
      } catch (err) {
        outcome.className = "error";
        outcome.textContent = err.message.split("\n")[0];
      }
    });
    root.replaceChildren(h("section", { class: "card" },
      h("h2", {}, `Models config, version ${doc.version}`),
      h("p", { class: "muted" }, doc.source), reload, outcome,
      h("pre", { id: "config-json" }, JSON.stringify(doc.config, null, 2))),
    h("section", { class: "card" }, h("h2", {}, "Replicas"),
      h("table", {}, Object.entries(doc.replicas).map(([id, v]) => h("tr", {}, h("td", {}, id), h("td", {}, `version ${v}`))))));
  },
};

function providerState(p) {
  if (p.circuit === "open") return { cls: "open", text: "circuit open" };
  if (p.circuit === "half_open") return { cls: "half_open", text: "half-open" };
  if (p.probe_up === false) return { cls: "down", text: "probe failing" };
  if (p.tier === "sleeping") return { cls: "sleeping", text: "sleeping (healthy)" };
  return { cls: "healthy", text: p.probe_up === null ? "not probed yet" : "healthy" };
}

const LIMIT_FIELDS = [
  ["rpm_limit", "requests/min"], ["tpm_limit", "tokens/min"], ["token_budget", "token budget"],
];

// The create and edit form: name, models, limits, budget period.
function keyForm(key, label, submit) {
  const input = (name, value, attrs = {}) => h("input", { name, value: value ?? "", ...attrs });
  const period = h("select", { name: "budget_period" },
    ["", "1h", "1d", "30d"].map((p) => h("option", { value: p, selected: (key.budget_period || "") === p }, p || "whole life")));
  const error = h("span", { class: "error" });
  const form = h("form", { class: "inline" },
    h("label", {}, "name", input("name", key.name, { required: true })),
    h("label", {}, "models (comma-separated, empty: all)", input("models", (key.models || []).join(", "))),
    LIMIT_FIELDS.map(([f, text]) => h("label", {}, text, input(f, key[f], { type: "number", min: 1 }))),
    h("label", {}, "budget period", period),
    h("button", { class: "primary", type: "submit" }, label), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const data = new FormData(form);
    const models = String(data.get("models")).split(",").map((m) => m.trim()).filter(Boolean);
    const body = { name: data.get("name"), models: models.length ? models : null };
    for (const [f] of LIMIT_FIELDS) body[f] = data.get(f) ? Number(data.get(f)) : null;
    body.budget_period = data.get("budget_period") || null;
    for (const f of ["priority", "weight", "set_priority", "max_priority", "default_max_tokens", "expires_at"]) if (key[f] !== undefined) body[f] = key[f];
    try {
      await submit(body);
    } catch (err) {
      error.textContent = err.message;
    }
  });
  return form;
}

function keyRow(k, detail, refresh) {
  const revoke = h("button", { class: "danger", type: "button" }, "Revoke");
  revoke.addEventListener("click", async () => {
    if (revoke.dataset.armed === undefined) {
      revoke.dataset.armed = "";
      revoke.textContent = "Confirm revoke";
      return;
    }
    await api(`api/v1/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
    detail.replaceChildren();
    await refresh();
  });
  const usage = h("button", { type: "button" }, "Usage");
  usage.addEventListener("click", () => showUsage(k, detail, "1h"));
  const edit = h("button", { type: "button" }, "Edit");
  edit.addEventListener("click", () => {
    detail.replaceChildren(h("section", { class: "card" }, h("h2", {}, `Edit ${k.name}`),
      keyForm(k, "Save", async (body) => {
        await api(`api/v1/keys/${encodeURIComponent(k.id)}`, { method: "PUT", body });
        detail.replaceChildren();
        await refresh();
      })));
  });
  return h("tr", { "data-key": k.id }, h("td", {}, k.name), h("td", { class: "muted" }, k.id),
    h("td", {}, (k.models || ["all"]).join(", ")),
    h("td", {}, k.rpm_limit ?? "–"), h("td", {}, k.tpm_limit ?? "–"),
    h("td", {}, k.token_budget ? `${k.token_budget} / ${k.budget_period || "life"}` : "–"),
    h("td", {}, fmt.time(k.expires_at)), h("td", {}, usage, " ", edit, " ", revoke));
}

async function showUsage(k, detail, window) {
  const doc = await api(`api/v1/keys/${encodeURIComponent(k.id)}/usage?window=${window}`);
  const pick = h("select", {}, ["1h", "1d", "30d"].map((w) => h("option", { value: w, selected: w === window }, w)));
  pick.addEventListener("change", () => showUsage(k, detail, pick.value));
  const models = Object.entries(doc.models);
  const per = { 60: "minute", 3600: "hour", 86400: "day" }[doc.bucket_s];
  detail.replaceChildren(h("section", { class: "card", "data-usage": k.id },
    h("h2", {}, `Usage of ${k.name} `, pick),
    models.length ? h("div", { class: "charts" }, models.flatMap(([m, u]) => [
      chart(`${m}: requests per ${per}`, [{ label: "", values: u.requests }], (v) => fmt.num(v, 0)),
      chart(`${m}: tokens per ${per}`,
        [{ label: "prompt", values: u.prompt }, { label: "completion", values: u.completion }], (v) => fmt.num(v, 0))]))
      : h("p", { class: "muted" }, "No usage in this window.")));
}

// `POST api/v1/models/provision?stream=true`: one JSON event per line, as it happens.
async function streamProvision(onEvent) {
  const resp = await api("api/v1/models/provision?stream=true", { method: "POST", body: {}, raw: true });
  if (!resp.ok) {
    const doc = await resp.json().catch(() => ({}));
    throw new ApiError(resp.status, (doc.error && doc.error.message) || resp.statusText);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      if (line.trim()) onEvent(JSON.parse(line));
    }
  }
}

// --- navigation ------------------------------------------------------------------------------
async function show() {
  const name = (location.hash || "#overview").slice(1);
  const view = views[name] ? name : "overview";
  const mine = ++generation;
  clearTimeout(timer);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  const root = $("#view");
  root.replaceChildren(h("p", { class: "muted" }, "loading…"));
  root.dataset.view = view;
  const tick = async () => {
    if (mine !== generation) return;
    try {
      await views[view](root);
      $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (mine === generation && err.status !== 401 && err.status !== 403) {
        $("#status").textContent = `error: ${err.message}`;
      }
    }
    if (POLL_MS[view] && mine === generation) timer = setTimeout(tick, POLL_MS[view]);
  };
  await tick();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  generation++;
  clearTimeout(timer);
  $("#view").replaceChildren();
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

$("#login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  $("#token").value = "";
  try {
    await api("api/v1/config");
  } catch (err) {
    if (err.status !== 401 && err.status !== 403) signOut(err.message);
    return;
  }
  start();
});
$("#logout").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", show);

function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  show();
}

if (sessionStorage.getItem(TOKEN_KEY)) start();
else signOut("");
