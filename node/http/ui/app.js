// Aquila dashboard. Plain browser JavaScript, no build step, no dependencies: it reads this
// node's public API every few seconds and draws members, shards, moves and collections.
// Everything from the API is put in the page as text (textContent), never as HTML.
"use strict";

const REFRESH_MS = 3000;
const KEY_STORE = "aquila.apiKey"; // sessionStorage: the key lives as long as the tab
const MATRIX_MAX_SHARDS = 64; // wider collections show replicas per node as counts only

// -- small helpers --------------------------------------------------------------------------
const $ = (sel) => document.querySelector(sel);
const enc = encodeURIComponent;
const fmt = new Intl.NumberFormat("en-US");

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function badge(kind, text) {
  return h("span", { class: `badge ${kind}`, text });
}

// -- the API, with the key prompt ----------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let keyPrompt = null; // one prompt shared by every request that met a 401

function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dialog = $("#key-dialog");
    $("#key-message").textContent = message;
    const input = $("#key-input");
    input.value = "";
    const done = (ev) => {
      ev.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      $("#key-form").removeEventListener("submit", done);
      dialog.close();
      keyPrompt = null;
      updateKeyButton();
      resolve();
    };
    $("#key-form").addEventListener("submit", done);
    // Escape would leave the page without data: the prompt stays until a key is given.
    dialog.addEventListener("cancel", (ev) => ev.preventDefault(), { once: true });
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

async function api(path, { method = "GET", body } = {}) {
  for (;;) {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method,
      headers,
      cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (resp.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      await askForKey(key ? "That key was refused. Enter the node's API key (or read key)."
        : "This node needs an API key (or its read key).");
      continue;
    }
    const data = await resp.json().catch(() => null);
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || "error", err.message || resp.statusText);
    }
    return data;
  }
}

function updateKeyButton() {
  $("#forget-key").hidden = !sessionStorage.getItem(KEY_STORE);
}

// -- drawing --------------------------------------------------------------------------------
function replicasHeld(shardMap) {
  const held = new Map();
  for (const shards of Object.values(shardMap)) {
    for (const s of shards) {
      for (const node of s.replicas) held.set(node, (held.get(node) || 0) + 1);
    }
  }
  return held;
}

function drawHeader(cluster, shards) {
  $("#node-id").textContent = cluster.node.id;
  $("#node-addr").textContent = cluster.node.addr;
  $("#epoch").textContent = String(Math.max(cluster.epoch, shards.epoch));
}

function drawTiles(cluster, colls, moves) {
  const alive = cluster.members.filter((m) => m.state === "alive").length;
  const total = cluster.members.filter((m) => m.state !== "left").length;
  const tile = $("#tile-members");
  tile.textContent = `${alive} / ${total}`;
  tile.className = "tile-value" + (alive < total ? (alive * 2 <= total ? " bad" : " warn") : "");
  $("#tile-collections").textContent = fmt.format(colls.length);
  $("#tile-documents").textContent = fmt.format(colls.reduce((n, c) => n + c.count, 0));
  $("#tile-moves").textContent = moves.length ? fmt.format(moves.length) : "none";
}

function drawMembers(cluster, shardMap) {
  const held = replicasHeld(shardMap);
  const rows = cluster.members.map((m) =>
    h("tr", { "data-member": m.id },
      h("td", { class: "mono" }, m.id, m.id === cluster.node.id ? h("span", { class: "me", text: "this node" }) : null),
      h("td", { class: "mono dim", text: m.addr }),
      h("td", {}, h("span", { class: `badge state state-${m.state}`, text: m.state })),
      h("td", { class: "num", text: fmt.format(m.incarnation) }),
      h("td", { class: "num held", text: fmt.format(held.get(m.id) || 0) })));
  $("#members tbody").replaceChildren(...rows);
}

function indexBadges(coll) {
  const counts = {};
  for (const s of coll.shard_states) counts[s.index_state] = (counts[s.index_state] || 0) + 1;
  return ["trained", "training", "buffering"].filter((st) => counts[st]).map((st) =>
    badge(`idx-${st}`, coll.shard_states.length > 1 ? `${st} ${counts[st]}/${coll.shard_states.length}` : st));
}

