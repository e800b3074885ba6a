"use strict";
// The page's logic: model information, uploads (one request per image, two at a time), result cards
// with the heatmap laid over the image, and the heatmap toggle and opacity slider. No external code.

const results = document.getElementById("results");
const input = document.getElementById("file-input");
const zone = document.getElementById("drop-zone");
const opacity = document.getElementById("opacity");
const opacityValue = document.getElementById("opacity-value");
const showHeatmap = document.getElementById("show-heatmap");
let threshold = null;

function pct(v) { return (v * 100).toFixed(1) + "%"; }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

async function loadModel() {
  const box = document.getElementById("model-info");
  try {
    const r = await fetch("/api/model");
    const m = await r.json();
    threshold = m.threshold;
    const v = m.validation || {};
    const items = [
      ["model", m.name], ["architecture", m.arch], ["input", `${m.image_size}×${m.image_size}`],
      ["threshold", m.threshold.toFixed(3)],
    ];
    if (v.roc_auc != null) items.push(["val ROC-AUC", v.roc_auc.toFixed(3)]);
    if (v.sensitivity != null) items.push(["val sensitivity", v.sensitivity.toFixed(3)]);
    if (v.specificity != null) items.push(["val specificity", v.specificity.toFixed(3)]);
    if (v.n != null) items.push(["val images", `${v.n} (${v.positives} fractured)`]);
    items.push(["probabilities", m.calibration ? "calibrated on val (Platt)" : "uncalibrated scores"]);
    box.replaceChildren(...items.map(([k, val]) => el("div", {}, el("dt", { text: k }), el("dd", { text: String(val) }))));
  } catch (e) {
    box.replaceChildren(el("dt", { text: "model" }), el("dd", { class: "error", text: "unavailable: " + e }));
  }
}

function card(file) {
  const img = el("img", { class: "xray", alt: file.name });
  // A file the browser cannot draw (DICOM, or not an image at all) shows "no preview", never a
  // broken-image icon; a DICOM gets the server's rendering once it is analysed.
  img.addEventListener("error", () => img.classList.add("unshown"));
  img.addEventListener("load", () => img.classList.remove("unshown"));
  img.src = URL.createObjectURL(file);
  const heat = el("img", { class: "heatmap", alt: "" });
  heat.style.opacity = opacity.value / 100;
  heat.hidden = true;
  const status = el("div", { class: "small status", text: "analysing…" });
  const c = el("article", { class: "result", "data-state": "pending" },
    el("div", { class: "figure" }, img, heat),
    el("div", { class: "meta" }, el("div", { class: "name", text: file.name }), status));
  results.prepend(c);
  return { c, heat, status };
}

async function analyse(file) {
  const { c, heat, status } = card(file);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch("/api/predict?heatmap=1", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    const fractured = body.predicted === "fractured";
    const bar = el("div", { class: "bar" }, el("div", { class: "fill" }), el("div", { class: "threshold" }));
    bar.firstChild.style.width = pct(body.p_fractured);
    // The colour scale spans the whole bar whatever the fill's length: a 3% fill shows the scale's
    // first 3%, not the whole scale squeezed.
    bar.firstChild.style.backgroundSize = `${100 / Math.max(body.p_fractured, 0.001)}% 100%`;
    bar.lastChild.style.left = pct(body.threshold);
    status.replaceWith(
      el("div", { class: "verdict" },
        el("span", { class: "label " + (fractured ? "fractured" : "not-fractured"), text: body.predicted }),
        el("span", {}, "P(fractured) ", el("span", { class: "p-fractured", text: pct(body.p_fractured) }))),
      bar,
      el("div", { class: "small", text: `threshold ${pct(body.threshold)} · ${body.ms.toFixed(0)} ms` }));
    if (body.image_png_base64) {
      // A DICOM upload: the browser cannot draw the file, the server sends the windowed image.
      c.querySelector(".xray").src = "data:image/png;base64," + body.image_png_base64;
    }
    if (body.heatmap_png_base64) {
      heat.src = "data:image/png;base64," + body.heatmap_png_base64;
      heat.hidden = false;
    }
    if (!fractured) {
      // Below the threshold there is no fracture to point at: no box, which would read as one.
      c.querySelector(".meta").append(el("div", { class: "small no-evidence", text: "no evidence box: below the threshold" }));
    } else if (body.evidence && body.image_size) {
      // The region holding the evidence and its peak, in percent of the image (the API reports
      // image pixels, so the marks follow the picture at any display size).
      const [w, h] = body.image_size;
      const [bx, by, bw, bh] = body.evidence.box;
      const mark = el("div", { class: "evidence-box", title: "where the evidence lies" });
      Object.assign(mark.style, { left: pct(bx / w), top: pct(by / h), width: pct(bw / w), height: pct(bh / h) });
      const [px, py] = body.evidence.peak;
      const peak = el("div", { class: "evidence-peak" });
      Object.assign(peak.style, { left: pct(px / w), top: pct(py / h) });
      c.querySelector(".figure").append(mark, peak);
    }
    c.dataset.state = "done";
  } catch (e) {
    status.className = "error";
    status.textContent = "could not analyse: " + e.message;
    c.dataset.state = "error";
    heat.remove();
  }
}

async function analyseAll(files) {
  const queue = Array.from(files);
  const worker = async () => { while (queue.length) await analyse(queue.shift()); };
  await Promise.all([worker(), worker()]);
}

input.addEventListener("change", () => { analyseAll(input.files); input.value = ""; });
for (const t of ["dragenter", "dragover"]) zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
for (const t of ["dragleave", "drop"]) zone.addEventListener(t, () => zone.classList.remove("dragging"));
zone.addEventListener("drop", (e) => { e.preventDefault(); analyseAll(e.dataTransfer.files); });
opacity.addEventListener("input", () => {
  opacityValue.textContent = opacity.value + "%";
  for (const h of document.querySelectorAll("img.heatmap")) h.style.opacity = opacity.value / 100;
});
showHeatmap.addEventListener("change", () => results.classList.toggle("hide-heatmaps", !showHeatmap.checked));
loadModel();
