#!/usr/bin/env python
"""Tokenizer throughput: ``Tokenizer.encode`` against SentencePiece's own batch encode, side by side.

    python benchmarks/bench_tokenizer.py                      # local tokenizers (vocab 512 and 8000), no network
    python benchmarks/bench_tokenizer.py --model /path/to/embeddinggemma-300m   # a real tokenizer.model + .json
    python benchmarks/bench_tokenizer.py --compare-rev HEAD~1  # also time the Tokenizer of an earlier revision

Texts are stdlib docstrings (``embgemma_jax.testing.stdlib_docstrings``, cycled to ``--texts``), in two cases:

  docs        the docstrings as they are (a few hold "<" or "[", none an added token)
  docs+added  every docstring with three of the tokenizer's added tokens written in it (start, middle, end)

Tokenizers: without ``--model``, SentencePiece models trained here (``train_tiny_sentencepiece``) and
converted to ``tokenizer.json`` by transformers' GemmaTokenizer, as the tests build them: ``sp512`` (the
tests' tokenizer), ``sp8000``, and ``sp8000-gemma-added``, the 8000 model with a Gemma-shaped added
vocabulary (6242 ``<unusedN>``, HTML tags, runs of 1-31 newlines and tabs; an approximation of the real
one, whose tokenizer.json is not at hand: with newline runs as added tokens almost every multi-line text
goes through the added-token path). Built once under benchmarks/.cache/.

Per case and thread count (1 and ``--threads``) each system encodes the same texts ``--repeats`` times, in
rotating order; the best time counts and the result lists are freed outside the timing:

  sp    ``sp.encode(texts, num_threads=n)``: SentencePiece's batch encode, no BOS/EOS, no added tokens
  ours  ``Tokenizer.encode(texts, num_threads=n)``: the reference ids (added tokens, BOS/EOS, truncation)
  rev   with ``--compare-rev``: that revision's ``Tokenizer.encode`` (its SentencePiece set to n threads)

tokens/s counts each system's own output ids (on docs+added SentencePiece alone cuts each added token
into several pieces); ``ours/sp`` is the speed ratio on the same texts, sp seconds / ours seconds, by
wall time and by CPU (process) time: on a machine shared with other work the CPU-time ratio of the
one-thread rows moves less; the load average before and after is recorded. Unless ``--no-check``, our
ids are compared with the reference tokenizer (transformers' AutoTokenizer on the same directory,
truncation at ``--max-length``) on every text. ``--profile`` prints a cProfile of ours per case: where
the time goes outside SentencePiece. Results: a markdown table on stdout and JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache" / "tokenizers"

HTML_TAGS = [
    f"<{c}{t}>"
    for t in ("table", "tr", "td", "th", "thead", "tbody", "p", "b", "i", "u", "code", "pre", "ul", "ol", "li", "a")
    for c in ("", "/")
] + [f"<h{k}>" for k in range(1, 7)] + ["<br>", "<hr>"]  # fmt: skip


def gemma_shaped_added_tokens() -> list[str]:
    """Added-token contents shaped like the real Gemma 3 vocabulary's (see the module docstring)."""
    runs = ["\n" * k for k in range(1, 32)] + ["\t" * k for k in range(1, 32)]
    unused = [f"<unused{i}>" for i in range(6242)]
    return ["<start_of_image>", "<end_of_image>", *HTML_TAGS, *runs, *unused]


