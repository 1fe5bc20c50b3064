"""The embedding server as a real process on 127.0.0.1, talked to with the official ``openai`` client and
plain HTTP (httpx), with the tiny checkpoint.

Two servers per module: ``server`` (open, limits sized for 32 concurrent clients) and ``guarded``
(``--api-key``, one admitted request at a time, large requests allowed; drained by SIGTERM in the last
test). Every wait is bounded.

Equality: the servers run batch-invariant (``--batch-invariant auto``: on, on the CPU backend), so a
text's vector does not depend on the requests it is coalesced with. Every response, those of 32 concurrent
clients included, is compared bit for bit (``np.array_equal``) with ``encode`` of the request's own texts
by the model loaded as the server loads it (this module's ``jax_model``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from embgemma_jax import EmbeddingGemma
from embgemma_jax.testing import REAL_PROMPTS

MODEL_NAME = "tiny-embeddinggemma"
API_KEY = "test-key-123"
MAX_BATCH_TOKENS = 16384
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 120.0

WORDS = sorted({w for p in REAL_PROMPTS.values() for w in p.split()} | {"Mars", "planet", "é", "😀", "\n"})


def _texts(seed: int, n: int, max_words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, max_words + 1)))) for _ in range(n)]


def _long_text(words: int = 120) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))  # well past the tiny model's 96 tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command() -> list[str]:
    return [sys.executable, "-m", "embgemma_jax.cli", "serve"]  # embgemma-jax serve, whatever is on PATH


class ServerProcess:
    """A real server process on 127.0.0.1; its log goes to a file that failures print."""

    def __init__(self, ckpt: Path, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            cmd = [*_server_command(), "--model", str(ckpt), "--port", str(self.port), "--model-name", MODEL_NAME]
            with open(log_path, "wb") as log:
                self.proc = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return
            self.stop()
        pytest.fail(f"server did not start; log:\n{self.log()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture(scope="module")
def jax_model(tiny_ckpt):
    """The model as the servers load it: batch-invariant (overrides the session's default-mode model)."""
    return EmbeddingGemma.from_pretrained(tiny_ckpt, batch_invariant=True)


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = ServerProcess(
        tiny_ckpt,
        tmp_path_factory.mktemp("server") / "server.log",
        "--max-client-batch-size",
        "32",
        "--max-concurrent-requests",
        "64",
        "--max-batch-tokens",
        str(MAX_BATCH_TOKENS),
        "--max-body-bytes",
        "65536",
    )
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def guarded(tiny_ckpt, tmp_path_factory):
    srv = ServerProcess(
        tiny_ckpt,
        tmp_path_factory.mktemp("guarded") / "server.log",
        "--api-key",
        API_KEY,
        "--max-concurrent-requests",
        "1",
        "--max-client-batch-size",
        "4096",
        "--max-batch-tokens",
        str(MAX_BATCH_TOKENS),
    )
    yield srv
    srv.stop()


def _client(srv: ServerProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, timeout=REQUEST_TIMEOUT_S, max_retries=0)


def _reference(model, texts, *, prompt_name=None, prompt=None, dim=None, normalize=None) -> np.ndarray:
    """What ``encode`` gives: OpenAI's ``dimensions`` truncates then re-normalizes."""
    return model.encode(
        texts,
        prompt_name=prompt_name,
        prompt=prompt,
        truncate_dim=dim,
        normalize_embeddings=dim is not None if normalize is None else normalize,
    )


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m is not None, f"{name}{labels} not in /metrics"
    return float(m.group(1))


# ----------------------------------------------------------------------------------------------------
# Equality with encode


@pytest.mark.parametrize(
    "texts, kwargs",
    [
        (["Which planet is known as the Red Planet?"], {}),
        (_texts(1, 7), {"prompt_name": "query"}),
        (_texts(2, 5), {"prompt": "custom prompt: "}),
        (_texts(3, 32), {"prompt_name": "document", "dimensions": 16}),
        ([_long_text(), "short"], {"encoding_format": "float"}),
    ],
)
def test_openai_client_gets_exactly_encode(server, jax_model, texts, kwargs):
    kwargs = dict(kwargs)
    extra = {k: kwargs.pop(k) for k in ("prompt_name", "prompt") if k in kwargs}
    out = _client(server).embeddings.create(model=MODEL_NAME, input=texts, extra_body=extra or None, **kwargs)
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    assert [d.index for d in out.data] == list(range(len(texts)))
    want = _reference(jax_model, texts, dim=kwargs.get("dimensions"), **extra)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"
    if "dimensions" in kwargs:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # re-normalized, as OpenAI
    # usage: the tokens the model saw (prompt, BOS, EOS included, truncated to the window)
    prompt = extra.get("prompt") or jax_model.prompts.get(extra.get("prompt_name"), "")
    ids = jax_model.tokenizer.encode([prompt + t for t in texts])
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(map(len, ids))
    long = [i for i, t in enumerate(texts) if len(jax_model.tokenizer.encode_pieces([prompt + t])[0]) > 94]
    assert out.model_extra is not None
    assert out.usage.model_extra["truncated_inputs"] == long
    if texts[0] == _long_text():
        assert long == [0]


def test_single_string_input_and_base64_bytes(server, jax_model):
    text = "Mars, known for its reddish appearance"
    r = httpx.post(
        f"{server.url}/v1/embeddings", json={"input": text, "encoding_format": "base64"}, timeout=REQUEST_TIMEOUT_S
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL_NAME and len(body["data"]) == 1
    raw = base64.b64decode(body["data"][0]["embedding"])
    got = np.frombuffer(raw, dtype="<f4")  # little-endian float32, as OpenAI
    assert np.array_equal(got, jax_model.encode([text])[0])
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": [text]}, timeout=REQUEST_TIMEOUT_S)
    assert np.array_equal(np.array(r.json()["data"][0]["embedding"], np.float32), got)


def test_tei_embed_gets_exactly_encode(server, jax_model):
    texts = _texts(4, 6)
    url = f"{server.url}/embed"
    # TEI's defaults: normalize true, truncate true
    r = httpx.post(url, json={"inputs": texts, "prompt_name": "query"}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    want = jax_model.encode(texts, prompt_name="query", normalize_embeddings=True)
    assert np.array_equal(np.array(r.json(), dtype=np.float32), want)
    ids = jax_model.tokenizer.encode([jax_model.prompts["query"] + t for t in texts])
    assert int(r.headers["x-prompt-tokens"]) == sum(map(len, ids))

    r = httpx.post(url, json={"inputs": texts[0], "normalize": False, "dimensions": 8}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    got = np.array(r.json(), dtype=np.float32)
    assert got.shape == (1, 8)
    assert np.array_equal(got, jax_model.encode([texts[0]], truncate_dim=8))

    # Truncation as the reference (reported), or refused with truncate: false.
    long = [_long_text(), "short"]
    r = httpx.post(url, json={"inputs": long}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "0"
    assert np.array_equal(np.array(r.json(), np.float32), jax_model.encode(long, normalize_embeddings=True))
    r = httpx.post(url, json={"inputs": long, "truncate": False}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 413
    assert r.json()["param"] == "inputs[0]" and "truncate" in r.json()["error"]


ROUNDS = 2


def test_32_concurrent_clients(server, jax_model):
    """32 clients at once, 2 requests each (mixed sizes, prompts and routes): every answer is the
    client's own vectors, and the device coalesced requests (more than one request per device call)."""
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    jobs = []
    for c in range(32):
        for r in range(ROUNDS):
            seed = 100 + ROUNDS * c + r
            n = 1 + seed % 4
            prompt_name = ["query", "document", None][seed % 3]
            dim = [None, 16, None, 32][seed % 4]
            jobs.append((seed, _texts(seed, n, max_words=[3, 12][seed % 2]), prompt_name, dim))

    def client_work(c: int) -> list[tuple[int, np.ndarray]]:
        out = []
        client = _client(server)
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            for seed, texts, prompt_name, dim in jobs[ROUNDS * c : ROUNDS * (c + 1)]:
                if seed % 2:
                    resp = client.embeddings.create(
                        model=MODEL_NAME,
                        input=texts,
                        dimensions=dim if dim is not None else openai.NOT_GIVEN,
                        extra_body={"prompt_name": prompt_name} if prompt_name else None,
                    )
                    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
                else:
                    body = {
                        "inputs": texts,
                        "normalize": dim is not None,
                        "prompt_name": prompt_name,
                        "dimensions": dim,
                    }
                    resp = http.post(f"{server.url}/embed", json=body)
                    assert resp.status_code == 200, resp.text
                    got = np.array(resp.json(), dtype=np.float32)
                out.append((seed, got))
        return out

    barrier = threading.Barrier(32, timeout=60)

    def start_together(c: int):
        barrier.wait()
        return client_work(c)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = [r for f in [pool.submit(start_together, c) for c in range(32)] for r in f.result(timeout=300)]
    assert len(results) == 32 * ROUNDS
    # Each request against encode of its own texts, bit for bit (see the module docstring).
    by_seed = {seed: (texts, prompt_name, dim) for seed, texts, prompt_name, dim in jobs}
    for seed, got in results:
        texts, prompt_name, dim = by_seed[seed]
        want = _reference(jax_model, texts, prompt_name=prompt_name, dim=dim)
        assert got.shape == want.shape
        assert np.array_equal(got, want), f"request {seed}: max |diff| {np.abs(got - want).max()}"

    after = httpx.get(f"{server.url}/metrics", timeout=10).text
    calls = _metric(after, "embgemma_batch_requests_count") - _metric(before, "embgemma_batch_requests_count")
    requests = _metric(after, "embgemma_batch_requests_sum") - _metric(before, "embgemma_batch_requests_sum")
    assert requests == 32 * ROUNDS
    assert calls < requests, "no two requests shared a device call: the batcher did not coalesce"


# ----------------------------------------------------------------------------------------------------
# Limits and errors


@pytest.mark.parametrize(
    "route, body, status, param",
    [
        ("/v1/embeddings", b"{not json", 400, None),
        ("/v1/embeddings", b"[1, 2]", 400, None),
        ("/v1/embeddings", {}, 400, "input"),
        ("/v1/embeddings", {"input": 5}, 400, "input"),
        ("/v1/embeddings", {"input": []}, 400, "input"),
        ("/v1/embeddings", {"input": ["ok", 7]}, 400, "input[1]"),
        ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "input[0]"),
        ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "dimensions"),
        ("/v1/embeddings", {"input": "x", "dimensions": 49}, 400, "dimensions"),
        ("/v1/embeddings", {"input": "x", "dimensions": "8"}, 400, "dimensions"),
        ("/v1/embeddings", {"input": "x", "dimensions": 8.0}, 400, "dimensions"),
        ("/v1/embeddings", {"input": "x", "dimensions": True}, 400, "dimensions"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ("/v1/embeddings", {"input": "x", "prompt_name": "nope"}, 400, "prompt_name"),
        ("/v1/embeddings", {"input": "x", "prompt": 3}, 400, "prompt"),
        ("/v1/embeddings", {"input": "x", "temperature": 1}, 400, "temperature"),
        ("/v1/embeddings", {"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
        ("/v1/embeddings", {"input": ["x"] * 33}, 413, "input"),
        ("/embed", {"inputs": ["x"] * 33}, 413, "inputs"),
        ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "normalize"),
        ("/embed", {"inputs": "x", "truncation_direction": "left"}, 422, "truncation_direction"),
        ("/embed", {"input": "x"}, 422, "input"),
        ("/embed", b"\xff\xfe", 422, None),
        ("/v1/embeddings", b'{"input": ["ok", "bad \\ud800"]}', 400, "input[1]"),
        ("/embed", b'{"inputs": "\\udfff"}', 422, "inputs"),
        ("/v1/embeddings", b'{"input": "x", "prompt": "\\ud800: "}', 400, "prompt"),
    ],
)
def test_bad_requests_name_the_field(server, route, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}{route}", timeout=REQUEST_TIMEOUT_S, **kw)
    assert r.status_code == status, r.text
    err = r.json()
    if route == "/embed":  # TEI's error shape
        assert set(err) == {"error", "error_type", "param"} and err["param"] == param
        assert isinstance(err["error"], str) and err["error"]
    else:  # OpenAI's
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["param"] == param and err["error"]["message"]
    if param is not None:
        assert param.split("[")[0] in (err["error"] if route == "/embed" else err["error"]["message"])


def test_openai_client_raises_on_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        _client(server).embeddings.create(model=MODEL_NAME, input="x", dimensions=1000)


def test_body_too_large(server):
    big = json.dumps({"input": "x" * 70000}).encode()
    r = httpx.post(f"{server.url}/v1/embeddings", content=big, timeout=REQUEST_TIMEOUT_S)  # Content-Length
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds on the streamed body too
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(f"{server.url}/v1/embeddings", content=chunks(), timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 413
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_routes_health_models_metrics(server):
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    r = httpx.get(f"{server.url}/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route /nope"
    assert httpx.get(f"{server.url}/v1/embeddings", timeout=10).status_code == 405
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert _metric(text, "embgemma_requests_total", '{route="/v1/embeddings",status="200"}') >= 1
    assert _metric(text, "embgemma_requests_total", '{route="/v1/embeddings",status="400"}') >= 1
    assert _metric(text, "embgemma_request_duration_seconds_count", '{route="/v1/embeddings"}') >= 1
    assert _metric(text, "embgemma_batch_texts_sum") >= 1
    assert _metric(text, "embgemma_tokens_total") >= 1
    assert _metric(text, "embgemma_truncated_inputs_total") >= 1
    assert _metric(text, "embgemma_queue_depth") == 0
    assert _metric(text, "embgemma_in_flight_requests") == 0


# ----------------------------------------------------------------------------------------------------
# The guarded server: API key, a queue of one, then drain


def test_api_key(guarded):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200  # never needs the key
    for method, route in [("POST", "/v1/embeddings"), ("POST", "/embed"), ("GET", "/metrics"), ("GET", "/v1/models")]:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}]:
            r = httpx.request(method, f"{guarded.url}{route}", json={"input": "x"}, headers=headers, timeout=10)
            assert r.status_code == 401, (route, headers)
            assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        _client(guarded, "wrong").embeddings.create(model=MODEL_NAME, input="x")
    out = _client(guarded, API_KEY).embeddings.create(model=MODEL_NAME, input="x")
    assert len(out.data[0].embedding) == 48
    assert httpx.get(f"{guarded.url}/metrics", headers=auth, timeout=10).status_code == 200


BIG = _texts(7, 512, max_words=80)  # ~1 s of device time on the tiny model: long enough to hold the slot


def _wait_in_flight(srv: ServerProcess, n: int, timeout: float = 60.0) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{srv.url}/metrics", headers=auth, timeout=10).text
        if _metric(text, "embgemma_in_flight_requests") == n:
            return
        time.sleep(0.005)
    pytest.fail(f"never saw {n} request(s) in flight")


def _post_big(srv: ServerProcess) -> concurrent.futures.Future:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    body = {"model": MODEL_NAME, "input": BIG}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    future = pool.submit(httpx.post, f"{srv.url}/v1/embeddings", json=body, headers=headers, timeout=300)
    pool.shutdown(wait=False)
    return future


def test_full_queue_answers_429_and_stays_up(guarded):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    big = _post_big(guarded)
    _wait_in_flight(guarded, 1)
    r = httpx.post(f"{guarded.url}/v1/embeddings", json={"input": "x"}, headers=headers, timeout=60)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "queue_full"
    assert not big.done()  # the refusal came while the slot was held
    assert big.result(timeout=300).status_code == 200
    r = httpx.post(f"{guarded.url}/v1/embeddings", json={"input": "x"}, headers=headers, timeout=60)
    assert r.status_code == 200


def test_sigterm_drains_then_exits_0(guarded, jax_model):
    """Last test of the module: it stops the guarded server."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    big = _post_big(guarded)
    _wait_in_flight(guarded, 1)
    guarded.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while httpx.get(f"{guarded.url}/health", timeout=10).status_code != 503:  # the signal is handled
        assert time.monotonic() < deadline and not big.done()
        time.sleep(0.005)
    r = httpx.post(f"{guarded.url}/v1/embeddings", json={"input": "late"}, headers=headers, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert not big.done()  # refused while the admitted request was still running
    resp = big.result(timeout=300)
    assert resp.status_code == 200, resp.text
    assert guarded.proc.wait(60) == 0, guarded.log()
    assert "drained" in guarded.log()
    got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    assert np.array_equal(got, jax_model.encode(BIG))


def test_bad_settings_exit_with_a_message(tiny_ckpt):
    r = subprocess.run(
        [*_server_command(), "--model", str(tiny_ckpt), "--port", "0", "--max-batch-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env={**os.environ},
    )
    assert r.returncode == 2
    assert "error: max_batch_tokens (--max-batch-tokens) must be an int >= 96" in r.stderr
    assert "Traceback" not in r.stderr
