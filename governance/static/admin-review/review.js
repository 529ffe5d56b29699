// Loupe reviewer workspace: refresh run progress while runs are active (no framework, no CDN).
// Polls the page's status.json every few seconds; when the last run finishes, reloads the page once
// so the new evidence appears. Only textContent is written: nothing from the server becomes HTML.
(function () {
  "use strict";
  var root = document.getElementById("review");
  if (!root || root.dataset.active !== "1") { return; }
  var url = root.dataset.pollUrl;
  var interval = 3000;

  function setText(el, text) { if (el) { el.textContent = text; } }

  function apply(status) {
    setText(document.getElementById("case-state"), status.state_label);
    setText(document.getElementById("overall-progress"), status.percent + "%");
    var overall = document.getElementById("overall-bar");
    if (overall) { overall.value = status.percent; }
    status.runs.forEach(function (run) {
      var row = document.getElementById("run-" + run.id);
      if (!row) { return; }
      row.className = "run-" + run.status;
      setText(row.querySelector(".run-status"), run.status_label);
      setText(row.querySelector(".run-percent"), run.percent + "%");
      setText(row.querySelector(".run-phase"), run.error || run.phase);
      var bar = row.querySelector(".run-bar");
      if (bar) { bar.value = run.percent; }
    });
  }

  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (status) {
        apply(status);
        if (status.active) { window.setTimeout(poll, interval); } else { window.location.reload(); }
      })
      .catch(function () { window.setTimeout(poll, interval * 4); });  // server busy or offline: back off
  }
  window.setTimeout(poll, interval);
})();
