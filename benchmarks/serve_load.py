"""Load test of `llava-jax serve` on localhost: N concurrent streaming clients for T seconds.

Starts `llava-jax serve` as a subprocess (or targets --url), then for each client count runs
that many clients, each sending one request after another (an image and a question, greedy,
`stream: true`), and reports requests/s, completion tokens/s, time to first token and
per-request decode rate percentiles, and failed requests. The first client count is the
sequential baseline; the gain is tokens/s against it. Every batch size is compiled in a warm-up
before measuring.

The default model is a small random LLaVA built here (CLIP-style tower at 42 px; LLaMA decoder
of --width x --layers; the 160-token test tokenizer), so nothing is downloaded.

    python benchmarks/serve_load.py --clients 1 8 32 --duration 60 [--model PATH --template T]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# With the default model's template these prompts are 33 to 41 tokens: one length bucket, so
# the warm-up compiles every shape the load test meets.
QUESTIONS = ("What is in the picture?", "Describe the image.", "What colour is it?",
             "What is it?", "Where was this taken?", "How many things are there?")  # fmt: skip


def build_model(root: Path, width: int, layers: int) -> Path:
    """A random LLaVA-1.5-shaped model dir (tokenizer and processor included)."""
    import torch
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from llava_jax import tiny_hf
    from llava_jax.convert.hf_to_jax import convert_hf_to_jax
    from llava_jax.tiny_tokenizer import save_tiny_tokenizer

    torch.manual_seed(0)
    heads = max(width // 32, 1)
    text = transformers.LlamaConfig(
        vocab_size=tiny_hf.VOCAB, hidden_size=width, intermediate_size=width * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        head_dim=32, max_position_embeddings=512,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=tiny_hf.clip_config(), text_config=text,
        image_token_index=tiny_hf.IMAGE_TOKEN, image_seq_length=9,
    )  # fmt: skip
    hf = root / "hf"
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(hf)
    save_tiny_tokenizer(hf)
    crop = {"height": tiny_hf.CROP, "width": tiny_hf.CROP}
    LlavaImageProcessorPil(size={"shortest_edge": tiny_hf.CROP}, crop_size=crop).save_pretrained(hf)
    convert_hf_to_jax(hf, root / "bench-llava")
    return root / "bench-llava"


def image_urls(n: int) -> list[str]:
    from PIL import Image

    urls = []
    for seed in range(n):
        pixels = np.random.RandomState(seed).randint(0, 255, (120, 160, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


class Client:
    """One client's loop of streaming requests; records one row per request."""

    def __init__(self, url: str, model: str, max_tokens: int, images: list[str], api_key=None):
        parsed = urllib.parse.urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.model, self.max_tokens, self.images = model, max_tokens, images
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, k: int) -> dict:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": self.images[k % len(self.images)]}},
                    {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]}]}  # fmt: skip
        start = time.perf_counter()
        first = None
        tokens = 0
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            conn.request("POST", "/v1/chat/completions", json.dumps(body), self.headers)
            response = conn.getresponse()
            if response.status != 200:
                return {"error": f"HTTP {response.status}: {response.read()[:200]!r}"}
            done = False
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if first is None and choice["delta"].get("content"):
                        first = time.perf_counter()
            conn.close()
            if not done:
                return {"error": "the stream ended without [DONE]"}
        except (OSError, http.client.HTTPException, ValueError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        end = time.perf_counter()
        first = first or end
        return {"start": start, "end": end, "ttft": first - start, "tokens": tokens,
                "decode_rate": (tokens - 1) / (end - first) if tokens > 1 and end > first
                else float("nan")}  # fmt: skip


def run_level(client: Client, clients: int, duration: float) -> dict:
    """`clients` loops for `duration` seconds; requests started in time are waited for."""
    rows: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration

    def loop(c: int):
        k = c
        while time.perf_counter() < deadline:
            row = client.request(k)
            with lock:
                rows.append(row)
            k += clients

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in rows if "error" not in r]
    errors = [r["error"] for r in rows if "error" in r]
    pct = lambda key, q: float(np.nanpercentile([r[key] for r in ok], q)) if ok else float("nan")  # noqa: E731
    return {
        "clients": clients, "wall_s": wall, "requests": len(ok), "errors": len(errors),
        "first_errors": errors[:3], "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "tokens_per_request": float(np.mean([r["tokens"] for r in ok])) if ok else 0.0,
        **{f"ttft_p{q}_s": pct("ttft", q) for q in (50, 90, 99)},
        **{f"decode_rate_p{q}": pct("decode_rate", q) for q in (50, 10)},
    }  # fmt: skip