function drawCollections(colls) {
  const rows = colls.map((c) =>
    h("tr", { "data-collection": c.name },
      h("td", { class: "mono name", text: c.name }),
      h("td", { class: "num count", text: fmt.format(c.count) }),
      h("td", { class: "index" }, indexBadges(c)),
      h("td", { class: "dim", text: `${c.shards} × ${c.replication}` }),
      h("td", { class: "dim", text: `${c.dim}-d ${c.metric}, ${c.index.type}` })));
  $("#collections tbody").replaceChildren(...rows);
  $("#no-collections").hidden = colls.length > 0;
}

function allMoves(shardMap) {
  const moves = [];
  for (const [name, shards] of Object.entries(shardMap)) {
    for (const s of shards) if (s.moving) moves.push({ collection: name, shard: s.shard, ...s.moving });
  }
  return moves;
}

function drawShards(cluster, shardMap, colls) {
  const states = new Map(cluster.members.map((m) => [m.id, m.state]));
  const nodes = cluster.members.filter((m) => m.state !== "left").map((m) => m.id);
  const byName = new Map(colls.map((c) => [c.name, c]));
  const blocks = [];
  const names = Object.keys(shardMap).sort();
  if (names.length) {
    blocks.push(h("div", { class: "legend" },
      h("span", {}, h("span", { class: "cell held first" }), "first replica (asked first)"),
      h("span", {}, h("span", { class: "cell held" }), "replica"),
      h("span", {}, h("span", { class: "cell move-from" }), "moving away"),
      h("span", {}, h("span", { class: "cell move-to" }), "move target")));
  }
  for (const name of names) {
    const shards = shardMap[name];
    const coll = byName.get(name);
    const title = h("div", { class: "coll-title" }, h("span", { class: "mono", text: name }),
      h("span", { class: "dim", text: `${shards.length} shard${shards.length === 1 ? "" : "s"}` +
        (coll ? ` × ${coll.replication}` : "") }));
    const wide = shards.length > MATRIX_MAX_SHARDS;
    const head = h("tr", {}, h("th", {}),
      wide ? h("th", { text: "replicas" }) : shards.map((s) => h("th", { class: "shard", text: s.shard })),
      wide ? null : h("th", {}));
    const body = nodes.map((node) => {
      const down = states.get(node) !== "alive";
      let count = 0;
      const cells = shards.map((s) => {
        const pos = s.replicas.indexOf(node);
        let cls = "cell";
        let tip = `${name}/${s.shard} on ${node}`;
        if (pos >= 0) {
          count += 1;
          cls += " held" + (pos === 0 ? " first" : "");
          tip += pos === 0 ? ": first replica" : ": replica";
        }
        if (s.moving && s.moving.from === node) { cls += " move-from"; tip += `: moving to ${s.moving.to}`; }
        if (s.moving && s.moving.to === node) {
          cls += " move-to";
          tip += `: receiving from ${s.moving.from || "(new replica)"}, ${Math.round(s.moving.progress * 100)}%`;
        }
        if (down) cls += " down";
        return h("td", {}, h("div", { class: cls, title: tip }));
      });
      return h("tr", { "data-node": node },
        h("th", { class: "node", text: node }),
        wide ? h("td", { class: "total", text: `${count}` }) : [cells, h("td", { class: "total", text: `${count}` })]);
    });
    blocks.push(h("div", { class: "coll-block", "data-shards": name }, title,
      h("table", { class: "matrix" }, h("thead", {}, head), h("tbody", {}, body))));
  }
  if (!names.length) blocks.push(h("p", { class: "empty", text: "No collections, so no shards." }));
  $("#shards").replaceChildren(...blocks);
}

function drawMoves(moves) {
  if (!moves.length) {
    $("#moves").replaceChildren(h("p", { class: "empty", text: "No shard moves under way." }));
    return;
  }
  $("#moves").replaceChildren(...moves.map((m) => {
    const bar = h("progress", { max: "1" });
    bar.value = m.progress;
    return h("div", { class: "move", "data-move": `${m.collection}/${m.shard}` },
      h("span", { class: "mono", text: `${m.collection} / shard ${m.shard}` }),
      bar,
      h("span", { class: "mono dim", text: `${m.from || "(new)"} → ${m.to}` }),
      h("span", { class: "num", text: `${Math.round(m.progress * 100)}%` }));
  }));
}

function drawCollectionChoices(colls) {
  const select = $("#search-collection");
  const current = select.value;
  const names = colls.map((c) => c.name).sort();
  const have = [...select.options].map((o) => o.value);
  if (names.join("\n") === have.join("\n")) return;
  select.replaceChildren(...names.map((n) => h("option", { value: n, text: n })));
  if (names.includes(current)) select.value = current;
}

