// webhookd dashboard: small enhancements over pages that work without JavaScript.
// - local time on hover for every <time datetime>
// - copy buttons (hidden until this script runs)
// - "All events" disables the single-event checkboxes
// - live refresh of the first deliveries page (fetches the rows partial, replaces the table body)
"use strict";

(function () {
  var REFRESH_MS = 5000;

  function localTimes(root) {
    var nodes = root.querySelectorAll("time[datetime]");
    for (var i = 0; i < nodes.length; i++) {
      var when = new Date(nodes[i].getAttribute("datetime"));
      if (!isNaN(when.getTime())) {
        nodes[i].title = "Your local time: " + when.toLocaleString();
      }
    }
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "sr-only";
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      if (ok) { resolve(); } else { reject(new Error("copy failed")); }
    });
  }

  function copyButtons() {
    var buttons = document.querySelectorAll("button[data-copy]");
    for (var i = 0; i < buttons.length; i++) {
      (function (button) {
        var target = document.getElementById(button.getAttribute("data-copy"));
        if (!target) { return; }
        var label = button.textContent;
        button.hidden = false;
        button.addEventListener("click", function () {
          copyText(target.textContent).then(function () {
            button.textContent = "Copied";
          }, function () {
            button.textContent = "Select and copy by hand";
          });
          window.setTimeout(function () { button.textContent = label; }, 2000);
        });
      })(buttons[i]);
    }
  }

  function allEvents() {
    var boxes = document.querySelectorAll("input[data-all-events]");
    for (var i = 0; i < boxes.length; i++) {
      (function (all) {
        var set = all.closest("fieldset");
        if (!set) { return; }
        var others = set.querySelectorAll("input[name='events']:not([data-all-events])");
        function sync() {
          for (var j = 0; j < others.length; j++) { others[j].disabled = all.checked; }
        }
        all.addEventListener("change", sync);
        sync();
      })(boxes[i]);
    }
  }

  function liveRefresh() {
    var body = document.querySelector("tbody[data-live-src]");
    var toggle = document.querySelector("label[data-live-toggle]");
    if (!body || !toggle) { return; }
    var box = toggle.querySelector("input");
    toggle.hidden = false;
    var busy = false;
    function tick() {
      if (busy || !box.checked || document.hidden) { return; }
      busy = true;
      fetch(body.getAttribute("data-live-src"), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (resp) {
          if (resp.redirected || !resp.ok) {
            // the session ended: let the page go to the log-in screen
            box.checked = false;
            if (resp.redirected) { window.location.reload(); }
            return null;
          }
          return resp.text();
        })
        .then(function (html) {
          if (html === null) { return; }
          var template = document.createElement("template");
          template.innerHTML = "<table><tbody>" + html + "</tbody></table>";
          var fresh = template.content.querySelector("tbody");
          if (fresh) {
            body.replaceChildren.apply(body, Array.prototype.slice.call(fresh.childNodes));
            localTimes(body);
          }
        })
        .catch(function () { /* the daemon is restarting: try again on the next tick */ })
        .then(function () { busy = false; });
    }
    window.setInterval(tick, REFRESH_MS);
    document.addEventListener("visibilitychange", tick);
  }

  function start() {
    localTimes(document);
    copyButtons();
    allEvents();
    liveRefresh();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
