#!/usr/bin/env python
"""Throughput, compile time and memory of embgemma_jax against sentence-transformers, side by side.

    python benchmarks/bench_encode.py                       # full-size random checkpoint (built once, cached)
    python benchmarks/bench_encode.py --model /path/to/embeddinggemma-300m
    python benchmarks/bench_encode.py --tiny --quick        # smoke run on a tiny random checkpoint
    python benchmarks/bench_encode.py --device cuda --scale 16 --st-batch-size 256 --token-budget 65536
                                                            # on a GPU: thousands of texts per case
    python benchmarks/bench_encode.py --systems st-f32,jax-f32 --cases mixed --same-batch 8
                                                            # a bounded run: one case, one same-batch setting

The corpus is real English text that ships with the machine: the docstrings of the Python standard
library, cut to three cases by token count (with the model's own tokenizer): short queries (~16 tokens),
mixed documents (10-600 tokens) and long documents (~2048 tokens, truncated). Every system runs in its own
subprocess (so its peak RSS is its own) on the same texts, in one run, alternating the order per case:

  st-f32   sentence-transformers, torch float32 (the reference)
  st-bf16  sentence-transformers with model_kwargs={"dtype": torch.bfloat16}
  jax-f32  embgemma_jax float32 (parity mode)
  jax-bf16 embgemma_jax bfloat16
  jax-int8 embgemma_jax weight-only int8 (bfloat16 compute)
  jax-f32-scanned    embgemma_jax float32, every batch as one scanned program (``engine.per_layer = False``,
                     the CPU's only form before embgemma_jax.layerwise); not in the defaults
  jax-f32-per-layer  embgemma_jax float32, every batch per layer (``engine.per_layer = True``); not in the
                     defaults (jax-f32 runs batches of at most 1024 padded tokens and rows of banded sliding
                     attention per layer, the rest scanned: ``Engine.uses_layers``)

Two kinds of settings run per case:

  throughput  each system at its own settings: sentence-transformers ``--st-batch-size`` (32, its default),
              ours ``--token-budget`` (8192 padded tokens, texts packed several per row) with at most
              ``--jax-batch-size`` rows
  batchN      the SAME batch size N for both (``--same-batch 8,32``, the reference's own batch sizes):
              sentence-transformers ``batch_size=N``, ours ``batch_size=N`` with no token budget (padded
              batches: rows to a power of two, lengths to a bucket)

A run whose settings equal another's (sentence-transformers at batch 32 in both ``throughput`` and
``batch32``; a batch size at or above the case's text count) is measured once and shown in both rows.
"padding" is device tokens (rows x padded length) over real tokens: ours counted by the engine,
sentence-transformers' computed from its plan (texts sorted by character length, each batch padded to
its longest text).

Each worker loads the model, runs one cold pass (includes compilation; JAX's persistent cache is off so
the number is honest), then ``--repeats`` timed passes; docs/s and tokens/s use the best timed pass.
Cosines of bf16/int8 against jax-f32 are computed on the same texts. The machine's matmul peak (best of
JAX and torch, per dtype) is measured too, and achieved model FLOP/s are reported as a fraction of it.
Results: a markdown table on stdout and JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("st-f32", "jax-f32", "st-bf16", "jax-bf16", "jax-int8")
FORM_SYSTEMS = ("jax-f32-scanned", "jax-f32-per-layer")  # jax-f32 with Engine.per_layer False / True
CASES = {
    # name: (target tokens low, high, default count)
    "queries": (16, 16, 512),
    "mixed": (10, 600, 48),
    "long": (2100, 2100, 6),
}


# ------------------------------------------------------------------------------------------------------
# Corpus


def build_cases(model_dir: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Texts cut from stdlib docstrings to target token lengths, measured with the model's tokenizer."""
    from embgemma_jax.testing import stdlib_docstrings
    from embgemma_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir, max_length=10**9)
    words = " ".join(" ".join(d.split()) for d in stdlib_docstrings()).split(" ")
    rng = np.random.default_rng(seed)
    cases: dict[str, list[str]] = {}
    cursor = 0
    for name, (lo, hi, _) in CASES.items():
        texts = []
        for _ in range(counts[name]):
            target = int(rng.integers(lo, hi + 1))
            n = max(1, int(target * 0.6))
            while True:
                text = " ".join(words[cursor : cursor + n])
                got = len(tok.encode_pieces([text])[0]) + 2
                if got >= target or n > 20 * target:
                    break
                n = max(n + 1, int(n * target / max(got, 1)))
            # shrink word by word to the target
            while n > 1 and len(tok.encode_pieces([" ".join(words[cursor : cursor + n - 1])])[0]) + 2 >= target:
                n -= 1
            texts.append(" ".join(words[cursor : cursor + n]))
            cursor = (cursor + n) % max(1, len(words) - 5000)
        cases[name] = texts
    return cases


