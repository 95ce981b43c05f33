// The ferkit page: photos, the webcam and short videos, sent to this server's JSON API. No other
// network: every asset comes from the ferkit server.
"use strict";

const $ = (id) => document.getElementById(id);
// as ferkit's annotated images have them (ferkit.draw.COLOURS: Okabe-Ito, colour-blind safe)
const COLORS = { angry: "#d55e00", disgust: "#009e73", fear: "#cc79a7", happy: "#f0e442",
                 neutral: "#c8c8c8", sad: "#0072b2", surprise: "#e69f00" };

// Each tab has its own status line: an answer that arrives while another tab is shown waits for its own.
const statuses = {};
const shownTab = () => document.querySelector(".tab[aria-selected=true]").dataset.tab;

function sayIn(tab, text, isError = false) {
  statuses[tab] = { text, isError };
  if (tab === shownTab()) showStatus(tab);
}

function showStatus(tab) {
  const { text, isError } = statuses[tab] || { text: "", isError: false };
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

const NOT_ANSWERING = "The server is not answering: is `ferkit serve` still running?";

// fetch, with the browser's own words for a server that is gone ("Failed to fetch", "NetworkError ...") said plainly
async function send(url, options) {
  try {
    return await fetch(url, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;  // replaced by a newer request: the server stops its work too
    throw new Error(NOT_ANSWERING);
  }
}

// One request at a time per kind: a new photo or video cancels the one still on its way.
const requests = {};

function freshSignal(kind) {
  requests[kind]?.abort();
  requests[kind] = new AbortController();
  return requests[kind].signal;
}

async function post(url, blob, signal) {
  const response = await send(url, { method: "POST", body: blob, signal,
                                     headers: { "Content-Type": blob.type || "application/octet-stream" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

// --- tabs (the ARIA tab pattern: arrow keys move between them) ---------------------------------
const tabs = [...document.querySelectorAll(".tab")];

function chooseTab(tab) {
  for (const other of tabs) {
    const chosen = other === tab;
    other.setAttribute("aria-selected", String(chosen));
    other.tabIndex = chosen ? 0 : -1;
    $(other.dataset.tab).hidden = !chosen;
  }
  if (tab.dataset.tab !== "webcam") stopWebcam();
  showStatus(tab.dataset.tab);
}

tabs.forEach((tab, index) => {
  tab.addEventListener("click", () => chooseTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(index + step + tabs.length) % tabs.length];
    chooseTab(next);
    next.focus();
  });
});
// a file dropped anywhere but on a drop zone would make the browser open it and leave the page
for (const kind of ["dragover", "drop"]) document.addEventListener(kind, (event) => event.preventDefault());

function dropZone(zone, take) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = event.dataTransfer.files;
    if (files.length) take(files[0], files.length);
  });
}

// --- drawing ----------------------------------------------------------------------------------
// As ferkit.draw draws an annotated copy: outline and letters no larger than the faces allow, each label
// above its box, else below, else inside it, clear of the others where it can be; where a quarter of the
// labels or more would still cover each other or their faces (a crowded group photo), the numbers alone.
// `shown`: canvas pixels per CSS pixel as the canvas is shown (a high-DPI screen, or a canvas shrunk to a
// phone's width): labels keep a readable size on the screen, not only in the canvas.
function drawFaces(context, faces, scale = 1, steady = null, shown = 1) {  // -> the labels drawn: their text and area
  const { width: canvasWidth, height: canvasHeight } = context.canvas;
  const boxes = faces.map((face) => face.box.map((v) => v * scale));
  const { line, letters } = lineAndLetters(scale, boxes, shown);
  context.lineWidth = line;
  context.font = `${letters}px system-ui, sans-serif`;
  const colors = faces.map((face) => COLORS[face.emotion] || "#56b4e9");
  boxes.forEach(([x, y, w, h], index) => {  // every box first, so that no box line runs through a label
    context.strokeStyle = colors[index];
    context.strokeRect(x, y, w, h);
  });
  const whole = faces.map((face, index) =>
    `${index + 1} ${face.emotion}${face.uncertain ? "?" : ""} ${Math.round(face.score * 100)}%`);
  const size = [canvasWidth, canvasHeight];
  let labels = placedLabels(context, boxes, whole, line, letters, size);
  const clashes = countClashes(labels, boxes);
  const crowded = boxes.length > 1 && clashes >= Math.max(2, boxes.length / 4);
  if (steady ? heldNumbersOnly(steady, crowded) : crowded) {
    const numbers = placedLabels(context, boxes, faces.map((_, index) => `${index + 1}`), line, letters, size);
    if (steady || countClashes(numbers, boxes) < clashes) labels = numbers;
  }
  labels.forEach(({ text, area: [left, top, right, bottom] }, index) => {
    context.fillStyle = colors[index];
    context.fillRect(left, top, right - left, bottom - top);
    context.fillStyle = textColour(colors[index]);
    context.fillText(text, left + Math.max(2, line), bottom - Math.max(2, line) - letters * 0.22);
  });
  return labels;
}

// The webcam's label style held from frame to frame, as an annotated video's (ferkit.draw.SteadyLabels):
// whole labels and numbers alone switch only after FRAMES_TO_SWITCH frames in a row ask for it.
const FRAMES_TO_SWITCH = 3;

function heldNumbersOnly(steady, crowded) {
  steady.streak = steady.numbersOnly !== null && crowded !== steady.numbersOnly ? steady.streak + 1 : 0;
  if (steady.numbersOnly === null || steady.streak >= FRAMES_TO_SWITCH) {
    steady.numbersOnly = crowded;
    steady.streak = 0;
  }
  return steady.numbersOnly;
}

function lineAndLetters(scale, boxes, shown = 1) {
  let line = Math.max(2 * shown, 3 * scale), letters = Math.max(Math.round(12 * shown), Math.round(16 * scale));
  if (boxes.length) {
    const sides = boxes.map(([, , w, h]) => Math.min(w, h)).sort((a, b) => a - b);
    const middle = sides.length >> 1;
    const face = sides.length % 2 ? sides[middle] : (sides[middle - 1] + sides[middle]) / 2;
    line = Math.max(2 * shown, Math.min(line, Math.round(face / 12)));
    letters = Math.max(Math.round(11 * shown), Math.min(letters, Math.round(face * 0.45)));
  }
  return { line, letters };
}

function placedLabels(context, boxes, texts, line, letters, [canvasWidth, canvasHeight]) {
  const pad = Math.max(2, line), height = Math.round(letters * 1.2) + 2 * pad, placed = [];
  return boxes.map((box, index) => {
    const [x, y, w, h] = box;
    const width = context.measureText(texts[index]).width + 2 * pad;
    const left = Math.min(Math.max(0, x - line / 2), Math.max(0, canvasWidth - width));
    const tops = [y - height, y + h, y, y + h - height];
    const inside = (top) => top >= 0 && top + height <= canvasHeight;
    const others = boxes.filter((_, k) => k !== index).map(([ox, oy, ow, oh]) => [ox, oy, ox + ow, oy + oh]);
    const candidates = tops.map((top) => Math.min(Math.max(0, top), Math.max(0, canvasHeight - height)));
    const cost = (i) => [cover([left, candidates[i], left + width, candidates[i] + height], placed) > 0 ? 1 : 0,
                         inside(tops[i]) ? 0 : 1, cover([left, candidates[i], left + width, candidates[i] + height], others), i];
    const best = [0, 1, 2, 3].map(cost).sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2] || a[3] - b[3])[0][3];
    const area = [left, candidates[best], left + width, candidates[best] + height];
    placed.push(area);
    return { text: texts[index], area };
  });
}