def build_local_tokenizer(name: str) -> Path:
    """A tokenizer directory (tokenizer.model + tokenizer.json), built as the tests build theirs."""
    out = CACHE / name
    if (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file():
        return out
    from tokenizers import AddedToken as HFAddedToken
    from transformers import GemmaTokenizer

    from embgemma_jax.testing import train_tiny_sentencepiece

    vocab = int(name.removeprefix("sp").split("-")[0])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_tiny_sentencepiece(work / "tokenizer.model", vocab_size=vocab)
        tok = GemmaTokenizer.from_pretrained(str(work), add_bos_token=True, add_eos_token=True, padding_side="right")
        tok.add_tokens(["<image_soft_token>"], special_tokens=True)
        if name.endswith("-gemma-added"):
            tok.add_tokens([HFAddedToken(c, normalized=False, special=False) for c in gemma_shaped_added_tokens()])
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
        (out / "tokenizer.model").write_bytes((work / "tokenizer.model").read_bytes())
    return out


def build_cases(n: int, added: list[str]) -> dict[str, list[str]]:
    from embgemma_jax.testing import stdlib_docstrings

    docs = stdlib_docstrings()
    docs = (docs * (n // len(docs) + 1))[:n]
    with_added = []
    for i, d in enumerate(docs):
        a, b, c = (added[(3 * i + k) % len(added)] for k in range(3))
        mid = len(d) // 2
        with_added.append(f"{a}{d[:mid]}{b}{d[mid:]} {c}")
    return {"docs": docs, "docs+added": with_added}


def tokenizer_at_revision(rev: str) -> type:
    """The Tokenizer class of embgemma_jax/tokenizer.py at git revision ``rev``."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:embgemma_jax/tokenizer.py"], capture_output=True, text=True
    )
    if src.returncode != 0:
        raise SystemExit(f"--compare-rev {rev}: git show failed: {src.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "tokenizer_at_rev.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("tokenizer_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Tokenizer


def revision_encoder(cls: type, directory: Path, max_length: int, threads: int) -> Callable[[list[str]], list]:
    """``encode`` of an earlier revision's Tokenizer on ``threads`` SentencePiece threads (revisions before
    the ``num_threads`` argument used SentencePiece's default, all cores: their processor is replaced)."""
    import sentencepiece as spm

    try:
        tok = cls.from_dir(directory, max_length=max_length, num_threads=threads)
        return tok.encode
    except TypeError:
        tok = cls.from_dir(directory, max_length=max_length)
        tok.sp = spm.SentencePieceProcessor(model_file=str(tok.model_file), num_threads=threads)
        return tok.encode


def best_times(fns: dict[str, Callable[[], list]], repeats: int) -> dict[str, dict[str, float]]:
    """Best wall and CPU (process) time and the output id count of each function, run ``repeats`` times
    in rotating order; results are freed outside the timing."""
    names = list(fns)
    res = {k: {"seconds": float("inf"), "cpu_seconds": float("inf")} for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            out = fns[k]()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            res[k]["seconds"] = min(res[k]["seconds"], wall)
            res[k]["cpu_seconds"] = min(res[k]["cpu_seconds"], cpu)
            res[k]["tokens"] = sum(map(len, out))
            del out
    for v in res.values():
        v["tokens_per_s"] = v["tokens"] / v["seconds"]
    return res


def profile(fn: Callable[[], list], top: int = 12) -> str:
    """cProfile of one call (CPU-time timer), the functions with the most own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile(timer=time.process_time)
    prof.enable()
    out = fn()
    prof.disable()
    del out
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def check_reference(directory: Path, texts: list[str], got: list[list[int]], max_length: int) -> bool | None:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    ref = AutoTokenizer.from_pretrained(str(directory))
    want = ref(texts, truncation=True, max_length=max_length)["input_ids"]
    bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    if bad:
        print(f"  MISMATCH with the reference tokenizer on {len(bad)} texts, first {texts[bad[0]]!r:.120}")
    return not bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory with tokenizer.model + .json")
    p.add_argument("--tokenizers", default="sp512,sp8000,sp8000-gemma-added", help="local tokenizers to build")
    p.add_argument("--texts", type=int, default=20_000, help="texts per case")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the multi-thread row (1 always runs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=2048, help="truncation length (the real model's)")
    p.add_argument("--compare-rev", default=None, help="also time the Tokenizer at this git revision")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the reference tokenizer")
    p.add_argument("--profile", action="store_true", help="print a cProfile of ours per case (one thread)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/...)")
    args = p.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.texts < 1:
        raise SystemExit("--threads, --repeats and --texts must be positive")

    from embgemma_jax.tokenizer import Tokenizer

    if args.model is not None:
        if not (args.model / "tokenizer.model").is_file():
            raise SystemExit(f"--model {args.model}: no tokenizer.model there")
        dirs = {args.model.name: args.model}
    else:
        dirs = {name: build_local_tokenizer(name) for name in args.tokenizers.split(",")}
    rev_cls = tokenizer_at_revision(args.compare_rev) if args.compare_rev else None
    thread_counts = sorted({1, args.threads})

    import sentencepiece

    report: dict = {
        "machine": {
            "cores": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "sentencepiece": sentencepiece.__version__,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
    }
    rows = []
    for name, directory in dirs.items():
        ours = Tokenizer.from_dir(directory, max_length=args.max_length)
        added = [t.content for t in ours.added_tokens if t.content not in ("<bos>", "<eos>", "<pad>")] or ["<eos>"]
        for case, texts in build_cases(args.texts, added).items():
            check = None
            if not args.no_check:
                check = check_reference(directory, texts, ours.encode(texts), args.max_length)
            for n in thread_counts:
                fns = {
                    "sp": functools.partial(ours.sp.encode, texts, num_threads=n),
                    "ours": functools.partial(ours.encode, texts, num_threads=n),
                }
                if rev_cls is not None:
                    fns["rev"] = functools.partial(revision_encoder(rev_cls, directory, args.max_length, n), texts)
                times = best_times(fns, args.repeats)
                res = {"tokenizer": name, "case": case, "threads": n, "texts": len(texts), "ids_match_reference": check}
                res.update(times)
                for k in ("ours", "rev"):
                    if k in times:
                        res[f"{k}_over_sp"] = times["sp"]["seconds"] / times[k]["seconds"]
                        res[f"{k}_over_sp_cpu"] = times["sp"]["cpu_seconds"] / times[k]["cpu_seconds"]
                report["results"].append(res)
                rows.append(res)
                ratios = f"ours/sp {res['ours_over_sp']:.2f} (cpu {res['ours_over_sp_cpu']:.2f})"
                print(f"{name} {case} threads={n}: {ratios}", flush=True)
                if args.profile and n == 1:
                    print(profile(fns["ours"]))
    report["machine"]["load_average_end"] = os.getloadavg()

    rev = f" rev {args.compare_rev}" if args.compare_rev else ""
    print(f"\nTokenizer.encode vs sp.encode, {args.texts} texts per case, best of {args.repeats}{rev}")
    print("(x/sp: sp seconds / x seconds on the same texts, by wall time and by CPU time)\n")
    head = "| tokenizer | case | threads | sp tokens/s | ours tokens/s | ours/sp | ours/sp cpu |"
    head += (" rev tokens/s | rev/sp | rev/sp cpu |" if rev else "") + " ids = reference |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [r["tokenizer"], r["case"], str(r["threads"]), f"{r['sp']['tokens_per_s'] / 1e6:.2f}M"]
        for k in ("ours", "rev") if rev else ("ours",):
            cells += [f"{r[k]['tokens_per_s'] / 1e6:.2f}M", f"{r[f'{k}_over_sp']:.2f}", f"{r[f'{k}_over_sp_cpu']:.2f}"]
        cells.append({True: "yes", False: "NO", None: "not checked"}[r["ids_match_reference"]])
        print("| " + " | ".join(cells) + " |")
    la = report["machine"]
    print(f"\nload average {la['load_average_start'][0]:.1f} -> {la['load_average_end'][0]:.1f} on {la['cores']} cores")

    out = args.out or HERE / "results" / f"bench_tokenizer_{args.model.name if args.model else 'local'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
