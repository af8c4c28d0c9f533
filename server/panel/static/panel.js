// qrpark operator panel: live dashboard over server-sent events. No framework, no CDN.
(function () {
  "use strict";

  function ago(seconds) {
    if (seconds === null || seconds === undefined || seconds === "") return "never";
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min ago";
    return Math.floor(seconds / 86400) + " d ago";
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function eventItem(e) {
    const li = el("li", "event event-" + e.kind + " fresh");
    li.appendChild(el("span", "ev-kind", e.kind.replace("_", " ")));
    const main = el("span", "ev-main");
    main.appendChild(el("b", "", e.account_id || "-"));
    main.appendChild(document.createTextNode(" at " + e.lot_id + "/" + e.gate_id + (e.amount ? " \u00b7 " + e.amount : "")));
    li.appendChild(main);
    const reason = el("span", "ev-reason", e.text || "");
    if (e.reason && e.reason !== "welcome" && e.reason !== "paid") {
      reason.appendChild(document.createTextNode(" "));
      reason.appendChild(el("code", "", e.reason));
    }
    li.appendChild(reason);
    const time = el("time", "", (e.at || "").substring(11, 19));
    time.setAttribute("datetime", e.at || "");
    li.appendChild(time);
    return li;
  }

  function applyAlarms(alarms) {
    const box = document.getElementById("alarms");
    if (!box || !alarms) return;
    box.hidden = !alarms.raised;
    box.querySelector('[data-alarm="dead"]').hidden = !alarms.dead_letters;
    box.querySelector('[data-field="dead-letters"]').textContent = alarms.dead_letters;
    box.querySelector('[data-alarm="gaps"]').hidden = !alarms.gates_missing;
    box.querySelector('[data-field="events-missing"]').textContent = alarms.events_missing;
    box.querySelector('[data-field="gates-missing"]').textContent = alarms.gates_missing;
  }

  function applyDashboard(data) {
    applyAlarms(data.alarms);
    data.lots.forEach(function (lot) {
      const card = document.querySelector('[data-lot="' + CSS.escape(lot.lot_id) + '"]');
      if (!card) return;
      card.querySelector('[data-field="used"]').textContent = lot.used;
      card.querySelector('[data-field="capacity"]').textContent = lot.capacity;
      const bar = card.querySelector('[data-field="bar"]');
      bar.max = lot.capacity; bar.value = lot.used; bar.classList.toggle("full", lot.full);
      const badge = card.querySelector('[data-field="full"]');
      badge.textContent = lot.full ? "FULL" : "Spaces free";
      badge.className = "badge " + (lot.full ? "badge-full" : "badge-ok");
      lot.gates.forEach(function (gate) {
        const row = card.querySelector('[data-gate="' + CSS.escape(lot.lot_id + "/" + gate.gate_id) + '"]');
        if (!row) return;
        const state = row.querySelector("[data-gate-state]");
        state.textContent = gate.state;
        state.className = "state state-" + gate.state;
        const seen = row.querySelector("[data-seen]");
        seen.dataset.seen = gate.seconds_since === null ? "" : gate.seconds_since;
        seen.dataset.base = String(Date.now());
        seen.textContent = ago(gate.seconds_since);
      });
    });
  }

  let refreshTimer = null;
  function refreshSoon() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(function () {
      refreshTimer = null;
      fetch("/panel/api/dashboard", { cache: "no-store", credentials: "same-origin" })
        .then(function (r) { if (r.status === 401) { location.reload(); } return r.ok ? r.json() : null; })
        .then(function (data) { if (data) applyDashboard(data); })
        .catch(function () { /* next tick retries */ });
    }, 250);
  }

  function tickSeen() {
    document.querySelectorAll("[data-seen]").forEach(function (node) {
      if (node.dataset.seen === "") return;
      const base = Number(node.dataset.base || node.dataset.loaded || Date.now());
      if (!node.dataset.base) node.dataset.base = String(base);
      node.textContent = ago(Number(node.dataset.seen) + (Date.now() - base) / 1000);
    });
  }

  function startLive() {
    const feed = document.getElementById("feed");
    if (!feed || !window.EventSource) return;
    const status = document.getElementById("live-state");
    const empty = document.getElementById("feed-empty");
    function setState(state, text) { status.dataset.state = state; status.querySelector("span").textContent = text; }
    const source = new EventSource("/panel/api/events");
    source.onopen = function () { setState("live", "live"); refreshSoon(); };
    source.onerror = function () { setState("down", "reconnecting…"); };
    source.onmessage = function (message) {
      let e;
      try { e = JSON.parse(message.data); } catch (err) { return; }
      refreshSoon();
      if (e.quiet) return;
      feed.insertBefore(eventItem(e), feed.firstChild);
      if (empty) empty.hidden = true;
      while (feed.children.length > 100) feed.removeChild(feed.lastChild);
    };
    setInterval(refreshSoon, 15000);
    setInterval(tickSeen, 1000);
  }

  document.addEventListener("DOMContentLoaded", startLive);
})();
