"""Serving throughput and latency of ``vlmkit serve`` against ``transformers serve``, on one exported model.

As vLLM's serving benchmark does: start each server on 127.0.0.1, send N streamed chat requests, each
with its own image, from C concurrent clients, and measure request throughput, output tokens/s, time
to first token (TTFT), time per output token after the first (TPOT) and inter-token latency (ITL:
the gaps between streamed chunks), each as mean / p50 / p99. Both servers run the same transformers
LLaVA folder (``vlmkit export --format hf-llava``), greedy, so they also give the same answers::

    python bench/serve_bench.py                                  # a tiny random LLaVA built here
    python bench/serve_bench.py --model runs/easyvqa-llava/model --requests 128 --concurrency 1,16,32

Without ``--model`` it builds a random model of the ``easyvqa-llava`` recipe's shape (a CLIP tower,
``mlp2x_gelu``, a 2-layer Llama; 64 visual tokens) in a temporary folder. Prints a table and, as its
last line, the request-throughput ratio vlmkit / transformers at concurrency 16 (or the highest
concurrency run).

``transformers serve`` (5.23) needs ``transformers[serving]`` (fastapi, uvicorn, openai, pydantic,
starlette, rich); it is started as ``transformers serve FOLDER --host 127.0.0.1 --port P --device cpu``
(FOLDER preloaded, so every request must name it as ``model`` or send none) and takes images as
OpenAI ``image_url`` parts (data: URLs, decoded by ``transformers.image_utils.load_image``). It refuses
unknown request fields (422), ignores ``stream_options`` (its last chunk always has usage) and has
no ``ignore_eos``: ``--ignore-eos`` sends it ``generation_config`` with ``min_new_tokens`` instead,
and vLLM's ``ignore_eos: true`` to vlmkit. Its log says ``CB: False`` for image-text models:
continuous batching there is for text-only models, so it answers one request at a time.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPTS = [
    "what color is the shape?", "what shape is in the image?", "describe the image.",
    "is there a circle in the image?", "what is the color of the background?", "is the shape red?",
]
#: text for the tiny model's tokenizer (it needs the words of the prompts and the chat markers)
CORPUS = [*PROMPTS, "A chat between a curious user and an assistant.", "yes no red blue green yellow circle triangle",
          "rectangle teal brown gray black white", "USER: ASSISTANT: system user assistant"] * 40
TRANSFORMERS_MAIN = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


# ------------------------------------------------------------------------------------------ the model
def build_tiny_model(folder: Path) -> Path:
    """A random model of the easyvqa-llava recipe's shape, saved as a vlmkit folder.

    Its output rows of special, whitespace-only and non-ASCII tokens are zeroed (the input embeddings
    are untied, so prompts are untouched): those logits are then 0 while some of the others are
    positive, so a greedy answer is readable text that runs to ``max_tokens``, as a trained model's
    long answer would. Untouched, a random model's answers are mostly newlines or stop at once.
    """
    import torch

    from vlmkit.config import load_recipe
    from vlmkit.formats import save_model
    from vlmkit.models.build import build_model
    from vlmkit.processing.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    config = load_recipe("easyvqa-llava").model
    config.language.config["tie_word_embeddings"] = False
    tokenizer = train_bpe_tokenizer(CORPUS, 512)
    model, processor = build_model(config, tokenizer=tokenizer)
    head = model.language.hf_model.get_output_embeddings().weight
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for token_id in range(head.shape[0]):
            text = tokenizer.decode([token_id])
            if token_id in special or not text.strip() or not all(32 <= ord(c) < 127 for c in text):
                head[token_id].zero_()
    return save_model(model.eval(), processor, config, folder)


def export_hf_llava(src: Path, dst: Path) -> Path:
    """``vlmkit export --format hf-llava SRC DST`` (the command users run)."""
    done = subprocess.run([sys.executable, "-m", "vlmkit", "export", "--format", "hf-llava", str(src), str(dst)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"vlmkit export --format hf-llava {src} failed (a model transformers' LLaVA cannot hold?):\n"
                 f"{done.stdout}{done.stderr}")
    return dst


# ------------------------------------------------------------------------------------------ the servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process on 127.0.0.1 and what its requests must carry."""

    name: str
    command: list[str]
    port: int
    log_path: Path
    model_id: str | None = None
    extra_body: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> None:
        with open(self.log_path, "w") as log:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(THREADS)} if THREADS else {})}
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = get(self.port, "/health")
                if status == 200:
                    if self.model_id is None:  # vlmkit names the model after its folder: ask it
                        self.model_id = json.loads(get(self.port, "/v1/models")[1])["data"][0]["id"]
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        sys.exit(f"{self.name} did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def vlmkit_server(folder: Path, work: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "vlmkit", "serve", "--model", str(folder), "--host", "127.0.0.1", "--port", str(port),
               "--max-queued", str(max(64, 2 * max(args.concurrency)))]
    extra = {"stream_options": {"include_usage": True}}
    if args.ignore_eos:
        extra["ignore_eos"] = True  # vLLM's extension; reported below when a server does not honour it
    return Server("vlmkit", command, port, work / "vlmkit-serve.log", extra_body=extra)


