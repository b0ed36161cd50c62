// The curator page's few behaviours: select every series of the queue page, and the frame
// viewer's window/level (typed, or dragged on the image as in most DICOM viewers), which asks
// the server for the frame rendered with window=center,width,linear (PS3.18 8.3.5.1.4).
"use strict";

function setUpQueue() {
  const all = document.getElementById("select-all");
  if (!all) return;
  all.addEventListener("change", () => {
    for (const box of document.querySelectorAll("input.pick")) box.checked = all.checked;
  });
}

function setUpViewer() {
  const viewer = document.getElementById("viewer");
  if (!viewer) return;
  const image = document.getElementById("frame-image");
  const frame = document.getElementById("frame");
  const center = document.getElementById("center");
  const width = document.getElementById("width");
  let pending = null;

  function source() {
    const n = Math.min(Math.max(parseInt(frame.value, 10) || 1, 1), parseInt(viewer.dataset.frames, 10));
    let url = viewer.dataset.src.replace("FRAME", String(n));
    if (center.value !== "" && width.value !== "" && Number(width.value) >= 1) {
      url += "?window=" + encodeURIComponent(`${center.value},${width.value},linear`);
    }
    return url;
  }
  // Typing or dragging asks for at most one image at a time: the latest wins.
  function update() {
    if (pending) clearTimeout(pending);
    pending = setTimeout(() => { image.src = source(); }, 120);
  }
  for (const input of [frame, center, width]) input.addEventListener("input", update);
  document.getElementById("reset").addEventListener("click", () => {
    center.value = ""; width.value = ""; update();
  });

  let drag = null;
  image.addEventListener("mousedown", (e) => {
    drag = { x: e.clientX, y: e.clientY, c: Number(center.value || 40), w: Number(width.value || 400) };
    e.preventDefault();
  });
  window.addEventListener("mouseup", () => { drag = null; });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    width.value = String(Math.max(1, Math.round(drag.w + (e.clientX - drag.x) * 2)));
    center.value = String(Math.round(drag.c + (e.clientY - drag.y) * 2));
    update();
  });
}

document.addEventListener("DOMContentLoaded", () => { setUpQueue(); setUpViewer(); });