def model_flops_per_text(n_tokens: int, cfg) -> float:
    """Matmul FLOPs of one text of n real tokens (2 per multiply-add), attention by its own length."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = 2 * n_tokens * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)
    total = 0.0
    for lt in cfg.layer_types:
        span = n_tokens if lt == "full_attention" else min(n_tokens, 2 * cfg.window_radius + 1)
        total += proj + 4 * n_tokens * span * n * h
    head, prev = 0, d
    for w in cfg.dense_features:
        head += 2 * prev * w
        prev = w
    return total + head


# ------------------------------------------------------------------------------------------------------
# Workers (one subprocess per system and case)


def peak_rss_mib() -> float:
    """This process's peak resident set size. VmHWM starts afresh at exec; ru_maxrss would carry over the
    RSS of the (large) parent that forked this worker."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    texts = json.loads(Path(args.texts_file).read_text())
    system = args.worker
    t0 = time.perf_counter()
    if system.startswith("st-"):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(os.cpu_count() or 1)
        kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if system == "st-bf16" else {}
        model = SentenceTransformer(str(args.model), device=args.device, **kwargs)

        def run():
            out = model.encode(texts, batch_size=args.st_batch_size, convert_to_numpy=True).astype(np.float32)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return out

        shapes = None
        stats = None
    else:
        from embgemma_jax import EmbeddingGemma

        dtype = {"jax-bf16": "bfloat16", "jax-int8": "bfloat16"}.get(system, "float32")
        model = EmbeddingGemma.from_pretrained(
            args.model, dtype=dtype, quantize="int8" if system == "jax-int8" else None
        )
        model.engine.per_layer = {"jax-f32-scanned": False, "jax-f32-per-layer": True}.get(system)

        def run():
            return model.encode(texts, batch_size=args.jax_batch_size, token_budget=budget_or_none(args.token_budget))

        shapes = model.engine.compiled
        stats = model.engine.stats
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    emb = run()
    cold_s = time.perf_counter() - t
    timed = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        emb = run()
        timed.append(time.perf_counter() - t)
    np.save(args.emb_out, emb)
    result = {
        "system": system,
        "load_s": load_s,
        "cold_pass_s": cold_s,
        "timed_pass_s": timed,
        "best_s": min(timed),
        "compile_s": max(0.0, cold_s - min(timed)),
        "compiled_shapes": None if shapes is None else len(shapes),
        # device tokens (rows x padded length) over real tokens, over every pass
        "padding_ratio": None if not stats else stats["device_tokens"] / max(1, stats["real_tokens"]),
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(args.result_out).write_text(json.dumps(result))


def budget_or_none(value: int) -> int | None:
    """The worker's token budget: 0 stands for none (padded batches of batch_size rows)."""
    return value or None


def st_padding_ratio(texts: list[str], lengths: list[int], batch_size: int) -> float:
    """Device tokens over real tokens of sentence-transformers' plan: texts sorted by character length
    (its own ``np.argsort`` of negated lengths), batches of batch_size, each padded to its longest text."""
    order = np.argsort([-len(t) for t in texts])
    sorted_lengths = np.asarray(lengths)[order]
    device = sum(
        int(chunk.max()) * len(chunk) for chunk in np.split(sorted_lengths, range(batch_size, len(texts), batch_size))
    )
    return device / max(1, sum(lengths))


def settings(args: argparse.Namespace) -> list[dict]:
    """The batch settings to run: the throughput one, then one per ``--same-batch`` size."""
    out = []
    if not args.no_throughput:
        out.append(
            {
                "name": "throughput",
                "st_batch_size": args.st_batch_size,
                "jax_batch_size": args.jax_batch_size,
                "token_budget": args.token_budget,
            }
        )
    for b in args.same_batch:
        out.append({"name": f"batch{b}", "st_batch_size": b, "jax_batch_size": b, "token_budget": None})
    return out


def run_key(system: str, setting: dict, n_texts: int) -> tuple:
    """What a worker's result depends on: runs with equal keys are measured once."""
    if system.startswith("st-"):
        return (system, min(setting["st_batch_size"], n_texts))
    rows, budget = setting["jax_batch_size"], setting["token_budget"]
    if budget is None and rows >= n_texts:  # one batch of every text, or (more rows) power-of-two batches
        rows = ("all", "one batch" if rows == n_texts else "power-of-two batches")
    return (system, rows, budget)


def run_worker(system: str, case: str, texts_file: Path, args: argparse.Namespace, tmp: Path, setting: dict) -> dict:
    tag = f"{system}-{case}-{setting['name']}"
    emb_out, result_out = tmp / f"{tag}.npy", tmp / f"{tag}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--model",
        str(args.model),
        "--texts-file",
        str(texts_file),
        "--emb-out",
        str(emb_out),
        "--result-out",
        str(result_out),
        "--repeats",
        str(args.repeats),
        "--st-batch-size",
        str(setting["st_batch_size"]),
        "--jax-batch-size",
        str(setting["jax_batch_size"]),
        "--token-budget",
        str(setting["token_budget"] or 0),
        "--device",
        args.device,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {system}/{case}/{setting['name']} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(result_out.read_text())
    res["embeddings"] = np.load(emb_out)
    return res


# ------------------------------------------------------------------------------------------------------
# Matmul peak


def matmul_peak(size: int = 2048, reps: int = 10, device: str = "cpu") -> dict[str, float]:
    """Best GFLOP/s of a square matmul, per dtype, over JAX and torch on this machine (or its GPU)."""
    import jax
    import jax.numpy as jnp
    import torch

    if device == "cuda":
        size, reps = 8192, 20
    flops = 2 * size**3
    out: dict[str, float] = {}
    for name, jdt, tdt in (("float32", jnp.float32, torch.float32), ("bfloat16", jnp.bfloat16, torch.bfloat16)):
        a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jdt)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            r = f(a, a)
        r.block_until_ready()
        jax_gf = flops * reps / (time.perf_counter() - t) / 1e9
        ta = torch.randn(size, size, dtype=tdt, device=device)
        torch.matmul(ta, ta)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(ta, ta)
        if device == "cuda":
            torch.cuda.synchronize()
        torch_gf = flops * reps / (time.perf_counter() - t) / 1e9
        out[name] = max(jax_gf, torch_gf)
        out[f"{name}_jax"] = jax_gf
        out[f"{name}_torch"] = torch_gf
    return out