def warm_up(client: Client, max_batch: int) -> None:
    """Compiles every batch size the scheduler pads to (1, 2, 4, ... max_batch)."""
    size = 1
    while True:
        with concurrent.futures.ThreadPoolExecutor(size) as pool:
            rows = list(pool.map(client.request, range(size)))
        bad = [r["error"] for r in rows if "error" in r]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[0]}")
        if size >= max_batch:
            return
        size = min(size * 2, max_batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "llava_jax.cli.main", "serve", "--model", str(model),
           "--port", str(port), "--model-name", "bench", "--max-batch", str(args.max_batch),
           "--max-queue", str(max(64, max(args.clients)))]  # fmt: skip
    if args.template:
        cmd += ["--template", args.template]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server (else one is started)")
    parser.add_argument("--model", type=Path, help="model dir (default: a small random LLaVA)")
    parser.add_argument("--model-name", default="bench", help="with --url: the model id")
    parser.add_argument("--template", default=None)
    parser.add_argument("--width", type=int, default=256, help="default model: decoder width")
    parser.add_argument("--layers", type=int, default=4, help="default model: decoder layers")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url, model_name = args.url, args.model_name
        if url is None:
            model = args.model
            if model is None:
                model = build_model(Path(tmp), args.width, args.layers)
                args.template = args.template or "mistral_instruct"
            proc, url = start_server(args, model)
            model_name = "bench"
        try:
            client = Client(url, model_name, args.max_tokens, image_urls(8))
            t = time.perf_counter()
            warm_up(client, args.max_batch)
            print(f"warm-up (compiles) {time.perf_counter() - t:.1f} s; load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
            results = []
            health = lambda: json.loads(urllib.request.urlopen(url + "/health").read())  # noqa: E731
            for clients in args.clients:
                before = health()
                r = run_level(client, clients, args.duration)
                after = health()
                batches = max(after["batches"] - before["batches"], 1)
                r["mean_batch"] = (after["requests"] - before["requests"]) / batches
                results.append(r)
                base = results[0]["tokens_per_s"]
                print(f"{clients:3d} clients: {r['requests']:5d} requests, {r['errors']} errors, "
                      f"{r['requests_per_s']:6.2f} req/s, {r['tokens_per_s']:7.1f} tok/s "
                      f"({r['tokens_per_s'] / base:.2f}x), {r['tokens_per_request']:.1f} tok/req, "
                      f"TTFT p50/p90/p99 {r['ttft_p50_s']:.3f}/{r['ttft_p90_s']:.3f}/"
                      f"{r['ttft_p99_s']:.3f} s, decode p50 {r['decode_rate_p50']:.1f} tok/s "
                      f"per request, mean batch {r['mean_batch']:.2f}; load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
                for e in r["first_errors"]:
                    print(f"    error: {e}")
            final = health()
            print(f"server: {final['requests']} requests in {final['batches']} batches, "
                  f"largest {final['largest_batch']}")  # fmt: skip
            if args.json:
                args.json.write_text(json.dumps({"args": vars(args) | {"model": str(args.model),
                                     "json": str(args.json)}, "results": results,
                                     "server": final}, indent=2))  # fmt: skip
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)


if __name__ == "__main__":
    main()
