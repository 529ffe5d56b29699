// Loupe provider portal. Forms marked .api-form post to the REST API with the session (so the API's
// rules apply unchanged) and show its refusals at the field; the case page follows its runs live.
// Only textContent is written: nothing from the server becomes HTML.
(function () {
  "use strict";

  function cookie(name) {
    var match = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return match ? decodeURIComponent(match[1]) : "";
  }

  function say(text) {
    var live = document.getElementById("api-status");
    if (live) { live.textContent = text; }
  }

  function clearErrors(form) {
    form.querySelectorAll(".field-error").forEach(function (el) { el.remove(); });
    form.querySelectorAll("[aria-invalid]").forEach(function (el) {
      el.removeAttribute("aria-invalid");
      el.removeAttribute("aria-describedby");
    });
  }

  function fieldError(form, name, text) {
    var input = form.querySelector("[name='" + name + "']");
    if (!input) { return false; }
    var note = document.createElement("p");
    note.className = "field-error";
    note.id = (input.id || name) + "-error";
    note.textContent = text;
    input.insertAdjacentElement("afterend", note);
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", note.id);
    return true;
  }

  function payload(form) {
    var data = new FormData(form);
    if (form.dataset.multipart) { return data; }
    var object = {};
    data.forEach(function (value, key) { object[key] = value; });
    if (object.plan_template !== undefined) {
      var templates = JSON.parse(document.getElementById("plan-templates").textContent);
      object.probe_plan = templates[object.plan_template];
      delete object.plan_template;
    }
    if (object.model_version) { object.model_version = parseInt(object.model_version, 10); }
    return JSON.stringify(object);
  }

  document.querySelectorAll("form.api-form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      clearErrors(form);
      var body = payload(form);
      var headers = {"X-CSRFToken": cookie("csrftoken"), "Accept": "application/json"};
      if (!form.dataset.multipart) { headers["Content-Type"] = "application/json"; }
      var button = form.querySelector("button[type=submit]");
      if (button) { button.disabled = true; }
      say("Sending...");
      fetch(form.dataset.api, {method: "POST", credentials: "same-origin", headers: headers, body: body})
        .then(function (response) {
          return response.json().catch(function () { return {}; }).then(function (json) {
            return {ok: response.ok, status: response.status, json: json};
          });
        })
        .then(function (result) {
          if (button) { button.disabled = false; }
          if (result.ok) {
            say("Done.");
            if (form.dataset.done === "case" && result.json.id) {
              window.location.assign("/portal/cases/" + result.json.id + "/");
            } else { window.location.reload(); }
            return;
          }
          var json = result.json || {};
          var fields = json.fields || {};
          var placed = 0;
          Object.keys(fields).forEach(function (name) {
            var messages = [].concat(fields[name]).join(" ");
            if (fieldError(form, name === "probe_plan" ? "plan_template" : name, messages)) { placed += 1; }
          });
          say("Not saved (" + result.status + "): " + (json.detail || "see the form") + ".");
          if (!placed && json.detail) { fieldError(form, form.querySelector("[name]:not([type=hidden])").name, json.detail); }
        })
        .catch(function () {
          if (button) { button.disabled = false; }
          say("The server did not answer; nothing was saved. Try again.");
        });
    });
  });

  // Live run progress on a case page.
  var runs = document.getElementById("runs");
  if (!runs || runs.dataset.active !== "1") { return; }
  var url = runs.dataset.pollUrl;
  var live = document.getElementById("run-live");
  var last = "";
  function apply(status) {
    document.getElementById("overall-progress").textContent = status.percent + "%";
    document.getElementById("overall-bar").value = status.percent;
    document.getElementById("case-state").textContent = status.state_label;
    status.runs.forEach(function (run) {
      var row = document.getElementById("run-" + run.id);
      if (!row) { return; }
      row.querySelector(".run-status").textContent = run.status_label;
      row.querySelector(".run-percent").textContent = run.percent + "%";
      row.querySelector(".run-bar").value = run.percent;
      row.querySelector(".run-phase").textContent = run.error || run.phase;
    });
    // Announce only changes of state, not every percent: a screen reader should not chatter.
    var summary = status.runs.map(function (r) { return "run " + r.id + " " + r.status_label; }).join(", ");
    if (summary !== last) { live.textContent = summary; last = summary; }
  }
  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) { if (!response.ok) { throw new Error(String(response.status)); } return response.json(); })
      .then(function (status) {
        apply(status);
        if (status.active) { window.setTimeout(poll, 2000); } else { window.location.reload(); }
      })
      .catch(function () { window.setTimeout(poll, 8000); });
  }
  window.setTimeout(poll, 1500);
})();
