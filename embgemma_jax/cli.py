"""Command line: ``embgemma-jax {embed,embed-corpus,serve,convert,parity}``.

Every subcommand checks its arguments, input files and output paths before it loads a model, and every
error ends the process with one ``error: ...`` line (exit status 2) that names the argument or file, not
with a traceback. The model options (:func:`add_model_options`) are the same for ``embed``,
``embed-corpus`` and ``serve``, and map one to one onto :meth:`EmbeddingGemma.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embgemma_jax import __version__
from embgemma_jax.batching import INVARIANT_BATCH_TOKENS, MAX_BATCH_TOKENS
from embgemma_jax.model import ATTENTION_IMPLS
from embgemma_jax.quant import QUANT_MODES

if TYPE_CHECKING:
    from embgemma_jax.encode import EmbeddingGemma

BATCHES_BOUNDED = (
    f"whatever is asked, every device batch is bounded to {MAX_BATCH_TOKENS:,} padded tokens, rows x padded "
    "length (embgemma_jax.batching.MAX_BATCH_TOKENS), so memory stays bounded"
)


class UsageError(ValueError):
    """A bad argument or path, found before any model is loaded; the message names it."""


# ---------------------------------------------------------------------------------------------------
# Argument types: argparse reports "argument --NAME: <message>" and exits 2.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [0, 65535], got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [0, 65535], got {text!r}")
    return value


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


# ---------------------------------------------------------------------------------------------------
# Shared model options


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --quantize, --attention-impl, --revision, --compilation-cache."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", required=True, type=non_empty, help="Hub id (google/embeddinggemma-300m) or local directory"
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype: float32 (exact parity, default) or bfloat16 (fast)",
    )
    g.add_argument(
        "--quantize",
        default=None,
        choices=[m for m in QUANT_MODES if m is not None],
        help="weight-only quantization of the large matrices (use with --dtype bfloat16); default: none",
    )
    g.add_argument(
        "--attention-impl",
        default="auto",
        choices=list(ATTENTION_IMPLS),
        help="sliding-window attention: auto (default), dense or banded",
    )
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    g.add_argument(
        "--compilation-cache",
        default=None,
        help="persistent JAX compilation cache directory (default: $EMBGEMMA_COMPILATION_CACHE, else "
        "$XDG_CACHE_HOME/embgemma_jax/xla, i.e. ~/.cache/embgemma_jax/xla; 'off' or --no-compilation-cache "
        "disables it)",
    )
    g.add_argument("--no-compilation-cache", action="store_true", help="compile afresh every run (no persistent cache)")


def compilation_cache_dir(args: argparse.Namespace) -> str | None:
    """The persistent compilation cache the CLI uses: on by default in the user's cache directory, so a
    second run of a job loads its compiled programs instead of compiling them again."""
    choice = args.compilation_cache or os.environ.get("EMBGEMMA_COMPILATION_CACHE")
    if args.no_compilation_cache or (choice or "").strip().lower() in ("off", "0", "none", "false", "no"):
        return None
    if choice:
        return choice
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "embgemma_jax", "xla")


def load_model(args: argparse.Namespace, **extra: Any) -> EmbeddingGemma:
    """The model the options of :func:`add_model_options` describe (``extra``: mesh, fsdp)."""
    from embgemma_jax.encode import EmbeddingGemma

    return EmbeddingGemma.from_pretrained(
        args.model,
        dtype=args.dtype,
        quantize=args.quantize,
        attention_impl=args.attention_impl,
        revision=args.revision,
        compilation_cache_dir=compilation_cache_dir(args),
        **extra,
    )


def _add_batching_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help=f"rows per forward pass, at most ({BATCHES_BOUNDED})"
    )
    p.add_argument(
        "--token-budget",
        type=positive_int,
        default=None,
        help="pack each batch with up to this many padded tokens (rows x padded length) instead of a fixed "
        "--batch-size rows; the embeddings are the same",
    )


def _check_file_output(path: str, option: str, suffix: str) -> Path:
    """An output file path that can be written: the right suffix, in an existing writable directory."""
    out = Path(path)
    if out.suffix != suffix:
        raise UsageError(f"{option} must end in {suffix}, got {out}")
    if out.is_dir():
        raise UsageError(f"{option} {out} is a directory; expected a {suffix} file name")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"{option} {out}: not writable")
    return out


# ---------------------------------------------------------------------------------------------------
# embed


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from embgemma_jax.corpus.readers import read_text_lines

    texts = list(args.texts)
    if args.input:
        lines = read_text_lines(args.input)
        if not lines:
            raise UsageError(f"--input {args.input} holds no lines")
        texts += lines
    if not texts:
        raise UsageError("no texts: pass TEXT arguments or --input FILE")
    out = _check_file_output(args.output, "--output", ".npy") if args.output else None
    if args.batch_invariant and args.token_budget is not None:
        raise UsageError("--batch-invariant plans its own batches; it cannot be combined with --token-budget")
    invariant = resolve_batch_invariant("on" if args.batch_invariant else "off", args.invariant_batch_tokens)
    model = load_model(args, batch_invariant=invariant, invariant_batch_tokens=args.invariant_batch_tokens)
    emb = model.encode(
        texts,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
        batch_size=args.batch_size,
        token_budget=args.token_budget,
        truncate_dim=args.truncate_dim,
        normalize_embeddings=args.normalize,
        show_progress_bar=args.progress,
    )
    if out is not None:
        np.save(out, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {out}", file=sys.stderr)
    else:
        json.dump({"model": str(args.model), "dim": int(emb.shape[1]), "embeddings": emb.tolist()}, sys.stdout)
        sys.stdout.write("\n")
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed texts given as arguments or in a file (one per line)")
    add_model_options(p)
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument(
        "--input",
        help="UTF-8 file with one text per line (only \\n ends a line; \\r\\n and a leading BOM are handled)",
    )
    p.add_argument("--prompt-name", default=None, help="prompt from the model's table, e.g. query, document, STS")
    p.add_argument("--prompt", default=None, help="explicit prompt string (wins over --prompt-name)")
    p.add_argument("--truncate-dim", type=positive_int, default=None, help="Matryoshka dimension (768, 512, 256, 128)")
    p.add_argument("--normalize", action="store_true", help="re-normalize after truncation")
    _add_batching_options(p)
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="each text's vector independent of the others, bit for bit (CPU; ignores --batch-size)",
    )
    p.add_argument(
        "--invariant-batch-tokens",
        type=positive_int,
        default=INVARIANT_BATCH_TOKENS,
        help=f"padded tokens per batch with --batch-invariant (default {INVARIANT_BATCH_TOKENS})",
    )
    p.add_argument("--output", help="write a .npy file instead of JSON on stdout")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=cmd_embed)


# ---------------------------------------------------------------------------------------------------
# convert


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


# ---------------------------------------------------------------------------------------------------
# embed-corpus


def cmd_embed_corpus(args: argparse.Namespace) -> int:
    from embgemma_jax.corpus import shards
    from embgemma_jax.corpus.job import embed_corpus
    from embgemma_jax.corpus.progress import progress_name
    from embgemma_jax.corpus.readers import check_decompressor
    from embgemma_jax.corpus.sources import Corpus
    from embgemma_jax.sharding import initialize_distributed, make_mesh

    distributed = {
        "--coordinator-address": args.coordinator_address,
        "--num-processes": args.num_processes,
        "--process-id": args.process_id,
    }
    given = [k for k, v in distributed.items() if v is not None]
    if given and len(given) != len(distributed):
        missing = [k for k in distributed if k not in given]
        raise UsageError(f"{', '.join(given)} also need {', '.join(missing)} (pass all three, or --distributed)")
    if given and args.process_id >= args.num_processes:
        raise UsageError(f"--process-id must be in [0, {args.num_processes}) for --num-processes {args.num_processes}")
    try:
        shards.check_format(args.format)
    except ValueError as e:
        raise UsageError(f"--format {args.format}: {e}") from None
    # The inputs and the output are checked before anything starts: every file's name, format and size, the
    # decompressors, and the first parquet file's columns (each process checks all of its own when it starts).
    corpus = Corpus(args.input, text_field=args.text_field, id_field=args.id_field)
    for f in corpus.files:
        check_decompressor(f.url, f.compression)
    next((f for f in corpus.files if f.format == "parquet" and f.size > 0), corpus.files[0]).check()
    store = shards.prepare_output_dir(args.output)

    if args.distributed or given:
        initialize_distributed(*distributed.values())
    import jax

    with shards.exclusive_output(store, jax.process_index()):
        pass  # another run writing there is reported now, not after the model has loaded
    model = load_model(args, mesh=make_mesh(), fsdp=args.fsdp)
    manifest = embed_corpus(
        model,
        args.input,
        store,
        text_field=args.text_field,
        id_field=args.id_field,
        prompt_name=args.prompt_name or None,
        prompt=args.prompt,
        truncate_dim=args.truncate_dim,
        on_error=args.on_error,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        token_budget=args.token_budget,
        output_format=args.format,
        progress=not (args.no_progress or args.quiet),
    )
    if jax.process_index() == 0 and not args.quiet:
        try:
            run = json.loads(store.read(progress_name(0)))
        except (OSError, ValueError):
            run = {}
        rate = ""
        if run.get("documents_per_s") is not None:
            rate = f" ({run['documents_per_s']:.1f} docs/s, {run['tokens_per_s']:.0f} tokens/s)"
        elapsed = f"; this run embedded {run.get('run_documents', 0)} in {run.get('elapsed_s', 0):.1f} s{rate}"
        skipped = f"; {manifest['errors']} malformed records skipped (see {', '.join(manifest['errors_files'])})"
        print(
            f"wrote {manifest['documents']} x {manifest['dim']} embeddings ({args.format}) in "
            f"{len(manifest['shards'])} shards to {store.url}{elapsed if run else ''}"
            f"{skipped if manifest['errors'] else ''}",
            file=sys.stderr,
        )
    return 0


def _add_embed_corpus(sub: argparse._SubParsersAction) -> None:
    """The ``embed-corpus`` subcommand."""
    p = sub.add_parser(
        "embed-corpus",
        help="embed a large corpus (.txt/.jsonl[.gz|.zst]/.parquet files, local or gs://, s3://, hf://) into "
        "resumable shards (multi-device, multi-host)",
        description="Streams the inputs, encodes them data-parallel over all local devices, writes shards (npy or "
        "parquet) with a manifest, locally or to an object store. Rerun the same command to resume an interrupted "
        "run (the inputs must be unchanged). A run owns its output: a second run on it stops with an error naming "
        "the first. Read the result with embgemma_jax.read_embeddings(OUTPUT), or, with --format parquet, with "
        "any Parquet reader (OUTPUT/shards/*.parquet).",
    )
    add_model_options(p)
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH_OR_GLOB",
        help="input files: local paths or URLs (gs://, s3://, hf://datasets/..., memory://), globs allowed "
        "(quote them); .txt (one text per line), .jsonl/.ndjson (either optionally .gz or .zst), .parquet. "
        "Order: the patterns as given, each one's files sorted by path; a file named twice is an error",
    )
    p.add_argument(
        "--output",
        required=True,
        help="output directory or URL (gs://bucket/dir, s3://...; created; an unfinished run there is resumed)",
    )
    p.add_argument(
        "--format",
        default="npy",
        choices=["npy", "parquet"],
        help="shard format: npy (default; .npy + .ids.json per shard, no extra packages, memory-mappable) or "
        "parquet (id and embedding columns, for pandas, polars, DuckDB, datasets; needs pyarrow)",
    )
    p.add_argument("--text-field", default="text", help="field/column with the text (jsonl, parquet)")
    p.add_argument(
        "--id-field",
        default=None,
        help="field/column with the id (default: line number for txt/jsonl, row index for parquet; with several "
        "input files, the string FILE:LINE)",
    )
    p.add_argument("--prompt-name", default="document", help="prompt from the model's table ('' for none)")
    p.add_argument("--prompt", default=None, help="explicit prompt string (wins over --prompt-name)")
    p.add_argument("--truncate-dim", type=positive_int, default=None, help="Matryoshka dimension (768, 512, 256, 128)")
    p.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="malformed records: stop with file:line (raise) or log to errors-*.jsonl and go on (skip)",
    )
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="input records per shard")
    _add_batching_options(p)
    p.add_argument("--fsdp", action="store_true", help="split parameters over the local devices instead of replicating")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (the closing summary line is still printed)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line (errors only)")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (TPU pod slices, SLURM, ...)",
    )
    g.add_argument("--coordinator-address", default=None, type=non_empty, help="host:port of process 0")
    g.add_argument("--num-processes", type=positive_int, default=None, help="number of processes")
    g.add_argument("--process-id", type=non_negative_int, default=None, help="index of this process")
    p.set_defaults(func=cmd_embed_corpus)


# ---------------------------------------------------------------------------------------------------
# serve


SERVE_LIMITS = ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size", "max_body_bytes")


def cmd_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key if args.api_key is not None else os.environ.get("EMBGEMMA_API_KEY")
    try:
        from embgemma_jax.server import serve
    except ImportError as e:
        raise UsageError(f"serve needs the server's dependencies: {e} (pip install 'embgemma-jax[serve]')") from e
    limits = {k: getattr(args, k) for k in SERVE_LIMITS if getattr(args, k) is not None}  # else the server's
    invariant = resolve_batch_invariant(args.batch_invariant, args.invariant_batch_tokens)
    model = load_model(args, batch_invariant=invariant, invariant_batch_tokens=args.invariant_batch_tokens)
    return serve(
        model,
        host=args.host,
        port=args.port,
        api_key=api_key or None,
        model_name=args.model_name if args.model_name is not None else args.model,
        warmup=args.warmup,
        **limits,
    )


def resolve_batch_invariant(choice: str, tokens: int) -> bool:
    """``--batch-invariant``: "on" (a usage error where the mode is not available), "off", or "auto" (serve's
    default): on where available, the CPU backend, so a coalesced request gets exactly the bits ``encode``
    of its own texts gives with a batch-invariant model. Checked before the model loads."""
    from embgemma_jax.engine import check_batch_invariant

    if choice == "off":
        return False
    try:
        check_batch_invariant(tokens)
    except ValueError as e:
        if choice == "on":
            raise UsageError(f"--batch-invariant: {e}") from e
        return False
    return True


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve embeddings over HTTP (OpenAI- and TEI-compatible; needs the serve extra)",
        description="Serves the model over HTTP until SIGTERM or Ctrl-C (which drain the requests in flight). "
        "Routes, limits and errors: see embgemma_jax.server. Limits left out take the server's defaults.",
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", type=non_empty, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", default=8080, type=port, help="TCP port (default 8080; 0: any free port, logged)")
    p.add_argument(
        "--warmup",
        action="store_true",
        help="compile every batch shape before listening (with the compilation cache, later starts load them)",
    )
    p.add_argument(
        "--batch-invariant",
        choices=("auto", "on", "off"),
        default="auto",
        help="each text's vector independent of the requests it is coalesced with, bit for bit (the same as "
        "EmbeddingGemma.from_pretrained(..., batch_invariant=True).encode gives); auto (default): on where "
        "available (the CPU backend); device batches then hold --invariant-batch-tokens padded tokens",
    )
    p.add_argument(
        "--invariant-batch-tokens",
        type=positive_int,
        default=INVARIANT_BATCH_TOKENS,
        help=f"padded tokens per device batch in batch-invariant mode (default {INVARIANT_BATCH_TOKENS}; "
        "fewer: lower latency for a lone request)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=None,
        help="padded tokens per device batch (batch-invariant: tokens taken from the queue per encode call)",
    )
    p.add_argument(
        "--max-concurrent-requests", type=positive_int, default=None, help="requests admitted at once; more get 429"
    )
    p.add_argument("--max-client-batch-size", type=positive_int, default=None, help="inputs per request; more get 413")
    p.add_argument("--max-body-bytes", type=positive_int, default=None, help="larger request bodies get 413")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $EMBGEMMA_API_KEY; "
        "no authentication if unset or empty)",
    )
    p.add_argument("--model-name", default=None, type=non_empty, help="model id clients send (default: --model)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------------------------------
# parity


def _read_texts(path: str) -> list[str]:
    from embgemma_jax.corpus.readers import read_text_lines

    texts = [line for line in read_text_lines(path, what="texts file") if line.strip()]
    if not texts:
        raise UsageError(f"--texts {path} holds no non-empty lines")
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
    if args.json:
        _check_file_output(args.json, "--json", Path(args.json).suffix or ".json")
    if args.plot:
        _check_file_output(args.plot, "--plot", Path(args.plot).suffix or ".png")
    report = parity_report(
        args.model,
        texts,
        dtype=args.dtype,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
        reference=False if args.no_reference else None,
        progress=True,
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
    p.add_argument("--model", required=True, type=non_empty, help="Hub id or local checkpoint directory")
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


# ---------------------------------------------------------------------------------------------------

# One entry per subcommand: name -> function that adds its parser.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "embed": _add_embed,
    "convert": _add_convert,
    "embed-corpus": _add_embed_corpus,
    "serve": _add_serve,
    "parity": _add_parity,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embgemma-jax", description="EmbeddingGemma in JAX")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from embgemma_jax.errors import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, TypeError, OSError, MemoryError) as e:
        print(f"error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
