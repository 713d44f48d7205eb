// lupool status page: polls the API (GET /v1/status, /v1/lus, /v1/events)
// with the admin token, as the CLI does. No build step, no dependencies.
"use strict";

const state = { token: "", afterSeq: null, renders: 0, firstSeen: {}, feed: [] };

function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("lupool-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("lupool-token") || "";
}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + state.token }, cache: "no-store" });
  if (r.status === 401) {
    sessionStorage.removeItem("lupool-token");
    showLogin("the admin token was refused");
    throw new Error("unauthorized");
  }
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r;
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function bar(fraction, warn, crit) {
  const b = el("span", { class: "bar", title: (100 * fraction).toFixed(1) + "%" }, el("i"));
  b.firstChild.style.width = Math.min(100, 100 * fraction) + "%";
  if (warn) { const w = el("b"); w.style.left = warn + "%"; b.append(w); }
  if (crit) { const c = el("b", { class: "crit" }); c.style.left = crit + "%"; b.append(c); }
  return b;
}

function renderNodes(st) {
  document.getElementById("primary").textContent = "primary: " + (st.primary || "none (no quorum)");
  const tb = document.querySelector("#nodes tbody");
  tb.replaceChildren();
  for (const n of st.nodes || []) {
    const p = n.pool;
    const used = p && p.capacity_bytes ? (p.capacity_bytes - p.free_bytes) / p.capacity_bytes : 0;
    const th = p && p.thresholds ? p.thresholds : {};
    const role = (n.leader ? "primary" : "follower") + (n.voter ? "" : " (non-voter)");
    tb.append(el("tr", { "data-node": n.id },
      el("td", {}, n.id),
      el("td", { class: "state-" + n.state }, n.state + (n.error ? ": " + n.error : "")),
      el("td", {}, role),
      el("td", {}, p ? bar(used, th.warn_percent, th.critical_percent) : "", p ? " " + (100 * used).toFixed(1) + "% of " + bytes(p.capacity_bytes) : ""),
      el("td", { class: "level-" + (p ? p.level : "") }, p ? p.level : "?"),
      el("td", {}, n.api_addr || "")));
  }
  const s = st.pool || {};
  const used = s.capacity_bytes ? (s.capacity_bytes - s.free_bytes) / s.capacity_bytes : 0;
  document.getElementById("pool").replaceChildren(
    el("span", { class: "level-" + s.level }, "level " + (s.level || "?")), " · ",
    bar(used), " " + bytes(s.capacity_bytes - s.free_bytes) + " used of " + bytes(s.capacity_bytes || 0),
    " · " + bytes(s.provisioned_bytes || 0) + " provisioned · LUs: " + (st.lus ? st.lus.total + " (" + st.lus.healthy +
      " healthy, " + st.lus.resyncing + " resyncing, " + st.lus.degraded + " degraded)" : "?"));
}

function renderLUs(lus) {
  const tb = document.querySelector("#lus tbody");
  tb.replaceChildren();
  for (const lu of lus || []) {
    if (!(lu.name in state.firstSeen)) state.firstSeen[lu.name] = state.renders;
    const copies = el("td");
    for (const r of lu.replicas || []) {
      const c = el("span", { class: "copy state-" + r.state, "data-copy": r.node, "data-state": r.state }, r.node + " " + r.state);
      if (r.dirty_bytes !== undefined && r.state !== "in-sync") {
        c.append(" ", bar(lu.size_bytes ? 1 - r.dirty_bytes / lu.size_bytes : 0), " " + bytes(r.dirty_bytes) + " to send");
      }
      copies.append(c);
    }
    tb.append(el("tr", { "data-lu": lu.name, "data-first-render": state.firstSeen[lu.name] },
      el("td", {}, lu.name), el("td", {}, bytes(lu.size_bytes)), el("td", {}, lu.writer), el("td", {}, lu.epoch), copies));
  }
}

async function pollEvents() {
  const q = state.afterSeq === null ? "tail=50" : "after=" + state.afterSeq;
  const r = await api("/v1/events?follow=false&" + q);
  const text = await r.text();
  const feed = document.getElementById("feed");
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const ev = JSON.parse(line);
    state.afterSeq = ev.seq;
    const details = Object.entries(ev.details || {}).map(([k, v]) => k + "=" + v).join(" ");
    feed.prepend(el("li", { "data-seq": ev.seq, "data-kind": ev.kind, value: ev.seq },
      ev.time.replace(/\.\d+/, "") + " " + ev.kind + (ev.lu ? " lu=" + ev.lu : "") + (ev.node ? " node=" + ev.node : "") + " " + details));
  }
  if (state.afterSeq === null) state.afterSeq = 0;
  while (feed.children.length > 300) feed.lastChild.remove();
}

async function tick() {
  try {
    const [st, lus] = await Promise.all([api("/v1/status").then(r => r.json()), api("/v1/lus").then(r => r.json())]);
    state.renders++;
    renderNodes(st);
    renderLUs(lus);
    await pollEvents();
    // One line per render on the console: what the page shows (headless
    // tests read it with --enable-logging=stderr).
    const shown = { render: state.renders, primary: st.primary, nodes: (st.nodes || []).map(n => n.id + ":" + n.state), lus: {}, seq: state.afterSeq };
    for (const lu of lus || []) shown.lus[lu.name] = Object.fromEntries((lu.replicas || []).map(r => [r.node, r.state]));
    console.log("lupool-ui " + JSON.stringify(shown));
    const u = document.getElementById("updated");
    u.textContent = "updated " + new Date().toLocaleTimeString();
    u.dataset.renders = state.renders;
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = String(e.message || e);
  }
  if (state.token) setTimeout(tick, 1000);
}

function showLogin(msg) {
  state.token = "";
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("error").textContent = msg || "";
}

document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  sessionStorage.setItem("lupool-token", document.getElementById("token").value.trim());
  start();
});

function start() {
  state.token = takeToken();
  if (!state.token) return showLogin("");
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  tick();
}

start();