function cover(area, rects) {  // how much of `area` the rectangles cover, in square pixels
  return rects.reduce((sum, r) => sum + Math.max(0, Math.min(area[2], r[2]) - Math.max(area[0], r[0]))
                                      * Math.max(0, Math.min(area[3], r[3]) - Math.max(area[1], r[1])), 0);
}

function countClashes(labels, boxes) {  // labels that cover a label placed before them, or their own face
  return labels.filter(({ area }, k) => {
    const [x, y, w, h] = boxes[k];
    return labels.slice(0, k).some((other) => cover(area, [other.area]) > 0) || cover(area, [[x, y, x + w, y + h]]) > 0;
  }).length;
}

function textColour(hex) {  // black or white, whichever contrasts more with the label's colour (WCAG 2)
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255)
    .map((c) => (c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4));
  const luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b;
  return (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) ? "#000" : "#fff";
}

function listFaces(list, faces) {
  list.replaceChildren();
  faces.forEach((face, index) => {
    const item = document.createElement("li");
    item.className = "face";
    item.dataset.emotion = face.emotion;
    const title = document.createElement("h2");
    title.textContent = `Face ${index + 1}: ${face.emotion} (${Math.round(face.score * 100)}%)`;
    if (face.uncertain) {
      const mark = document.createElement("span");
      mark.className = "uncertain";
      mark.textContent = " (uncertain)";  // a space in the text, not only a margin: read out apart from the heading
      title.append(mark);
    }
    item.append(title);
    for (const [name, p] of Object.entries(face.probabilities)) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.innerHTML = `<span></span><span class="track"><span class="fill"></span></span><span></span>`;
      bar.children[0].textContent = name;
      bar.querySelector(".fill").style.width = `${(p * 100).toFixed(1)}%`;
      bar.querySelector(".fill").style.background = COLORS[name] || "";
      bar.children[2].textContent = `${Math.round(p * 100)}%`;
      item.append(bar);
    }
    list.append(item);
  });
}

