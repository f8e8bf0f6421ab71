// Every string from the server is shown with textContent, never parsed as HTML: an error
// message can quote text from inside an uploaded file.
"use strict";
const $ = id => document.getElementById(id);

function headers() {
  const key = $("key").value || sessionStorage.getItem("covidxray-key") || "";
  return key ? {"X-API-Key": key} : {};
}

function showError(text) {
  const span = document.createElement("span");
  span.className = "error";
  span.textContent = text;
  $("status").replaceChildren(span);
}

async function loadModel() {
  const response = await fetch("api/model", {headers: headers()});
  if (response.status === 401) { $("keyrow").hidden = false; return; }
  const m = await response.json();
  const card = m.model_card;
  $("synthetic").hidden = !card.synthetic_data;
  $("model").textContent = "Model " + m.model_id + " · threshold " + card.threshold.toFixed(3) +
    " (" + card.threshold_method + ") · out-of-distribution gate: " + (card.ood_gate ? "on" : "off");
}

function show(r) {
  $("result").hidden = false;
  const p = r.probability, t = r.threshold;
  $("prob").textContent = p.toFixed(3);
  $("thr").textContent = t.toFixed(3);
  $("fill").style.width = (100 * p) + "%";
  $("mark").style.left = (100 * t) + "%";
  $("marklabel").style.left = (100 * t) + "%";
  const classes = r.class_probabilities;
  $("classes").hidden = !classes;
  if (classes) $("classes").textContent = "Each class: " + Object.entries(classes)
    .map(([name, p]) => name + " " + p.toFixed(3)).join(" · ");
  const level = r.confidence ? Math.round(100 * r.confidence) + "%" : "";
  const ood = r.ood === true;
  const state = ood ? "notfrontal" : r.verdict === "uncertain: refer" ? "uncertain" :
    (r.verdict === "unlike the calibration data" ? "unlike" : "result");
  $("verdict").className = "verdict " + state;
  $("verdict").dataset.state = state;
  // a film the gate flags gets no call: its score is never the headline, only small print
  $("score").hidden = ood;
  $("researchscore").hidden = !ood;
  $("researchscore").textContent = ood ? "Model score, kept for research only and meaningless " +
    "for this image: " + p.toFixed(3) + "." : "";
  if (state === "notfrontal") {
    $("verdict").textContent = "NOT A FRONTAL CHEST X-RAY: NO VERDICT. This image does not look " +
      "like a frontal chest X-ray of the kind the model was trained on (" + r.ood_reason + ").";
  } else if (state === "uncertain") {
    $("verdict").textContent = "UNCERTAIN: REFER. At " + level + " confidence the model cannot tell " +
      "this film either way; it gives no result for it.";
  } else if (state === "unlike") {
    $("verdict").textContent = "NO RESULT: this film is unlike every film the model was calibrated on " +
      "(at " + level + " confidence it belongs to neither class).";
  } else {
    $("verdict").textContent = (r.positive ? "Above" : "Below") + " the threshold: the model calls this image " + r.label +
      (level ? " (at " + level + " confidence)" : "") + ". A research score, not a diagnosis.";
  }
  $("image").src = r.image_png;
  $("base").src = r.image_png;
  $("heat").src = r.heatmap_png;
  $("heat").style.opacity = $("opacity").value / 100;
  const lungs = Boolean(r.lung_outline_png);
  $("lungrow").hidden = !lungs;
  $("lungs").hidden = !lungs || !$("showlungs").checked;
  if (lungs) $("lungs").src = r.lung_outline_png;
  $("lungshare").textContent = r.lung_heat_share !== null && r.lung_heat_share !== undefined ?
    " " + Math.round(100 * r.lung_heat_share) + "% of the heat lies inside the lungs found." :
    (r.lungs_found === false ? " No plausible lungs were found on this image." : "");
}

async function upload(file) {
  $("status").textContent = "Analysing " + file.name + " …";
  const form = new FormData();
  form.append("files", file);
  try {
    // the page shows the heat map: it asks for it (machines need not)
    const response = await fetch("api/predict?heatmap=1", {method: "POST", body: form,
                                                            headers: headers()});
    const body = await response.json();
    if (!response.ok) { showError(String(body.detail || response.statusText)); return; }
    const r = body.results[0];
    if (r.error) { showError(String(r.error)); return; }
    $("status").textContent = file.name;
    show(r);
  } catch (e) {
    showError("The server could not be reached.");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").onchange = () => { sessionStorage.setItem("covidxray-key", $("key").value); loadModel(); };
  $("drop").onclick = () => $("file").click();
  $("file").onchange = e => e.target.files.length && upload(e.target.files[0]);
  $("drop").ondragover = e => { e.preventDefault(); $("drop").classList.add("over"); };
  $("drop").ondragleave = () => $("drop").classList.remove("over");
  $("drop").ondrop = e => { e.preventDefault(); $("drop").classList.remove("over"); if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); };
  $("opacity").oninput = e => $("heat").style.opacity = e.target.value / 100;
  $("showlungs").onchange = e => $("lungs").hidden = !e.target.checked;
  loadModel();
});
