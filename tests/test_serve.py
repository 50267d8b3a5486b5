"""``vlmkit serve``: the OpenAI-compatible server, talked to with the official ``openai`` client.

A tiny random model (hidden 32, 2 layers) is saved and loaded back as ``vlmkit serve`` would load it,
then served by uvicorn on 127.0.0.1 in a background thread. Its language model's weight matrices are
scaled up 3x, so answers depend on the prompt and image (at the default init, 50 prompts gave 15
distinct answers; scaled, 37), and its output rows of special and non-printable tokens are zeroed,
so greedy answers are readable text that never stops by itself (streamed text compares character
for character; a long answer has something to cancel).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from PIL import Image

import vlmkit
from conftest import TINY_ANSWERS, seeded, tiny_model_config
from vlmkit.cli import build_parser, main
from vlmkit.formats import save_model
from vlmkit.inference.pipeline import VLMPipeline
from vlmkit.models.build import build_model
from vlmkit.processing.image import ImageError, load_image_bytes
from vlmkit.processing.templates import Message
from vlmkit.serving import ServeOptions, create_app
from vlmkit.serving.media import decode_data_url, load_image_url, local_path
from vlmkit.serving.protocol import RequestError, parse_chat_request

API_KEY = "serve-test-key"
TOKENS = 6  # answer length of the compared requests
LIMITS = dict(max_images_per_request=2, max_image_pixels=128 * 128, max_body_bytes=256 * 1024, max_queued=64)


def _sensitive_printable_and_endless(model, tokenizer) -> None:
    """Scale the language model's matrices 3x (answers then differ from prompt to prompt), and zero the
    output rows of special and non-printable tokens: greedy answers become printable text that never
    ends on a stop token (the other tokens' random logits beat 0)."""
    head = model.language.hf_model.get_output_embeddings().weight
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for weight in model.language.hf_model.parameters():
            if weight.dim() >= 2:
                weight.mul_(3.0)
        for token_id in range(head.shape[0]):
            text = tokenizer.decode([token_id])
            if token_id in special or not text or not all(32 <= ord(c) < 127 for c in text):
                head[token_id].zero_()


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[2], color[1]), (4, 4, 4 + size[0] // 3, 4 + size[1] // 3))
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, *images: Image.Image | str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": i if isinstance(i, str) else data_url(i)}} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, bpe_tokenizer):
    """The tiny model, saved and loaded back with ``vlmkit.load`` (the folder is named ``tiny-serve``)."""
    config = tiny_model_config()
    seeded(0)
    model, processor = build_model(config, tokenizer=copy.deepcopy(bpe_tokenizer))
    _sensitive_printable_and_endless(model, processor.tokenizer)
    folder = save_model(model.eval(), processor, config, tmp_path_factory.mktemp("serve") / "tiny-serve")
    return vlmkit.load(str(folder))


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    """``(base URL, app, media folder)`` of the tiny model served with an API key and small limits."""
    media = tmp_path_factory.mktemp("media")
    options = ServeOptions(model_name="tiny-serve", api_key=API_KEY, allowed_local_media_path=media, **LIMITS)
    app = create_app(pipe, options)
    with running(app) as url:
        yield url, app, media


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def reference(pipe, text: str, images: list[Image.Image], tokens: int = TOKENS, history=None) -> str:
    """The unbatched greedy answer of the Python API."""
    return pipe.chat(images, text, history=history, max_new_tokens=tokens)


# ---------------------------------------------------------------------------------------------
def test_chat_with_an_image_answers_as_the_python_api(pipe, client):
    image = png((200, 40, 40))
    expected = reference(pipe, "what color is the shape?", [image])
    reply = client.chat.completions.create(model="tiny-serve", messages=[user("what color is the shape?", image)],
                                           max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.object == "chat.completion" and reply.model == "tiny-serve" and reply.id.startswith("chatcmpl-")
    assert abs(reply.created - time.time()) < 120
    prompt = pipe.processor.prompt("what color is the shape?", [image])
    assert reply.usage.prompt_tokens == prompt.input_ids.numel() > pipe.processor.num_image_tokens
    assert reply.usage.completion_tokens == TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + TOKENS


def test_streamed_chat_sends_role_deltas_finish_and_usage(pipe, client):
    image = png((30, 160, 200))
    expected = reference(pipe, "describe the image", [image])
    chunks = list(client.chat.completions.create(
        model="tiny-serve", messages=[user("describe the image", image)], max_completion_tokens=TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny-serve" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == expected
    assert sum(1 for piece in content if piece) > 1  # streamed in pieces, not as one block
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length" and chunks[-2] is finish[0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage.prompt_tokens == pipe.processor.prompt("describe the image", [image]).input_ids.numel()


def test_raw_event_stream_ends_with_done(server):
    url = server[0]
    body = {"model": "tiny-serve", "messages": [user("hello", png((1, 2, 3)))], "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:])  # no usage chunk unless asked


def test_several_turns_images_and_a_system_message(pipe, client):
    first, second = png((250, 250, 20)), png((20, 20, 250), (32, 48))
    messages = [{"role": "system", "content": "You answer briefly."},
                user("what is this?", first), {"role": "assistant", "content": "a yellow shape"},
                {"role": "user", "content": [{"type": "text", "text": "and this one?"},
                                             {"type": "image_url", "image_url": {"url": data_url(second)}}]}]
    history = [Message("system", "You answer briefly."), Message("user", "<image>\nwhat is this?"),
               Message("assistant", "a yellow shape")]
    expected = reference(pipe, "and this one?\n<image>", [first, second], history=history)
    reply = client.chat.completions.create(model="tiny-serve", messages=messages, max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected
    encoded = pipe.processor.prompt("and this one?\n<image>", [first, second], history)
    assert reply.usage.prompt_tokens == encoded.input_ids.numel()


def test_stop_strings_sampling_seed_and_default_length(pipe, client):
    image = png((90, 90, 90))
    full = reference(pipe, "stop test", [image], tokens=12)
    cut = full[len(full) // 2:][:2]
    reply = client.chat.completions.create(model="tiny-serve", messages=[user("stop test", image)], max_tokens=12,
                                           temperature=0, stop=[cut])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[: full.index(cut)].strip()
    ask = dict(model="tiny-serve", messages=[user("sample", image)], max_tokens=8, temperature=1.3, top_p=0.9, seed=7)
    a, b = (client.chat.completions.create(**ask).choices[0].message.content for _ in range(2))
    assert a == b  # the request's own seeded generator


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-serve"] and models.data[0].object == "model"
    assert client.models.retrieve("tiny-serve").id == "tiny-serve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    health = httpx.get(server[0] + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_web_page_is_served_when_installed(server):
    page = Path(vlmkit.__file__).parent / "serving" / "static" / "index.html"
    if not page.is_file():
        pytest.skip("the web page (serving/static/index.html) is not installed")
    r = httpx.get(server[0] + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for asset in sorted(p for p in page.parent.iterdir() if p.is_file()):
        assert httpx.get(f"{server[0]}/static/{asset.name}", timeout=10).status_code == 200, asset.name
    check_envelope(httpx.get(server[0] + "/static/no-such-file.js", timeout=10), 404)


# ---------------------------------------------------------------------------------------------
BIG = png((10, 10, 10), (200, 100))  # 20,000 pixels > the 128 x 128 limit


def bad_requests(media: Path) -> list[tuple[str, dict, int, str | None]]:
    """``(name, JSON body or special, status, param)`` of refused requests."""
    good = png((5, 100, 5))
    ok = {"model": "tiny-serve", "messages": [user("hi", good)], "max_tokens": 2, "temperature": 0}
    outside = media.parent / "outside.png"
    good.save(outside)
    (media / "link.png").unlink(missing_ok=True)
    (media / "link.png").symlink_to(outside)
    return [
        ("invalid base64", {**ok, "messages": [user("hi", "data:image/png;base64,@@notbase64@@")]}, 400,
         "messages[0].content[0].image_url.url"),
        ("not an image", {**ok, "messages": [user("hi", "data:image/png;base64," + base64.b64encode(b"GIF? no").decode())]},
         400, "messages[0].content[0].image_url.url"),
        ("text media type", {**ok, "messages": [user("hi", "data:text/plain;base64,aGVsbG8=")]}, 400,
         "messages[0].content[0].image_url.url"),
        ("oversized image", {**ok, "messages": [user("hi", BIG)]}, 400, "messages[0].content[0].image_url.url"),
        ("too many images", {**ok, "messages": [user("hi", good, good, good)]}, 400, "messages"),
        ("remote image refused", {**ok, "messages": [user("hi", "http://127.0.0.1:9/x.png")]}, 400,
         "messages[0].content[0].image_url.url"),
        ("file outside the media folder", {**ok, "messages": [user("hi", f"file://{outside}")]}, 400,
         "messages[0].content[0].image_url.url"),
        ("dot-dot escape", {**ok, "messages": [user("hi", f"file://{media}/../outside.png")]}, 400,
         "messages[0].content[0].image_url.url"),
        ("symlink out", {**ok, "messages": [user("hi", f"file://{media}/link.png")]}, 400,
         "messages[0].content[0].image_url.url"),
        ("bad part type", {**ok, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
         "messages[0].content[0].type"),
        ("missing url", {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
         "messages[0].content[0].image_url.url"),
        ("placeholder in text", {**ok, "messages": [{"role": "user", "content": "look <image> here"}]}, 400,
         "messages[0].content"),
        ("no messages", {**ok, "messages": []}, 400, "messages"),
        ("ends with assistant", {**ok, "messages": [user("hi"), {"role": "assistant", "content": "x"}]}, 400,
         "messages[1].role"),
        ("bad role", {**ok, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ("temperature out of range", {**ok, "temperature": 3}, 400, "temperature"),
        ("top_p zero", {**ok, "top_p": 0}, 400, "top_p"),
        ("max_tokens zero", {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("max_tokens over the limit", {**ok, "max_tokens": 5000}, 400, "max_tokens"),
        ("n = 2", {**ok, "n": 2}, 400, "n"),
        ("tools", {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("stop not strings", {**ok, "stop": [1]}, 400, "stop[0]"),
        ("prompt beyond the context", {**ok, "messages": [user("hello world " * 200)]}, 400, "messages"),
        ("prompt + max_tokens beyond the context", {**ok, "messages": [user("hello world " * 40)], "max_tokens": 200},
         400, "max_tokens"),
        ("lone surrogate", {**ok, "messages": [{"role": "user", "content": "bad \ud800 text"}]}, 400, "messages[0].content"),
        ("empty data URL", {**ok, "messages": [user("hi", "data:image/png;base64,")]}, 400,
         "messages[0].content[0].image_url.url"),
        ("no scheme", {**ok, "messages": [user("hi", "picture.png")]}, 400, "messages[0].content[0].image_url.url"),
        ("image_url as a string", {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
         400, "messages[0].content[0].image_url"),
        ("content a number", {**ok, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("content missing", {**ok, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ("messages an object", {**ok, "messages": {"role": "user", "content": "x"}}, 400, "messages"),
        ("huge max_tokens", {**ok, "max_tokens": 10**30}, 400, "max_tokens"),
        ("float max_tokens", {**ok, "max_tokens": 5.0}, 400, "max_tokens"),
        ("float seed", {**ok, "seed": 1.5}, 400, "seed"),
        ("too many stop strings", {**ok, "stop": ["a"] * 20}, 400, "stop"),
        ("model a number", {**ok, "model": 7}, 400, "model"),
        ("stream_options a list", {**ok, "stream": True, "stream_options": [1]}, 400, "stream_options"),
        ("unknown model", {**ok, "model": "gpt-4o"}, 404, "model"),
        ("missing model", {k: v for k, v in ok.items() if k != "model"}, 400, "model"),
        ("not an object", [1, 2], 400, None),
        ("bad JSON", "RAW:{not json", 400, None),
        ("body too large", {**ok, "messages": [user("x" * 300_000)]}, 413, None),
        ("wrong key", {**ok, "_key": "nope"}, 401, None),
        ("missing key", {**ok, "_key": None}, 401, None),
    ]


def send(url: str, body, key: str | None = API_KEY) -> httpx.Response:
    if isinstance(body, dict) and "_key" in body:
        body = dict(body)
        key = body.pop("_key")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    raw = body[4:] if isinstance(body, str) and body.startswith("RAW:") else json.dumps(body)  # ASCII: \\ud800 kept
    return httpx.post(url + "/v1/chat/completions", content=raw.encode(), headers=headers, timeout=60)


def check_envelope(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert error["message"].startswith(param) or status != 400, error


def test_each_bad_request_is_a_4xx_envelope_naming_the_field(server):
    url, _, media = server
    for name, body, status, param in bad_requests(media):
        check_envelope(send(url, body), status, param)
    def chunked():  # no Content-Length: the limit applies while reading
        yield b'{"model": "tiny-serve", "messages": "'
        yield b"x" * 300_000
        yield b'"}'

    check_envelope(httpx.post(url + "/v1/chat/completions", content=chunked(), timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"}), 413)
    r = httpx.get(url + "/v1/no-such-endpoint", timeout=10)
    check_envelope(r, 404)
    check_envelope(httpx.get(url + "/v1/chat/completions", timeout=10), 405)


def test_allowed_local_file_is_read(pipe, server, client):
    url, _, media = server
    image = png((120, 30, 200))
    image.save(media / "inside.png")
    reply = client.chat.completions.create(model="tiny-serve", max_tokens=TOKENS, temperature=0,
                                           messages=[user("local", f"file://{media}/inside.png")])
    assert reply.choices[0].message.content == reference(pipe, "local", [image])


def test_the_openai_client_raises_its_error_classes(server):
    url = server[0]
    ok = dict(model="tiny-serve", messages=[user("hi", png((1, 1, 1)))], max_tokens=2, temperature=0)
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{**ok, "messages": [user("hi", "data:image/png;base64,!!!")]})
    assert info.value.body["param"] == "messages[0].content[0].image_url.url" and "base64" in info.value.body["message"]
    for broken in ({"messages": [user("hi", BIG)]}, {"messages": [user("hi", *[png((1, 1, 1))] * 3)]},
                   {"messages": [user("hello world " * 200)]}, {"temperature": -1}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{**ok, **broken})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**ok, "model": "nope"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(**ok)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_full_queue_is_429_and_a_disconnect_cancels_generation(pipe):
    """One queue place; the engine is held inside its first forward pass, so the next requests pile up.
    Then the clients go away (streamed, and plain ones): their generations end ``cancelled``, long
    before their 200 tokens."""
    app = create_app(pipe, ServeOptions(model_name="tiny-serve", max_queued=1))
    entered, gate = threading.Event(), threading.Event()

    def hold(*_):
        if not gate.is_set():
            entered.set()
            gate.wait(30)
        else:
            time.sleep(0.02)  # 200 tokens take > 4 s: a cancel must come first

    hook = pipe.model.language.hf_model.register_forward_pre_hook(hold)
    streams = []
    try:
        with running(app) as url:
            runner = app.state.service.runner
            submitted, submit = [], runner.submit
            runner.submit = lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1]
            client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
            ask = dict(model="tiny-serve", messages=[user("a long answer", png((9, 9, 9)))], max_tokens=200,
                       temperature=0, stream=True)
            streams.append(client.chat.completions.create(**ask))
            assert entered.wait(30)
            with pytest.raises(openai.RateLimitError) as info:
                for _ in range(4):  # a request in prefill may count as neither waiting nor running
                    streams.append(client.chat.completions.create(**ask))
            assert info.value.body["code"] == "queue_full"
            gate.set()
            assert next(iter(streams[0])).choices[0].delta.role == "assistant"
            for s in streams:
                s.close()  # the clients go away
            deadline = time.monotonic() + 20
            while not all(s.request.finished for s in submitted) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert submitted and [s.request.finish_reason for s in submitted] == ["cancelled"] * len(submitted)
            assert all(len(s.request.output_ids) < 150 for s in submitted)
            before = len(submitted)
            with pytest.raises(httpx.TimeoutException):  # a plain (not streamed) request whose client gives up
                httpx.post(url + "/v1/chat/completions", json={**ask, "stream": False}, timeout=1.5)
            assert len(submitted) == before + 1
            deadline = time.monotonic() + 20
            while not submitted[-1].request.finished and time.monotonic() < deadline:
                time.sleep(0.05)
            assert submitted[-1].request.finish_reason == "cancelled" and len(submitted[-1].request.output_ids) < 150
            health = httpx.get(url + "/health", timeout=10).json()
            assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    finally:
        hook.remove()
        gate.set()


def test_200_requests_at_concurrency_32_a_quarter_malformed(pipe, server, client):
    """Good requests answer exactly as one unbatched greedy call; bad ones are 4xx envelopes; no 5xx."""
    url, app, media = server
    prompts = [(f"question {i}: what is shape {i % 7}?", png(((i * 37) % 256, (i * 91) % 256, (i * 53) % 256),
                                                                 (32 + i % 5 * 4, 32 + i % 3 * 8))) for i in range(50)]
    references = [reference(pipe, text, [image]) for text, image in prompts]
    assert len(set(references)) >= 30, "the references should differ so that a swapped answer is caught"
    bad = bad_requests(media)
    jobs = []
    for k in range(200):
        if k % 4 == 3:
            jobs.append(("bad", bad[k // 4 % len(bad)]))
        else:
            jobs.append(("good", (k % 50, k % 3 == 0)))  # a third of the good ones streamed

    def run(job):
        kind, what = job
        if kind == "bad":
            name, body, status, param = what
            response = send(url, body)
            return kind, what, response.status_code, response.json()
        index, stream = what
        text, image = prompts[index]
        ask = dict(model="tiny-serve", messages=[user(text, image)], max_tokens=TOKENS, temperature=0)
        if stream:
            chunks = client.chat.completions.create(**ask, stream=True)
            return kind, what, 200, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return kind, what, 200, client.chat.completions.create(**ask).choices[0].message.content

    engine, batch_sizes, done = app.state.service.engine, [], threading.Event()

    def watch():
        while not done.is_set():
            batch_sizes.append(engine.num_running)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    done.set()
    watcher.join()
    assert max(batch_sizes) > 1, "the requests never shared a decode step"
    for kind, what, status, answer in results:
        if kind == "good":
            assert answer == references[what[0]], (what, answer, references[what[0]])
        else:
            name, _, expected, param = what
            assert 400 <= status < 500 and status == expected, (name, status, answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"}
            if param is not None:
                assert answer["error"]["param"] == param, (name, answer)
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.chat.completions.create(model="tiny-serve", messages=[user(*prompts[0])], max_tokens=TOKENS,
                                          temperature=0).choices[0].message.content == references[0]


# ---------------------------------------------------------------------------------------------
def test_encoder_only_models_answer_by_classification(tokenizer):
    seeded(0)
    model, processor = build_model(tiny_model_config(backbone="roberta"), tokenizer=tokenizer)
    pipeline = VLMPipeline(model, processor)
    image = png((200, 200, 30))
    expected = pipeline.classify(["what color?"], [[image]])[0]
    with running(create_app(pipeline, ServeOptions(model_name="tiny-roberta"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        reply = client.chat.completions.create(model="tiny-roberta", messages=[user("what color?", image)])
        assert reply.choices[0].message.content == expected and expected in TINY_ANSWERS
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens == processor.prompt("what color?", [image]).input_ids.numel()
        chunks = list(client.chat.completions.create(model="tiny-roberta", messages=[user("what color?", image)],
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_an_hf_llava_folder_is_served(tmp_path):
    from formats_helpers import image as random_image
    from formats_helpers import save_hf_llava

    folder = save_hf_llava(tmp_path / "llava-hf")
    pipeline = vlmkit.load(str(folder))
    picture = random_image(3)
    expected = pipeline.chat(picture, "what shape is it?", max_new_tokens=4)
    with running(create_app(pipeline, ServeOptions(model_name="llava-hf"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        reply = client.chat.completions.create(model="llava-hf", messages=[user("what shape is it?", picture)],
                                               max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == expected


# ---------------------------------------------------------------------------------------------
def test_protocol_names_the_bad_field_without_a_server():
    def parse(**body):
        return parse_chat_request({"model": "m", **body}, "m", max_tokens=64, max_images=2)

    chat = parse(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "a"},
                           {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                                        {"type": "text", "text": "b"}]}],
                 stop="END", seed=3, top_k=-1)
    assert chat.history == [Message("system", "be brief")]
    assert chat.prompt == "a\n<image>\nb" and [i.param for i in chat.images] == ["messages[2].content[0].image_url.url"]
    assert chat.params.stop == ("END",) and chat.params.seed == 3 and chat.params.top_k == 0
    assert chat.params.temperature == 1.0 and chat.params.max_tokens == 64 and chat.max_tokens_param is None
    for body, param in [
        (dict(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]),
         "messages[1].role"),
        (dict(messages=[{"role": "assistant", "content": "a"}]), "messages[0].role"),
        (dict(messages=[{"role": "user", "content": None}]), "messages[0].content"),
        (dict(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                        {"role": "user", "content": "b"}]), "messages[0].content[0]"),
        (dict(messages=[{"role": "user", "content": "a"}], temperature=float("nan")), "temperature"),
        (dict(messages=[{"role": "user", "content": "a"}], seed=2**64), "seed"),
        (dict(messages=[{"role": "user", "content": "a"}], stream="yes"), "stream"),
        (dict(messages=[{"role": "user", "content": "a"}], stream_options={"include_usage": 1}), "stream_options.include_usage"),
        (dict(messages=[{"role": "user", "content": "a"}], logprobs=True), "logprobs"),
        (dict(messages=[{"role": "user", "content": "a"}], max_completion_tokens=True), "max_completion_tokens"),
    ]:
        with pytest.raises(RequestError) as info:
            parse(**body)
        assert info.value.status == 400 and info.value.param == param, (body, info.value.message)
    assert parse(messages=[{"role": "user", "content": "a"}], logprobs=False, presence_penalty=0.0,
                 response_format={"type": "text"}).prompt == "a"


def test_media_urls_and_image_bytes(tmp_path):
    image = png((10, 200, 10))
    assert load_image_url(data_url(image), "f", ServeOptions()).tobytes() == image.tobytes()
    raw = base64.b64encode(b"\x89PNG").decode()
    assert decode_data_url("data:image/png;base64," + raw.rstrip("="), "f") == b"\x89PNG"  # padding added
    assert decode_data_url("data:,%89PNG", "f") == b"\x89PNG"
    with pytest.raises(ImageError, match="image upload.png could not be decoded"):
        load_image_bytes(b"not an image", "upload.png")
    with pytest.raises(ImageError, match="more than the limit of 100"):
        load_image_bytes(base64.b64decode(data_url(image).split(",")[1]), "upload.png", max_pixels=100)
    with pytest.raises(RequestError, match="--allowed-local-media-path"):
        local_path(f"file://{tmp_path}/a.png", "f", None)
    with pytest.raises(RequestError, match="host"):
        local_path("file://example.com/etc/passwd", "f", tmp_path)
    with pytest.raises(RequestError, match="no image file"):
        local_path(f"file://{tmp_path}/missing.png", "f", tmp_path.resolve())


def test_serve_command_line_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0 and "--allowed-local-media-path" in capsys.readouterr().out
    args = build_parser().parse_args(["serve", "--model", str(tmp_path / "m"), "--port", "9001", "--max-queued", "5",
                                      "--allowed-local-media-path", str(tmp_path), "--allow-remote-images"])
    assert (args.host, args.port, args.max_queued, args.allow_remote_images) == ("127.0.0.1", 9001, 5, True)
    assert args.api_key is None and args.func.__name__ == "cmd_serve"
    with pytest.raises(ValueError, match="max_queued"):
        ServeOptions(max_queued=0)
    with pytest.raises(ValueError, match="not a folder"):
        ServeOptions(allowed_local_media_path=tmp_path / "missing")
