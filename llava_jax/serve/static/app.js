// The llava-jax chat page: plain JavaScript, no build step.
// The conversation lives here (`conversation`, OpenAI message format) and is sent whole each turn;
// answers stream in over server-sent events from /v1/chat/completions.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];   // [{role, content}] as sent to the server
let pending = [];     // data URLs attached to the next message
let model = null;
let controller = null;  // aborts the answer being streamed
let epoch = 0;          // bumped by Clear, so an answer cut short by it leaves no trace

// -- settings (kept in localStorage) ---------------------------------------------------------

const SETTINGS = ["temperature", "top-p", "max-tokens", "seed", "api-key"];
for (const id of SETTINGS) {
  const saved = localStorage.getItem("llava-jax:" + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("llava-jax:" + id, $(id).value));
}
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function sampling() {
  const body = {
    temperature: Number($("temperature").value || 0),
    top_p: Number($("top-p").value || 1),
  };
  // Empty: the server's default, which never asks for more than the context has room for.
  if ($("max-tokens").value !== "") {
    body.max_tokens = Math.max(1, Math.floor(Number($("max-tokens").value)));
  }
  if ($("seed").value !== "") body.seed = Math.floor(Number($("seed").value));
  return body;
}

// -- the model ---------------------------------------------------------------------------------

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error ? answer.error.message : response.statusText);
    model = answer.data[0].id;
    $("model-name").textContent = model;
    showError("");
  } catch (e) {
    $("model-name").textContent = "(no model)";
    showError("Cannot list the model: " + e.message + (String(e.message).includes("API key") ? " — set it under Settings." : ""));
  }
}
$("api-key").addEventListener("change", loadModel);

// -- images ------------------------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    pending.push(await readAsDataURL(file));
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  pending.forEach((url, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached image " + (i + 1);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove";
    remove.addEventListener("click", () => { pending.splice(i, 1); renderAttachments(); });
    figure.append(img, remove);
    box.append(figure);
  });
}

$("file-input").addEventListener("change", async (e) => { await attach(e.target.files); e.target.value = ""; });
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); attach(files); }
});
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  attach([...e.dataTransfer.files]);
});

// -- the conversation --------------------------------------------------------------------------

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "message " + role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image";
    div.append(img);
  }
  div.append(document.createTextNode(text));
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("send").disabled = busy;
  $("regenerate").disabled = busy || !conversation.some((m) => m.role === "assistant");
  $("status").textContent = busy ? "answering…" : "";
}

// Streams the answer to `conversation` into a new assistant bubble; on success the answer joins
// the conversation, on failure the bubble is removed and the error shown.
async function answer() {
  const started = epoch;
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  const text = div.lastChild;
  controller = new AbortController();
  setBusy(true);
  showError("");
  let reply = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model, messages: conversation, stream: true, ...sampling() }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : response.status + " " + response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            text.textContent = reply;
            $("messages").scrollTop = $("messages").scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    if (started === epoch) conversation.push({ role: "assistant", content: reply });
    $("status").dataset.finish = finish || "";
  } catch (e) {
    if (e.name === "AbortError") {
      if (started === epoch) conversation.push({ role: "assistant", content: reply });  // keep what came
    } else {
      div.remove();
      showError(e.message);
    }
  } finally {
    div.classList.remove("streaming");
    controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

async function send() {
  const question = $("prompt").value.trim();
  if (!question && !pending.length) return;
  if (!model) await loadModel();
  if (!model) return;
  const content = pending.map((url) => ({ type: "image_url", image_url: { url } }));
  if (question) content.push({ type: "text", text: question });
  conversation.push({ role: "user", content });
  bubble("user", question, pending);
  pending = [];
  renderAttachments();
  $("prompt").value = "";
  await answer();
  const last = conversation[conversation.length - 1];
  if (last && last.role === "user") {  // failed: take the turn back to edit
    const turn = conversation.pop();
    $("messages").lastChild.remove();
    $("prompt").value = question;
    pending = turn.content.filter((p) => p.type === "image_url").map((p) => p.image_url.url);
    renderAttachments();
  }
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());

$("regenerate").addEventListener("click", async () => {
  if (conversation.length && conversation[conversation.length - 1].role === "assistant") {
    conversation.pop();
    const bubbles = $("messages").querySelectorAll(".message.assistant");
    bubbles[bubbles.length - 1].remove();
  }
  if (conversation.length) await answer();
});

$("clear").addEventListener("click", () => {
  epoch += 1;
  if (controller) controller.abort();
  conversation.length = 0;
  pending = [];
  renderAttachments();
  $("messages").replaceChildren();
  showError("");
  setBusy(false);
});

loadModel();