// A result as a file to keep, named as `ferkit predict` names its files: photo.faces.json, clip.timeline.csv.
const offered = {};

function offerDownload(link, blob, fileName, suffix) {
  if (offered[link.id]) URL.revokeObjectURL(offered[link.id]);
  offered[link.id] = link.href = URL.createObjectURL(blob);
  link.download = fileName.replace(/\.[^.]+$/, "") + suffix;
  link.hidden = false;
}

function facesInWords(where, faces) {  // what an annotated picture shows, for those who cannot see it
  if (!faces.length) return `${where}: no face found`;
  const each = faces.map((face, index) => `${index + 1} ${face.emotion}${face.uncertain ? " (uncertain)" : ""}`);
  return `${where}: ${faces.length} face${faces.length > 1 ? "s" : ""}: ${each.join(", ")}`;
}

// --- photo ------------------------------------------------------------------------------------
let latestPhoto = 0;  // photos given in quick succession: only the last one's answer is shown

async function analyzePhoto(file, given = 1) {
  const mine = ++latestPhoto;
  const say = (text, isError) => sayIn("photo", text, isError);
  const canvas = $("photo-canvas");
  canvas.hidden = true;  // nothing of the previous photo stays up beside this one's answer or error
  $("faces").replaceChildren();
  $("photo-json").hidden = true;
  if (file.type.startsWith("video/")) {
    say(`${file.name} is a video: the Video tab analyses videos`, true);
    return;
  }
  const which = given > 1 ? ` (the first of the ${given} files given: one photo at a time)` : "";
  say(`Analysing ${file.name}…${which}`);
  try {
    const result = await post("/v1/analyze", file, freshSignal("photo"));  // the server's answer, or its error, comes first
    if (mine !== latestPhoto) return;
    listFaces($("faces"), result.faces);
    offerDownload($("photo-json"), new Blob([JSON.stringify({ ...result, source: file.name }, null, 2)],
                                           { type: "application/json" }), file.name, ".faces.json");
    const count = result.faces.length;
    let note = "";
    try {
      const bitmap = await createImageBitmap(file);
      if (mine !== latestPhoto) return;
      // as wide as it is shown (a phone's screen: narrower than 640 px), so that labels keep their size there
      const scale = Math.min(1, Math.min(640, canvas.parentElement.clientWidth || 640) / bitmap.width);
      const ratio = window.devicePixelRatio || 1;  // as many canvas pixels as the screen shows: sharp on high-DPI screens
      canvas.style.width = `${Math.round(bitmap.width * scale)}px`;
      canvas.width = Math.round(bitmap.width * scale * ratio);
      canvas.height = Math.round(bitmap.height * scale * ratio);
      const context = canvas.getContext("2d");
      context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      // boxes are in pixels of the upright image, which is how the browser shows it too
      drawFaces(context, result.faces, canvas.width / result.image_size[0], null, ratio);
      canvas.setAttribute("aria-label", facesInWords(file.name, result.faces));
      canvas.hidden = false;
    } catch {
      note = " (this browser cannot show the image itself)";  // TIFF, say: the faces are still listed
    }
    say((count ? `${count} face${count > 1 ? "s" : ""} in ${file.name}` : `No face found in ${file.name}`) + note + which);
  } catch (error) {
    if (mine === latestPhoto) say(error.message, true);
  }
}

