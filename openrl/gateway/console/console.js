// The console's only script: the Copy buttons beside tinker:// paths. No inline script
// anywhere (the Content-Security-Policy allows scripts from /console/static only).
"use strict";
document.addEventListener("click", function (event) {
  var button = event.target.closest("button.copy");
  if (!button) return;
  var text = button.getAttribute("data-copy");
  var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, function () { select(button); });
  } else {
    select(button);
  }
});
// Without the clipboard API (plain http on another host): select the path for Ctrl+C.
function select(button) {
  var code = button.parentNode.querySelector("code.path");
  var range = document.createRange();
  range.selectNodeContents(code);
  var selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  button.textContent = "Selected: press Ctrl+C";
}
