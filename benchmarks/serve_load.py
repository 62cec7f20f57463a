"""Load test of `llava-jax serve` on localhost: N concurrent streaming clients for T seconds.

Starts `llava-jax serve` as a subprocess (or targets --url), then for each client count runs
that many clients, each sending one request after another (an image and a question, greedy,
`stream: true`), and reports requests/s, completion tokens/s, time to first token and
per-request decode rate percentiles, and failed requests. The first client count is the
sequential baseline; the gain is tokens/s against it. Every batch size is compiled in a warm-up
before measuring.

Workloads (--workload): `uniform`, every answer --max-tokens long; `mixed`, each request's
`max_tokens` drawn from 8 to 256 (both about 8 images that the clients cycle over);
`multiturn`, each client holds 3-turn conversations, each about an image of its own (each turn
sends the whole conversation so far) and TTFT is reported per turn.
--schedulers runs the same load against `serve --scheduler engine` and `--scheduler batch`,
one server after the other, and prints their ratios. The server's resident memory (RSS) is
sampled every --rss-every seconds while each client count runs: a soak is one long count,
e.g. `--workload mixed --clients 32 --duration 600`, whose RSS should stay flat.

The default model is a small random LLaVA built here (CLIP-style tower at --image-size px,
default 42: 9 image tokens; LLaMA decoder of --width x --layers; the 160-token test
tokenizer), so nothing is downloaded.

    python benchmarks/serve_load.py --clients 1 8 32 --duration 60 [--model PATH --template T]
    python benchmarks/serve_load.py --workload mixed --schedulers engine batch
    python benchmarks/serve_load.py --workload multiturn --clients 1 8 --schedulers engine batch
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


def build_model(root: Path, width: int, layers: int, image_size: int = 42) -> Path:
    """A random LLaVA-1.5-shaped model dir (tokenizer and processor included)."""
    import torch
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from llava_jax.checks import tiny_hf
    from llava_jax.checks.tiny_tokenizer import save_tiny_tokenizer
    from llava_jax.conversion.hf_to_jax import convert_hf_to_jax

    torch.manual_seed(0)
    heads = max(width // 32, 1)
    text = transformers.LlamaConfig(
        vocab_size=tiny_hf.VOCAB, hidden_size=width, intermediate_size=width * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        head_dim=32, max_position_embeddings=512 + (image_size // 14) ** 2,
    )  # fmt: skip
    vision = tiny_hf.clip_config()
    vision.image_size = image_size
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tiny_hf.IMAGE_TOKEN, image_seq_length=(image_size // 14) ** 2,
    )  # fmt: skip
    hf = root / "hf"
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(hf)
    save_tiny_tokenizer(hf)
    crop = {"height": image_size, "width": image_size}
    LlavaImageProcessorPil(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(hf)
    convert_hf_to_jax(hf, root / "bench-llava")
    return root / "bench-llava"


def image_url(seed: int) -> str:
    """A random 160x120 JPEG as a data URL."""
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 255, (120, 160, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_urls(n: int) -> list[str]:
    return [image_url(seed) for seed in range(n)]


class Client:
    """One client's loop of streaming requests; records one row per request."""

    def __init__(self, url: str, model: str, max_tokens: int, images: list[str], api_key=None):
        parsed = urllib.parse.urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.model, self.max_tokens, self.images = model, max_tokens, images
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def first_turn(self, k: int, fresh: bool = False) -> list[dict]:
        """Request k's message: one of the client's images (or, `fresh`, an image of its own,
        which no earlier request has sent) and a question."""
        url = image_url(10_000 + k) if fresh else self.images[k % len(self.images)]
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]}]  # fmt: skip

    def request(self, k: int, max_tokens: int | None = None, messages=None) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens or self.max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                "messages": messages or self.first_turn(k)}  # fmt: skip
        start = time.perf_counter()
        first = None
        tokens = 0
        text = []
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
                    text.append(choice["delta"].get("content") or "")
            conn.close()
            if not done:
                return {"error": "the stream ended without [DONE]"}
        except (OSError, http.client.HTTPException, ValueError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        end = time.perf_counter()
        first = first or end
        return {"start": start, "end": end, "ttft": first - start, "tokens": tokens,
                "text": "".join(text), "decode_rate": (tokens - 1) / (end - first)
                if tokens > 1 and end > first else float("nan")}  # fmt: skip


FOLLOW_UPS = ("Tell me more about it.", "And what else is there?")


def conversation(client: Client, k: int) -> list[dict]:
    """Three turns about an image no earlier conversation sent (so that turn 1 prefills it
    whole); each row gets its `turn` (1, 2, 3)."""
    messages, rows = client.first_turn(k, fresh=True), []
    for turn in (1, 2, 3):
        row = client.request(k, messages=messages)
        rows.append({**row, "turn": turn})
        if "error" in row or turn == 3:
            break
        messages = [*messages, {"role": "assistant", "content": row["text"]},
                    {"role": "user", "content": FOLLOW_UPS[turn - 1]}]  # fmt: skip
    return rows


def run_level(client: Client, clients: int, duration: float, workload: str = "uniform") -> dict:
    """`clients` loops for `duration` seconds; requests started in time are waited for."""
    rows: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration

    def loop(c: int):
        k = c
        draw = np.random.RandomState(c)
        while time.perf_counter() < deadline:
            if workload == "multiturn":
                new = conversation(client, k)
            else:
                mixed = workload == "mixed"
                new = [client.request(k, int(draw.randint(8, 257)) if mixed else None)]
            with lock:
                rows.extend(new)
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
        **{f"turn{t}_ttft_p{q}_s": float(np.percentile(ttfts, q))
           for t in (1, 2, 3) if (ttfts := [r["ttft"] for r in ok if r.get("turn") == t])
           for q in (50, 99)},
    }  # fmt: skip


