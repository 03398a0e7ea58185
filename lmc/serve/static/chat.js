// The chat page: multi-turn, streamed replies over /v1/chat/completions, a stop button, settings.
// Settings live in localStorage; the conversation lives in this page.
"use strict";

const $ = (id) => document.getElementById(id);
const settings = ["temperature", "max-tokens", "system", "api-key"];
const conversation = [];  // {role, content} of finished turns
let images = [];  // data URLs of the images attached to the next message
let model = null;
let controller = null;  // the AbortController of the reply being streamed

for (const id of settings) {
  const saved = localStorage.getItem("lmc-" + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("lmc-" + id, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error.message;
  } catch {
    return "the server answered " + response.status;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  model = (await response.json()).data[0].id;
  $("model").textContent = model;
}

// Yields the parsed JSON of each server-sent event of a streamed response.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data !== "[DONE]") yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  $("error").hidden = true;
  const system = $("system").value.trim();
  const attached = images;
  images = [];
  $("attached").textContent = "";
  const content = attached.length
    ? attached.map((url) => ({ type: "image_url", image_url: { url: url } })).concat([{ type: "text", text: text }])
    : text;
  const messages = (system ? [{ role: "system", content: system }] : [])
    .concat(conversation, [{ role: "user", content: content }]);
  const userDiv = addMessage("user", text);
  for (const url of attached) {
    const img = document.createElement("img");
    img.src = url;
    userDiv.prepend(img);
  }
  const replyDiv = addMessage("assistant", "");
  replyDiv.dataset.state = "streaming";
  controller = new AbortController();
  setBusy(true);
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: model, messages: messages, stream: true,
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice && choice.delta.content) {
        reply += choice.delta.content;
        replyDiv.textContent = reply;
        replyDiv.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) replyDiv.dataset.finishReason = choice.finish_reason;
    }
    replyDiv.dataset.state = "done";
    conversation.push({ role: "user", content: content }, { role: "assistant", content: reply });
  } catch (err) {
    if (err.name === "AbortError") {  // stopped: keep what came, as the turn's reply
      replyDiv.dataset.state = "stopped";
      conversation.push({ role: "user", content: content }, { role: "assistant", content: reply });
    } else {  // refused: show why, and give the message (and its images) back to edit
      userDiv.remove();
      replyDiv.remove();
      $("input").value = text;
      images = attached;
      $("attached").textContent = attached.length ? attached.length + " image(s)" : "";
      showError(err.message);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("image").addEventListener("change", () => {  // each file read as a data URL, sent with the next message
  for (const file of $("image").files) {
    const reader = new FileReader();
    reader.onload = () => {
      images.push(reader.result);
      $("attached").textContent = images.length + " image(s)";
    };
    reader.readAsDataURL(file);
  }
  $("image").value = "";
});
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  images = [];
  $("attached").textContent = "";
  $("messages").replaceChildren();
  $("error").hidden = true;
});
$("api-key").addEventListener("change", loadModel);
loadModel();