# ------------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax
    import sentence_transformers
    import torch
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }


def batch_sizes(value: str) -> list[int]:
    """``--same-batch``: '8,32' -> [8, 32]; '' or 'none' -> []."""
    if value.strip().lower() in ("", "none"):
        return []
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {value!r}") from None
    if any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {value!r}")
    return list(dict.fromkeys(sizes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=Path, default=None, help="sentence-transformers directory (default: full-size random)"
    )
    p.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint (smoke run)")
    p.add_argument("--quick", action="store_true", help="few texts per case (smoke run)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers batch_size (its default)")
    p.add_argument("--jax-batch-size", type=int, default=256, help="embgemma_jax max rows per batch")
    p.add_argument(
        "--token-budget", type=int, default=8192, help="embgemma_jax padded tokens per batch (0: none, padded batches)"
    )
    p.add_argument(
        "--same-batch",
        type=batch_sizes,
        default=[8, 32],
        help="comma-separated batch sizes run with the SAME batch_size for both systems, ours without a token "
        "budget (default 8,32, the reference's own batch sizes; '' for none)",
    )
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput setting (same-batch rows only)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/<name>.json)")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="sentence-transformers' device (JAX: its default backend, which must match)",
    )
    p.add_argument("--scale", type=int, default=1, help="multiply the texts per case (e.g. 16 on a GPU)")
    # worker mode
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--texts-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--emb-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(ROOT))
    from embgemma_jax.checkpoint.load import read_st_config

    if args.model is None:
        from checkpoints import cached_checkpoint

        args.model = cached_checkpoint(tiny=args.tiny)
    cfg = read_st_config(args.model)
    wanted = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(wanted) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; valid: {list(CASES)}")
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS) - set(FORM_SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; valid: {list(SYSTEMS + FORM_SYSTEMS)}")
    plan = settings(args)
    if not plan:
        raise SystemExit("nothing to run: --no-throughput and no --same-batch sizes")
    counts = {name: (4 if args.quick else c * args.scale) for name, (_, _, c) in CASES.items()}
    cases = {k: v for k, v in build_cases(args.model, counts).items() if k in wanted}

    from embgemma_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.model, max_length=cfg.max_seq_length)
    report = {
        "machine": machine(),
        "model": str(args.model),
        "params": cfg.num_params(),
        "settings": {
            "repeats": args.repeats,
            "st_batch_size": args.st_batch_size,
            "jax_batch_size": args.jax_batch_size,
            "token_budget": args.token_budget,
            "same_batch": args.same_batch,
            "device": args.device,
        },
        "cases": {},
    }
    print("measuring matmul peak ...", file=sys.stderr)
    report["matmul_peak_gflops"] = matmul_peak(device=args.device)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        turn = 0
        for case, texts in cases.items():
            lengths = [len(x) for x in tok.encode(texts)]
            flops = sum(model_flops_per_text(n, cfg) for n in lengths)
            texts_file = tmp / f"{case}.json"
            texts_file.write_text(json.dumps(texts))
            measured: dict[tuple, tuple[str, dict]] = {}  # run key -> (setting that measured it, result)
            for setting in plan:
                order = systems if turn % 2 == 0 else systems[::-1]
                turn += 1
                results = {}
                for system in order:
                    key = run_key(system, setting, len(texts))
                    if key not in measured:
                        print(f"{case} / {setting['name']}: {system} ...", file=sys.stderr)
                        measured[key] = (setting["name"], run_worker(system, case, texts_file, args, tmp, setting))
                    source, res = measured[key]
                    results[system] = dict(res, measured_in=source)
                name = case if setting["name"] == "throughput" else f"{case}@{setting['name']}"
                report["cases"][name] = summarize(case, setting, texts, lengths, flops, results, report)
    report["wall_s"] = time.perf_counter() - t_start
    print(f"workers took {report['wall_s']:.0f} s", file=sys.stderr)
    out = args.out or HERE / "results" / f"bench_encode_{'tiny' if args.tiny else Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nJSON: {out}", file=sys.stderr)


