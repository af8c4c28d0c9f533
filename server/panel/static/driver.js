// qrpark driver page: keeps the signed code fresh (with a countdown), balance, top-up, stays.
(function () {
  "use strict";
  const app = document.getElementById("app");
  if (!app) return;
  const csrf = app.dataset.csrf;
  const refreshBefore = Number(app.dataset.refreshBefore || 5);
  const exponents = { JPY: 0 };
  const symbols = { CNY: "\u00a5", EUR: "\u20ac", USD: "$", GBP: "\u00a3", JPY: "\u00a5" };
  let expiresAt = 0;
  let lifetime = Number(app.dataset.lifetime || 60);
  let timer = null;

  function money(minor, currency) {
    const exp = exponents[currency] ?? 2;
    const sign = minor < 0 ? "-" : "";
    return sign + (symbols[currency] ?? currency + " ") + (Math.abs(minor) / Math.pow(10, exp)).toFixed(exp);
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60);
    return h ? h + " h " + String(m).padStart(2, "0") + " min" : m + " min";
  }

  function showStatus(text) {
    const status = document.getElementById("status");
    status.textContent = text || "";
    status.hidden = !text;
  }

  async function refreshMe() {
    try {
      const r = await fetch("/driver/api/me", { cache: "no-store", credentials: "same-origin" });
      if (r.status === 401) { location.href = "/driver/login"; return; }
      if (!r.ok) return;
      const me = await r.json();
      const balance = document.getElementById("balance");
      balance.textContent = money(me.account.balance_minor, me.account.currency);
      balance.classList.toggle("neg", me.account.balance_minor < 0);
      const debt = document.getElementById("debt");
      if (debt) {
        debt.hidden = !(me.account.debt_minor > 0);
        debt.textContent = "You owe " + money(me.account.debt_minor || 0, me.account.currency) + ": it is paid from your next top-up.";
      }
      const list = document.getElementById("history");
      list.textContent = "";
      if (!me.sessions.length) {
        const li = document.createElement("li"); li.className = "muted"; li.textContent = "No stays yet."; list.appendChild(li);
      }
      me.sessions.forEach(function (s) {
        const li = document.createElement("li");
        const left = document.createElement("span");
        const when = new Date(s.entered_at);
        left.textContent = s.lot_id + " \u00b7 " + when.toLocaleString() + (s.duration_s !== null ? " \u00b7 " + duration(s.duration_s) : "");
        const right = document.createElement("span");
        if (s.state === "open") { right.className = "inside"; right.textContent = "inside now"; }
        else { right.className = "amount"; right.textContent = s.amount ? money(s.amount.amount_minor, s.amount.currency) : "free"; }
        li.appendChild(left); li.appendChild(right); list.appendChild(li);
      });
    } catch (e) { /* keep what is shown */ }
  }

  async function refreshCode() {
    const qr = document.getElementById("qr");
    try {
      const r = await fetch("/driver/api/code.svg", { cache: "no-store", credentials: "same-origin" });
      if (r.status === 401) { location.href = "/driver/login"; return; }
      if (!r.ok) throw new Error("HTTP " + r.status);
      lifetime = parseInt(r.headers.get("X-Code-Lifetime") || String(lifetime), 10);
      const svg = await r.text();
      qr.innerHTML = svg;  // our own server's SVG
      qr.classList.remove("stale");
      qr.dataset.ready = "1";
      expiresAt = Date.now() + lifetime * 1000;  // the phone's own clock: immune to skew
      document.getElementById("countdown-bar").max = lifetime;
      showStatus("");
      schedule(Math.max(1, lifetime - refreshBefore) * 1000);
    } catch (e) {
      qr.classList.add("stale");
      showStatus("Cannot refresh the code \u2014 retrying\u2026");
      schedule(2000);
    }
    refreshMe();
  }

  function schedule(ms) { if (timer) clearTimeout(timer); timer = setTimeout(refreshCode, ms); }

  function tick() {
    const left = Math.max(0, Math.ceil((expiresAt - Date.now()) / 1000));
    document.getElementById("countdown").textContent = expiresAt ? "New code in " + left + " s" : "--";
    document.getElementById("countdown-bar").value = left;
    if (expiresAt && left === 0) document.getElementById("qr").classList.add("stale");
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return String(Date.now()) + "-" + Math.random().toString(36).slice(2);
  }

  function showTopup(text, failed) {
    const result = document.getElementById("topup-result");
    if (!result) return;
    result.textContent = text || "";
    result.className = failed ? "alert" : "hint";
    result.hidden = !text;
  }

  function problem(body, status) {
    if (body && typeof body.detail === "string") return body.detail;
    return "Top-up refused (HTTP " + status + "): nothing was charged.";
  }

  // One key per top-up attempt: a retry of the same amount and card after a lost or
  // unconfirmed answer reuses it, so the card is never charged twice.
  let pending = null;

  async function topup(button) {
    const amount = Number(button.dataset.topup);
    const select = document.getElementById("topup-card");
    const card = select ? select.value : "";
    if (!pending || pending.amount !== amount || pending.card !== card) {
      pending = { amount: amount, card: card, key: newKey() };
    }
    const body = { amount_minor: amount };
    if (card) body.card_token = card;
    document.querySelectorAll("[data-topup]").forEach(function (b) { b.disabled = true; });
    showTopup("Charging the card\u2026", false);
    try {
      // Unconfirmed (503), still in flight (409) or no answer: ask again with the same key.
      for (let attempt = 0; attempt < 3; attempt++) {
        if (attempt) await new Promise(function (done) { setTimeout(done, 1500 * attempt); });
        let r;
        try {
          r = await fetch("/driver/api/topups", {
            method: "POST", credentials: "same-origin",
            headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, "Idempotency-Key": pending.key },
            body: JSON.stringify(body),
          });
        } catch (e) {
          showTopup("No answer from the server. Tap again to retry: you will not be charged twice.", true);
          continue;
        }
        if (r.status === 401) { location.href = "/driver/login"; return; }
        let answer = null;
        try { answer = await r.json(); } catch (e) { answer = null; }
        if (r.ok && answer) {
          pending = null;
          let text = "Added " + money(answer.amount_minor, answer.currency) + " by card.";
          if (answer.collected_minor > 0) text += " " + money(answer.collected_minor, answer.currency) + " of it paid what you owed.";
          showTopup(text, false);
          return;
        }
        showTopup(problem(answer, r.status), true);
        if (r.status !== 503 && r.status !== 409) { pending = null; return; }  // a definite answer
      }
    } finally {
      document.querySelectorAll("[data-topup]").forEach(function (b) { b.disabled = false; });
      refreshMe();
    }
  }

  document.querySelectorAll("[data-topup]").forEach(function (button) {
    button.addEventListener("click", function () { topup(button); });
  });
  const topupForm = document.getElementById("topup");
  if (topupForm) topupForm.addEventListener("submit", function (e) { e.preventDefault(); });

  const balance = document.getElementById("balance");
  balance.textContent = money(Number(balance.textContent), balance.dataset.currency);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && Date.now() > expiresAt - refreshBefore * 1000) refreshCode();
  });
  setInterval(tick, 250);
  refreshCode();
})();
