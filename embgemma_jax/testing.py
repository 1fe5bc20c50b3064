"""Build tiny, random, offline EmbeddingGemma-shaped checkpoints with the reference code.

This module needs the ``test`` extra (torch, transformers, sentence-transformers). It is how our tests,
benchmark smoke runs and users without Hub access get a real sentence-transformers directory: a random
``Gemma3TextModel`` with ``use_bidirectional_attention=True`` wrapped by sentence-transformers' own
Transformer / Pooling / Dense / Normalize modules, with a SentencePiece tokenizer trained locally and
converted by transformers' own converter. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

# The real model's prompt table (config_sentence_transformers.json of google/embeddinggemma-300m).
REAL_PROMPTS: dict[str, str] = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}

# Added (special) tokens of the tiny tokenizer, in the real model's id order where they exist there.
TINY_USER_SYMBOLS = ["<mask>", "[multimodal]", "<unused0>", "<unused1>", "<start_of_turn>", "<end_of_turn>"]


SMALL_CORPUS_FILES = ("textwrap.py", "argparse.py", "json/__init__.py", "functools.py", "pathlib.py", "string.py")


def stdlib_docstrings(files: tuple[str, ...] | None = None) -> list[str]:
    """Docstrings of the Python standard library (real English text that ships with every CPython), in a
    fixed order. ``files`` limits them to those stdlib files; None takes every top-level module."""
    import ast
    import sysconfig
    import warnings

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [stdlib / f for f in files] if files is not None else sorted(stdlib.glob("*.py"))
    docs: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    docs.append(doc.strip())
    return docs


def _training_corpus(full: bool = False) -> list[str]:
    """Lines of stdlib docstrings plus the prompts and a few multilingual lines."""
    lines: list[str] = []
    for doc in stdlib_docstrings(None if full else SMALL_CORPUS_FILES):
        lines.extend(line.strip() for line in doc.splitlines() if line.strip())
    lines += list(REAL_PROMPTS.values())
    lines += [
        "Which planet is known as the Red Planet?",
        "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
        "Numbers 0123456789 and émigré café naïve Ünïcödé 東京 日本語 😀 🚀",
    ]
    return lines


def train_tiny_sentencepiece(out_file: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Trains a Gemma-style SentencePiece BPE model (byte fallback, no dummy prefix, split digits).

    Ids 0..3 are <pad>, <eos>, <bos>, <unk> as in Gemma; TINY_USER_SYMBOLS follow.
    """
    import sentencepiece as spm

    out_file = Path(out_file)
    prefix = out_file.with_suffix("")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus(full=vocab_size > 1000)),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=TINY_USER_SYMBOLS,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    produced = Path(f"{prefix}.model")
    if produced != out_file:
        produced.rename(out_file)
    return out_file


def tiny_gemma3_config(**overrides: Any):
    """A random-init-sized Gemma 3 text config with the real structure: 5 sliding : 1 full layers,
    3 query heads sharing 1 kv head, q/k norms, two RoPE bases, a small sliding window."""
    from transformers import Gemma3TextConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=6,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=256,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        sliding_window=16,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        use_bidirectional_attention=True,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    return Gemma3TextConfig(**kwargs)


def build_tiny_checkpoint(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    max_seq_length: int = 96,
    dense_dim: int = 128,
    vocab_size: int = 512,
    sp_vocab_size: int | None = None,
    weight_scale: float = 1.0,
    prompts: dict[str, str] | None = None,
    extra_added_tokens: tuple[str, ...] = ("<image_soft_token>",),
    **config_overrides: Any,
) -> Path:
    """Writes a sentence-transformers directory shaped exactly like google/embeddinggemma-300m.

    Weights are random (torch.manual_seed(seed)); RMS-norm scales and weights get non-trivial random
    values so every parameter affects the output. ``extra_added_tokens`` are added after the SentencePiece
    vocabulary, so (like the real ``<image_soft_token>``) their ids are outside the embedding table.
    Returns the directory.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers 5.x
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import Gemma3TextModel, GemmaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "_backbone"
    work.mkdir(exist_ok=True)

    train_tiny_sentencepiece(work / "tokenizer.model", vocab_size=sp_vocab_size or vocab_size)
    tokenizer = GemmaTokenizer.from_pretrained(str(work), add_bos_token=True, add_eos_token=True, padding_side="right")
    if extra_added_tokens:
        tokenizer.add_tokens(list(extra_added_tokens), special_tokens=True)

    torch.manual_seed(seed)
    config = tiny_gemma3_config(vocab_size=vocab_size, **config_overrides)
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(weight_scale * 0.05 * torch.randn_like(p) * (20.0 if "embed" in name else 1.0))
    model.save_pretrained(str(work))
    tokenizer.save_pretrained(str(work))

    transformer = Transformer(str(work), max_seq_length=max_seq_length)
    hidden = config.hidden_size
    pooling = Pooling(hidden, pooling_mode="mean", include_prompt=True)
    dense_up = Dense(hidden, dense_dim, bias=False, activation_function=torch.nn.Identity())
    dense_down = Dense(dense_dim, hidden, bias=False, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense_up.linear.weight.copy_(torch.randn_like(dense_up.linear.weight) / hidden**0.5)
        dense_down.linear.weight.copy_(torch.randn_like(dense_down.linear.weight) / dense_dim**0.5)
    st = SentenceTransformer(
        modules=[transformer, pooling, dense_up, dense_down, Normalize()],
        prompts=dict(REAL_PROMPTS if prompts is None else prompts),
        similarity_fn_name="cosine",
        device="cpu",
    )
    st.save(str(out_dir))
    # The Hub checkpoint ships the SentencePiece model next to tokenizer.json; save_pretrained of the
    # converted tokenizer does not, so put it where the real layout has it.
    shutil.copyfile(work / "tokenizer.model", out_dir / "tokenizer.model")
    shutil.rmtree(work)
    return out_dir


def build_full_size_random_checkpoint(out_dir: str | os.PathLike, *, seed: int = 0, sp_vocab_size: int = 8000) -> Path:
    """A random checkpoint with the exact google/embeddinggemma-300m architecture and sizes (307,581,696
    parameters, vocabulary 262144, max_seq_length 2048) and a SentencePiece tokenizer of ``sp_vocab_size``
    pieces trained on the stdlib docstrings. For benchmarks when the real weights are not at hand: speed
    and memory are those of the real model; the embeddings mean nothing."""
    return build_tiny_checkpoint(
        out_dir,
        seed=seed,
        max_seq_length=2048,
        dense_dim=3072,
        vocab_size=262144,
        sp_vocab_size=sp_vocab_size,
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=24,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        max_position_embeddings=2048,
        sliding_window=512,
    )
