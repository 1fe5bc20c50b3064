"""embed-corpus end to end: shards and manifest, malformed input, resume after SIGKILL, two processes.

The reference everywhere is an uninterrupted single-process run (or plain ``encode``) of the tiny model
on one device; runs under test use 8 (CLI, one process) or 2 + 2 (two processes) CPU devices, hence the
float32 tolerance instead of bit equality.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embgemma_jax import embed_corpus, read_embeddings
from embgemma_jax.corpus.readers import CorpusError
from embgemma_jax.corpus.shards import MANIFEST, ShardError
from tests.conftest import F32_ATOL

SHARD_SIZE, BATCH_SIZE = 16, 8
WORDS = "mars planet red known reddish orbit sun moon the a of is".split()


def _corpus_lines() -> list[str]:
    """128 lines whose prompted token counts fall in the 32-, 64- and 96-token buckets, shortest first,
    so the later shards of a run each need a fresh compile (time to kill it mid-run)."""
    out = []
    for i in range(128):
        n = 1 + i % 5 if i < 32 else 12 + i % 7 if i < 80 else 40 + i % 9
        out.append(" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" {i}")
    return out


@pytest.fixture(scope="module")
def corpus_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(_corpus_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(jax_model, corpus_txt, tmp_path_factory) -> Path:
    """An uninterrupted single-process, single-device run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    embed_corpus(jax_model, corpus_txt, out, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE)
    return out


def _cli(ckpt: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "embgemma_jax.cli",
        "embed-corpus",
        "--model",
        str(ckpt),
        "--input",
        str(corpus),
        "--output",
        str(out),
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        str(BATCH_SIZE),
        *extra,
    ]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)  # keeps PYTHONPATH, so subprocesses import this checkout
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _assert_same_output(out: Path, reference: Path, *, same_shards: bool = True) -> None:
    ids, emb = read_embeddings(out)
    ref_ids, ref_emb = read_embeddings(reference)
    assert ids == ref_ids
    np.testing.assert_allclose(emb, ref_emb, atol=F32_ATOL, rtol=0)
    if not same_shards:  # shards are cut per process
        return
    man, ref_man = (json.loads((d / MANIFEST).read_text()) for d in (out, reference))
    assert [s["rows"] for s in man["shards"]] == [s["rows"] for s in ref_man["shards"]]


def test_single_process_output_matches_encode(jax_model, corpus_txt, reference):
    ids, emb = read_embeddings(reference)
    lines = _corpus_lines()
    assert ids == list(range(1, len(lines) + 1))  # .txt ids are 1-based line numbers
    np.testing.assert_allclose(emb, jax_model.encode(lines, prompt_name="document"), atol=F32_ATOL, rtol=0)
    man = json.loads((reference / MANIFEST).read_text())
    assert man["documents"] == 128 and man["errors"] == 0 and len(man["shards"]) == 128 // SHARD_SIZE
    # A finished run started again does no work and rewrites the same manifest.
    shard = reference / man["shards"][0]["files"]["embeddings"]["name"]
    before = shard.stat().st_mtime_ns
    again = embed_corpus(jax_model, corpus_txt, reference, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE)
    assert again == man and shard.stat().st_mtime_ns == before
    # ... but not with other settings.
    with pytest.raises(ValueError, match=r"different settings \(dim\)"):
        embed_corpus(jax_model, corpus_txt, reference, shard_size=SHARD_SIZE, truncate_dim=32)


def test_kill_and_resume_equals_uninterrupted_run(tiny_ckpt, corpus_txt, reference, tmp_path):
    out = tmp_path / "out"
    cmd = _cli(tiny_ckpt, corpus_txt, out)
    first_commit = out / "commits" / "p00000-s000000.json"
    proc = subprocess.Popen(cmd, env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not first_commit.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stderr.read().decode()[-3000:]
        assert first_commit.exists(), "no shard was committed in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists()
    # The killed run's lock file still names it; the kernel dropped its lock, so the resume takes over.
    assert json.loads((out / "run-p00000.lock").read_text())["pid"] == proc.pid
    committed = sorted((out / "commits").glob("p00000-s*[0-9].json"))
    assert 1 <= len(committed) < 128 // SHARD_SIZE, "the kill did not land mid-run"
    with pytest.raises(ShardError, match="the run has not finished"):
        read_embeddings(out)
    kept = {}
    for rec_path in committed:
        for entry in json.loads(rec_path.read_text())["files"].values():
            st = (out / entry["name"]).stat()
            kept[entry["name"]] = (st.st_ino, st.st_mtime_ns)

    resumed = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"\ddoc/s", resumed.stderr), "no progress bar with a docs/s rate"
    # Shards committed before the kill were kept, not recomputed ...
    for name, stamp in kept.items():
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp, f"{name} was rewritten on resume"
    # ... and the whole equals an uninterrupted run: nothing duplicated, nothing lost.
    _assert_same_output(out, reference)


