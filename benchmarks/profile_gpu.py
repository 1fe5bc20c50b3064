# ruff: noqa: E501
"""Device profile of embgemma_jax bf16 on bench_encode's mixed case (scale 16: 768 texts, 10-600 tokens).

    OUT=results_dir python benchmarks/profile_gpu.py      # run from the repository root, on the GPU

One cold and two warm passes of ``encode(token_budget=65536, batch_size=1024)``, then one pass under
``jax.profiler.trace(create_perfetto_trace=True)``; the trace's GPU kernel events are summed by name and
grouped by name into transpose/copy, matmul/gemm, reduction and other. Writes profile_mixed.txt (the
table), kernels_all.json and the trace to $OUT. Findings: benchmarks/gpu_profile.md.
"""

import collections
import glob
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

out = Path(os.environ.get("OUT", "/tmp/out"))
out.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import bench_encode  # noqa: E402
import jax  # noqa: E402

from embgemma_jax import EmbeddingGemma, testing  # noqa: E402

ckpt = Path(os.environ["EGJ_CKPT"]) if os.environ.get("EGJ_CKPT") else None
for c in () if ckpt else ("benchmarks/.cache/random-full", "/tmp/egj-random-full"):
    if Path(c, "modules.json").is_file():
        ckpt = Path(c)
        break
if ckpt is None:
    ckpt = Path("/tmp/egj-random-full")
    t = time.perf_counter()
    testing.build_full_size_random_checkpoint(ckpt)
    print(f"rebuilt checkpoint in {time.perf_counter() - t:.1f}s", flush=True)
print("checkpoint:", ckpt, flush=True)
t = time.perf_counter()
cases = bench_encode.build_cases(
    ckpt,
    {"queries": int(os.environ.get("EGJ_NQ", 512 * 16)), "mixed": int(os.environ.get("EGJ_NM", 48 * 16)), "long": 0},
)
texts = cases["mixed"]
print(f"texts: {len(texts)} (built in {time.perf_counter() - t:.1f}s)", flush=True)

model = EmbeddingGemma.from_pretrained(ckpt, dtype="bfloat16")
kw = dict(token_budget=65536, batch_size=1024)
lens = [len(x) for x in model.tokenizer.encode(texts)] if hasattr(model, "tokenizer") else None
t = time.perf_counter()
model.encode(texts, **kw)
cold = time.perf_counter() - t
walls = []
for _ in range(2):
    t = time.perf_counter()
    model.encode(texts, **kw)
    walls.append(time.perf_counter() - t)
st0 = dict(model.engine.stats)
tdir = "/tmp/egj-trace"
with jax.profiler.trace(tdir, create_perfetto_trace=True):
    t = time.perf_counter()
    model.encode(texts, **kw)
    prof_wall = time.perf_counter() - t
st1 = dict(model.engine.stats)
per_pass = {k: st1[k] - st0[k] for k in st0}

files = sorted(glob.glob(f"{tdir}/**/*.trace.json.gz", recursive=True))
print("trace files:", files, flush=True)
tr = json.load(gzip.open(files[-1]))
ev = tr["traceEvents"] if isinstance(tr, dict) else tr
pname, tname = {}, {}
for e in ev:
    if e.get("ph") == "M" and e.get("name") == "process_name":
        pname[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
        tname[(e["pid"], e["tid"])] = e["args"]["name"]
lines = collections.Counter()
for e in ev:
    if e.get("ph") == "X":
        lines[(pname.get(e["pid"], str(e["pid"])), tname.get((e["pid"], e.get("tid")), str(e.get("tid"))))] += e.get(
            "dur", 0
        )
rep = []
rep.append(
    f"mixed case: {len(texts)} texts" + (f", {sum(lens)} real tokens, {min(lens)}-{max(lens)} tok" if lens else "")
)
rep.append(
    f"encode(token_budget=65536, batch_size=1024) bf16: cold {cold:.4f}s, warm passes {[round(w, 4) for w in walls]}, profiled pass {prof_wall:.4f}s"
)
rep.append(f"per pass: {per_pass}  padding ratio {per_pass['device_tokens'] / max(1, per_pass['real_tokens']):.4f}")
rep.append(f"compiled programs/shapes: {sorted(model.engine.compiled)}")
rep.append("")
rep.append("trace lines (process / thread: total X-event us):")
for (p, th), d in sorted(lines.items(), key=lambda kv: -kv[1]):
    rep.append(f"  {p} / {th}: {d}")


# GPU kernel events: device processes, stream threads
def is_gpu(pid):
    n = pname.get(pid, "")
    return "GPU" in n or "gpu" in n or "device:" in n.lower()


kern = collections.Counter()
cnt = collections.Counter()
hlo = {}
stream_threads = {k for k in tname if is_gpu(k[0]) and tname[k].lower().startswith("stream")}
for e in ev:
    if e.get("ph") != "X" or not is_gpu(e["pid"]):
        continue
    key = (e["pid"], e.get("tid"))
    if stream_threads and key not in stream_threads:
        continue
    n = e["name"]
    kern[n] += e.get("dur", 0)
    cnt[n] += 1
    a = e.get("args", {})
    hlo.setdefault(n, a.get("hlo_op") or a.get("long_name") or "")
total = sum(kern.values()) or 1


def cat(n):
    s = n.lower()
    if "transpose" in s or "copy" in s:
        return "transpose/copy"
    if any(k in s for k in ("gemm", "cublas", "cutlass", "dot", "matmul", "triton_gemm", "sm90_xmma", "xmma")):
        return "matmul/gemm"
    if "reduce" in s:
        return "reduction"
    return "other"


cats = collections.Counter()
ccnt = collections.Counter()
for n, d in kern.items():
    cats[cat(n)] += d
    ccnt[cat(n)] += cnt[n]
rep.append("")
rep.append(
    f"GPU kernel time (stream threads {sorted(tname[k] for k in stream_threads)}): {total} us over {sum(cnt.values())} events; profiled wall {prof_wall * 1e6:.0f} us; busy {100 * total / (prof_wall * 1e6):.2f}% of wall"
)
rep.append("")
rep.append("category totals:")
rep.append("| category | us | % of device time | events |")
rep.append("|---|---:|---:|---:|")
for c, d in cats.most_common():
    rep.append(f"| {c} | {d} | {100 * d / total:.2f}% | {ccnt[c]} |")
rep.append("")
rep.append("top 25 ops:")
rep.append("| # | op | category | us | % of device time | count | hlo/args |")
rep.append("|---:|---|---|---:|---:|---:|---|")
for i, (n, d) in enumerate(kern.most_common(25), 1):
    rep.append(f"| {i} | {n[:110]} | {cat(n)} | {d} | {100 * d / total:.2f}% | {cnt[n]} | {str(hlo[n])[:80]} |")
txt = "\n".join(rep)
print(txt)
(out / "profile_mixed.txt").write_text(txt + "\n")
(out / "kernels_all.json").write_text(json.dumps({n: [kern[n], cnt[n], str(hlo[n])] for n in kern}, indent=0))
shutil.copy(files[-1], out / "mixed.trace.json.gz")