def warm_up(client: Client, max_batch: int, workload: str) -> None:
    """Compiles every batch size the batch scheduler pads to (1, 2, 4, ... max_batch), for
    every answer-length bucket the workload meets, and the longer prompts of later turns."""
    lengths = {"uniform": [None], "mixed": [16, 32, 64, 128, 256]}.get(workload, [None])
    for max_tokens in lengths:
        size = 1
        while True:
            with concurrent.futures.ThreadPoolExecutor(size) as pool:
                if workload == "multiturn":
                    rows = sum(pool.map(lambda k: conversation(client, k), range(size)), [])
                else:
                    rows = list(pool.map(client.request, range(size), [max_tokens] * size))
            bad = [r["error"] for r in rows if "error" in r]
            if bad:
                raise RuntimeError(f"warm-up failed: {bad[0]}")
            if size >= max_batch:
                break
            size = min(size * 2, max_batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path, scheduler: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "llava_jax.cli.main", "serve", "--model", str(model),
           "--port", str(port), "--model-name", "bench", "--max-batch", str(args.max_batch),
           "--max-queue", str(max(64, max(args.clients))), "--scheduler", scheduler]  # fmt: skip
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


def rss_mib(pid: int) -> float:
    """A process's resident memory (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler(threading.Thread):
    """Samples a process's RSS every `every` seconds until stopped: (seconds, MiB) rows."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self.done = threading.Event()

    def run(self):
        start = time.perf_counter()
        while True:
            self.samples.append((round(time.perf_counter() - start, 1), rss_mib(self.pid)))
            if self.done.wait(self.every):
                self.samples.append((round(time.perf_counter() - start, 1), rss_mib(self.pid)))
                return


