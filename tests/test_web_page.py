"""The web chat page in a real headless browser (Debian's chromium driven by Playwright).

A ``vlmkit serve`` process on 127.0.0.1 serves a tiny model built here; the browser opens ``/``, enters
the API key, uploads an image, asks, and the streamed answer must equal what the Python API answers
for the same image and prompt; a follow-up question resends the conversation; Stop interrupts a long
answer; a server error is shown from the OpenAI error envelope. A screenshot lands in ``tmp_path``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from playwright.sync_api import expect, sync_playwright

import vlmkit
from conftest import CORPUS, make_image, seeded, tiny_model_config
from vlmkit.formats import save_model
from vlmkit.inference.pipeline import GenerationSettings
from vlmkit.models.build import build_model
from vlmkit.processing.templates import Message
from vlmkit.processing.tokenizer import train_bpe_tokenizer

API_KEY = "test-key-123"
ANSWER_TOKENS = 24      # the page's "Max tokens" for the compared answers
LONG_TOKENS = 1000      # a long answer for Stop to interrupt (the server's default limit is 1024)
QUESTION = "what color is the shape?"
FOLLOW_UP = "is it red?"


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser on this machine (make install-dev installs "
                                                "Debian's chromium: apt-get install chromium)"),
]


def _printable_and_endless(model, tokenizer) -> None:
    """Zero the output-embedding rows of every token that is not plain printable ASCII (special and stop
    tokens included): those logits are then 0 while some of the many others are positive, so greedy
    decoding of this random model writes readable text and never stops by itself. The streamed text
    then compares character for character with the Python API's, and Stop has a long answer to cut."""
    head = model.language.hf_model.get_output_embeddings().weight
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for token_id in range(head.shape[0]):
            text = tokenizer.decode([token_id])
            if token_id in special or not text or not all(32 <= ord(c) < 127 for c in text):
                head[token_id].zero_()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(base URL, model folder, image path, server log)`` of a running ``vlmkit serve --api-key``."""
    root = tmp_path_factory.mktemp("web")
    tokenizer = train_bpe_tokenizer(CORPUS, 400)
    config = tiny_model_config(max_length=2048)
    config.language.config.update(max_position_embeddings=2048, tie_word_embeddings=False)
    seeded(0)
    model, processor = build_model(config, tokenizer=tokenizer)
    _printable_and_endless(model, tokenizer)
    folder = save_model(model.eval(), processor, config, root / "tiny-chat")
    image = make_image(root / "shape.png", color=(30, 30, 210), size=(48, 40))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = root / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlmkit", "serve", "--model", str(folder), "--host", "127.0.0.1", "--port", str(port),
             "--api-key", API_KEY], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vlmkit serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            last_error: Exception | None = None
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:  # not listening yet
                last_error = exc
            if time.monotonic() > deadline:
                pytest.fail(f"vlmkit serve did not answer /health within 180 s (last: {last_error}):\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, folder, image, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# Records every text the newest answer shows, to see it grow piece by piece.
WATCH_ANSWERS = """() => {
  window.__shown = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('#log .msg.assistant .text');
    if (answers.length) window.__shown.push(answers[answers.length - 1].textContent);
  }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}"""


# Drops a PNG (base64) onto the page as a user dragging a file from the desktop would.
DROP_FILE = """(b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
  document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
}"""


def _ask(page, text: str, timeout_ms: int = 60_000) -> str:
    """Type ``text``, send it, wait for the answer to finish; returns the answer's text."""
    done_before = page.locator('#log .msg.assistant[data-state="done"]').count()
    page.fill("#prompt", text)
    page.click("#send")
    expect(page.locator('#log .msg.assistant[data-state="done"]')).to_have_count(done_before + 1, timeout=timeout_ms)
    return page.locator("#log .msg.assistant .text").last.text_content()


