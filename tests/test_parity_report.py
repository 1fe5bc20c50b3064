"""The parity report and its command line, on the tiny checkpoint."""

import json

import pytest

from embgemma_jax.cli import main
from embgemma_jax.research.parity import check_tolerances

# Stated once: float32 JAX, float32 torch and the float64 oracle agree to ~3e-7 of the activation scale
# on the tiny model (see the README's report); 1e-5 is the suite-wide float32 tolerance.
F32_REL = 1e-5


def test_parity_cli_float32_passes_and_writes_json_and_plot(tiny_ckpt, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text(
        "Which planet is known as the Red Planet?\n\n"
        + "The quick brown fox jumps over the lazy dog. " * 12
        + "\n"  # longer than the window, truncated
        + "émigré café 東京 😀\n",
        encoding="utf-8",
    )
    out_json, out_png = tmp_path / "report.json", tmp_path / "report.png"
    rc = main(
        [
            "parity",
            "--model",
            str(tiny_ckpt),
            "--texts",
            str(texts),
            "--prompt-name",
            "query",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--max-abs-tol",
            "1e-5",
            "--max-rel-tol",
            str(F32_REL),
            "--min-cosine",
            "0.99999",
            "--min-token-agreement",
            "1",
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed
    assert "all tolerances met" in printed and "L5.out" in printed
    # progress on stderr, step by step (the oracle on the real model takes minutes)
    assert "parity: float64 oracle on" in captured.err and "parity: comparing" in captured.err

    report = json.loads(out_json.read_text())
    assert report["passed"] and report["failures"] == []
    assert report["reference"] == "torch" and report["prompt"] == "task: search result | query: "
    assert report["tokens"]["n_texts"] == 3 and report["tokens"]["agreement"] == 1.0  # the empty line is skipped
    n = report["num_layers"]
    names = [s["name"] for s in report["stages"]]
    assert names[0] == "embed" and names[-5:] == ["final_norm", "pooled", "dense_0", "dense_1", "embedding"]
    assert len(names) == 1 + 2 * n + 5
    for s in report["stages"]:
        assert s["scale"] > 0
        for pair in ("jax_vs_f64", "torch_vs_f64", "jax_vs_torch"):
            if pair in s:
                assert s[pair]["rel"] < F32_REL, (s["name"], pair)
    assert sum("jax_vs_torch" in s for s in report["stages"]) == n + 5  # every stage transformers exposes
    for v in report["embeddings"].values():
        assert v["min_cosine"] > 1 - 1e-6
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same report fails a tolerance no float32 computation can meet
    failures = check_tolerances(report, max_abs_tol=1e-12)
    assert failures and all("max abs error" in f for f in failures)


def test_parity_cli_bfloat16_fails_float32_tolerance(tiny_ckpt, tmp_path, capsys):
    out_json = tmp_path / "bf16.json"
    rc = main(
        [
            "parity",
            "--model",
            str(tiny_ckpt),
            "--dtype",
            "bfloat16",
            "--no-reference",
            "--json",
            str(out_json),
            "--max-rel-tol",
            "1e-4",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 1
    assert "FAILED" in printed
    report = json.loads(out_json.read_text())
    assert report["dtype"] == "bfloat16" and report["reference"] is None and not report["passed"]
    rels = [s["jax_vs_f64"]["rel"] for s in report["stages"]]
    # bfloat16 really ran (8 mantissa bits: errors ~1e-3..1e-2 of scale), and stayed sane
    assert 1e-4 < max(rels) < 5e-2
    assert any("relative error" in f for f in report["failures"])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-abs-tol", "-1", "max_abs_tol must be in"),
        ("--min-cosine", "1.5", "min_cosine must be in"),
        ("--max-rel-tol", "nan", "max_rel_tol must be a finite number"),
        ("--min-token-agreement", "2", "min_token_agreement must be in"),
    ],
)
def test_parity_cli_rejects_bad_tolerances(tiny_ckpt, capsys, flag, value, message):
    assert main(["parity", "--model", str(tiny_ckpt), flag, value]) == 2
    assert message in capsys.readouterr().err


def test_parity_cli_bad_texts_file(tiny_ckpt, tmp_path, capsys):
    assert main(["parity", "--model", str(tiny_ckpt), "--texts", str(tmp_path / "missing.txt")]) == 2
    assert "texts file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert main(["parity", "--model", str(tiny_ckpt), "--texts", str(empty)]) == 2
    assert "no non-empty lines" in capsys.readouterr().err
