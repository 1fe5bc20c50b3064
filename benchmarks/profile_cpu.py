#!/usr/bin/env python
"""Where encode's time goes on the CPU, at the reference's batch sizes (padded batches, no token budget).

    python benchmarks/profile_cpu.py                                  # float32 and bfloat16, batch 8 and 32
    python benchmarks/profile_cpu.py --dtypes float32 --batches 8 --out /tmp/p.json

Texts: the ``mixed`` case of ``bench_encode.py`` (the same 48 stdlib docstring texts, 10-600 tokens), on the
full-size random checkpoint (``benchmarks/.cache/random-full``, built once). Per dtype and batch size:

  padding     real tokens, and the device tokens of each stage of the plan: each batch padded to its own
              longest text (what the reference does, with our sort), then to the length bucket, then rows
              to a power of two (= the engine's device tokens, checked against ``engine.stats``); and the
              reference's own plan (sorted by characters, each batch padded to its longest text)
  compile     the cold pass minus the warm pass, the programs compiled (``engine.compiled``), and per
              shape the time to trace+lower and to compile the scanned program (``engine._forward``)
              again ahead of time
  host        ``Tokenizer.encode`` of all texts alone; one warm encode with the engine's tokenizer,
              ``place`` and ``forward`` dispatch wrapped in timers, and the gaps between dispatches;
              every batch of the plan run alone (``block_until_ready``), summed: the device time, so
              encode wall - device time = what the host adds
  xla         one warm batch (the batch holding the median-length text) under
              ``jax.profiler.trace(create_perfetto_trace=True)``; XLA op events (names of instructions in
              the compiled HLO of what ``engine.forward`` runs for that shape: the scanned program or the
              per-layer programs, see ``forward_hlo_text``; control flow excluded) summed by category
              from the HLO of each op: the dot/matmul fusions, transposes/copies, reductions, gathers,
              slices of the scanned layer weights, elementwise
  matmul peak float32 and bfloat16 GFLOP/s of a 2048^3 JAX matmul, measured in the same run

Results: JSON (``--out``) and a markdown summary on stdout. Other processes on the machine change the
timings; run it twice and compare.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_encode import build_cases, model_flops_per_text  # noqa: E402

# ------------------------------------------------------------------------------------------------------
# Padding: the plan's stages


def padding_stages(tok, texts: list[str], batch_size: int) -> dict:
    """Device tokens of each padding stage of our plan, and of the reference's plan."""
    from embgemma_jax import batching

    ids = tok.encode(texts)
    lengths = [len(x) for x in ids]
    real = sum(lengths)
    longest = bucket = rows = 0
    rounded: collections.Counter = collections.Counter()  # per-batch longest rounded up to a multiple of k
    window = batching.tokenize_window(batch_size, None)
    shapes = []
    for start in range(0, len(texts), window):
        part = lengths[start : start + window]
        for b in batching.plan_batches(part, batch_size, None, tok.max_length):
            n = len(b.indices)
            top = max(part[i] for i in b.indices)
            longest += n * top
            bucket += n * b.length
            rows += b.rows * b.length
            shapes.append((b.rows, b.length, n))
            for k in (16, 32, 64):
                rounded[k] += b.rows * min(-(-top // k) * k, tok.max_length)
    order = np.argsort([-len(t) for t in texts])  # sentence-transformers: characters, longest first
    sl = np.asarray(lengths)[order]
    st = sum(int(c.max()) * len(c) for c in np.split(sl, range(batch_size, len(texts), batch_size)))
    return {
        "real_tokens": real,
        "per_batch_longest": longest,
        "length_buckets": bucket,
        "power_of_two_rows": rows,
        "reference_plan": st,
        "alternative_longest_rounded_to_k_pow2_rows": {str(k): v for k, v in sorted(rounded.items())},
        "batches": [{"rows": r, "length": t, "texts": n} for r, t, n in shapes],
    }


# ------------------------------------------------------------------------------------------------------
# XLA trace: leaf op events by category


def hlo_index(hlo_text: str) -> dict[str, dict]:
    """Instruction name -> {opcode, shape, computation opcodes (fusions), op_name} from compiled HLO text."""
    comps: dict[str, list[str]] = {}
    flops: collections.Counter = collections.Counter()  # computation -> FLOPs of its dots
    roles: dict[str, set[str]] = collections.defaultdict(set)  # computation -> einsum equations of its dots
    shapes: dict[str, str] = {}
    instrs: dict[str, dict] = {}
    current = None
    head = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
    name_re = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
    for line in hlo_text.splitlines():
        m = head.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            comps[current] = []
            continue
        m = name_re.match(line)
        if m is None:
            continue
        name, rest = m.group(1), line[m.end() :]
        shape, rest = split_shape(rest)
        opcode = rest.split("(", 1)[0].strip()
        shapes[name] = shape
        if current is not None:
            comps[current].append(opcode)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        if current is not None and opcode == "dot":
            flops[current] += dot_flops(shape, rest, shapes)
            eq = re.search(r"([A-Za-z,]+->[A-Za-z]+)/dot_general", op_name.group(1) if op_name else "")
            roles[current].add(eq.group(1) if eq else "dot (no einsum name)")
        instrs[name] = {
            "opcode": opcode,
            "dot_flops": dot_flops(shape, rest, shapes) if opcode == "dot" else 0,
            "shape": shape,
            "calls": calls.group(1) if calls else None,
            "op_name": op_name.group(1) if op_name else "",
            "ynn": "__ynn_fusion" in line,
        }
    for info in instrs.values():
        info["inner"] = sorted(set(comps.get(info["calls"], []))) if info["calls"] else [info["opcode"]]
        if info["calls"]:
            info["dot_flops"] = flops.get(info["calls"], 0)
        info["dot_roles"] = " + ".join(sorted(roles.get(info["calls"], ())))
    return instrs


def dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(shape: str, rest: str, shapes: dict[str, str]) -> int:
    """2 x output elements x contracted size of one dot instruction."""
    lhs = re.match(r"dot\(%([\w.\-]+)", rest)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if lhs is None or contracting is None or lhs.group(1) not in shapes:
        return 0
    lhs_dims = dims(shapes[lhs.group(1)])
    k = int(np.prod([lhs_dims[int(i)] for i in contracting.group(1).split(",") if i]))
    return 2 * int(np.prod(dims(shape))) * k


def split_shape(rest: str) -> tuple[str, str]:
    """'f32[8]{0} add(...)' -> ('f32[8]{0}', 'add(...)'); tuple shapes '(f32[], s32[]) while(...)' too."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


CONTROL = {"while", "conditional", "call", "tuple", "get-tuple-element", "parameter", "constant", "bitcast"}


def category(info: dict) -> str:
    """The category of one XLA op (a fusion by the instructions it holds)."""
    inner = set(info["inner"])
    if inner & {"dot", "convolution"}:
        return "dot/matmul"
    if "gather" in inner:
        return "gather"
    if "dynamic-slice" in inner and "/while/body" in info["op_name"] and "dynamic_slice" in info["op_name"]:
        return "scan: slice layer weights"
    if inner & {"dynamic-update-slice"}:
        return "scan: write outputs"
    if inner & {"reduce", "reduce-window"}:
        return "reduction"
    if inner & {"transpose", "copy"}:
        return "transpose/copy"
    if inner <= {"convert", "bitcast", "parameter"}:
        return "convert"
    if info["opcode"] in {"copy", "transpose"}:
        return "transpose/copy"
    return "elementwise/other"


def trace_summary(trace_dir: Path, hlo: dict[str, dict], wall_s: float) -> dict:
    """Sums of XLA op event durations by category and the top ops, from the perfetto trace."""
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[e["tid"]] = e["args"]["name"]
    by_cat: collections.Counter = collections.Counter()
    n_cat: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    n_op: collections.Counter = collections.Counter()
    by_thread: collections.Counter = collections.Counter()
    dot_fusion_flops = 0
    by_role: collections.Counter = collections.Counter()
    role_flops: collections.Counter = collections.Counter()
    intervals = []
    other: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        if e["name"] not in hlo:
            if not e["name"].startswith(("$", "end: ")):
                other[e["name"]] += e["dur"]
            continue
        info = hlo[e["name"]]
        if info["opcode"] in CONTROL:
            continue
        cat = category(info)
        by_cat[cat] += e["dur"]
        n_cat[cat] += 1
        by_op[e["name"]] += e["dur"]
        dot_fusion_flops += info["dot_flops"]
        if cat == "dot/matmul":
            by_role[info["dot_roles"]] += e["dur"]
            role_flops[info["dot_roles"]] += info["dot_flops"]
        n_op[e["name"]] += 1
        by_thread[threads.get(e["tid"], str(e["tid"]))] += e["dur"]
        intervals.append((e["ts"], e["ts"] + e["dur"]))
    busy, end = 0.0, -1.0
    for a, b in sorted(intervals):  # union of op intervals over threads
        if b > end:
            busy += b - max(a, end)
            end = b
    total = sum(by_cat.values())
    top = []
    for name, us in by_op.most_common(20):
        info = hlo[name]
        top.append(
            {
                "op": name,
                "us": us,
                "count": n_op[name],
                "category": category(info),
                "shape": info["shape"],
                "op_name": info["op_name"].replace("jit(_forward)/EmbeddingGemmaModule/", ""),
            }
        )
    return {
        "wall_us": wall_s * 1e6,
        "op_us_total": total,
        "op_busy_us": busy,
        "dot_flops_executed": dot_fusion_flops,  # every executed dot (scan iterations counted)
        "dot_fusions_by_einsum": {
            r: {"us": us, "gflop": role_flops[r] / 1e9, "gflops": role_flops[r] / 1e3 / max(us, 1)}
            for r, us in by_role.most_common()
        },
        "categories": {
            c: {"us": us, "events": n_cat[c], "share": us / max(total, 1)} for c, us in by_cat.most_common()
        },
        "threads": dict(by_thread),
        "top_ops": top,
        "non_op_events_us": dict(other.most_common(12)),
    }


# ------------------------------------------------------------------------------------------------------


def matmul_peak(size: int = 2048, reps: int = 5) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    out = {}
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dt)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * size**3 / best / 1e9
    return out


def forward_hlo_text(eng, params, d_ids, d_mask, rows=None) -> str:
    """The compiled HLO of what ``eng.forward`` runs for this batch shape: the scanned program, or on the CPU
    for batches that run per layer (``Engine.uses_layers``) the per-layer programs' modules one after
    another, the layer programs last. The trace's op events name HLO instructions, not their program, so
    where two programs share an instruction name the last module's wins: the layer programs, which run 24
    times per pass, against the prepare and tail programs' few ops."""
    if not eng.uses_layers(*np.shape(d_ids)):
        return eng.scanned_forward.lower(params, d_ids, d_mask, d_mask, rows).compile().as_text()
    texts = [job().as_text() for job in eng.layers.compile_jobs(params, d_ids, d_mask, rows)]
    return "\n".join([texts[0], texts[-1], *texts[1:-1]])  # prepare, tail, then the layer programs


def run_batch(eng, params, d_ids, d_mask, rows=None) -> float:
    """Seconds of one synchronous forward of a placed batch (``rows``: the host-gathered table rows when the
    table stays on the host, see ``Engine.split_table``; ``params`` then without the table)."""
    import jax

    t = time.perf_counter()
    jax.block_until_ready(eng.forward(params, d_ids, d_mask, d_mask, rows).embeddings)
    return time.perf_counter() - t


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def machine_load() -> dict:
    """Load average and CPU pressure (share of time some runnable task waited for a CPU)."""
    out = {"loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    try:
        out["cpu_pressure"] = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        pass
    return out


def profile_one(model, texts: list[str], batch_size: int, trace_root: Path, cfg) -> dict:
    import jax

    from embgemma_jax import batching

    eng, tok = model.engine, model.tokenizer
    params, table = eng.split_table(model.params)
    res: dict = {"batch_size": batch_size, "load_before": machine_load(), "matmul_peak_before": matmul_peak()}
    res["padding"] = padding_stages(tok, texts, batch_size)

    # Tokenization alone (the texts of one encode call), twice.
    res["tokenize_s"] = [timed(tok.encode, texts)[1] for _ in range(2)]
    res["plan_and_pad_s"] = timed(lambda: list(batching.padded_batches(tok, texts, batch_size)))[1]

    # Cold pass (compiles), then a warm pass.
    before = set(eng.compiled)
    stats0 = dict(eng.stats)
    _, res["cold_s"] = timed(model.encode, texts, batch_size=batch_size)
    stats1 = dict(eng.stats)
    res["new_programs"] = sorted(str(s) for s in set(eng.compiled) - before)
    res["engine_stats_per_pass"] = {k: stats1[k] - stats0[k] for k in stats0}
    _, res["warm_s"] = timed(model.encode, texts, batch_size=batch_size)
    res["compile_s_estimate"] = res["cold_s"] - res["warm_s"]

    # One warm pass with the host steps timed: tokenizer, place (host -> device arrays), forward dispatch.
    log: dict[str, list] = {"encode": [], "place": [], "dispatch": []}

    def wrap(fn, key):
        def inner(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            log[key].append((t0, time.perf_counter(), len(a[0]) if key == "encode" else None))
            return out

        return inner

    forward = eng.forward  # an instance attribute (the jitted program); encode and place are methods
    tok.encode, eng.place = wrap(tok.encode, "encode"), wrap(eng.place, "place")
    eng.forward = wrap(forward, "dispatch")
    try:
        t0 = time.perf_counter()
        model.encode(texts, batch_size=batch_size)
        inst_wall = time.perf_counter() - t0
    finally:
        del tok.encode, eng.place  # back to the class's methods
        eng.forward = forward
    starts = [a for a, _, _ in log["dispatch"]]
    res["instrumented"] = {
        "wall_s": inst_wall,
        "tokenize_s": sum(b - a for a, b, _ in log["encode"]),
        "tokenize_calls": [{"texts": n, "s": b - a} for a, b, n in log["encode"]],
        "place_s": sum(b - a for a, b, _ in log["place"]),
        "dispatch_s": [b - a for a, b, _ in log["dispatch"]],
        "gaps_between_dispatches_s": [b - a for a, b in zip(starts, starts[1:], strict=False)],
        "first_dispatch_after_s": starts[0] - t0 if starts else None,
        "after_last_dispatch_s": t0 + inst_wall - log["dispatch"][-1][1] if starts else None,
    }

    # Device time: every batch of the plan alone, synchronously (already compiled).
    batches = list(batching.padded_batches(tok, texts, batch_size))
    device, per_batch = 0.0, []
    for _, b in batches:
        d_ids, d_mask = eng.place("forward", b["input_ids"], b["attention_mask"])
        rows = eng.gather(table, b["input_ids"])
        jax.block_until_ready((d_ids, rows))
        s = run_batch(eng, params, d_ids, d_mask, rows)
        device += s
        real = int(b["attention_mask"].sum())
        per_batch.append({"shape": list(b["input_ids"].shape), "real_tokens": real, "s": s})
    res["device_s"] = device
    res["device_batches"] = per_batch
    res["host_overhead_s"] = res["warm_s"] - device
    lengths = [len(x) for x in tok.encode(texts)]
    res["model_gflop"] = sum(model_flops_per_text(n, cfg) for n in lengths) / 1e9

    # Compile time per shape, ahead of time (tracing + lowering, then XLA compilation), of a fresh jit of the
    # same program: the engine's own jit would answer from its in-memory caches.
    per_shape = []
    for shape in sorted({tuple(b["input_ids"].shape) for _, b in batches}):
        ids = np.zeros(shape, np.int32)
        d_ids, d_mask = eng.place("forward", ids, np.ones(shape, np.int32))
        fresh = jax.jit(lambda *a: eng._forward(*a))  # noqa: PLW0108 - a new function: no cache hit
        lowered, lower_s = timed(fresh.lower, params, d_ids, d_mask, d_mask, eng.gather(table, ids))
        _, compile_s = timed(lowered.compile)
        per_shape.append({"shape": list(shape), "lower_s": lower_s, "compile_s": compile_s})
    res["compile_per_shape"] = per_shape

    # XLA profile of one warm batch: the batch holding the median-length text.
    median_text = int(np.argsort(lengths)[len(lengths) // 2])
    idx, b = next((i, b) for i, b in batches if median_text in set(i.tolist()))
    d_ids, d_mask = eng.place("forward", b["input_ids"], b["attention_mask"])
    rows_in = eng.gather(table, b["input_ids"])
    hlo_text = forward_hlo_text(eng, params, d_ids, d_mask, rows_in)
    hlo = hlo_index(hlo_text)
    run_batch(eng, params, d_ids, d_mask, rows_in)  # warm
    warm_batch_s = min(run_batch(eng, params, d_ids, d_mask, rows_in) for _ in range(2))
    trace_dir = Path(tempfile.mkdtemp(dir=trace_root))
    (trace_dir / "forward.hlo.txt").write_text(hlo_text)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        traced_s = run_batch(eng, params, d_ids, d_mask, rows_in)
    rows, length = b["input_ids"].shape
    res["xla"] = {
        "shape": [rows, length],
        "texts": len(idx),
        "real_tokens": int(b["attention_mask"].sum()),
        "warm_untraced_s": warm_batch_s,
        "traced_s": traced_s,
        "model_gflop_real": sum(model_flops_per_text(n, cfg) for n in b["attention_mask"].sum(1) if n) / 1e9,
        "model_gflop_device": rows * model_flops_per_text(length, cfg) / 1e9,
        "trace_dir": str(trace_dir),
        **trace_summary(trace_dir, hlo, traced_s),
    }
    res["load_after"] = machine_load()
    res["matmul_peak_after"] = matmul_peak()
    return res


def scaling(model, cfg, shapes: list[tuple[int, int]]) -> list[dict]:
    """Warm seconds per real-size batch of all-real tokens at each (rows, length): how time per token grows
    with the batch's size (one compile per shape first; best of two runs)."""
    eng = model.engine
    params, table = eng.split_table(model.params)
    out = []
    for rows, length in shapes:
        ids = np.ones((rows, length), np.int32)
        d_ids, d_mask = eng.place("forward", ids, ids)
        emb = eng.gather(table, ids)
        first = run_batch(eng, params, d_ids, d_mask, emb)  # compiles
        best = min(run_batch(eng, params, d_ids, d_mask, emb) for _ in range(2))
        gflop = rows * model_flops_per_text(length, cfg) / 1e9
        out.append(
            {
                "rows": rows,
                "length": length,
                "first_s": first,
                "s": best,
                "us_per_token": 1e6 * best / (rows * length),
                "gflops": gflop / best,
            }
        )
        print(f"  scaling {rows}x{length}: {best:.3f} s, {gflop / best:.0f} GFLOP/s", file=sys.stderr)
    return out


def summary_md(report: dict) -> str:
    pk = report["matmul_peak_gflops"]
    out = [f"matmul peak at start (JAX 2048^3): f32 {pk['float32']:.0f} GFLOP/s, bf16 {pk['bfloat16']:.0f} GFLOP/s", ""]
    out.append("Padding (device tokens / real tokens):")
    out.append("")
    out.append(
        "| dtype | batch | real tok | reference plan | per-batch longest | + length buckets | + pow2 rows (ours) "
        "| engine.stats |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["runs"]:
        p, st = r["padding"], r["engine_stats_per_pass"]
        real = p["real_tokens"]
        out.append(
            f"| {r['dtype']} | {r['batch_size']} | {real} | {p['reference_plan'] / real:.3f} "
            f"| {p['per_batch_longest'] / real:.3f} | {p['length_buckets'] / real:.3f} "
            f"| {p['power_of_two_rows'] / real:.3f} | {st['device_tokens'] / st['real_tokens']:.3f} |"
        )
    out.append("")
    out.append("Host and compile (seconds unless noted):")
    out.append("")
    out.append(
        "| dtype | batch | peak f32/bf16 now | tokenize | plan+pad | cold pass | warm pass | cold-warm | programs "
        "| AOT lower+compile sum | device sum | warm-device | in encode: tokenize / place / dispatch ms | gap mean ms |"
    )
    out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in report["runs"]:
        ins = r["instrumented"]
        gaps = ins["gaps_between_dispatches_s"]
        aot = sum(c["lower_s"] + c["compile_s"] for c in r["compile_per_shape"])
        pb = r["matmul_peak_before"]
        out.append(
            f"| {r['dtype']} | {r['batch_size']} | {pb['float32']:.0f}/{pb['bfloat16']:.0f} "
            f"| {min(r['tokenize_s']):.3f} | {r['plan_and_pad_s']:.3f} | {r['cold_s']:.1f} | {r['warm_s']:.2f} "
            f"| {r['compile_s_estimate']:.1f} | {len(r['new_programs'])} | {aot:.1f} | {r['device_s']:.2f} "
            f"| {r['host_overhead_s']:.2f} | {1e3 * ins['tokenize_s']:.1f} / {1e3 * ins['place_s']:.1f} / "
            f"{1e3 * sum(ins['dispatch_s']):.1f} | {1e3 * statistics.mean(gaps) if gaps else float('nan'):.1f} |"
        )
    out.append("")
    out.append("XLA profile of one warm batch (share of summed op time):")
    out.append("")
    out.append(
        "| dtype | batch | shape (texts, real tok) | batch s | GFLOP/s real | GFLOP/s device | dot fusions GFLOP/s | "
        + " | ".join(CATS)
        + " | busy/wall |"
    )
    out.append("|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(CATS) + "---:|")
    for r in report["runs"]:
        x = r["xla"]
        cats = x["categories"]
        shares = " | ".join(f"{100 * cats[c]['share']:.1f}%" if c in cats else "-" for c in CATS)
        dot_s = cats.get("dot/matmul", {}).get("us", 0) / 1e6
        out.append(
            f"| {r['dtype']} | {r['batch_size']} | {x['shape'][0]}x{x['shape'][1]} ({x['texts']}, {x['real_tokens']}) "
            f"| {x['warm_untraced_s']:.3f} | {x['model_gflop_real'] / x['warm_untraced_s']:.0f} "
            f"| {x['model_gflop_device'] / x['warm_untraced_s']:.0f} "
            f"| {x['dot_flops_executed'] / 1e9 / dot_s if dot_s else float('nan'):.0f} | {shares} "
            f"| {x['op_busy_us'] / x['wall_us']:.2f} |"
        )
    for dtype, sc in report.get("scaling", {}).items():
        pb, pa = sc["matmul_peak_before"], sc["matmul_peak_after"]
        out += [
            "",
            f"Scaling, {dtype} (all tokens real; matmul peak {pb[dtype]:.0f} before, {pa[dtype]:.0f} after):",
            "",
        ]
        out += ["| rows x length | tokens | warm s | us/token | model GFLOP/s |", "|---|---:|---:|---:|---:|"]
        for r in sc["shapes"]:
            out.append(
                f"| {r['rows']}x{r['length']} | {r['rows'] * r['length']} | {r['s']:.3f} | {r['us_per_token']:.0f} "
                f"| {r['gflops']:.0f} |"
            )
    return "\n".join(out)


CATS = (
    "dot/matmul",
    "transpose/copy",
    "reduction",
    "elementwise/other",
    "convert",
    "gather",
    "scan: slice layer weights",
    "scan: write outputs",
)


def git_state() -> dict:
    """The commit and the library files changed in the working tree (other sessions edit it while this runs)."""
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--short", "--", "embgemma_jax").splitlines()}


def jax_versions() -> dict:
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the cached full-size random one)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--out", type=Path, default=None, help="JSON output")
    p.add_argument("--scaling", action="store_true", help="also time all-real batches of growing size per dtype")
    p.add_argument("--skip-profile", action="store_true", help="only the --scaling section")
    p.add_argument("--limit", type=int, default=None, help="only the first N texts (a smoke run)")
    p.add_argument("--trace-root", type=Path, default=Path(tempfile.gettempdir()) / "embgemma-cpu-profile")
    p.add_argument(
        "--reanalyze", type=Path, default=None, help="recompute the XLA summaries of a saved JSON from its traces"
    )
    args = p.parse_args()
    if args.reanalyze:
        report = json.loads(args.reanalyze.read_text())
        for r in report["runs"]:
            x, td = r["xla"], Path(r["xla"]["trace_dir"])
            x.update(trace_summary(td, hlo_index((td / "forward.hlo.txt").read_text()), x["traced_s"]))
        (args.out or args.reanalyze).write_text(json.dumps(report, indent=1) + "\n")
        print(summary_md(report))
        return

    from embgemma_jax import EmbeddingGemma, testing
    from embgemma_jax.checkpoint.load import read_st_config

    if args.model is None:
        args.model = HERE / ".cache" / "random-full"
        if not (args.model / "modules.json").is_file():
            testing.build_full_size_random_checkpoint(args.model)
    cfg = read_st_config(args.model)
    # The bench's mixed case: the same counts so the same texts (its corpus cursor runs through queries first).
    texts = build_cases(args.model, {"queries": 512, "mixed": 48, "long": 0})["mixed"]
    args.trace_root.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(args.model),
        "n_texts": len(texts),
        "git": git_state(),
        "jax": jax_versions(),
        "matmul_peak_gflops": matmul_peak(),
        "runs": [],
    }
    for dtype in args.dtypes.split(","):
        model, load_s = timed(EmbeddingGemma.from_pretrained, args.model, dtype=dtype)
        for bs in () if args.skip_profile else (int(b) for b in args.batches.split(",")):
            print(f"{dtype} batch {bs} ...", file=sys.stderr)
            r = profile_one(model, texts[: args.limit], bs, args.trace_root, cfg)
            r.update(dtype=dtype, load_s=load_s)
            report["runs"].append(r)
        if args.scaling:
            shapes = [(r, 512) for r in (1, 2, 4, 8, 16, 32)] + [(8, 768), (32, 768), (64, 192), (128, 48)]
            report.setdefault("scaling", {})[dtype] = {
                "matmul_peak_before": matmul_peak(),
                "shapes": scaling(model, cfg, shapes),
                "matmul_peak_after": matmul_peak(),
            }
        del model
    report["matmul_peak_gflops_after"] = matmul_peak()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary_md(report))


if __name__ == "__main__":
    main()