def _multi_file_corpus(d: Path) -> tuple[list[str], list[str], list[str]]:
    """A gzip JSONL file, a plain JSONL file and two parquet files (128 texts); returns the --input patterns,
    the texts in input order and their positional ids. By bytes, the cut between two processes falls inside
    the plain JSONL file, so its lines are numbered across the cut; lengths ramp up within every share, so
    later shards need fresh compiles (time to kill the run mid-way)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = _corpus_lines()
    texts = lines[:32] + lines[32:64] + lines[:16] + lines[96:112] + lines[:32]
    texts = [f"{t} #{i}" for i, t in enumerate(texts)]  # distinct
    d.mkdir()
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts[:32])
    (d / "a-0.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (d / "b-1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[32:96]))
    pq.write_table(pa.table({"text": texts[96:112]}), d / "c-2.parquet")
    pq.write_table(pa.table({"text": texts[112:]}), d / "c-3.parquet")
    ids = [f"{d}/a-0.jsonl.gz:{i}" for i in range(1, 33)] + [f"{d}/b-1.jsonl:{i}" for i in range(1, 65)]
    ids += [f"{d}/c-2.parquet:{i}" for i in range(16)] + [f"{d}/c-3.parquet:{i}" for i in range(16)]
    return [str(d / "*.jsonl*"), str(d / "c-*.parquet")], texts, ids


def test_two_processes_killed_and_resumed_equal_encode(tiny_ckpt, jax_model, tmp_path):
    """Two real JAX processes (2 CPU devices each) embed a corpus of several files into parquet shards; both
    are killed with SIGKILL once each has committed a shard (a preempted slice); the same two commands
    resume, keep what was committed, and give exactly the texts' encode() in input order."""
    inputs, texts, ids = _multi_file_corpus(tmp_path / "in")
    out = tmp_path / "out"

    def start() -> list[subprocess.Popen]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--format", "parquet"]
        return [
            subprocess.Popen(
                [*_cli(tiny_ckpt, inputs[0], out, "--no-progress", *dist, "--process-id", str(i)), "--input", *inputs],
                env=_env(2),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]

    procs = start()
    try:
        firsts = [out / "commits" / f"p{i:05d}-s000000.json" for i in range(2)]
        deadline = time.monotonic() + 240
        while not all(f.exists() for f in firsts) and all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.005)
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=60)
        assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, [p.stderr.read()[-2000:] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not (out / MANIFEST).exists()
    committed = sorted((out / "commits").glob("p*-s*[0-9].json"))
    records = sum(json.loads(c.read_text())["records"] for c in committed)
    assert {c.name[:6] for c in committed} == {"p00000", "p00001"} and records < len(texts), "not killed mid-run"
    kept = {}
    for c in committed:
        for entry in json.loads(c.read_text())["files"].values():
            st = (out / entry["name"]).stat()
            kept[entry["name"]] = (st.st_ino, st.st_mtime_ns)

    procs = start()
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for name, stamp in kept.items():
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp, f"{name} was rewritten on resume"
    got_ids, emb = read_embeddings(out)
    assert got_ids == ids
    np.testing.assert_allclose(emb, jax_model.encode(texts, prompt_name="document"), atol=F32_ATOL, rtol=0)

    # Each process read only its part: the plain JSONL file was cut between them, its lines numbered across.
    man = json.loads((out / MANIFEST).read_text())
    (end0_file, end0_line), start1 = man["processes"][0]["end"], man["processes"][1]["start"]
    assert end0_file == 1 and start1 == [1, end0_line] and 1 < end0_line <= 64
    assert man["processes"][1]["end"] == [4, 0]  # the end of the input
    run1 = json.loads((out / "run-p00001-of-00002.json").read_text())
    assert run1["pieces"][0][:2] == [1, run1["pieces"][0][1]] and run1["pieces"][0][1] > 0
    assert run1["first_lines"][0] == end0_line
    assert json.loads((out / "commits" / "p00001-s000000.json").read_text())["start"] == [1, end0_line]


def test_a_bad_input_of_one_process_stops_both(tiny_ckpt, tmp_path):
    """Process 1's own parquet file lacks the text column: both processes stop with the error, none hangs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "c-1.parquet")
    (tmp_path / "a.txt").write_text("\n".join(_corpus_lines()[:60]) + "\n")
    pq.write_table(pa.table({"body": ["three"]}), tmp_path / "c-2.parquet")
    inputs = [str(tmp_path / n) for n in ("c-1.parquet", "a.txt", "c-2.parquet")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--quiet"]
    procs = [
        subprocess.Popen(
            [*_cli(tiny_ckpt, inputs[0], tmp_path / "out", *dist, "--process-id", str(i)), "--input", *inputs],
            env=_env(1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = f"{tmp_path / 'c-2.parquet'}: no text column 'text' (columns: ['body'])"
    assert [p.returncode for p in procs] == [2, 2], errs
    assert errs[1].strip().splitlines()[-1] == f"error: {bad}"
    assert errs[0].strip().splitlines()[-1] == f"error: process 1 stopped: {bad}"


@pytest.fixture(scope="module")
def bad_jsonl(tmp_path_factory) -> tuple[Path, list[tuple[object, str]]]:
    """A jsonl with good records (a duplicate id among them) and every kind of malformed one."""
    good = [("a", "Mars is red"), (2, "the moon"), ("a", "duplicate id, kept"), ("z", "sun")]
    lines = [
        json.dumps({"id": "a", "text": "Mars is red"}),
        "{bad json",
        json.dumps({"id": 2, "text": "the moon"}),
        json.dumps({"id": 3}),
        "",
        json.dumps({"id": "a", "text": "duplicate id, kept"}),
        json.dumps({"id": 4, "text": ["not", "a", "string"]}),
        json.dumps({"id": 5, "text": "<image_soft_token> is outside the embedding table"}),
        json.dumps({"text": "no id"}),
    ]
    path = tmp_path_factory.mktemp("bad") / "docs.jsonl"
    undecodable = b'{"id": 6, "text": "\xc3("}\n'
    path.write_bytes(("\n".join(lines) + "\n").encode() + undecodable + b'{"id": "z", "text": "sun"}\n')
    return path, good


def test_malformed_input_raises_with_file_and_line(jax_model, bad_jsonl, tmp_path):
    path, _ = bad_jsonl
    with pytest.raises(CorpusError, match=re.escape(f"{path}:2: invalid JSON")):
        embed_corpus(jax_model, path, tmp_path / "out", id_field="id")
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_malformed_input_skipped_is_logged_and_counted(jax_model, bad_jsonl, tmp_path):
    path, good = bad_jsonl
    out = tmp_path / "out"
    man = embed_corpus(jax_model, path, out, id_field="id", on_error="skip", shard_size=3, truncate_dim=32)
    ids, emb = read_embeddings(out)
    assert ids == [i for i, _ in good]
    expected = jax_model.encode([t for _, t in good], prompt_name="document", truncate_dim=32)
    np.testing.assert_allclose(emb, expected, atol=F32_ATOL, rtol=0)
    assert man["documents"] == 4 and man["errors"] == 6 and man["errors_files"] == ["errors-p00000.jsonl"]
    logged = [json.loads(x) for x in (out / "errors-p00000.jsonl").read_text().splitlines()]
    assert [e["line"] for e in logged] == [2, 4, 7, 8, 9, 10]
    assert all(e["file"] == str(path.resolve()) and e["location"] == f"{path}:{e['line']}" for e in logged)
    reasons = [e["error"] for e in logged]
    for line_reason in (
        "invalid JSON",
        "text field 'text' is missing",
        "is list",
        "cannot embed this text",
        "id field 'id' is missing",
        "invalid UTF-8",
    ):
        assert sum(line_reason in r for r in reasons) == 1, (line_reason, reasons)


def test_interrupted_commit_and_corruption(jax_model, tmp_path):
    """A crash after a shard's data files were renamed but before its commit record: on resume the
    orphans are rewritten. A corrupted shard of a finished run fails read_embeddings."""
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(_corpus_lines()[:40]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    embed_corpus(jax_model, corpus, out, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE)
    ids, emb = read_embeddings(out)

    (out / MANIFEST).unlink()
    (out / "commits" / "p00000-s000002.json").unlink()  # the last shard was never committed ...
    orphan = out / "shards" / "p00000-s000002.npy"
    orphan.write_bytes(orphan.read_bytes()[:100])  # ... and its data file is garbage
    (out / "shards" / ".p00000-s000002.ids.json.tmp").write_bytes(b"[1, 2")
    embed_corpus(jax_model, corpus, out, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE)
    assert not list((out / "shards").glob(".*.tmp"))
    ids2, emb2 = read_embeddings(out)
    assert ids2 == ids
    np.testing.assert_array_equal(emb2, emb)

    shard = out / "shards" / "p00000-s000001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"p00000-s000001\.npy fails its sha256 checksum"):
        read_embeddings(out)


def test_parquet_input(jax_model, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = _corpus_lines()[:20]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(20)], "body": texts}), path, row_group_size=6)
    embed_corpus(
        jax_model, path, tmp_path / "out", text_field="body", id_field="doc", shard_size=7, prompt_name="query"
    )
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == [f"d{i}" for i in range(20)]
    np.testing.assert_allclose(emb, jax_model.encode(texts, prompt_name="query"), atol=F32_ATOL, rtol=0)


def test_token_budget_gives_the_same_output(jax_model, corpus_txt, reference, tmp_path):
    out = tmp_path / "out"
    embed_corpus(jax_model, corpus_txt, out, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, token_budget=200)
    _assert_same_output(out, reference)
    with pytest.raises(ValueError, match="token_budget must be a positive int or None, got 0"):
        embed_corpus(jax_model, corpus_txt, tmp_path / "other", token_budget=0)
