"""embed-corpus never silently wrong: one writer per output, resumes only over the same input, manifests
that must match their shards, and per-record failures that are always located and skippable.

Every case here was once accepted without an error (issue "Nothing silently wrong"); each test builds the
situation with real files and, for the writers, real second processes.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embgemma_jax import EmbeddingGemma, embed_corpus, read_embeddings
from embgemma_jax.corpus.readers import CorpusError
from embgemma_jax.corpus.shards import MANIFEST, ShardError
from tests.conftest import F32_ATOL

ROOT = Path(__file__).resolve().parents[1]
WORDS = "mars planet red known reddish orbit sun moon the a of is".split()


def _lines(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(1 + i % 9)) + f" {i}" for i in range(n)]


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _listing(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under out (hidden temporaries included) with its inode and mtime."""
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------------------------
# One writer per output directory


HOLD_LOCK = """
import sys
from pathlib import Path
from embgemma_jax.corpus.shards import exclusive_output
with exclusive_output(Path(sys.argv[1]), 0):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_held_output_is_refused_and_left_alone_then_taken_over_after_a_crash(jax_model, tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(_lines(12)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    in_flight = out / "shards" / ".p00000-s000000.npy.tmp"  # the holder's temporary file, being written
    in_flight.write_bytes(b"partial")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _listing(out)
        pattern = rf"{re.escape(str(out))} is being written by another embed-corpus run \(pid {holder.pid} on host "
        with pytest.raises(ShardError, match=pattern + re.escape(socket.gethostname())):
            embed_corpus(jax_model, corpus, out, shard_size=4)
        assert _listing(out) == before, "the refused run changed the holder's directory"
        assert in_flight.read_bytes() == b"partial"
        # The holder crashes (SIGKILL): the kernel drops its lock; the lock file still names the dead pid.
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert json.loads((out / "run-p00000.lock").read_text())["pid"] == holder.pid
    man = embed_corpus(jax_model, corpus, out, shard_size=4)  # takes over, cleans the dead run's leftovers
    assert man["documents"] == 12 and not in_flight.exists()
    expected = jax_model.encode(_lines(12), prompt_name="document")
    np.testing.assert_allclose(read_embeddings(out)[1], expected, atol=F32_ATOL, rtol=0)


def test_two_runs_on_one_output_real_processes(tiny_ckpt, jax_model, tmp_path):
    """Run A (a CLI process) is paused mid-run; run B, with another prompt, is refused and deletes nothing;
    A then finishes alone and its output holds only its own rows."""
    lines = _lines(96)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "embgemma_jax.cli", "embed-corpus", "--model", str(tiny_ckpt)]
    cmd += ["--input", str(corpus), "--output", str(out), "--shard-size", "8", "--batch-size", "4", "--no-progress"]
    run_a = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first_commit = out / "commits" / "p00000-s000000.json"
        deadline = time.monotonic() + 240
        while not first_commit.exists() and run_a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(run_a.pid, signal.SIGSTOP)
        assert run_a.poll() is None, "run A ended before it could be paused:\n" + run_a.stderr.read()[-3000:]
        assert first_commit.exists(), "run A committed nothing in time"
        before = _listing(out)
        with pytest.raises(ShardError, match=rf"another embed-corpus run \(pid {run_a.pid} on host"):
            embed_corpus(jax_model, corpus, out, shard_size=8, prompt="other prompt: ")
        assert _listing(out) == before, "run B changed run A's files"
        os.kill(run_a.pid, signal.SIGCONT)
        err = run_a.communicate(timeout=300)[1]
    finally:
        if run_a.poll() is None:
            os.kill(run_a.pid, signal.SIGCONT)
            run_a.kill()
            run_a.wait()
    assert run_a.returncode == 0, err[-3000:]
    ids, emb = read_embeddings(out)
    assert ids == list(range(1, 97))
    np.testing.assert_allclose(emb, jax_model.encode(lines, prompt_name="document"), atol=F32_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# A resume checks the input it depends on, in full


def _unfinish(out: Path, keep: int) -> None:
    """Makes a finished run look interrupted after its first ``keep`` shards."""
    (out / MANIFEST).unlink()
    for rec in sorted((out / "commits").glob("p00000-s*[0-9].json"))[keep:]:
        rec.unlink()


def _edges(path: Path) -> tuple[int, str]:
    """Size and sha256 of the first and last MiB: the partial fingerprint an earlier version compared."""
    data = path.read_bytes()
    return len(data), hashlib.sha256(data[: 2**20] + data[-(2**20) :]).hexdigest()


def test_a_same_size_edit_before_the_resume_position_is_refused(jax_model, tmp_path):
    """A 2.7 MiB input of 40 long lines (each text is cut to the model's window, so embedding is cheap).
    An edit that keeps the size and the first and last MiB moves a line boundary inside what was embedded.
    The run records the file's modification time, which catches the edit at once; with the time set back,
    the input hash of the embedded span still does."""
    lines = [f"{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(15_000)) for i in range(40)]
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = corpus.read_bytes()
    assert len(data) > 2.5 * 2**20
    out = tmp_path / "out"
    embed_corpus(jax_model, corpus, out, shard_size=8)
    _unfinish(out, keep=3)  # resume position: the start of line 25, about 1.6 MiB in
    fingerprint, st = _edges(corpus), corpus.stat()

    def set_time_back() -> None:  # as `cp -p` or a careless sync can
        os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))

    # Line 20 ends one byte earlier and line 21 starts one byte earlier: same size, same edges.
    edited = bytearray(data)
    nl = data.index(b"\n", sum(len(x) + 1 for x in lines[:19]))  # the "\n" ending line 20
    assert 2**20 < nl < len(data) - 2**20
    edited[nl - 1 : nl + 1] = b"\n" + data[nl - 1 : nl]
    corpus.write_bytes(bytes(edited))
    set_time_back()
    assert _edges(corpus) == fingerprint  # what used to be compared
    pattern = rf"{re.escape(str(corpus))} changed since this run embedded part of it: its bytes \[0, \d+\) .*restore"
    with pytest.raises(CorpusError, match=pattern):
        embed_corpus(jax_model, corpus, out, shard_size=8)
    os.utime(corpus)  # now with the time of the edit
    with pytest.raises(CorpusError, match=rf"input {re.escape(str(corpus))} changed since this run started \(modified"):
        embed_corpus(jax_model, corpus, out, shard_size=8)
    assert not (out / MANIFEST).exists()

    # An edit after the resume position, with the file's time set back, is what the resumed run reads: the
    # result is the file as it is. With its time, it is refused like any change.
    new_lines = list(lines)
    new_lines[30] = new_lines[30][:-3] + "XYZ"
    corpus.write_text("\n".join(new_lines) + "\n", encoding="utf-8")
    assert corpus.stat().st_size == len(data)
    with pytest.raises(CorpusError, match=rf"input {re.escape(str(corpus))} changed since this run started"):
        embed_corpus(jax_model, corpus, out, shard_size=8)
    set_time_back()
    embed_corpus(jax_model, corpus, out, shard_size=8)
    ids, emb = read_embeddings(out)
    assert ids == list(range(1, 41))
    np.testing.assert_allclose(emb, jax_model.encode(new_lines, prompt_name="document"), atol=F32_ATOL, rtol=0)


def test_a_resume_with_another_dtype_names_the_dtype(tiny_ckpt, jax_model, tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(_lines(10)) + "\n", encoding="utf-8")
    embed_corpus(jax_model, corpus, tmp_path / "out", shard_size=4)
    bf16 = EmbeddingGemma.from_pretrained(tiny_ckpt, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"different settings \(dtype\): dtype is 'float32' in run-p00000-of-00001"):
        embed_corpus(bf16, corpus, tmp_path / "out", shard_size=4)


# ---------------------------------------------------------------------------------------------------
# The manifest's shard list must match its process summaries


@pytest.fixture(scope="module")
def finished(jax_model, tmp_path_factory) -> Path:
    """A finished run: 37 lines in 5 shards (8, 8, 8, 8, 5 rows)."""
    d = tmp_path_factory.mktemp("finished")
    (d / "docs.txt").write_text("\n".join(_lines(37)) + "\n", encoding="utf-8")
    embed_corpus(jax_model, d / "docs.txt", d / "out", shard_size=8)
    return d / "out"


def _drop(m, k):
    m["shards"].pop(k)


def _duplicate(m, k):
    m["shards"].insert(k + 1, dict(m["shards"][k]))


def _swap(m, k):
    m["shards"][k], m["shards"][k + 1] = m["shards"][k + 1], m["shards"][k]


def _empty(m, _k):
    m["shards"] = []


@pytest.mark.parametrize(
    "edit, k, message",
    [
        (_drop, 2, r"the shard entries of process 0 are \[0, 1, 3, 4\], expected 0..4 in order"),
        (_drop, 4, r"the shard entries of process 0 are \[0, 1, 2, 3\], expected 0..4 in order"),
        (_duplicate, 1, r"the shard entries of process 0 are \[0, 1, 1, 2, 3, 4\], expected 0..4"),
        (_swap, 0, r"the shard entries of process 0 are \[1, 0, 2, 3, 4\], expected 0..4"),
        (_empty, 0, r"the shard entries of process 0 are \[\], expected 0..4"),
    ],
)
@pytest.mark.parametrize("adjust", ["documents", "documents and process documents"])
def test_an_edited_shard_list_is_an_error(finished, tmp_path, edit, k, message, adjust):
    """Dropped, duplicated, swapped or no shard entries, with ``documents`` adjusted to match."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    assert len(read_embeddings(out)[0]) == 37
    m = json.loads((out / MANIFEST).read_text())
    edit(m, k)
    m["documents"] = sum(s["rows"] for s in m["shards"])
    if adjust == "documents" and m["documents"] != 37:  # then the totals disagree first
        message = rf"documents={m['documents']}, but its processes add up to 37"
    else:
        m["processes"][0]["documents"] = m["documents"]
    (out / MANIFEST).write_text(json.dumps(m))
    for verify in (True, False):
        with pytest.raises(ShardError, match=re.escape(str(out / MANIFEST)) + ": " + message):
            read_embeddings(out, verify=verify)


def test_a_consistently_emptied_manifest_still_fails(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    m = json.loads((out / MANIFEST).read_text())
    m["shards"], m["documents"] = [], 0
    m["processes"][0].update(documents=0, shards=0, next=m["processes"][0]["start"])
    (out / MANIFEST).write_text(json.dumps(m))
    docs = re.escape(m["settings"]["input"]["files"][0]["url"])
    message = rf"the shards of process 0 end at {docs}:1, but its part ends at the end of the input"
    with pytest.raises(ShardError, match=message):
        read_embeddings(out)


# ---------------------------------------------------------------------------------------------------
# --on-error skip skips every per-record failure, with its location


def _hostile_jsonl(path: Path) -> tuple[list[tuple[str, str]], dict[int, str]]:
    rows = [
        (json.dumps({"id": "a", "text": "Mars is red"}), None),
        ('{"id": "x\\ud800", "text": "lone surrogate in the id"}', "lone surrogate"),
        (json.dumps({"id": "b", "text": "the moon"}), None),
        ('{"id": "c", "n": ' + "1" * 5000 + ', "text": "a 5,000-digit integer"}', "Exceeds the limit (4300 digits)"),
        ('{"id": "d", "text": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"id": "e", "text": "lone \\udc00 surrogate in the text"}', "lone surrogate"),
        (json.dumps({"id": "z", "text": "sun"}), None),
    ]
    path.write_text("\n".join(r for r, _ in rows) + "\n", encoding="utf-8")
    good = [(json.loads(r)["id"], json.loads(r)["text"]) for r, e in rows if e is None]
    return good, {i + 1: e for i, (_, e) in enumerate(rows) if e is not None}


def test_hostile_records_are_skipped_with_their_location(jax_model, tmp_path):
    path = tmp_path / "docs.jsonl"
    good, bad = _hostile_jsonl(path)
    out = tmp_path / "out"
    for _ in range(2):  # and again: a finished run started again does not fail on them either
        man = embed_corpus(jax_model, path, out, id_field="id", on_error="skip", shard_size=3)
    assert man["documents"] == len(good) and man["errors"] == len(bad)
    ids, emb = read_embeddings(out)
    assert ids == [i for i, _ in good]
    np.testing.assert_allclose(emb, jax_model.encode([t for _, t in good], prompt_name="document"), atol=F32_ATOL)
    logged = [json.loads(x) for x in (out / "errors-p00000.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["line"] for e in logged] == sorted(bad)
    for e in logged:
        assert e["location"] == f"{path}:{e['line']}" and bad[e["line"]] in e["error"]


def test_hostile_records_raise_located_errors(jax_model, tmp_path):
    path = tmp_path / "docs.jsonl"
    _, bad = _hostile_jsonl(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, reason in bad.items():  # each bad line alone after a good one: the error names that line
        single = tmp_path / f"bad{n}.jsonl"
        single.write_text(lines[0] + "\n" + lines[n - 1] + "\n", encoding="utf-8")
        with pytest.raises(CorpusError, match=re.escape(f"{single}:2: ") + ".*" + re.escape(reason)):
            embed_corpus(jax_model, single, tmp_path / f"out{n}", id_field="id")