def measure(args, url: str, model_name: str, label: str,
            pid: int | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Warms the server up, then runs every client count; prints one line per count (and
    the server's RSS over it, when `pid` is the server's)."""
    client = Client(url, model_name, args.max_tokens, image_urls(8))
    t = time.perf_counter()
    warm_up(client, args.max_batch, args.workload)
    print(f"[{label}] warm-up (compiles) {time.perf_counter() - t:.1f} s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    results = []
    health = lambda: json.loads(urllib.request.urlopen(url + "/health").read())  # noqa: E731
    for clients in args.clients:
        before = health()
        sampler = None if pid is None else RssSampler(pid, args.rss_every)
        if sampler is not None:
            sampler.start()
        r = run_level(client, clients, args.duration, args.workload)
        if sampler is not None:
            sampler.done.set()
            sampler.join()
            rss = [m for _, m in sampler.samples]
            r["rss_mib"] = sampler.samples
            # From the first minute on (or the first sample): warm-up allocations excluded.
            settled = [m for t, m in sampler.samples if t >= 60] or rss
            r["rss_growth"] = max(settled) / settled[0]
        after = health()
        if "steps" in after:  # the engine: rows decoded per step
            steps = max(after["steps"] - before["steps"], 1)
            r["mean_batch"] = (after["decoded_tokens"] - before["decoded_tokens"]) / steps
        else:  # the batch scheduler: requests per batch
            batches = max(after["batches"] - before["batches"], 1)
            r["mean_batch"] = (after["requests"] - before["requests"]) / batches
        results.append(r)
        base = results[0]["tokens_per_s"]
        turns = "".join(f", turn {t} TTFT p50 {r[f'turn{t}_ttft_p50_s']:.3f} s"
                        for t in (1, 2, 3) if f"turn{t}_ttft_p50_s" in r)  # fmt: skip
        print(f"[{label}] {clients:3d} clients: {r['requests']:5d} requests, {r['errors']} "
              f"errors, {r['requests_per_s']:6.2f} req/s, {r['tokens_per_s']:7.1f} tok/s "
              f"({r['tokens_per_s'] / base:.2f}x), {r['tokens_per_request']:.1f} tok/req, "
              f"TTFT p50/p90/p99 {r['ttft_p50_s']:.3f}/{r['ttft_p90_s']:.3f}/"
              f"{r['ttft_p99_s']:.3f} s, decode p50 {r['decode_rate_p50']:.1f} tok/s "
              f"per request, mean batch {r['mean_batch']:.2f}{turns}; load "
              f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        if "rss_mib" in r:
            rss = [m for _, m in r["rss_mib"]]
            print(f"[{label}] {clients:3d} clients: server RSS {rss[0]:.0f} MiB at the start, "
                  f"{rss[-1]:.0f} at the end, {max(rss):.0f} at most; growth from the first "
                  f"minute on {100 * (r['rss_growth'] - 1):.1f}%", flush=True)  # fmt: skip
        for e in r["first_errors"]:
            print(f"    error: {e}")
    final = health()
    hits = f", prefix hits {final['prefix_hits']}" if "prefix_hits" in final else ""
    print(f"[{label}] server: {final['requests']} requests in {final['batches']} batches, "
          f"largest {final['largest_batch']}{hits}")  # fmt: skip
    return results, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server (else one is started)")
    parser.add_argument("--model", type=Path, help="model dir (default: a small random LLaVA)")
    parser.add_argument("--model-name", default="bench", help="with --url: the model id")
    parser.add_argument("--template", default=None)
    parser.add_argument("--width", type=int, default=256, help="default model: decoder width")
    parser.add_argument("--layers", type=int, default=4, help="default model: decoder layers")
    parser.add_argument("--image-size", type=int, default=42,
                        help="default model: image side in pixels; (side / 14)^2 image "
                        "tokens")  # fmt: skip
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--workload", choices=("uniform", "mixed", "multiturn"),
                        default="uniform")  # fmt: skip
    parser.add_argument("--schedulers", nargs="+", choices=("engine", "batch"),
                        default=["engine"],
                        help="servers to start and compare, one after the other")  # fmt: skip
    parser.add_argument("--rss-every", type=float, default=10.0, metavar="S",
                        help="sample the started server's RSS every S seconds "
                        "(default 10)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.url is not None:
            runs["url"] = measure(args, args.url, args.model_name, "url")
        else:
            model = args.model
            if model is None:
                model = build_model(Path(tmp), args.width, args.layers, args.image_size)
                args.template = args.template or "mistral_instruct"
            for scheduler in args.schedulers:
                proc, url = start_server(args, model, scheduler)
                try:
                    runs[scheduler] = measure(args, url, "bench", scheduler, pid=proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(60)
    if {"engine", "batch"} <= runs.keys():
        for e, b in zip(runs["engine"][0], runs["batch"][0], strict=True):
            ratio = {k: e[k] / b[k] if b[k] else float("nan")
                     for k in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s")}  # fmt: skip
            print(f"engine / batch at {e['clients']:3d} clients: tokens/s "
                  f"{ratio['tokens_per_s']:.2f}x, TTFT p50 {ratio['ttft_p50_s']:.2f}x, p99 "
                  f"{ratio['ttft_p99_s']:.2f}x", flush=True)  # fmt: skip
    for label, (results, _) in runs.items():
        for r in results:
            if "turn1_ttft_p50_s" in r and "turn3_ttft_p50_s" in r:
                t1 = r["turn1_ttft_p50_s"]
                print(f"[{label}] {r['clients']} clients: TTFT p50 turn 2 / turn 1 "
                      f"{r['turn2_ttft_p50_s'] / t1:.2f}, turn 3 / turn 1 "
                      f"{r['turn3_ttft_p50_s'] / t1:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"model": str(args.model),
                             "json": str(args.json)}, "runs": runs}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
