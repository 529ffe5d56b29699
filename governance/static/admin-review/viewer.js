// Loupe figure viewer: zoom in, out and back to fit; keyboard + and - work when the figure has focus.
(function () {
  "use strict";
  var image = document.getElementById("viewer-image");
  var canvas = document.getElementById("viewer-canvas");
  var label = document.getElementById("zoom-level");
  if (!image || !canvas) { return; }
  var scale = 0;  // 0: fit to width

  function apply() {
    if (scale === 0) {
      image.style.width = "100%";
      label.textContent = "Fit to width";
    } else {
      image.style.width = Math.round(image.naturalWidth * scale) + "px";
      label.textContent = "Zoom " + Math.round(scale * 100) + "%";
    }
  }
  function zoom(how) {
    var current = scale === 0 ? image.clientWidth / Math.max(1, image.naturalWidth) : scale;
    if (how === "in") { scale = Math.min(8, current * 1.5); }
    else if (how === "out") { scale = Math.max(0.25, current / 1.5); }
    else { scale = 0; }
    apply();
  }
  document.querySelectorAll("[data-zoom]").forEach(function (button) {
    button.addEventListener("click", function () { zoom(button.dataset.zoom); });
  });
  canvas.addEventListener("keydown", function (event) {
    if (event.key === "+" || event.key === "=") { zoom("in"); event.preventDefault(); }
    if (event.key === "-") { zoom("out"); event.preventDefault(); }
    if (event.key === "0") { zoom("fit"); event.preventDefault(); }
  });
  apply();
})();
