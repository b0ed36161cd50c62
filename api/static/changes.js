// The series view's redaction and edit forms (api/web_changes.py). With "Draw" on, a drag on
// the frame viewer draws a rectangle on a canvas over the image (several may be drawn), kept in
// pixels of the stored image: the rendered frame has the image's own size, so the canvas
// scales from the displayed size by naturalWidth / clientWidth. A click on a top-level row of
// the header table names its attribute in the edit form.
"use strict";

function setUpRedaction() {
  const canvas = document.getElementById("redact-canvas");
  if (!canvas) return;
  const image = document.getElementById("frame-image");
  const draw = document.getElementById("draw");
  const field = document.getElementById("rectangles");
  const list = document.getElementById("rect-list");
  const apply = document.getElementById("apply-redaction");
  const frame = document.getElementById("frame");
  const rects = [];
  let start = null;
  let current = null;

  function scale() { return image.naturalWidth / image.clientWidth || 1; }
  function place() {
    canvas.width = image.clientWidth;
    canvas.height = image.clientHeight;
    paint();
  }
  // The image pixel under a mouse event, clamped to the image.
  function pixel(e) {
    const box = canvas.getBoundingClientRect();
    const s = scale();
    return {
      x: Math.min(Math.max(Math.floor((e.clientX - box.left) * s), 0), image.naturalWidth),
      y: Math.min(Math.max(Math.floor((e.clientY - box.top) * s), 0), image.naturalHeight),
    };
  }
  function rectangle(a, b) {
    const x = Math.min(a.x, b.x), y = Math.min(a.y, b.y);
    return { x, y, width: Math.max(a.x, b.x) - x, height: Math.max(a.y, b.y) - y };
  }
  function paint() {
    const g = canvas.getContext("2d");
    const s = scale();
    g.clearRect(0, 0, canvas.width, canvas.height);
    g.lineWidth = 2;
    for (const r of current ? [...rects, current] : rects) {
      g.fillStyle = "rgba(214, 54, 56, 0.35)";
      g.strokeStyle = "#d63638";
      g.fillRect(r.x / s, r.y / s, r.width / s, r.height / s);
      g.strokeRect(r.x / s, r.y / s, r.width / s, r.height / s);
    }
  }
  function changed() {
    field.value = rects.map((r) => `${r.x},${r.y},${r.width},${r.height}`).join(";");
    list.textContent = rects.length
      ? rects.map((r) => `${r.width}×${r.height} at (${r.x}, ${r.y})`).join("; ")
      : "No rectangle drawn.";
    apply.disabled = rects.length === 0;
    paint();
  }

  draw.addEventListener("change", () => canvas.classList.toggle("drawing", draw.checked));
  canvas.addEventListener("mousedown", (e) => {
    start = pixel(e);
    current = rectangle(start, start);
    e.preventDefault();
  });
  canvas.addEventListener("mousemove", (e) => {
    if (!start) return;
    current = rectangle(start, pixel(e));
    paint();
  });
  window.addEventListener("mouseup", () => {
    if (start && current && current.width > 0 && current.height > 0) rects.push(current);
    start = null;
    current = null;
    changed();
  });
  document.getElementById("clear-rects").addEventListener("click", () => {
    rects.length = 0;
    changed();
  });
  document.getElementById("redact").addEventListener("submit", () => {
    document.getElementById("redact-frame").value = frame.value || "1";
  });
  image.addEventListener("load", place);
  window.addEventListener("resize", place);
  if (image.complete) place();
}

function setUpEdit() {
  const attribute = document.getElementById("edit-attribute");
  if (!attribute) return;
  for (const row of document.querySelectorAll("table.header tr[data-path]")) {
    if (row.dataset.path.includes(".")) continue;  // only top-level attributes are edited
    row.addEventListener("click", () => {
      attribute.value = row.dataset.path;
      document.getElementById("edit-value").focus();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => { setUpRedaction(); setUpEdit(); });