$("photo-input").addEventListener("change", (event) => {
  if (event.target.files.length) analyzePhoto(event.target.files[0]);
  event.target.value = "";  // so that choosing the same file again (after an error, say) is a change too
});
dropZone($("drop"), analyzePhoto);

// --- webcam: one request in flight; frames that arrive meanwhile are dropped, not queued --------
let stream = null;
let busy = false;
let nextTry = 0;  // after a failed frame, the next waits a second: not sixty failing requests a second
const RETRY_MS = 1000;
const grab = document.createElement("canvas");
let webcamLabels = { numbersOnly: null, streak: 0 };  // see heldNumbersOnly

async function startWebcam() {
  webcamLabels = { numbersOnly: null, streak: 0 };
  if (!navigator.mediaDevices) {
    sayIn("webcam", "No webcam here: browsers allow the camera only on https or localhost pages", true);
    return;
  }
  $("webcam-start").disabled = true;  // a second click while the browser asks would open a second camera stream
  let started;
  try {
    started = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  } catch (error) {
    sayIn("webcam", `No webcam: ${error.message}`, true);
    return;
  } finally {
    $("webcam-start").disabled = false;
  }
  if ($("webcam").hidden) {  // the user went to another tab while the browser asked: no camera left on unseen
    for (const track of started.getTracks()) track.stop();
    return;
  }
  stream = started;
  $("webcam-video").srcObject = stream;
  $("webcam-start").hidden = true;
  $("webcam-stop").hidden = false;
  $("webcam-stop").focus();  // the button pressed is gone: focus goes to the one in its place
  sayIn("webcam", "Webcam on");
  requestAnimationFrame(sendFrame);
}

function stopWebcam() {
  if (!stream) return;
  for (const track of stream.getTracks()) track.stop();
  stream = null;
  $("webcam-video").srcObject = null;
  const hadFocus = document.activeElement === $("webcam-stop");
  $("webcam-start").hidden = false;
  $("webcam-stop").hidden = true;
  if (hadFocus) $("webcam-start").focus();
  const overlay = $("webcam-overlay");
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  $("webcam-faces").replaceChildren();
  sayIn("webcam", "Webcam off");
}

async function sendFrame() {
  if (!stream) return;
  const video = $("webcam-video");
  if (!busy && video.videoWidth && performance.now() >= nextTry) {
    busy = true;
    grab.width = video.videoWidth;
    grab.height = video.videoHeight;
    grab.getContext("2d").drawImage(video, 0, 0);
    try {
      const frame = await new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", 0.85));
      const result = await post("/v1/analyze", frame);
      const overlay = $("webcam-overlay");
      overlay.width = grab.width;
      overlay.height = grab.height;
      const context = overlay.getContext("2d");
      context.clearRect(0, 0, overlay.width, overlay.height);
      if (stream) {
        drawFaces(context, result.faces, 1, webcamLabels, overlay.width / (overlay.clientWidth || overlay.width));
        overlay.setAttribute("aria-label", facesInWords("The webcam", result.faces));
        listFaces($("webcam-faces"), result.faces);
        if (statuses.webcam?.isError) sayIn("webcam", "Webcam on");  // a failed frame is behind us
      }
    } catch (error) {
      nextTry = performance.now() + RETRY_MS;
      const overlay = $("webcam-overlay");  // boxes of an older frame would no longer match the live picture
      overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
      $("webcam-faces").replaceChildren();
      if (stream) sayIn("webcam", error.message, true);
    } finally {
      busy = false;
    }
  }
  requestAnimationFrame(sendFrame);
}

