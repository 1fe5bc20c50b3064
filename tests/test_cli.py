"""The command line, run as a real subprocess (console script and conversion script)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma
from tests.conftest import F32_ATOL

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_embed_json_and_npy(tiny_ckpt, jax_model, tmp_path):
    texts = ["first text", "second, longer text about planets"]
    proc = run(
        "-m",
        "embgemma_jax.cli",
        "embed",
        "--model",
        str(tiny_ckpt),
        "--prompt-name",
        "query",
        "--truncate-dim",
        "32",
        *texts,
    )
    out = json.loads(proc.stdout)
    ref = jax_model.encode(texts, prompt_name="query", truncate_dim=32)
    assert out["dim"] == 32
    np.testing.assert_allclose(np.array(out["embeddings"], np.float32), ref, atol=1e-6)

    inp = tmp_path / "texts.txt"
    inp.write_text("\n".join(texts) + "\n", encoding="utf-8")
    npy = tmp_path / "emb.npy"
    run("-m", "embgemma_jax.cli", "embed", "--model", str(tiny_ckpt), "--input", str(inp), "--output", str(npy))
    np.testing.assert_allclose(np.load(npy), jax_model.encode(texts), atol=1e-6)


def test_convert_script_and_subcommand(tiny_ckpt, jax_model, tmp_path):
    run("conversion/convert_checkpoint.py", str(tiny_ckpt), str(tmp_path / "a"))
    run("-m", "embgemma_jax.cli", "convert", str(tiny_ckpt), str(tmp_path / "b"))
    for d in ("a", "b"):
        np.testing.assert_array_equal(
            EmbeddingGemma.from_pretrained(tmp_path / d).encode(["converted"]), jax_model.encode(["converted"])
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "--model", "/nonexistent/dir", "hi"], "checkpoint directory not found"),
        (["embed", "--model", "{ckpt}", "--prompt-name", "nope", "hi"], "unknown prompt_name 'nope'"),
        (["embed", "--model", "{ckpt}", "--truncate-dim", "4096", "hi"], "truncate_dim must be"),
        (["embed", "--model", "{ckpt}", "--input", "/nonexistent.txt"], "input file not found"),
    ],
)
def test_errors_exit_nonzero_with_message(tiny_ckpt, args, message):
    proc = run("-m", "embgemma_jax.cli", *[a.format(ckpt=tiny_ckpt) for a in args], check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_embed_input_reads_lines_as_embed_corpus_and_takes_every_model_option(tiny_ckpt, tmp_path):
    """The issue's file: 3 lines (\\f and U+2028 inside lines, a BOM, \\r\\n), not splitlines()'s 5 rows."""
    inp = tmp_path / "t.txt"
    inp.write_bytes(b"\xef\xbb\xbfpage one\fpage two\nline\xe2\x80\xa8sep\nthird\r\n")
    lines = ["page one\fpage two", "line\u2028sep", "third"]
    npy = tmp_path / "emb.npy"
    options = ["--dtype", "bfloat16", "--quantize", "int8", "--attention-impl", "dense", "--token-budget", "64"]
    args = ["embed", "--model", str(tiny_ckpt), "--input", str(inp), "--output", str(npy), *options]
    run("-m", "embgemma_jax.cli", *args)
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16", quantize="int8", attention_impl="dense")
    emb = np.load(npy)
    assert emb.shape[0] == 3
    np.testing.assert_array_equal(emb, model.encode(lines, token_budget=64))


def test_embed_batch_invariant(tiny_ckpt, tmp_path):
    """--batch-invariant: exactly the batch-invariant model's vectors, which are those of each text alone."""
    texts = ["a short one", "a much longer text about the red planet and its two small moons", ""]
    npy = tmp_path / "inv.npy"
    args = ["embed", "--model", str(tiny_ckpt), "--batch-invariant", "--invariant-batch-tokens", "64"]
    run("-m", "embgemma_jax.cli", *args, "--output", str(npy), *texts)
    model = EmbeddingGemma.from_pretrained(tiny_ckpt, batch_invariant=True, invariant_batch_tokens=64)
    got = np.load(npy)
    np.testing.assert_array_equal(got, model.encode(texts))
    np.testing.assert_array_equal(got, np.stack([model.encode([t])[0] for t in texts]))


def test_serve_subcommand(tiny_ckpt, jax_model):
    """`embgemma-jax serve` wires the model options, the limits, --model-name and $EMBGEMMA_API_KEY to the
    server: a real process on 127.0.0.1, plain HTTP, drained by SIGTERM."""
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), EMBGEMMA_API_KEY="sekret")
    cmd = [sys.executable, "-m", "embgemma_jax.cli", "serve", "--model", str(tiny_ckpt), "--port", str(port)]
    cmd += ["--model-name", "tiny", "--max-client-batch-size", "2"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def post(texts, key):
        body = json.dumps({"model": "tiny", "input": texts}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(url + "/v1/embeddings", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        texts = ["hello", "Mars is red"]
        out = post(texts, "sekret")
        emb = np.array([d["embedding"] for d in sorted(out["data"], key=lambda d: d["index"])], np.float32)
        np.testing.assert_allclose(emb, jax_model.encode(texts), atol=F32_ATOL, rtol=0)
        for texts, key, status in ((["a"], None, 401), (["a", "b", "c"], "sekret", 413)):
            with pytest.raises(urllib.error.HTTPError) as exc:
                post(texts, key)
            assert exc.value.code == status
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
