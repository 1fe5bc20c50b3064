"""Command line: ``embgemma-jax {embed,convert,...}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from embgemma_jax.corpus_job import add_embed_corpus_parser
from embgemma_jax.parity import add_parser as add_parity_parser


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
    from embgemma_jax.checkpoint import convert

    out = convert(args.src, args.out, revision=args.revision)
    print(f"converted {args.src} -> {out}", file=sys.stderr)
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a sentence-transformers checkpoint to the embgemma_jax format")
    p.add_argument("src", help="Hub id or local sentence-transformers directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_convert)


# One entry per subcommand: name -> function that adds its parser.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "embed": _add_embed,
    "convert": _add_convert,
    "embed-corpus": add_embed_corpus_parser,
    "parity": add_parity_parser,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embgemma-jax", description="EmbeddingGemma in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from embgemma_jax.config import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
