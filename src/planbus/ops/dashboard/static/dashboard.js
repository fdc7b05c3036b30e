// planbus dashboard: apply each server-sent snapshot, show ages, send Retry and Cancel.
"use strict";
(() => {
  let offset = 0; // the database's clock minus this browser's, in seconds
  let lastMessage = Date.now();
  const shown = new Map(); // section id -> the HTML it shows

  const serverNow = () => Date.now() / 1000 + offset;

  function age(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return `${s} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} d`;
  }

  function showAges() {
    const now = serverNow();
    for (const el of document.querySelectorAll("time[data-at]")) {
      const at = Number(el.dataset.at);
      if (Number.isFinite(at) && at > 0) el.textContent = age(now - at);
    }
    const quiet = (Date.now() - lastMessage) / 1000;
    const freshness = document.getElementById("freshness");
    freshness.textContent = quiet < 5 ? "live" : `no update for ${age(quiet)}; reconnecting`;
    freshness.classList.toggle("stale", quiet >= 5);
  }

  function apply(snapshot) {
    lastMessage = Date.now();
    if (typeof snapshot.now === "number") offset = snapshot.now - Date.now() / 1000;
    for (const [id, html] of Object.entries(snapshot.sections || {})) {
      const el = document.getElementById(id);
      // Replace a section only when it changed: a button under the pointer stays put.
      if (el && shown.get(id) !== html) {
        el.innerHTML = html;
        shown.set(id, html);
      }
    }
    const problem = document.getElementById("problem");
    problem.textContent = snapshot.error || "";
    problem.hidden = !snapshot.error;
    showAges();
  }

  function notice(text, ok) {
    const el = document.getElementById("notice");
    el.textContent = text;
    el.classList.toggle("refused", !ok);
    el.hidden = false;
  }

  async function act(form) {
    const button = form.querySelector("button");
    if (button) button.disabled = true;
    try {
      const answer = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      const body = await answer.json().catch(() => ({ message: answer.statusText }));
      notice(body.message || `HTTP ${answer.status}`, answer.ok && body.ok);
    } catch (error) {
      notice(`the dashboard did not answer: ${error}`, false);
      if (button) button.disabled = false;
    }
  }

  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form.action");
    if (!form) return;
    event.preventDefault();
    act(form);
  });

  // A token given in the address has become a cookie: keep it out of history and screenshots.
  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname);
  }
  offset = Number(document.body.dataset.now) - Date.now() / 1000 || 0;
  showAges();
  setInterval(showAges, 1000);
  const events = new EventSource("events");
  events.onmessage = (event) => apply(JSON.parse(event.data));
})();