function setStatus(ok, text) {
  $("#status").className = "status " + (ok ? "ok" : "error");
  $("#status-text").textContent = text;
}

let refreshing = false;

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const [cluster, shards, listed] = await Promise.all([
      api("/v1/cluster"), api("/v1/cluster/shards"), api("/v1/collections")]);
    const colls = listed.collections.slice().sort((a, b) => a.name.localeCompare(b.name));
    const moves = allMoves(shards.collections);
    drawHeader(cluster, shards);
    drawTiles(cluster, colls, moves);
    drawMembers(cluster, shards.collections);
    drawCollections(colls);
    drawShards(cluster, shards.collections, colls);
    drawMoves(moves);
    drawCollectionChoices(colls);
    document.body.dataset.updated = String(Date.now());
    setStatus(true, `updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    setStatus(false, `cannot reach the node: ${err.message}`);
  } finally {
    refreshing = false;
  }
}

// -- search ---------------------------------------------------------------------------------
// The body of a search for the neighbours of a stored document: the node looks the document's
// vector up itself and leaves the document out of its own results (contract v2). A node
// without search by id would need: fetch .../documents/{id}?vector=true, then
// { vector: doc.vector, k: k + 1 } (the filter below drops the document itself).
async function neighboursQuery(collection, id, k) {
  return { id, k, include: ["metadata"] };
}

async function search(collection, id, k) {
  const body = await neighboursQuery(collection, id, k);
  const res = await api(`/v1/collections/${enc(collection)}/search`, { method: "POST", body });
  const hits = res.results[0].filter((hit) => hit.id !== id).slice(0, k);
  return { ...res, hits };
}

// Metadata as "key value" pairs (nested values as JSON), shortened; the whole object stays in
// the cell's data-meta attribute.
function metadataCell(meta) {
  const obj = meta && typeof meta === "object" && !Array.isArray(meta) ? meta : {};
  const cell = h("td", { class: "meta", "data-meta": JSON.stringify(meta === undefined ? {} : meta) });
  const keys = Object.keys(obj);
  for (const key of keys.slice(0, 8)) {
    const v = obj[key];
    let text = typeof v === "string" ? v : JSON.stringify(v);
    if (text.length > 300) text = text.slice(0, 300) + "…";
    cell.append(h("span", { class: "pair" }, h("span", { class: "mk", text: key }), h("span", { class: "mv", text })));
  }
  if (keys.length > 8) cell.append(h("span", { class: "dim", text: `… ${keys.length - 8} more` }));
  if (!keys.length) cell.append(h("span", { class: "dim", text: "no metadata" }));
  return cell;
}

async function runSearch(ev) {
  if (ev) ev.preventDefault();
  const collection = $("#search-collection").value;
  const id = $("#search-id").value.trim();
  const k = Math.max(1, Math.min(100, parseInt($("#search-k").value, 10) || 10));
  const info = $("#search-info");
  const table = $("#search-results");
  if (!collection || !id) return;
  info.className = "info";
  info.textContent = "Searching…";
  try {
    const res = await search(collection, id, k);
    const rows = res.hits.map((hit, i) => {
      const link = h("a", { class: "docid", href: "#", text: hit.id, title: "neighbours of this one",
        onclick: (e) => { e.preventDefault(); $("#search-id").value = hit.id; runSearch(); } });
      return h("tr", { "data-id": hit.id },
        h("td", { class: "num dim", text: i + 1 }),
        h("td", {}, link),
        h("td", { class: "num score", text: hit.score.toFixed(4) }),
        metadataCell(hit.metadata));
    });
    table.querySelector("tbody").replaceChildren(...rows);
    table.hidden = rows.length === 0;
    const partial = res.partial ? ` Partial: shard(s) ${res.missing_shards.join(", ")} did not answer.` : "";
    info.className = res.partial ? "info warn" : "info";
    info.textContent = `${rows.length} nearest neighbour${rows.length === 1 ? "" : "s"} of ${id} in ${res.took_ms} ms.${partial}`;
  } catch (err) {
    table.hidden = true;
    info.className = "info error";
    info.textContent = err.status === 404 ? `No document ${id} in ${collection}.` : err.message;
  }
}

// -- start ----------------------------------------------------------------------------------
function start() {
  $("#search-form").addEventListener("submit", runSearch);
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    updateKeyButton();
    refresh();
  });
  updateKeyButton();
  refresh();
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
