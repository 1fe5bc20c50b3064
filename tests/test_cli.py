"""The command line, run as a real subprocess (console script and conversion script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma

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