def transformers_server(folder: Path, work: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    command = [sys.executable, "-c", TRANSFORMERS_MAIN, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning"]
    if args.continuous_batching:
        command.append("--continuous-batching")
    extra = {}
    if args.ignore_eos:  # no ignore_eos there: its generation_config field replaces the model's defaults
        extra["generation_config"] = json.dumps({"max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens,
                                                 "do_sample": False})
    return Server("transformers", command, port, work / "transformers-serve.log", model_id=str(folder), extra_body=extra)


# ------------------------------------------------------------------------------------------ the client
def make_images(n: int, size: int) -> list[str]:
    """``n`` different PNG images as data: URLs (a coloured shape on a random background)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    urls = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        box = sorted(rng.integers(0, size, 2).tolist()), sorted(rng.integers(0, size, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if i % 2 else draw.rectangle)([box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1], fill=colour)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


@dataclass
class Result:
    """One request, timed from just before it was sent."""

    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    output_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: str = ""


def stream_request(port: int, body: dict, timeout_s: float) -> Result:
    """POST one streamed chat completion and time every text chunk of its server-sent events."""
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body=payload, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return Result(False, error=f"HTTP {r.status}: {r.read()[:300].decode(errors='replace')}")
        result, parts, usage = Result(True), [], None
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                return Result(False, error=f"stream error: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    result.chunk_times.append(now - start)
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
        result.latency = time.perf_counter() - start
        result.text = "".join(parts)
        result.output_tokens = usage["completion_tokens"] if usage else len(result.chunk_times)
        result.ttft = result.chunk_times[0] if result.chunk_times else result.latency
        return result
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def request_body(server: Server, index: int, images: list[str], max_tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": images[index % len(images)]}},
               {"type": "text", "text": PROMPTS[index % len(PROMPTS)]}]
    return {"model": server.model_id, "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, **server.extra_body}


def run_load(server: Server, n: int, concurrency: int, images: list[str], max_tokens: int,
             timeout_s: float) -> tuple[list[Result], float]:
    """``n`` requests from ``concurrency`` client threads; the results in request order and the wall time."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(n):
        todo.put(i)
    results: list[Result | None] = [None] * n

    def client() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            results[i] = stream_request(server.port, request_body(server, i, images, max_tokens), timeout_s)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None], time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the figures
def summary(values: list[float]) -> tuple[float, float, float]:
    """``(mean, p50, p99)`` in milliseconds (NaN when empty)."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    ordered = sorted(values)

    def pct(q: float) -> float:  # linear interpolation, as numpy.percentile
        k = (len(ordered) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return statistics.fmean(ordered) * 1e3, pct(0.5) * 1e3, pct(0.99) * 1e3


def metrics(results: list[Result], duration: float) -> dict:
    good = [r for r in results if r.ok]
    itl = [b - a for r in good for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    tokens = sum(r.output_tokens for r in good)
    return {"requests": len(results), "ok": len(good), "duration_s": duration, "req_per_s": len(good) / duration,
            "out_tok_per_s": tokens / duration, "mean_out_tokens": tokens / max(1, len(good)),
            "ttft_ms": summary([r.ttft for r in good]), "tpot_ms": summary(tpot), "itl_ms": summary(itl),
            "errors": sorted({r.error for r in results if not r.ok})}


def print_table(rows: list[tuple[str, int, dict]]) -> None:
    head = (f"{'server':<13}{'conc':>5}{'ok/N':>9}{'time s':>8}{'req/s':>8}{'out tok/s':>10}{'tok/req':>8}"
            f"  {'TTFT ms mean/p50/p99':>22}  {'TPOT ms mean/p50/p99':>22}  {'ITL ms mean/p50/p99':>22}")
    print(head)
    print("-" * len(head))

    def triple(t: tuple[float, float, float]) -> str:
        return "/".join(f"{x:.1f}" for x in t)

    for name, conc, m in rows:
        done = f"{m['ok']}/{m['requests']}"
        print(f"{name:<13}{conc:>5}{done:>9}{m['duration_s']:>8.2f}{m['req_per_s']:>8.2f}"
              f"{m['out_tok_per_s']:>10.1f}{m['mean_out_tokens']:>8.1f}  {triple(m['ttft_ms']):>22}  "
              f"{triple(m['tpot_ms']):>22}  {triple(m['itl_ms']):>22}")


# ------------------------------------------------------------------------------------------ main
#: torch intra-op threads of both servers (OMP_NUM_THREADS; 0: their default). On 2 cores, 2 intra-op
#: threads beside the server's own event-loop thread oversubscribe the CPU (measured: vlmkit 49 req/s at
#: concurrency 16 with the default, 79 with 1 thread; transformers serve 12.7 and 12.9)
THREADS = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a vlmkit model folder (LLaVA-expressible: it is exported to hf-llava); "
                                                 "default: a tiny random LLaVA of the easyvqa-llava recipe's shape")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default: %(default)s)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default: %(default)s)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask for exactly --max-tokens tokens (vlmkit: ignore_eos; transformers: min_new_tokens)")
    p.add_argument("--image-size", type=int, default=64, help="side of the square request images (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server first (default: %(default)s)")
    p.add_argument("--servers", default="vlmkit,transformers", help="which to run (default: %(default)s)")
    p.add_argument("--continuous-batching", action="store_true",
                   help="start transformers serve with --continuous-batching (it still answers image-text one at a time)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take (default: %(default)s)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads (OMP_NUM_THREADS) of both servers; 0 = their default (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--workdir", default=None, help="keep the built and exported models and the server logs here")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be >= 1")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if set(args.servers) - {"vlmkit", "transformers"} or not args.servers:
        p.error(f"--servers takes vlmkit and/or transformers, got {args.servers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global THREADS
    THREADS = args.threads
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = Path(args.model) if args.model else build_tiny_model(work / "tiny-llava")
        exported = export_hf_llava(src, work / "model-hf-llava")
        print(f"model: {src} -> exported to {exported}")
        print(f"{args.requests} requests per level, concurrency {args.concurrency}, max_tokens {args.max_tokens}"
              f"{', ignore_eos' if args.ignore_eos else ''}, {args.image_size}x{args.image_size} PNG images, greedy, "
              f"{os.cpu_count()} CPUs\n")
        images = make_images(args.requests, args.image_size)
        makers = {"vlmkit": vlmkit_server, "transformers": transformers_server}
        rows: list[tuple[str, int, dict]] = []
        answers: dict[str, list[str]] = {}
        for name in args.servers:
            server = makers[name](exported, work, args)
            t0 = time.perf_counter()
            server.start()
            print(f"{name}: up in {time.perf_counter() - t0:.1f} s (log: {server.log_path})", flush=True)
            try:
                warm, _ = run_load(server, args.warmup, 1, images, args.max_tokens, args.timeout)
                if any(not r.ok for r in warm):
                    sys.exit(f"{name}: warm-up failed: {[r.error for r in warm if not r.ok]}\n{server.log_tail()}")
                for conc in args.concurrency:
                    results, duration = run_load(server, args.requests, conc, images, args.max_tokens, args.timeout)
                    m = metrics(results, duration)
                    rows.append((name, conc, m))
                    print(f"  concurrency {conc:>3}: {m['req_per_s']:.2f} req/s, {m['ok']}/{m['requests']} ok", flush=True)
                    for err in m["errors"][:3]:
                        print(f"    error: {err}")
                    if args.ignore_eos and any(r.ok and r.output_tokens < args.max_tokens for r in results):
                        print(f"    note: {name} ended some answers before {args.max_tokens} tokens: it does not honour "
                              "--ignore-eos")
                    answers.setdefault(name, [r.text if r.ok else None for r in results])
            finally:
                server.stop()
        print()
        print_table(rows)
        by = {(name, conc): m for name, conc, m in rows}
        if len(answers) == 2:
            a, b = answers["vlmkit"], answers["transformers"]
            # vlmkit trims the whitespace around an answer; transformers serve sends it as generated
            same = sum(x is not None and y is not None and x.strip() == y.strip() for x, y in zip(a, b))
            print(f"\nidentical answers vlmkit / transformers (concurrency {args.concurrency[0]}): {same} / {len(a)}")
        if "vlmkit" in args.servers and len(args.concurrency) > 1:
            lo, hi = min(args.concurrency), max(args.concurrency)
            base = by[("vlmkit", lo)]["req_per_s"]
            scale = f"{by[('vlmkit', hi)]['req_per_s'] / base:.2f}x" if base else "n/a"
            print(f"vlmkit request throughput, concurrency {hi} / {lo}: {scale}")
        if args.json:
            Path(args.json).write_text(json.dumps([{"server": n, "concurrency": c, **m} for n, c, m in rows], indent=2))
        if len(args.servers) == 2:
            conc = 16 if 16 in args.concurrency else max(args.concurrency)
            ours, theirs = by[("vlmkit", conc)]["req_per_s"], by[("transformers", conc)]["req_per_s"]
            ratio = f"{ours / theirs:.2f}x" if theirs else "n/a (transformers answered no request)"
            print(f"request throughput vlmkit / transformers at concurrency {conc}: {ratio}")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
