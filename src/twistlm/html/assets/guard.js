/* twistlm pages: record every script error, failed resource and CSP violation into the page itself, so a headless
   browser test (and a reader) can see them. Runs first, before the data and the page scripts. */
(function () {
  "use strict";
  const errors = [];
  function show() {
    const box = document.getElementById("twistlm-errors");
    if (box && errors.length) {
      box.textContent = errors.join("\n");
      box.hidden = false;
    }
    document.documentElement.setAttribute("data-errors", String(errors.length));
  }
  function record(message) {
    errors.push(String(message));
    show();
  }
  window.twistlmErrors = errors;
  window.twistlmRecordError = record;
  window.addEventListener("error", function (event) {
    if (event.target && event.target !== window && event.target.tagName) {
      record("failed to load " + event.target.tagName.toLowerCase());
      return;
    }
    const where = event.filename ? " (line " + event.lineno + ")" : "";
    record("error: " + (event.message || "unknown") + where);
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    record("unhandled rejection: " + (event.reason && event.reason.message ? event.reason.message : event.reason));
  });
  document.addEventListener("securitypolicyviolation", function (event) {
    record("blocked by the page's content policy: " + event.violatedDirective + " " + (event.blockedURI || ""));
  });
  ["error", "warn"].forEach(function (level) {
    const original = console[level];
    console[level] = function () {
      record("console." + level + ": " + Array.prototype.join.call(arguments, " "));
      return original.apply(console, arguments);
    };
  });
  document.addEventListener("DOMContentLoaded", show);
})();
