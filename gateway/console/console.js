// The EcomGateway admin console (gateway/console/__init__.py says what it shows and why it is safe).
// Plain browser JavaScript, no build step. Every value from the server is rendered with textContent, never as
// HTML: actor state, dead-letter bodies and audit entries hold user data.
"use strict";

(function () {
  const STORE_TOKEN = "ecom-admin-token";
  const STORE_FLOW = "ecom-admin-flow";
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const cfg = {
    clientId: meta("ecom-client-id"),
    publicUrl: meta("ecom-public-url"),
    redirectUri: meta("ecom-redirect-uri"),
  };
  const $ = (id) => document.getElementById(id);
  let services = []; // [{name, admin}] from /admin/api/cluster

  // -- rendering helpers ----------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else if (key === "onclick") node.addEventListener("click", value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child)); // a string is a text node: never parsed
    }
    return node;
  }

  function table(headers, rows) {
    const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
  }

  function cells(...values) {
    return values.map((v) => (v instanceof Node ? el("td", {}, v) : el("td", {}, v === null || v === undefined ? "" : v)));
  }

  function fill(section, ...children) {
    const body = $(section).querySelector(".body");
    body.replaceChildren(...children);
  }

  function flash(text, isError) {
    const box = $("flash");
    box.textContent = text;
    box.className = isError ? "error" : "";
    box.hidden = false;
  }

  function show(view) {
    for (const name of ["loading", "signin", "denied", "console"]) $(`view-${name}`).hidden = name !== view;
    $("who").hidden = view !== "console" && view !== "denied";
  }

  // -- sign-in: authorization code + PKCE (RFC 7636, S256) with the first-party public client -----------------

  function b64url(bytes) {
    let s = "";
    for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function random(n) {
    return b64url(crypto.getRandomValues(new Uint8Array(n)));
  }

  function claims(jwt) {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
  }

  async function discovery() {
    const resp = await fetch("/.well-known/openid-configuration");
    if (!resp.ok) throw new Error(`discovery answered ${resp.status}`);
    return resp.json();
  }

  async function signIn() {
    const doc = await discovery();
    const verifier = random(32);
    const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
    const flow = { verifier, state: random(16), nonce: random(16) };
    sessionStorage.setItem(STORE_FLOW, JSON.stringify(flow));
    const query = new URLSearchParams({
      response_type: "code",
      client_id: cfg.clientId,
      redirect_uri: cfg.redirectUri,
      scope: "openid email ecom",
      state: flow.state,
      nonce: flow.nonce,
      code_challenge: challenge,
      code_challenge_method: "S256",
    });
    location.assign(`${doc.authorization_endpoint}?${query}`);
  }

  async function finishSignIn(params) {
    const flow = JSON.parse(sessionStorage.getItem(STORE_FLOW) || "null");
    sessionStorage.removeItem(STORE_FLOW);
    history.replaceState(null, "", "/admin"); // the code leaves the address bar and the history
    if (params.has("error")) throw new Error(`sign-in failed: ${params.get("error_description") || params.get("error")}`);
    if (!flow || params.get("state") !== flow.state) throw new Error("sign-in failed: the answer is not for this sign-in (state)");
    const doc = await discovery();
    if (params.has("iss") && params.get("iss") !== doc.issuer) throw new Error("sign-in failed: wrong issuer");
    const resp = await fetch(doc.token_endpoint, {
      method: "POST",
      body: new URLSearchParams({
        grant_type: "authorization_code",
        client_id: cfg.clientId,
        code: params.get("code"),
        redirect_uri: cfg.redirectUri,
        code_verifier: flow.verifier,
      }),
    });
    const body = await resp.json();
    if (!resp.ok) throw new Error(`sign-in failed: ${body.error_description || body.error || resp.status}`);
    const id = body.id_token ? claims(body.id_token) : {};
    if (id.nonce !== flow.nonce) throw new Error("sign-in failed: the ID token is not for this sign-in (nonce)");
    const session = {
      token: body.access_token,
      expires: Date.now() + 1000 * (body.expires_in || 0),
      email: id.email || claims(body.access_token).sub,
    };
    sessionStorage.setItem(STORE_TOKEN, JSON.stringify(session));
    return session;
  }

  function currentSession() {
    const session = JSON.parse(sessionStorage.getItem(STORE_TOKEN) || "null");
    if (session && session.expires > Date.now()) return session;
    sessionStorage.removeItem(STORE_TOKEN);
    return null;
  }

  function signOut() {
    sessionStorage.removeItem(STORE_TOKEN);
    $("flash").hidden = true;
    show("signin");
  }

  // -- the admin API ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(method, path) {
    const session = currentSession();
    if (!session) {
      $("signin-message").textContent = "Your session ended. Sign in again.";
      show("signin");
      throw new ApiError(401, "signed out");
    }
    const resp = await fetch(path, { method, headers: { Authorization: `Bearer ${session.token}` } });
    const body = resp.headers.get("Content-Type")?.includes("json") ? await resp.json() : null;
    if (resp.status === 401) {
      sessionStorage.removeItem(STORE_TOKEN);
      $("signin-message").textContent = "Your session ended. Sign in again.";
      show("signin");
    } else if (resp.status === 403) {
      show("denied");
    }
    if (!resp.ok) throw new ApiError(resp.status, (body && (body.detail || body.title)) || `${method} ${path}: ${resp.status}`);
    return body;
  }

  const seg = encodeURIComponent;

  // -- sections -----------------------------------------------------------------------------------------------

  async function loadCluster() {
    const body = await api("GET", "/admin/api/cluster");
    services = body.services.filter((s) => s.admin).map((s) => ({ name: s.name, admin: s.admin }));
    const select = $("actor-service");
    const chosen = select.value;
    select.replaceChildren(...services.map((s) => el("option", { value: s.name, selected: s.name === chosen }, s.name)));
    const rows = [];
    for (const service of body.services) {
      for (const inst of service.instances) {
        const members = inst.members === null ? el("span", { class: "muted" }, "no cluster membership (one instance)") : inst.members.join(", ");
        const ready = inst.ready ? el("span", { class: "ok" }, "ready") : el("span", { class: "bad" }, inst.error || "not ready");
        rows.push(el("tr", { "data-service": service.name }, ...cells(service.name, inst.url, ready, inst.breaker, members)));
      }
    }
    fill("cluster", table(["service", "instance", "readiness", "breaker", "cluster members (its view)"], rows));
  }

  async function loadActors() {
    const body = await api("GET", "/admin/api/actors?limit=50");
    const blocks = [];
    for (const service of body.services) {
      const several = service.instances.length > 1;
      const rows = [];
      const errors = [];
      for (const inst of service.instances) {
        if (!inst.body) {
          errors.push(el("p", { class: "bad" }, `${service.name} at ${inst.url}: ${inst.error}`));
          continue;
        }
        for (const [type, info] of Object.entries(inst.body.types)) {
          const where = several ? ` on ${inst.url}` : "";
          rows.push(el("tr", { class: "type" }, ...cells(el("strong", {}, type + where), `${info.live} live`, info.mailbox_depth, info.handled, "", "", "")));
          for (const actor of info.actors) {
            const open = el("button", { type: "button", class: "open-actor", onclick: () => openActor(service, type, actor.id).catch(report) }, "open");
            rows.push(el("tr", { "data-actor": `${type}/${actor.id}` }, ...cells(el("code", {}, actor.id), actor.running ? "running" : "idle", actor.mailbox_depth, actor.handled, actor.last_activity, actor.owner, open)));
          }
        }
      }
      blocks.push(el("h3", {}, service.name), ...errors);
      if (rows.length) blocks.push(table(["type / actor", "", "mailbox depth", "handled", "last activity", "owner", ""], rows));
      else if (!errors.length) blocks.push(el("p", { class: "muted" }, "no actor types"));
    }
    fill("actors", ...blocks);
  }

  async function openActor(service, type, id) {
    const info = await api("GET", `${service.admin}/actors/${seg(type)}/${seg(id)}`);
    $("actor-title").textContent = `${service.name} ${type} ${id}`;
    const facts = table(["version", "active", "owner", "mailbox depth", "handled"], [el("tr", {}, ...cells(info.version, info.active ? "yes" : "no (as stored)", info.owner, info.mailbox_depth, info.handled))]);
    fill("actor", facts, el("pre", { id: "actor-state" }, JSON.stringify(info.state, null, 2)));
    $("actor").hidden = false;
    if (type === "order") $("trace-order").value = id; // ready for "Show traces"
    $("actor").scrollIntoView();
  }

  async function loadPending() {
    const rows = [];
    const reminders = [];
    for (const service of services) {
      try {
        const body = await api("GET", `${service.admin}/pending?limit=20`);
        rows.push(el("tr", {}, ...cells(service.name, body.outbox ? body.outbox.backlog : "—", body.reminders ? body.reminders.due : "—")));
        for (const r of (body.reminders && body.reminders.items) || []) {
          reminders.push(el("tr", { class: r.due ? "bad" : "" }, ...cells(service.name, r.actor_type, el("code", {}, r.actor_id), r.name, r.due_at, r.due ? "due" : "later")));
        }
      } catch (err) {
        rows.push(el("tr", {}, ...cells(service.name, err.status === 404 ? "not available on this deployment" : err.message, "")));
      }
    }
    fill(
      "pending",
      table(["service", "outbox backlog", "reminders due"], rows),
      el("h3", {}, "Soonest reminders"),
      reminders.length ? table(["service", "actor type", "actor", "reminder", "due at", ""], reminders) : el("p", { class: "muted" }, "none"),
    );
  }

  async function loadDeadLetters() {
    const blocks = [];
    for (const service of services) {
      let summary;
      try {
        summary = await api("GET", `${service.admin}/dead-letters`);
      } catch (err) {
        if (err.status === 404) continue; // a service without bus queues (or a deployment without the API)
        blocks.push(el("p", { class: "bad" }, `${service.name}: ${err.message}`));
        continue;
      }
      for (const queue of summary.queues) {
        if (!queue.count) continue;
        const list = await api("GET", `${service.admin}/dead-letters/${seg(queue.queue)}?page_size=100`);
        const rows = list.items
          .filter((letter) => letter.kind === queue.kind)
          .map((letter) => {
            const path = `${service.admin}/dead-letters/${seg(queue.queue)}/${seg(letter.message_id)}`;
            const actions = el(
              "span",
              {},
              el("button", { type: "button", class: "view-letter", onclick: () => viewLetter(path, letter.message_id) }, "view"),
              " ",
              el("button", { type: "button", class: "replay-letter", onclick: () => changeLetter("replay", path, letter.message_id) }, "replay"),
              " ",
              el("button", { type: "button", class: "discard-letter", onclick: () => changeLetter("discard", path, letter.message_id) }, "discard"),
            );
            return el("tr", { "data-message-id": letter.message_id }, ...cells(el("code", {}, letter.message_id), letter.type, letter.session_id, letter.reason, letter.attempts, letter.dead_lettered_at, actions));
          });
        blocks.push(el("h3", {}, `${service.name}: ${queue.kind} ${queue.queue} (${queue.count})`), table(["message id", "type", "session", "reason", "attempts", "dead-lettered at", ""], rows));
      }
    }
    fill("dead-letters", ...(blocks.length ? blocks : [el("p", { class: "muted", id: "no-dead-letters" }, "No dead letters.")]));
    if (!services.length) fill("dead-letters", el("p", { class: "muted" }, "not available on this deployment"));
  }

  async function viewLetter(path, id) {
    const letter = await api("GET", path);
    $("dead-letter-title").textContent = id;
    $("dead-letter").querySelector("pre").textContent = JSON.stringify(letter, null, 2);
    $("dead-letter").hidden = false;
  }

  async function changeLetter(action, path, id) {
    const question = action === "replay" ? `Replay ${id} through the outbox (same message id)?` : `Discard ${id} for good?`;
    if (!confirm(question)) return;
    try {
      const result = action === "replay" ? await api("POST", `${path}/replay`) : await api("DELETE", path);
      flash(action === "replay" ? `Replayed ${id} (outbox row ${result.outbox_id}).` : `Discarded ${id}.`);
    } catch (err) {
      flash(`Could not ${action} ${id}: ${err.message}`, true);
    }
    $("dead-letter").hidden = true;
    await Promise.all([loadDeadLetters(), loadAudit()]).catch(report);
  }

  async function loadAudit() {
    const entries = [];
    for (const service of services) {
      try {
        const body = await api("GET", `${service.admin}/audit?limit=20`);
        for (const entry of body.items) entries.push({ service: service.name, ...entry });
      } catch (err) {
        if (err.status !== 404) throw err;
      }
    }
    entries.sort((a, b) => (a.at < b.at ? 1 : -1));
    const rows = entries.slice(0, 30).map((e) => el("tr", { "data-action": e.action }, ...cells(e.at, e.service, e.actor, e.via, e.action, el("code", {}, e.target))));
    fill("audit", rows.length ? table(["at", "service", "who", "via", "action", "target"], rows) : el("p", { class: "muted" }, "No admin actions recorded yet."));
  }

  async function loadTraces(orderId) {
    // Each process keeps its own recent spans (runtime/tracing.py): ask every service and merge by span id
    // (services in one process answer with the same spans).
    const spans = new Map();
    let enabled = false;
    const errors = [];
    for (const service of services) {
      try {
        const body = await api("GET", `${service.admin}/traces?order_id=${seg(orderId)}`);
        if (body.enabled && body.buffer) enabled = true;
        for (const span of body.spans || []) spans.set(span.span_id, span);
      } catch (err) {
        if (err.status !== 404) errors.push(el("p", { class: "bad" }, `${service.name}: ${err.message}`));
      }
    }
    if (!enabled) {
      fill("traces", ...errors, el("p", { class: "muted", id: "traces-unavailable" }, "Traces are not available on this deployment (tracing off, or no in-process buffer: OTEL_TRACES_EXPORTER=buffer)."));
      return;
    }
    const byTrace = new Map();
    for (const span of spans.values()) {
      if (!byTrace.has(span.trace_id)) byTrace.set(span.trace_id, []);
      byTrace.get(span.trace_id).push(span);
    }
    const blocks = [...errors];
    for (const [traceId, list] of byTrace) {
      list.sort((a, b) => (a.start_time || 0) - (b.start_time || 0));
      const ids = new Map(list.map((sp) => [sp.span_id, sp]));
      const depth = (sp) => {
        let d = 0;
        for (let p = ids.get(sp.parent_span_id); p && d < 50; p = ids.get(p.parent_span_id)) d += 1;
        return d;
      };
      const rows = list.map((sp) => el("tr", { "data-span": sp.span_id }, ...cells("\u00a0\u00a0".repeat(depth(sp)) + sp.name, sp.service, sp.kind, sp.duration_ms, sp.status)));
      blocks.push(el("h3", {}, `trace ${traceId} (${list.length} spans)`), table(["span", "service", "kind", "ms", "status"], rows));
    }
    if (!byTrace.size) blocks.push(el("p", { class: "muted", id: "traces-none" }, "No recent spans of this order (the buffer keeps the latest only)."));
    fill("traces", ...blocks);
  }

  function report(err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return; // the view says it
    flash(err.message, true);
  }

  async function loadAll() {
    await loadCluster();
    await Promise.all([loadActors(), loadPending(), loadDeadLetters(), loadAudit()]);
  }

  // -- start --------------------------------------------------------------------------------------------------

  async function start() {
    $("signin").addEventListener("click", () => signIn().catch(report));
    $("signout").addEventListener("click", signOut);
    $("signout-denied").addEventListener("click", signOut);
    $("refresh").addEventListener("click", () => loadAll().catch(report));
    $("actor-form").addEventListener("submit", (event) => {
      // any actor, live or not: one that is not active is read as stored
      event.preventDefault();
      const service = services.find((s) => s.name === $("actor-service").value);
      if (service) openActor(service, $("actor-type").value.trim(), $("actor-id").value.trim()).catch(report);
    });
    $("trace-form").addEventListener("submit", (event) => {
      event.preventDefault();
      loadTraces($("trace-order").value.trim()).catch(report);
    });
    if (location.origin !== new URL(cfg.publicUrl).origin) {
      // The client's redirect URI is at the public URL; sessionStorage is per origin, so start there.
      location.replace(`${cfg.publicUrl}/admin`);
      return;
    }
    let session = currentSession();
    const params = new URLSearchParams(location.search);
    if (location.pathname === "/admin/callback") {
      try {
        session = await finishSignIn(params);
      } catch (err) {
        show("signin");
        flash(err.message, true);
        return;
      }
    }
    if (!session) {
      show("signin");
      return;
    }
    $("who-name").textContent = session.email;
    const roles = claims(session.token).roles || [];
    if (!roles.includes("admin")) {
      show("denied");
      return;
    }
    show("console");
    await loadAll().catch(report);
  }

  start();
})();
