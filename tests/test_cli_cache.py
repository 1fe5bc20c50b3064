"""The CLI's persistent compilation cache: on by default in the user's cache directory, opt-out by flag or
environment variable."""

import argparse
import os
import subprocess
import sys

from embgemma_jax.cli import compilation_cache_dir


def _args(**kw):
    return argparse.Namespace(**{"compilation_cache": None, "no_compilation_cache": False, **kw})


def test_cache_directory_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("EMBGEMMA_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir(_args()) == os.path.join(str(tmp_path), "embgemma_jax", "xla")
    assert compilation_cache_dir(_args(compilation_cache="/x")) == "/x"
    assert compilation_cache_dir(_args(no_compilation_cache=True)) is None
    monkeypatch.setenv("EMBGEMMA_COMPILATION_CACHE", "off")
    assert compilation_cache_dir(_args()) is None
    monkeypatch.setenv("EMBGEMMA_COMPILATION_CACHE", str(tmp_path / "c"))
    assert compilation_cache_dir(_args()) == str(tmp_path / "c")


def test_embed_fills_the_default_cache(tiny_ckpt, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EMBGEMMA_COMPILATION_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    cmd = [sys.executable, "-m", "embgemma_jax.cli", "embed", "--model", str(tiny_ckpt), "a short text"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    cache = tmp_path / "embgemma_jax" / "xla"
    assert cache.is_dir() and any(cache.iterdir()), "no compiled program was written to the default cache"
    env["EMBGEMMA_COMPILATION_CACHE"] = "off"
    env["XDG_CACHE_HOME"] = str(tmp_path / "other")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and not (tmp_path / "other").exists()
