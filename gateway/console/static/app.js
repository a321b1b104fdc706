// Bastion console: the only script. Every page works without it; it adds a
// confirmation before destructive forms (data-confirm) and nothing else.
"use strict";
document.addEventListener("submit", function (ev) {
  var f = ev.target;
  var msg = f && f.getAttribute && f.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) {
    ev.preventDefault();
  }
});