def summarize(
    case: str, setting: dict, texts: list[str], lengths: list[int], flops: float, results: dict, report: dict
) -> dict:
    """One case under one setting: each system's speed, ratios to the references, cosines, padding."""
    ref = results.get("jax-f32", {}).get("embeddings")
    st_ref = results.get("st-f32", {}).get("embeddings")
    rows = {}
    for system, res in results.items():
        r = {k: v for k, v in res.items() if k != "embeddings"}
        emb = res["embeddings"]
        dt = "bfloat16" if system.endswith(("bf16", "int8")) else "float32"
        r.update(
            docs_per_s=len(texts) / r["best_s"],
            tokens_per_s=sum(lengths) / r["best_s"],
            model_gflops=flops / r["best_s"] / 1e9,
            peak_fraction=flops / r["best_s"] / 1e9 / report["matmul_peak_gflops"][dt],
        )
        if system.startswith("st-"):
            r["padding_ratio"] = st_padding_ratio(texts, lengths, setting["st_batch_size"])
        if ref is not None:
            cos = np.sum(emb * ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
            r["cos_to_jax_f32_min"], r["cos_to_jax_f32_mean"] = float(cos.min()), float(cos.mean())
        if st_ref is not None:
            r["max_abs_vs_st_f32"] = float(np.abs(emb - st_ref).max())
        rows[system] = r
    for r in rows.values():
        for base in ("st-f32", "st-bf16"):
            if base in rows:
                r[f"speedup_vs_{base}"] = r["docs_per_s"] / rows[base]["docs_per_s"]
                r[f"rss_ratio_vs_{base}"] = r["peak_rss_mib"] / rows[base]["peak_rss_mib"]
    return {
        "case": case,
        "setting": setting,
        "n_texts": len(texts),
        "tokens": int(sum(lengths)),
        "min_tokens": int(min(lengths)),
        "max_tokens": int(max(lengths)),
        "model_gflop": flops / 1e9,
        "systems": rows,
    }


def setting_label(setting: dict | None, settings_: dict) -> str:
    """How a row's batch setting reads in the table."""
    if setting is None or setting["name"] == "throughput":
        s = setting or settings_
        budget = f", budget {s['token_budget']}" if s.get("token_budget") else ""
        return f"ST batch {s['st_batch_size']}; ours ≤{s['jax_batch_size']} rows{budget}"
    return f"batch {setting['st_batch_size']} (both)"


def markdown(report: dict) -> str:
    m = report["machine"]
    peak = report["matmul_peak_gflops"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']} ({m['jax_backend']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, sentence-transformers {m['sentence_transformers']}. "
        f"Matmul peak: f32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s.",
        "",
        "| case | setting | system | docs/s | tokens/s | vs st-f32 | vs st-bf16 | cold pass s | compile s | shapes "
        "| padding | peak RSS MiB | RSS vs st-f32 | % of peak | cos to f32 (min) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(value: float | None, fmt: str, suffix: str = "") -> str:
        return "-" if value is None else format(value, fmt) + suffix

    for key, c in report["cases"].items():
        setting = setting_label(c.get("setting"), report["settings"])
        here = (c.get("setting") or {}).get("name", "throughput")
        for system, r in c["systems"].items():
            pad = f"{r['padding_ratio']:.2f}x" if r.get("padding_ratio") else "-"
            shown = system if r.get("measured_in", here) == here else f"{system} (same run as {r['measured_in']})"
            lines.append(
                f"| {c.get('case', key)} ({c['n_texts']} texts, {c['min_tokens']}-{c['max_tokens']} tok) "
                f"| {setting} | {shown} "
                f"| {r['docs_per_s']:.2f} | {r['tokens_per_s']:.0f} "
                f"| {num(r.get('speedup_vs_st-f32'), '.2f', 'x')} | {num(r.get('speedup_vs_st-bf16'), '.2f', 'x')} "
                f"| {r['cold_pass_s']:.1f} | {r['compile_s']:.1f} "
                f"| {r['compiled_shapes'] if r['compiled_shapes'] is not None else '-'} "
                f"| {pad} "
                f"| {r['peak_rss_mib']:.0f} | {num(r.get('rss_ratio_vs_st-f32'), '.2f')} "
                f"| {100 * r['peak_fraction']:.0f}% | {num(r.get('cos_to_jax_f32_min'), '.5f')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
