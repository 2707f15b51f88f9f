// Fractal's live fleet page. Reads the admin API every few seconds with the credential the operator pasted
// (kept in sessionStorage only) and drains a host after a confirmation. No framework, no build step, nothing
// inline: the page runs under script-src 'self'. Every value from the API is written with textContent.
"use strict";

(function () {
  const STORAGE_KEY = "fractal.credential";
  // Relative to /ui/: the admin API beside this page, also behind a proxy that mounts it under a prefix.
  const API = "../admin";
  const STATUSES = ["ACTIVE", "PRE_CONNECTION", "DRAINING", "TERMINATING", "LOST"];
  const DRAINABLE = new Set(["ACTIVE", "PRE_CONNECTION"]);
  const EVENT_COUNT = 25;
  const MAX_INSTANCE_PAGES = 20;
  const params = new URLSearchParams(window.location.search);
  const refreshSeconds = clamp(Number(params.get("refresh") || 5), 1, 300);

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let generation = 0; // bumped on sign-in/out so a slow answer for an old credential is dropped
  let pendingDrain = null;

  function clamp(value, low, high) {
    return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : low;
  }

  function credential() {
    return window.sessionStorage.getItem(STORAGE_KEY);
  }

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path) {
    const token = credential();
    if (!token) throw new ApiError(401, "UNAUTHORIZED", "Not signed in.");
    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
    } catch (error) {
      throw new ApiError(0, "UNREACHABLE", "The admin API cannot be reached (" + error.message + ").");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      const code = body && body.error ? body.error : "HTTP_" + response.status;
      const message = body && body.message ? body.message : response.statusText;
      throw new ApiError(response.status, code, message);
    }
    return body;
  }

  async function allInstances() {
    const rows = [];
    let cursor = null;
    for (let page = 0; page < MAX_INSTANCE_PAGES; page += 1) {
      const query = "?limit=5000" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
      const body = await api("GET", "/instances" + query);
      rows.push(...body.instances);
      cursor = body.next_cursor;
      if (!cursor) break;
    }
    return rows;
  }

  // --- rendering ------------------------------------------------------------------------------------------
  function age(timestamp) {
    if (!timestamp) return "never";
    const seconds = Math.max(0, Math.round((Date.now() - Date.parse(timestamp)) / 1000));
    if (seconds < 90) return seconds + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function stat(label, value, extraClass) {
    return el("span", { class: "stat" + (extraClass ? " " + extraClass : "") }, label + " ", el("b", { text: value }));
  }

  function groupKey(region, commit) {
    return region + "\u0000" + commit;
  }

  function renderFleet(capacity, instances) {
    const byGroup = new Map();
    for (const instance of instances) {
      if (instance.status === "TERMINATED") continue;
      const key = groupKey(instance.region, instance.client_commit_hash);
      if (!byGroup.has(key)) byGroup.set(key, []);
      byGroup.get(key).push(instance);
    }
    const groups = capacity.map((row) => ({ row, hosts: byGroup.get(groupKey(row.region, row.client_commit_hash)) || [] }));
    const container = $("fleet");
    container.replaceChildren(...groups.map(({ row, hosts }) => renderGroup(row, hosts)));
    $("fleet-empty").hidden = groups.length > 0;
    $("fleet-section").hidden = false;
  }

  function renderGroup(row, hosts) {
    const short = row.free < row.target_free;
    const counts = el(
      "span",
      { class: "counts" },
      ...STATUSES.filter((s) => row.instances[s]).map((s) =>
        el("span", { class: "badge status status-" + s, "data-status": s, text: s + " " + row.instances[s] })
      )
    );
    const header = el(
      "header",
      {},
      el(
        "h3",
        {},
        row.region + " · ",
        el("code", { text: row.client_commit_hash }),
        " ",
        el("span", { class: "badge" + (row.active ? "" : " inactive"), text: row.active ? "active image" : "no active image" })
      ),
      stat("capacity", row.capacity),
      stat("used", row.used),
      stat("free", row.free + " / target " + row.target_free, short ? "short" : "met"),
      counts
    );
    const table = el(
      "table",
      { class: "hosts" },
      el(
        "thead",
        {},
        el("tr", {}, ...["instance", "status", "used", "ip", "last heartbeat", "since", ""].map((h) => el("th", { text: h })))
      ),
      el("tbody", {}, ...hosts.map(renderHost))
    );
    return el(
      "article",
      { class: "group", "data-region": row.region, "data-commit": row.client_commit_hash },
      header,
      hosts.length ? table : el("p", { class: "muted stat", text: "No live hosts." })
    );
  }

  function renderHost(instance) {
    const button = el("button", {
      type: "button",
      class: "drain",
      text: "Drain",
      disabled: !DRAINABLE.has(instance.status),
      title: DRAINABLE.has(instance.status) ? "Take no new mandelboxes; terminate once empty" : "Only ACTIVE or PRE_CONNECTION hosts drain",
    });
    button.addEventListener("click", () => askDrain(instance));
    return el(
      "tr",
      { "data-instance": instance.instance_name },
      el("td", {}, el("code", { text: instance.instance_name })),
      el("td", { class: "status status-" + instance.status, text: instance.status }),
      el("td", { class: "num", text: instance.live_mandelboxes + " / " + instance.mandelbox_capacity }),
      el("td", { text: instance.ip || "–" }),
      el("td", { text: age(instance.last_heartbeat_at) }),
      el("td", { text: age(instance.status_changed_at) }),
      el("td", {}, button)
    );
  }

  function renderEvents(events) {
    const rows = events.map((event) =>
      el(
        "tr",
        { "data-event": event.id },
        el("td", { text: event.created_at.replace("T", " ").replace(/\.\d+Z$/, "") }),
        el("td", { text: event.kind }),
        el("td", { text: event.actor }),
        el("td", { text: event.instance_name || "" }),
        el("td", { class: "detail", text: Object.keys(event.detail || {}).length ? JSON.stringify(event.detail) : "" })
      )
    );
    $("events").replaceChildren(...rows);
    $("events-section").hidden = false;
  }

  function notice(text, isError) {
    const node = $("notice");
    node.textContent = text;
    node.className = "notice" + (isError ? " error" : "");
    node.hidden = !text;
  }

  function connection(state, text) {
    const node = $("connection");
    node.dataset.state = state;
    node.textContent = text;
  }

  // --- the refresh loop -----------------------------------------------------------------------------------
  async function refresh() {
    window.clearTimeout(timer);
    const mine = generation;
    try {
      const [capacity, instances, events] = await Promise.all([
        api("GET", "/capacity"),
        allInstances(),
        api("GET", "/events?limit=" + EVENT_COUNT),
      ]);
      if (mine !== generation) return;
      renderFleet(capacity.capacity, instances);
      renderEvents(events.events);
      connection("live", "live · every " + refreshSeconds + " s");
      $("updated").textContent = "updated " + new Date().toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
    } catch (error) {
      if (mine !== generation) return;
      if (error.status === 401 || error.status === 403) {
        signOut(error.status === 401 ? "The credential was refused (" + error.message + ")" : "This credential may not read the fleet (" + error.message + ")");
        return;
      }
      connection("error", "error");
      notice(error.code + ": " + error.message + " (retrying)", true);
    }
    if (mine === generation) timer = window.setTimeout(refresh, refreshSeconds * 1000);
  }

  // --- drain ----------------------------------------------------------------------------------------------
  function askDrain(instance) {
    pendingDrain = instance.instance_name;
    $("drain-name").textContent = instance.instance_name;
    $("drain-text").textContent =
      instance.region + " · " + instance.client_commit_hash + ": the host takes no new mandelboxes; its " +
      instance.live_mandelboxes + " live mandelbox(es) keep running, and the scaler terminates it once it is empty.";
    $("drain-dialog").showModal();
  }

  async function drainConfirmed(name) {
    try {
      const drained = await api("POST", "/instances/" + encodeURIComponent(name) + "/drain");
      notice("Drained " + drained.instance_name + ": now " + drained.status + ".", false);
    } catch (error) {
      notice("Drain of " + name + " refused: " + error.code + ": " + error.message, true);
    }
    refresh();
  }

  // --- sign in / out --------------------------------------------------------------------------------------
  function signIn(token) {
    window.sessionStorage.setItem(STORAGE_KEY, token);
    generation += 1;
    $("login").hidden = true;
    $("login-error").textContent = "";
    $("sign-out").hidden = false;
    connection("idle", "connecting…");
    notice("", false);
    refresh();
  }

  function signOut(reason) {
    window.sessionStorage.removeItem(STORAGE_KEY);
    generation += 1;
    window.clearTimeout(timer);
    $("fleet").replaceChildren();
    $("events").replaceChildren();
    $("fleet-section").hidden = true;
    $("events-section").hidden = true;
    $("sign-out").hidden = true;
    $("updated").textContent = "";
    notice("", false);
    connection("idle", "not signed in");
    $("login-error").textContent = reason || "";
    $("login").hidden = false;
    $("credential").value = "";
    $("credential").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("credential").value.trim().replace(/^Bearer\s+/i, "");
      $("credential").value = "";
      if (token) signIn(token);
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("drain-dialog").addEventListener("close", () => {
      const name = pendingDrain;
      pendingDrain = null;
      if (name && $("drain-dialog").returnValue === "drain") drainConfirmed(name);
    });
    if (credential()) signIn(credential());
    else signOut("");
  });
})();
