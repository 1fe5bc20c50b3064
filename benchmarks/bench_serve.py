#!/usr/bin/env python
"""Throughput and latency of the embedding server under N concurrent clients, against offline ``encode``.

    python benchmarks/bench_serve.py --tiny                  # tiny random checkpoint (built once, cached)
    python benchmarks/bench_serve.py                         # full-size random checkpoint (built once, cached)
    python benchmarks/bench_serve.py --model DIR --clients 1,16,64

Two workloads of real English text (stdlib docstrings cut with the model's tokenizer):

  queries  one short query (8-16 tokens) per request, prompt_name "query"
  mixed    1-8 documents of 10-600 tokens (capped at the model's window) per request, prompt_name "document"

On the same texts, in one run, offline and server passes alternating (so a change in the machine's load
hits both):

  offline  ``model.encode(all texts, prompt_name=..., batch_size=B)`` in this process, one call: the
           default-mode path (padded batches; B the largest power of two with B x bucket(longest) within
           --max-batch-tokens): the ``ratio``. Also reported: encode's throughput mode
           (``token_budget=--max-batch-tokens``, several texts packed per row), and with a batch-invariant
           server (``--batch-invariant``, auto: on, on the CPU) the batch-invariant model's ``encode``, whose
           vectors each request must get bit for bit (``ratio_to_invariant``).
  server   a real server process (the public ``serve(model, ...)``; ``warmup=True`` unless --no-warmup, so
           every batch shape is compiled before it listens) with --max-batch-tokens. N clients, one
           keep-alive connection each, send pre-encoded ``POST /v1/embeddings`` requests
           (``encoding_format: base64``, as the openai client sends) over raw asyncio sockets, taking them
           from a shared list until it is empty: a lean load generator, since on a small machine it shares
           the cores with the server. Latency is per request, queueing included.

After one untimed pass of each, ``--repeats`` alternating timed passes; the best of each counts.
Reported: texts/s and tokens/s, the server/offline throughput ratio (issue 14's target: >= 0.8 at 64
clients), p50/p99 latency, requests per device call (from /metrics), the server process's CPU seconds per
request, and how many requests came back bit-identical to ``encode`` of the server's own mode (max |diff|
of the rest).
Prints a table, writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = {
    # name: (prompt_name, texts per request (lo, hi), tokens per text (lo, hi), default requests)
    "queries": ("query", (1, 1), (8, 16), 1024),
    "mixed": ("document", (1, 8), (10, 600), 128),
}


# ------------------------------------------------------------------------------------------------------
# Texts


def build_requests(model_dir: Path, name: str, n_requests: int, max_len: int, seed: int) -> list[list[str]]:
    """Requests of texts cut from stdlib docstrings to target token counts (the model's tokenizer)."""
    from embgemma_jax.testing import stdlib_docstrings
    from embgemma_jax.tokenizer import Tokenizer

    _, per_request, (lo, hi), _ = WORKLOADS[name]
    tok = Tokenizer.from_dir(model_dir, max_length=10**9)
    words = " ".join(" ".join(d.split()) for d in stdlib_docstrings()).split(" ")
    rng = np.random.default_rng(seed)
    cursor = int(rng.integers(0, len(words) // 2))
    requests = []
    for _ in range(n_requests):
        texts = []
        for _ in range(int(rng.integers(per_request[0], per_request[1] + 1))):
            target = min(int(rng.integers(lo, hi + 1)), max_len)
            n = max(1, int(target * 0.7))
            while n > 1 and len(tok.encode_pieces([" ".join(words[cursor : cursor + n])])[0]) + 2 > target:
                n -= max(1, n // 8)
            texts.append(" ".join(words[cursor : cursor + n]))
            cursor = (cursor + n) % (len(words) - 2000)
        requests.append(texts)
    return requests


# ------------------------------------------------------------------------------------------------------
# The server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    launch = (
        "import sys; from embgemma_jax import EmbeddingGemma; from embgemma_jax.server import serve; "
        "a = sys.argv[1:]; m = EmbeddingGemma.from_pretrained(a[0], dtype=a[1], compilation_cache_dir=a[6] or None, "
        "batch_invariant=a[7] == '1'); "
        "sys.exit(serve(m, port=int(a[2]), max_batch_tokens=int(a[3]), max_concurrent_requests=int(a[4]), "
        "model_name='bench', warmup=a[5] == '1'))"
    )
    cmd = [
        sys.executable,
        "-c",
        launch,
        str(model),
        args.dtype,
        str(port),
        str(args.max_batch_tokens),
        str(max(args.clients_list) * 2),
        "0" if args.no_warmup else "1",
        args.compilation_cache or "",
        "1" if args.invariant else "0",
    ]
    log = open(log_path, "wb")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; log:\n{log_path.read_text()[-4000:]}")
        try:
            status, _ = asyncio.run(get(port, "/health"))
            if status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start in {args.start_timeout} s; log:\n{log_path.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------------
# A lean HTTP/1.1 load generator


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return status, await reader.readexactly(int(m.group(1))) if m else b""


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await _exchange(reader, writer, f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    finally:
        writer.close()


def post_request(texts: list[str], prompt_name: str) -> bytes:
    body = json.dumps(
        {"model": "bench", "input": texts, "prompt_name": prompt_name, "encoding_format": "base64"}
    ).encode()
    head = "POST /v1/embeddings HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def run_clients(port: int, requests: list[bytes], clients: int) -> dict:
    """N clients take pre-encoded requests from a shared list until it is empty."""
    todo = list(range(len(requests)))[::-1]
    latencies = [0.0] * len(requests)
    bodies: list[bytes] = [b""] * len(requests)

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while todo:
                i = todo.pop()
                t0 = time.perf_counter()
                status, body = await _exchange(reader, writer, requests[i])
                latencies[i] = time.perf_counter() - t0
                if status != 200:
                    raise RuntimeError(f"request {i}: HTTP {status}: {body[:500]!r}")
                bodies[i] = body
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"wall_s": time.perf_counter() - t0, "latencies": latencies, "bodies": bodies}


def decode(body: bytes) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in json.loads(body)["data"]])


def scrape(port: int) -> dict[str, float]:
    _, text = asyncio.run(get(port, "/metrics"))
    out = {}
    for name in ("embgemma_batch_requests_count", "embgemma_batch_seconds_sum"):
        m = re.search(rf"^{name} (\S+)$", text.decode(), re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


# ------------------------------------------------------------------------------------------------------


def write(results: dict, args: argparse.Namespace, tag: str) -> Path:
    out = args.out or HERE / "results" / f"bench_serve_{tag}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a random one)")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint instead of the full-size one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--clients", default="64", help="comma-separated client counts (default 64)")
    p.add_argument("--workloads", default="queries,mixed")
    p.add_argument("--requests", type=int, default=None, help="requests per workload (default: per workload)")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-warmup", action="store_true", help="no server warm-up (two untimed passes instead)")
    p.add_argument("--compilation-cache", default=None, help="JAX persistent compilation cache for both sides")
    p.add_argument(
        "--batch-invariant",
        choices=("auto", "on", "off"),
        default="auto",
        help="the server's mode, as `serve --batch-invariant` (auto: on, on the CPU backend)",
    )
    p.add_argument("--start-timeout", type=float, default=1800.0, help="seconds for the server to come up")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args()
    args.clients_list = [int(c) for c in args.clients.split(",")]
    sys.path.insert(0, str(ROOT))

    import jax
    from checkpoints import cached_checkpoint

    from embgemma_jax import EmbeddingGemma
    from embgemma_jax.batching import INVARIANT_BATCH_TOKENS
    from embgemma_jax.cli import resolve_batch_invariant
    from embgemma_jax.server.batcher import batch_size_for

    args.invariant = resolve_batch_invariant(args.batch_invariant, INVARIANT_BATCH_TOKENS)

    tag = "custom"
    if args.model is None:
        tag = "tiny" if args.tiny else "random-full"
        args.model = cached_checkpoint(tiny=args.tiny)

    model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype, compilation_cache_dir=args.compilation_cache)
    # The server's own model: with batch-invariant mode, its encode gives what each request must get exactly.
    inv_model = None
    if args.invariant:
        inv_model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype, batch_invariant=True)
    budget = args.max_batch_tokens
    results: dict = {
        "model": str(args.model),
        "tag": tag,
        "dtype": args.dtype,
        "max_batch_tokens": budget,
        "server_warmup": not args.no_warmup,
        "batch_invariant": args.invariant,
        "devices": [str(d) for d in jax.devices()],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "command": " ".join(["python benchmarks/bench_serve.py", *sys.argv[1:]]),
        "workloads": {},
    }
    workloads = {}
    for i, name in enumerate(args.workloads.split(",")):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; valid: {list(WORKLOADS)}")
        n = args.requests or WORKLOADS[name][3]
        workloads[name] = build_requests(args.model, name, n, model.config.max_seq_length, seed=i)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc, port = start_server(args.model, args, Path(tmp) / "server.log")
        results["server_start_s"] = time.perf_counter() - t0
        print(f"server up in {results['server_start_s']:.0f} s", file=sys.stderr)
        try:
            for name, requests in workloads.items():
                prompt_name = WORKLOADS[name][0]
                texts = [t for r in requests for t in r]
                tokens = sum(map(len, model.tokenizer.encode([model.prompts[prompt_name] + t for t in texts])))
                splits = np.cumsum([0] + [len(r) for r in requests])
                wire = [post_request(r, prompt_name) for r in requests]

                prompted = [model.prompts[prompt_name] + t for t in texts]
                longest = max(map(len, model.tokenizer.encode(prompted)))
                batch_size = batch_size_for(budget, longest, model.config.max_seq_length)

                def offline(
                    packed: bool, texts=texts, prompt_name=prompt_name, bs=batch_size, invariant=False
                ) -> tuple[float, np.ndarray]:
                    """The server's default-mode path (padded batches of its batch size), encode's throughput
                    mode (token_budget: several texts packed per row; other last bits), or (``invariant``) the
                    batch-invariant model's encode, the server's own path in that mode."""
                    kw = {"batch_size": 1024, "token_budget": budget} if packed else {"batch_size": bs}
                    t0 = time.perf_counter()
                    m = inv_model if invariant else model
                    out = m.encode(texts, prompt_name=prompt_name, **({} if invariant else kw))
                    return time.perf_counter() - t0, out

                _, vectors = offline(False)  # compiles
                offline(True)
                if inv_model is not None:
                    _, vectors = offline(False, invariant=True)  # what the server must give, bit for bit
                for _ in range(2 if args.no_warmup else 1):
                    asyncio.run(run_clients(port, wire, max(args.clients_list)))
                best_offline = best_packed = best_invariant = float("inf")
                rows = []
                for clients in args.clients_list:
                    best = None
                    for _ in range(args.repeats):
                        best_offline = min(best_offline, offline(False)[0])
                        best_packed = min(best_packed, offline(True)[0])
                        if inv_model is not None:
                            best_invariant = min(best_invariant, offline(False, invariant=True)[0])
                        before, cpu0 = scrape(port), cpu_seconds(proc.pid)
                        run = asyncio.run(run_clients(port, wire, clients))
                        cpu, after = cpu_seconds(proc.pid) - cpu0, scrape(port)
                        if best is None or run["wall_s"] < best["wall_s"]:
                            best = {**run, "cpu_s": cpu, "before": before, "after": after}
                    lat = np.array(best["latencies"]) * 1000
                    identical, max_diff = 0, 0.0
                    for i, body in enumerate(best["bodies"]):
                        got, want = decode(body), vectors[splits[i] : splits[i + 1]]
                        identical += int(np.array_equal(got, want))
                        max_diff = max(max_diff, float(np.abs(got - want).max()))
                    calls = (
                        best["after"]["embgemma_batch_requests_count"] - best["before"]["embgemma_batch_requests_count"]
                    )
                    busy = best["after"]["embgemma_batch_seconds_sum"] - best["before"]["embgemma_batch_seconds_sum"]
                    rows.append(
                        {
                            "clients": clients,
                            "requests": len(requests),
                            "server_wall_s": best["wall_s"],
                            "server_texts_per_s": len(texts) / best["wall_s"],
                            "server_tokens_per_s": tokens / best["wall_s"],
                            "p50_ms": float(np.percentile(lat, 50)),
                            "p99_ms": float(np.percentile(lat, 99)),
                            "device_calls": calls,
                            "requests_per_device_call": len(requests) / calls if calls else float("nan"),
                            "device_thread_busy_fraction": busy / best["wall_s"],
                            "server_cpu_ms_per_request": 1000 * best["cpu_s"] / len(requests),
                            "bit_identical_requests": identical,
                            "max_abs_diff": max_diff,
                        }
                    )
                for row in rows:  # the best offline pass of the whole workload
                    row["offline_texts_per_s"] = len(texts) / best_offline
                    row["offline_tokens_per_s"] = tokens / best_offline
                    row["ratio"] = best_offline / row["server_wall_s"]
                    row["offline_packed_texts_per_s"] = len(texts) / best_packed
                    row["ratio_to_packed"] = best_packed / row["server_wall_s"]
                    if inv_model is not None:
                        row["offline_invariant_texts_per_s"] = len(texts) / best_invariant
                        row["ratio_to_invariant"] = best_invariant / row["server_wall_s"]
                    print(
                        f"{name} x{row['clients']}: server {row['server_texts_per_s']:.1f} texts/s vs offline "
                        f"{row['offline_texts_per_s']:.1f} (ratio {row['ratio']:.2f}), p50 {row['p50_ms']:.1f} ms, "
                        f"p99 {row['p99_ms']:.1f} ms",
                        file=sys.stderr,
                    )
                results["workloads"][name] = {
                    "prompt_name": prompt_name,
                    "texts": len(texts),
                    "tokens": tokens,
                    "offline_wall_s": best_offline,
                    "offline_packed_wall_s": best_packed,
                    "offline_batch_size": batch_size,
                    "runs": rows,
                }
                write(results, args, tag)  # after each workload, so a cut-off run keeps what it measured
        finally:
            results["server_exit_code"] = stop_server(proc)
            results["server_log_tail"] = (Path(tmp) / "server.log").read_text(errors="replace")[-3000:]

    print()
    print(
        "| workload | clients | offline texts/s (packed; invariant) | server texts/s | ratio (to packed; to invariant) "
        "| p50 ms | p99 ms | req/device call | device busy | server CPU ms/req | bit-identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, w in results["workloads"].items():
        for r in w["runs"]:
            inv = r.get("offline_invariant_texts_per_s")
            inv_rate = "" if inv is None else f"; {inv:.1f}"
            inv_ratio = "" if inv is None else f"; {r['ratio_to_invariant']:.2f}"
            print(
                f"| {name} | {r['clients']} | {r['offline_texts_per_s']:.1f} ({r['offline_packed_texts_per_s']:.1f}"
                f"{inv_rate}) | {r['server_texts_per_s']:.1f} | {r['ratio']:.2f} ({r['ratio_to_packed']:.2f}"
                f"{inv_ratio}) | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['requests_per_device_call']:.1f} | "
                f"{r['device_thread_busy_fraction']:.0%} | {r['server_cpu_ms_per_request']:.2f} | "
                f"{r['bit_identical_requests']}/{r['requests']} (max diff {r['max_abs_diff']:.1e}) |"
            )
    print(f"\nwrote {write(results, args, tag)}", file=sys.stderr)


if __name__ == "__main__":
    main()