def test_the_chat_page_streams_the_models_answer_and_stops_on_request(served, tmp_path):
    url, folder, image, log_path = served
    pipe = vlmkit.load(str(folder))
    greedy = GenerationSettings(max_new_tokens=ANSWER_TOKENS)
    expected = pipe.chat(str(image), QUESTION, max_new_tokens=ANSWER_TOKENS)
    history = [Message("user", "<image>\n" + QUESTION), Message("assistant", expected)]
    expected_follow_up = pipe.generate([FOLLOW_UP], [[str(image)]], greedy, [history])[0]
    assert len(expected) >= 10 and expected != expected_follow_up, (expected, expected_follow_up)
    history3 = [*history, Message("user", FOLLOW_UP), Message("assistant", expected_follow_up)]
    full = pipe.generate(["tell me more"], [[str(image)]], GenerationSettings(max_new_tokens=LONG_TOKENS), [history3])[0]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            console_errors: list[str] = []
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            requests: list[dict] = []
            page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
            page.goto(url + "/")
            expect(page).to_have_title("vlmkit chat")

            # Without the key the model list is refused, and the server's own message is shown.
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + "/v1/models", timeout=10)
            assert refused.value.code == 401
            message = json.loads(refused.value.read())["error"]["message"]
            expect(page.locator("#error")).to_have_text(f"Could not list the models: {message}")
            page.click("summary")
            page.fill("#api-key", API_KEY)
            page.locator("#api-key").dispatch_event("change")
            expect(page.locator("#model")).to_have_value(folder.name)
            expect(page.locator("#error")).to_be_hidden()
            page.fill("#max-tokens", str(ANSWER_TOKENS))

            # First turn: image + question; the answer arrives in pieces and ends equal to the Python API's.
            page.evaluate(WATCH_ANSWERS)
            page.set_input_files("#image-input", str(image))
            expect(page.locator("#preview")).to_be_visible()
            expect(page.locator("#preview-img")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
            answer = _ask(page, QUESTION)
            assert answer == expected
            shown = [s for s in page.evaluate("window.__shown") if s]
            assert len(set(shown)) >= 3, f"the answer did not stream in: {shown}"
            assert all(expected.startswith(s) for s in shown), shown
            expect(page.locator("#preview")).to_be_hidden()  # the image went with the first message
            expect(page.locator("#log .msg.user img")).to_have_count(1)

            # Second turn: the whole conversation is resent, the image in the first user turn only.
            assert _ask(page, FOLLOW_UP) == expected_follow_up
            sent = requests[-1]
            assert sent["stream"] is True and sent["model"] == folder.name and sent["temperature"] == 0
            assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
            first = sent["messages"][0]["content"]
            assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")
            assert first[1] == {"type": "text", "text": QUESTION}
            assert sent["messages"][1] == {"role": "assistant", "content": expected}
            assert sent["messages"][2] == {"role": "user", "content": FOLLOW_UP}
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # Stop: a long answer is cut; what was shown stays, stops growing, and is the model's answer so far.
            page.fill("#max-tokens", str(LONG_TOKENS))
            page.fill("#prompt", "tell me more")
            page.click("#send")
            expect(page.locator("#stop")).to_be_enabled()
            page.wait_for_function("() => { const a = document.querySelectorAll('#log .msg.assistant .text');"
                                   " return a[a.length - 1].textContent.length > 20; }", polling=10, timeout=60_000)
            page.click("#stop")
            stopped = page.locator("#log .msg.assistant").last
            expect(stopped).to_have_attribute("data-state", "stopped", timeout=10_000)
            cut = stopped.locator(".text").text_content()
            page.wait_for_timeout(500)
            assert stopped.locator(".text").text_content() == cut
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_disabled()
            assert full.startswith(cut) and len(cut) < len(full), (cut, full)

            # A server error comes back in the OpenAI envelope and is shown as its message; the turn is undone.
            bad = tmp_path / "broken.png"
            bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
            page.click("#clear")
            expect(page.locator("#log .msg")).to_have_count(0)
            page.set_input_files("#image-input", str(bad))
            page.fill("#prompt", QUESTION)
            page.click("#send")
            expect(page.locator("#error")).to_be_visible(timeout=30_000)
            data_url = "data:image/png;base64," + base64.b64encode(bad.read_bytes()).decode()
            status, envelope = _post(url, {"model": folder.name, "max_tokens": LONG_TOKENS, "temperature": 0, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION}]}]})
            assert status == 400 and envelope["error"]["message"]
            # (the message may name an object's address, which differs between two requests)
            pattern = re.escape(re.sub(r"0x[0-9a-f]+", "ADDRESS", envelope["error"]["message"]))
            expect(page.locator("#error")).to_have_text(re.compile("^" + pattern.replace("ADDRESS", "0x[0-9a-f]+") + "$"))
            expect(page.locator("#log .msg")).to_have_count(0)
            expect(page.locator("#prompt")).to_have_value(QUESTION)
            expect(page.locator("#preview")).to_be_visible()

            # After all that the server still answers, and a new chat starts from scratch; this time the
            # image is dropped onto the page instead of picked.
            page.click("#remove-image")
            expect(page.locator("#preview")).to_be_hidden()
            page.evaluate(DROP_FILE, base64.b64encode(image.read_bytes()).decode())
            expect(page.locator("#preview-name")).to_have_text("dropped.png")
            page.fill("#max-tokens", str(ANSWER_TOKENS))
            assert _ask(page, QUESTION) == expected
            assert not console_errors, console_errors
        finally:
            browser.close()
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        assert r.status == 200
    assert "Traceback" not in log_path.read_text()