async function videoResult(answer, onProgress) {
  // lines of JSON as the server analyses the video: {"progress": ...}, then {"result": ...} or {"error": ...}
  const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(NOT_ANSWERING);  // the stream ended before its last line
    pending += value;
    let end;
    while ((end = pending.indexOf("\n")) >= 0) {
      const line = JSON.parse(pending.slice(0, end));
      pending = pending.slice(end + 1);
      if (line.progress) onProgress(line.progress.seconds_analysed, line.progress.seconds);
      if (line.error) throw new Error(line.error.detail);
      if (line.result) return line.result;
    }
  }
}

$("webcam-start").addEventListener("click", startWebcam);
$("webcam-stop").addEventListener("click", stopWebcam);

// --- video ------------------------------------------------------------------------------------
let latestVideo = 0;  // videos given in quick succession: only the last one's answer is shown

async function analyzeVideo(file, given = 1) {
  const mine = ++latestVideo;
  const say = (text, isError) => sayIn("video", text, isError);
  const which = given > 1 ? ` (the first of the ${given} files given: one video at a time)` : "";
  $("video-plot").hidden = true;
  $("video-csv").hidden = true;
  if (file.type.startsWith("image/") && !["image/gif", "image/png"].includes(file.type)) {  // GIF, PNG: maybe animated
    say(`${file.name} is a photo: the Photo tab analyses photos`, true);
    return;
  }
  say(`Analysing ${file.name}… (a minute of video takes a while)${which}`);
  try {
    const form = new FormData();  // a form, so that the plot carries the file's name
    form.append("file", file);
    const answer = await send("/v1/video", { method: "POST", body: form, signal: freshSignal("video"),
                                             headers: { Accept: "application/x-ndjson" } });
    if (!answer.ok) {  // refused before the analysis began: one JSON error
      const refusal = await answer.json().catch(() => ({}));
      throw new Error(refusal.detail || `${answer.status} ${answer.statusText}`);
    }
    const result = await videoResult(answer, (seconds, length) => {
      if (mine === latestVideo) say(`Analysing ${file.name}… ${seconds.toFixed(0)}` + (length ? ` of ${length.toFixed(0)}` : "") + ` s${which}`);
    });
    if (mine !== latestVideo) return;
    $("video-plot").src = result.plot_png;
    $("video-plot").alt = `Emotions over time in ${file.name}: ${result.tracks} face${result.tracks === 1 ? "" : "s"} followed, ` +
                          "each emotion's probability drawn against the time; the CSV below holds the numbers";
    $("video-plot").hidden = false;
    offerDownload($("video-csv"), new Blob([result.csv], { type: "text/csv" }), file.name, ".timeline.csv");
    // `tracks`: each face followed from frame to frame (`faces` would count it once per frame it is in)
    say(`${result.frames_analysed} frames analysed, ${result.tracks} face${result.tracks === 1 ? "" : "s"} followed through them` +
        (result.cut_short ? " (the file seems cut short: frames stopped before its end)" : "") + which);
  } catch (error) {
    if (mine === latestVideo) say(error.message, true);
  }
}

$("video-input").addEventListener("change", (event) => {
  if (event.target.files.length) analyzeVideo(event.target.files[0]);
  event.target.value = "";
});
dropZone($("video-drop"), analyzeVideo);

// --- the model ----------------------------------------------------------------------------------
fetch("/v1/models").then((r) => r.json()).then((body) => {
  const model = body.models[0];
  $("model").textContent = `model ${model.version}`;
}).catch(() => {});
