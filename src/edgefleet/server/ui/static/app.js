// edgefleet dashboard: login, live refresh of each page's content, rollout commands. No dependencies.
(function () {
  "use strict";

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function flash(text, bad) {
    var box = document.getElementById("flash");
    if (!box) { return; }
    box.textContent = text;
    box.className = bad ? "bad" : "ok";
    box.hidden = false;
  }

  function post(url) {
    return fetch(url, {method: "POST", credentials: "same-origin", headers: {"X-CSRF-Token": csrfToken()}});
  }

  function detail(response) {
    return response.json().then(function (body) { return body.detail || response.statusText; },
                                function () { return response.statusText; });
  }

  // -- login ---------------------------------------------------------------------------------------------
  var form = document.getElementById("login-form");
  if (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var token = document.getElementById("token").value.trim();
      var error = document.getElementById("login-error");
      fetch("/ui/login", {method: "POST", credentials: "same-origin",
                          headers: {"Authorization": "Bearer " + token}})
        .then(function (response) {
          if (response.ok) {
            window.location.assign(form.getAttribute("data-next") || "/ui/fleet");
            return;
          }
          return detail(response).then(function (text) { error.textContent = text; error.hidden = false; });
        })
        .catch(function () { error.textContent = "the server cannot be reached"; error.hidden = false; });
    });
    return;
  }

  // -- live refresh --------------------------------------------------------------------------------------
  var main = document.getElementById("live");
  var status = document.getElementById("live-status");
  var last = main ? main.innerHTML : "";
  var refreshing = false;

  function fragmentUrl() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    return url.toString();
  }

  function editing() {
    var active = document.activeElement;
    return active && main.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function refresh() {
    if (!main || refreshing || document.hidden) { return Promise.resolve(); }
    refreshing = true;
    return fetch(fragmentUrl(), {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign("/ui/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
          return;
        }
        if (!response.ok) { throw new Error(String(response.status)); }
        return response.text().then(function (html) {
          status.textContent = "live";
          status.className = "live";
          if (html !== last && !editing()) {
            main.innerHTML = html;
            last = main.innerHTML;
            exportTile();
            document.dispatchEvent(new CustomEvent("edgefleet:refreshed"));
          }
        });
      })
      .catch(function (error) {
        status.textContent = /^\d+$/.test(error.message) ? "not updated (HTTP " + error.message + ")" : "offline";
        status.className = "live offline";
      })
      .then(function () { refreshing = false; });
  }

  function loop() {
    var every = main ? parseInt(main.getAttribute("data-poll") || "2000", 10) : 0;
    if (every > 0) {
      window.setTimeout(function () { refresh().then(loop); }, every);
    }
  }

  // -- export lag tile (only where the server has telemetry export) -------------------------------------
  function exportTile() {
    var tile = document.getElementById("export-tile");
    if (!tile) { return; }
    fetch(tile.getAttribute("data-src"), {credentials: "same-origin"})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (body) {
        if (!body) { return; }
        tile.hidden = body.enabled === false;  // no export configured: nothing to show
        document.getElementById("export-lag").textContent = "lag_s" in body ? body.lag_s + " s" : "-";
        document.getElementById("export-detail").textContent = ["pending", "exported_total", "broker_up", "last_error"]
          .filter(function (k) { return body[k] !== undefined && body[k] !== null; })
          .map(function (k) { return k.replace("_", " ") + ": " + body[k]; }).join(", ");
      })
      .catch(function () { /* shown as unknown */ });
  }

  // -- commands ------------------------------------------------------------------------------------------
  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-action]") : null;
    if (button) {
      var question = button.getAttribute("data-confirm");
      if (question && !window.confirm(question)) { return; }
      var id = button.getAttribute("data-rollout");
      var action = button.getAttribute("data-action");
      button.disabled = true;
      post("/api/v1/rollouts/" + encodeURIComponent(id) + "/" + action)
        .then(function (response) {
          if (response.ok) {
            return response.json().then(function (r) { flash("rollout " + id + ": " + r.phase); });
          }
          return detail(response).then(function (text) { flash(action + " refused: " + text, true); });
        })
        .catch(function () { flash(action + " failed: the server cannot be reached", true); })
        .then(function () { button.disabled = false; return refresh(); });
      return;
    }
    if (event.target.id === "logout") {
      post("/ui/logout").then(function () { window.location.assign("/ui/login"); });
    }
  });

  document.addEventListener("visibilitychange", function () { if (!document.hidden) { refresh(); } });
  exportTile();
  loop();
}());
