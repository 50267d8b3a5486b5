// vlmkit chat page: talks to the server's OpenAI-compatible API (GET v1/models, POST v1/chat/completions
// with stream: true) and renders the streamed answer. No dependencies; every URL is relative to the page,
// so it also works behind a proxy that mounts the server under a prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"), modelStatus: $("model-status"), clear: $("clear"), apiKey: $("api-key"),
    maxTokens: $("max-tokens"), temperature: $("temperature"), log: $("log"), empty: $("empty"),
    error: $("error"), composer: $("composer"), dropzone: $("dropzone"), input: $("image-input"),
    preview: $("preview"), previewImg: $("preview-img"), previewName: $("preview-name"),
    removeImage: $("remove-image"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  };
  const state = {
    history: [],       // OpenAI messages already answered; resent in full with every question
    pending: null,     // {name, ready: Promise<data URL>}: the image that goes with the next message
    controller: null,  // AbortController of the answer being streamed
  };

  // ---------------------------------------------------------------- errors
  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function hideError() {
    els.error.hidden = true;
    els.error.textContent = "";
  }

  /** The message of an error response: the OpenAI envelope {"error": {"message"}}, else what came. */
  async function errorMessage(response) {
    let text = "";
    try { text = await response.text(); } catch (_) { /* body unreadable: fall back to the status */ }
    try {
      const body = JSON.parse(text);
      const err = body && (body.error || body.detail);
      if (typeof err === "string") return err;
      if (err && typeof err.message === "string") return err.message;
      if (err) return JSON.stringify(err);
    } catch (_) { /* not JSON */ }
    const status = `${response.status} ${response.statusText}`.trim();
    return text ? `${status}: ${text.slice(0, 300)}` : `the server answered ${status}`;
  }

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // ---------------------------------------------------------------- models
  async function loadModels() {
    els.modelStatus.textContent = "loading models…";
    try {
      const response = await fetch("v1/models", { headers: headers(false) });
      if (!response.ok) throw new Error(await errorMessage(response));
      const ids = ((await response.json()).data || []).map((m) => m.id);
      if (!ids.length) throw new Error("the server lists no model");
      const previous = els.model.value;
      els.model.replaceChildren(...ids.map((id) => new Option(id, id)));
      if (ids.includes(previous)) els.model.value = previous;
      els.modelStatus.textContent = "";
      hideError();
    } catch (err) {
      els.modelStatus.textContent = "no model";
      showError(`Could not list the models: ${err.message}`);
    }
  }

  // ---------------------------------------------------------------- the image of the next message
  function setImage(file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) {
      showError(`${file.name} is not an image (${file.type || "unknown type"}).`);
      return;
    }
    hideError();
    const ready = new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error(`could not read ${file.name}`));
      reader.readAsDataURL(file);  // the file's own bytes, not re-encoded: the server sees the same pixels
    });
    state.pending = { name: file.name, ready };
    showPreview(state.pending);
  }

  function showPreview(pending) {
    els.previewName.textContent = pending.name;
    els.preview.hidden = false;
    pending.ready.then((url) => { if (state.pending === pending) els.previewImg.src = url; },
                       (err) => { if (state.pending === pending) { clearImage(); showError(err.message); } });
  }

  function clearImage() {
    state.pending = null;
    els.input.value = "";
    els.preview.hidden = true;
    els.previewImg.removeAttribute("src");
    els.previewName.textContent = "";
  }

  // ---------------------------------------------------------------- the conversation view
  function addMessage(role, text, imageUrl) {
    const li = document.createElement("li");
    li.className = `msg ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    li.append(who);
    if (imageUrl) {
      const img = document.createElement("img");
      img.src = imageUrl;
      img.alt = "Image sent with this message";
      li.append(img);
    }
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;  // text only, never HTML
    li.append(body);
    els.log.append(li);
    els.empty.hidden = true;
    li.scrollIntoView({ block: "end" });
    return li;
  }

  function setText(li, text) {
    li.querySelector(".text").textContent = text;
    li.scrollIntoView({ block: "end" });
  }

  function finish(li, stateName, note) {
    li.dataset.state = stateName;
    if (note) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = note;
      li.append(meta);
    }
  }

  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.disabled = !busy;
    els.log.setAttribute("aria-busy", busy ? "true" : "false");
  }

  // ---------------------------------------------------------------- server-sent events
  /** Yield the data of each server-sent event of a fetch body (lines ending in \n, \r\n or \r). */
  async function* readEvents(stream) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? "\n\n" : value;
        const eol = /\r\n|\r|\n/g;
        let start = 0;
        let match;
        while ((match = eol.exec(buffer)) !== null) {
          // a lone \r at the end may be the first half of a \r\n still in flight
          if (!done && match[0] === "\r" && eol.lastIndex === buffer.length) break;
          const line = buffer.slice(start, match.index);
          start = eol.lastIndex;
          if (line === "") {
            if (data.length) yield data.join("\n");
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue;  // a comment (keep-alive)
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "data") data.push(val);
        }
        buffer = buffer.slice(start);
        if (done) return;
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function numberField(input) {
    const raw = input.value.trim();
    return raw === "" ? null : Number(raw);
  }

  // ---------------------------------------------------------------- asking
  async function ask(event) {
    event.preventDefault();
    if (state.controller) return;
    const text = els.prompt.value.trim();
    if (!text) { els.prompt.focus(); return; }
    const model = els.model.value;
    if (!model) { showError("No model yet: the server's v1/models listed none."); loadModels(); return; }
    const image = state.pending;
    let imageUrl = null;
    if (image) {
      try { imageUrl = await image.ready; } catch (err) { showError(err.message); return; }
    }
    hideError();

    const userMessage = imageUrl
      ? { role: "user", content: [{ type: "image_url", image_url: { url: imageUrl } }, { type: "text", text }] }
      : { role: "user", content: text };
    const messages = [...state.history, userMessage];
    const request = { model, messages, stream: true, stream_options: { include_usage: true } };
    const maxTokens = numberField(els.maxTokens);
    const temperature = numberField(els.temperature);
    if (maxTokens !== null) request.max_tokens = maxTokens;
    if (temperature !== null) request.temperature = temperature;

    const userLi = addMessage("user", text, imageUrl);
    const answerLi = addMessage("assistant", "");
    answerLi.dataset.state = "streaming";
    els.prompt.value = "";
    clearImage();
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    let answer = "";
    let reason = null;
    let usage = null;
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(request), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const data of readEvents(response.body)) {
        if (data === "[DONE]") break;
        let chunk;
        try { chunk = JSON.parse(data); } catch (_) { throw new Error(`the server sent an unreadable event: ${data.slice(0, 200)}`); }
        if (chunk.error) throw new Error(typeof chunk.error === "string" ? chunk.error : chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && typeof choice.delta.content === "string" && choice.delta.content) {
          answer += choice.delta.content;
          setText(answerLi, answer);
        }
        if (choice.finish_reason) reason = choice.finish_reason;
      }
      state.history = [...messages, { role: "assistant", content: answer }];
      const notes = [];
      if (usage) notes.push(`${usage.completion_tokens} tokens`);
      if (reason === "length") notes.push("cut at the token limit");
      finish(answerLi, "done", notes.join(" · "));
    } catch (err) {
      if (controller.signal.aborted && answer) {
        // keep what was said: the next question continues from the partial answer
        state.history = [...messages, { role: "assistant", content: answer }];
        finish(answerLi, "stopped", "stopped");
      } else {
        // the turn did not happen: take it out and give the question (and image) back to resend
        userLi.remove();
        answerLi.remove();
        els.empty.hidden = els.log.children.length > 0;
        els.prompt.value = text;
        if (image) { state.pending = image; showPreview(image); }
        if (!controller.signal.aborted) showError(err.message || String(err));
      }
    } finally {
      state.controller = null;
      setBusy(false);
      els.prompt.focus();
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.history = [];
    els.log.replaceChildren();
    els.empty.hidden = false;
    clearImage();
    hideError();
    els.prompt.focus();
  }

  // ---------------------------------------------------------------- wiring
  els.composer.addEventListener("submit", ask);
  els.stop.addEventListener("click", stop);
  els.clear.addEventListener("click", newChat);
  els.removeImage.addEventListener("click", clearImage);
  els.input.addEventListener("change", () => setImage(els.input.files[0]));
  els.apiKey.addEventListener("change", loadModels);
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); els.composer.requestSubmit(); }
    if (e.key === "Escape") stop();
  });
  // A file dropped anywhere becomes the image (and never makes the browser navigate away to it).
  document.addEventListener("dragover", (e) => { e.preventDefault(); els.dropzone.classList.add("over"); });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) els.dropzone.classList.remove("over"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    els.dropzone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) { e.preventDefault(); setImage(file); }
  });

  setBusy(false);
  loadModels();
})();
