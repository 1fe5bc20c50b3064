"""CLI errors: found before the model loads, named, and ending the process with a message.

Most cases call ``embgemma_jax.cli.main`` in this process with a model path that does not exist: had the
check come after loading, the error would be "checkpoint directory not found" instead of the one
asserted. A few run the real console entry point as a subprocess to show there is no traceback.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import embgemma_jax
from embgemma_jax.batching import MAX_BATCH_TOKENS
from embgemma_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "/nonexistent/model-dir"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "embgemma_jax.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture()
def txt(tmp_path) -> Path:
    path = tmp_path / "docs.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    return path


def _fill(argv: list[str], **paths: Path) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


CORPUS = ["embed-corpus", "--model", NO_MODEL, "--input", "{txt}", "--output", "{out}"]
SERVE = ["serve", "--model", NO_MODEL]
EMBED = ["embed", "--model", NO_MODEL, "hello"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (CORPUS + ["--shard-size", "0"], "argument --shard-size: expected a positive integer, got '0'"),
        (CORPUS + ["--batch-size", "-3"], "argument --batch-size: expected a positive integer, got '-3'"),
        (CORPUS + ["--token-budget", "many"], "argument --token-budget: expected a positive integer, got 'many'"),
        (CORPUS + ["--truncate-dim", "0"], "argument --truncate-dim: expected a positive integer, got '0'"),
        (CORPUS + ["--num-processes", "0"], "argument --num-processes: expected a positive integer, got '0'"),
        (CORPUS + ["--process-id", "-1"], "argument --process-id: expected an integer >= 0, got '-1'"),
        (CORPUS + ["--on-error", "ignore"], "argument --on-error: invalid choice: 'ignore'"),
        (CORPUS + ["--shard-size", "9" * 5000], "argument --shard-size: expected a positive integer"),
        (EMBED + ["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
        (EMBED + ["--token-budget", "0"], "argument --token-budget: expected a positive integer, got '0'"),
        (EMBED + ["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
        (EMBED + ["--attention-impl", "flash"], "argument --attention-impl: invalid choice: 'flash'"),
        (EMBED + ["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (SERVE + ["--port", "70000"], "argument --port: expected a TCP port in [0, 65535], got '70000'"),
        (SERVE + ["--port", "-1"], "argument --port: expected a TCP port in [0, 65535], got '-1'"),
        (SERVE + ["--max-body-bytes", "0"], "argument --max-body-bytes: expected a positive integer, got '0'"),
        (SERVE + ["--max-batch-tokens", "0"], "argument --max-batch-tokens: expected a positive integer, got '0'"),
        (SERVE + ["--max-concurrent-requests", "x"], "argument --max-concurrent-requests: expected a positive integer"),
        (SERVE + ["--max-client-batch-size", "-1"], "argument --max-client-batch-size: expected a positive integer"),
        (SERVE + ["--host", " "], "argument --host: expected a non-empty value"),
        (["serve", "--port", "8000"], "the following arguments are required: --model"),
        (SERVE + ["--batch-invariant", "yes"], "argument --batch-invariant: invalid choice: 'yes'"),
        (SERVE + ["--invariant-batch-tokens", "0"], "argument --invariant-batch-tokens: expected a positive integer"),
    ],
)
def test_argument_errors_come_before_the_model_loads(argv, message, txt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_fill(argv, txt=txt, out=tmp_path / "out"))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, argv, message",
    [
        ("output is a file", CORPUS, "output {txt} exists and is not a directory"),
        ("input is a directory", CORPUS, "input file {tmp} is a directory; expected a file"),
        ("input is a FIFO", CORPUS, "input file {fifo} is a FIFO (named pipe)"),
        ("input missing", CORPUS, "input file not found: {tmp}/missing.txt"),
        ("partial multi-host", CORPUS + ["--num-processes", "2"], "--num-processes also need --coordinator-address"),
        (
            "process id",
            CORPUS + ["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in [0, 2) for --num-processes 2",
        ),
        ("embed to .json", EMBED + ["--output", "{tmp}/x.json"], "--output must end in .npy, got {tmp}/x.json"),
        ("embed into no dir", EMBED + ["--output", "{tmp}/nodir/x.npy"], "the directory {tmp}/nodir does not exist"),
        ("embed to a dir", EMBED + ["--output", "{tmp}/d.npy"], "--output {tmp}/d.npy is a directory"),
        ("embed input dir", EMBED + ["--input", "{tmp}"], "input file {tmp} is a directory; expected a file"),
        ("embed bad utf-8", EMBED + ["--input", "{bad}"], "{bad}:2: invalid UTF-8 at byte 0"),
        ("embed empty", EMBED[:-1] + ["--input", "{empty}"], "--input {empty} holds no lines"),
        (
            "invariant with a budget",
            EMBED + ["--batch-invariant", "--token-budget", "64"],
            "--batch-invariant plans its own batches; it cannot be combined with --token-budget",
        ),
    ],
)
def test_path_errors_come_before_the_model_loads(case, argv, message, txt, tmp_path, capsys):
    paths = {"txt": txt, "tmp": tmp_path, "out": tmp_path / "out", "fifo": tmp_path / "f.txt"}
    paths.update(bad=tmp_path / "bad.txt", empty=tmp_path / "empty.txt")
    os.mkfifo(paths["fifo"])
    paths["bad"].write_bytes(b"fine\n\xff\n")
    paths["empty"].write_bytes(b"")
    (tmp_path / "d.npy").mkdir()
    if case == "output is a file":
        paths["out"] = txt
    elif case == "input is a directory":
        argv = [a.replace("{txt}", "{tmp}") for a in argv]
    elif case == "input is a FIFO":
        argv = [a.replace("{txt}", "{fifo}") for a in argv]
    elif case == "input missing":
        argv = [a.replace("{txt}", "{tmp}/missing.txt") for a in argv]
    assert main(_fill(argv, **paths)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and _fill([message], **paths)[0] in err


def test_read_only_outputs_are_named_before_the_model_loads(txt, tmp_path, capsys):
    for d in ("ro", "ro_out"):
        (tmp_path / d).mkdir()
        (tmp_path / d).chmod(0o555)
    if os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("permission bits do not bind this user (root): no read-only directory can be made here")
    cases = [
        (CORPUS, tmp_path / "ro" / "out", f"cannot create output directory {tmp_path}/ro/out: Permission denied"),
        (CORPUS, tmp_path / "ro_out", f"output directory {tmp_path}/ro_out is not writable"),
        (EMBED + ["--output", "{out}"], tmp_path / "ro" / "x.npy", f"--output {tmp_path}/ro/x.npy: not writable"),
    ]
    for argv, out, message in cases:
        assert main(_fill(argv, txt=txt, out=out)) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"


HOLD_LOCK = """
import sys
from pathlib import Path
from embgemma_jax.corpus.shards import exclusive_output
with exclusive_output(Path(sys.argv[1]), 0):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_an_output_in_use_is_reported_before_the_model_loads(txt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_fill(CORPUS, txt=txt, out=out)) == 2
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    err = capsys.readouterr().err
    assert f"is being written by another embed-corpus run (pid {holder.pid} on host" in err


def test_help_says_batches_are_bounded_and_version(capsys):
    for sub in ("embed", "embed-corpus"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"every device batch is bounded to {MAX_BATCH_TOKENS:,} padded tokens" in help_text
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"embgemma-jax {embgemma_jax.__version__}"


def test_real_process_errors_are_one_line_not_tracebacks(tiny_ckpt, tmp_path):
    """Located per-record errors with --on-error raise, and a late-looking path error, in real processes."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "n": ' + "1" * 5000 + ', "text": "x"}\n', encoding="utf-8")
    proc = _cli("embed-corpus", "--model", str(tiny_ckpt), "--input", str(path), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(rf"^error: {re.escape(str(path))}:2: invalid JSON: Exceeds the limit", proc.stderr, re.M)
    proc = _cli("embed", "--model", str(tiny_ckpt), "--output", str(tmp_path / "nodir" / "x.npy"), "hello")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    nodir = tmp_path / "nodir"
    assert proc.stderr.strip() == f"error: --output {nodir}/x.npy: the directory {nodir} does not exist"
