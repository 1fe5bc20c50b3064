"""Command line: ``embgemma-jax {embed,convert,...}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub id (google/embeddinggemma-300m) or local directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument(
        "--compilation-cache",
        default=os.environ.get("EMBGEMMA_COMPILATION_CACHE"),
        help="persistent JAX compilation cache directory (default: $EMBGEMMA_COMPILATION_CACHE; off if unset)",
    )


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: input file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {p} is not UTF-8 text ({e})") from e
    return text.splitlines()


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from embgemma_jax.encode import EmbeddingGemma

    texts = list(args.texts)
    if args.input:
        texts += _read_lines(args.input)
    if not texts:
        raise SystemExit("error: no texts: pass TEXT arguments or --input FILE")
    model = EmbeddingGemma.from_pretrained(
        args.model, dtype=args.dtype, revision=args.revision, compilation_cache_dir=args.compilation_cache
    )
    emb = model.encode(
        texts,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
        batch_size=args.batch_size,
        truncate_dim=args.truncate_dim,
        normalize_embeddings=args.normalize,
        show_progress_bar=args.progress,
    )
    if args.output:
        out = Path(args.output)
        if out.suffix != ".npy":
            raise SystemExit(f"error: --output must end in .npy, got {out}")
        np.save(out, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {out}", file=sys.stderr)
    else:
        json.dump({"model": str(args.model), "dim": int(emb.shape[1]), "embeddings": emb.tolist()}, sys.stdout)
        sys.stdout.write("\n")
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed texts given as arguments or in a file (one per line)")
    _add_model_args(p)
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--input", help="UTF-8 file with one text per line")
    p.add_argument("--prompt-name", default=None, help="prompt from the model's table, e.g. query, document, STS")
    p.add_argument("--prompt", default=None, help="explicit prompt string (wins over --prompt-name)")
    p.add_argument("--truncate-dim", type=int, default=None, help="Matryoshka dimension (768, 512, 256, 128)")
    p.add_argument("--normalize", action="store_true", help="re-normalize after truncation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", help="write a .npy file instead of JSON on stdout")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=cmd_embed)


def cmd_convert(args: argparse.Namespace) -> int:
    from embgemma_jax.checkpoint.load import convert

    out = convert(args.src, args.out, revision=args.revision)
    print(f"converted {args.src} -> {out}", file=sys.stderr)
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a sentence-transformers checkpoint to the embgemma_jax format")
    p.add_argument("src", help="Hub id or local sentence-transformers directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_convert)


def cmd_embed_corpus(args: argparse.Namespace) -> int:
    from embgemma_jax.corpus.job import embed_corpus
    from embgemma_jax.sharding import initialize_distributed, make_mesh

    distributed = [args.coordinator_address, args.num_processes, args.process_id]
    if args.distributed or any(x is not None for x in distributed):
        initialize_distributed(*distributed)
    import jax

    from embgemma_jax.encode import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(
        args.model,
        dtype=args.dtype,
        revision=args.revision,
        mesh=make_mesh(),
        fsdp=args.fsdp,
        compilation_cache_dir=args.compilation_cache,
    )
    manifest = embed_corpus(
        model,
        args.input,
        args.output,
        text_field=args.text_field,
        id_field=args.id_field,
        prompt_name=args.prompt_name or None,
        prompt=args.prompt,
        truncate_dim=args.truncate_dim,
        on_error=args.on_error,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if jax.process_index() == 0:
        skipped = f", {manifest['errors']} malformed records skipped (see {', '.join(manifest['errors_files'])})"
        print(
            f"wrote {manifest['documents']} x {manifest['dim']} embeddings in {len(manifest['shards'])} shards to "
            f"{args.output}{skipped if manifest['errors'] else ''}",
            file=sys.stderr,
        )
    return 0


def _add_embed_corpus(sub: argparse._SubParsersAction) -> None:
    """The ``embed-corpus`` subcommand."""
    p = sub.add_parser(
        "embed-corpus",
        help="embed a large .txt/.jsonl/.parquet corpus into resumable shards (multi-device, multi-host)",
        description="Streams the input, encodes it data-parallel over all local devices, writes shards with a "
        "manifest. Rerun the same command to resume an interrupted run. Read the result with "
        "embgemma_jax.read_embeddings(OUTPUT).",
    )
    _add_model_args(p)
    p.add_argument("--input", required=True, help=".txt (one text per line), .jsonl or .parquet file")
    p.add_argument("--output", required=True, help="output directory (created; an unfinished run there is resumed)")
    p.add_argument("--text-field", default="text", help="field/column with the text (jsonl, parquet)")
    p.add_argument(
        "--id-field",
        default=None,
        help="field/column with the id (default: line number for txt/jsonl, row index for parquet)",
    )
    p.add_argument("--prompt-name", default="document", help="prompt from the model's table ('' for none)")
    p.add_argument("--prompt", default=None, help="explicit prompt string (wins over --prompt-name)")
    p.add_argument("--truncate-dim", type=int, default=None, help="Matryoshka dimension (768, 512, 256, 128)")
    p.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="malformed records: stop with file:line (raise) or log to errors-*.jsonl and go on (skip)",
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="input records per shard")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--fsdp", action="store_true", help="split parameters over the local devices instead of replicating")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (TPU pod slices, SLURM, ...)",
    )
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="index of this process")
    p.set_defaults(func=cmd_embed_corpus)


def _read_texts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"texts file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e})") from e
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{p} holds no non-empty lines")
    return texts


def cmd_parity(args: argparse.Namespace) -> int:
    from embgemma_jax.research.parity import check_tolerances, format_report, json_safe, parity_report, plot_report

    tolerances = {
        "max_abs_tol": args.max_abs_tol,
        "max_rel_tol": args.max_rel_tol,
        "min_cosine": args.min_cosine,
        "min_token_agreement": args.min_token_agreement,
    }
    empty = {"embeddings": {}, "stages": [], "tokens": {}}
    check_tolerances(empty, **tolerances)  # validate the values before any work
    texts = _read_texts(args.texts) if args.texts else None
    report = parity_report(
        args.model,
        texts,
        dtype=args.dtype,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
        reference=False if args.no_reference else None,
    )
    failures = check_tolerances(report, **tolerances)
    report["tolerances"] = {k: v for k, v in tolerances.items() if v is not None}
    report["failures"] = failures
    report["passed"] = not failures
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(report), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}", file=sys.stderr)
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    if any(v is not None for v in tolerances.values()):
        print("\nall tolerances met")
    return 0


def _add_parity(sub: argparse._SubParsersAction) -> None:
    """Registers ``embgemma-jax parity``."""
    p = sub.add_parser(
        "parity",
        help="layer-by-layer comparison with a float64 oracle and the PyTorch reference",
        description="Compares every stage (embeddings, each layer, pooling, dense head, final vector) "
        "with a float64 NumPy oracle and the PyTorch reference.",
    )
    p.add_argument("--model", required=True, help="Hub id or local checkpoint directory")
    p.add_argument("--texts", help="UTF-8 file, one text per line (default: a built-in set incl. a long text)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="JAX compute dtype")
    p.add_argument("--prompt-name", default=None, help="prompt from the model's table, e.g. query, document")
    p.add_argument("--prompt", default=None, help="explicit prompt string (wins over --prompt-name)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference even if installed")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--plot", help="save a PNG of the error per stage (needs matplotlib)")
    p.add_argument("--max-abs-tol", type=float, help="fail if our final embeddings differ by more than this")
    p.add_argument("--max-rel-tol", type=float, help="fail if any stage's relative error exceeds this")
    p.add_argument(
        "--min-cosine", type=float, help="fail if a final embedding's cosine to the oracle/reference is lower"
    )
    p.add_argument("--min-token-agreement", type=float, help="fail if fewer texts tokenize identically (0..1)")
    p.set_defaults(func=cmd_parity)


# One entry per subcommand: name -> function that adds its parser.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "embed": _add_embed,
    "convert": _add_convert,
    "embed-corpus": _add_embed_corpus,
    "parity": _add_parity,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embgemma-jax", description="EmbeddingGemma in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from embgemma_jax.errors import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
