"""Layer-by-layer parity report: our JAX model against the float64 oracle and the PyTorch reference.

For a set of texts the report runs

  * ``jax``: our model (``EmbeddingGemma.inspect`` for every intermediate, plus ``encode`` for the
    production path with its bucketing and batching), in the requested dtype;
  * ``f64``: the NumPy float64 oracle (:mod:`embgemma_jax.oracle`) on the float32 checkpoint weights;
  * ``torch`` (when torch, transformers and sentence-transformers import): transformers' hidden states
    and sentence-transformers' modules run on *our* token ids (so model arithmetic and tokenization
    are judged separately), and ``SentenceTransformer.encode`` end to end on its own tokenization;

and compares them stage by stage. For every stage and pair it reports the max abs error over real
tokens and the relative error ``max_abs / scale``, where ``scale`` is the largest |value| of the float64
oracle at that stage (the residual stream grows to ~1e5 in late layers of the real model, so absolute
errors of different layers are not comparable, relative ones are). Final embeddings also get the
minimum cosine similarity over texts, and the tokenizers the fraction of texts with identical ids.

Use :func:`parity_report` from Python, or ``embgemma-jax parity`` on the command line.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PAIRS = ("jax_vs_f64", "torch_vs_f64", "jax_vs_torch")

_LONG = (
    "EmbeddingGemma maps text to a single vector. The encoder is a stack of bidirectional transformer layers; "
    "five of every six attend within a sliding window, the sixth attends to the whole sequence. "
)
DEFAULT_TEXTS: tuple[str, ...] = (
    "Which planet is known as the Red Planet?",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
    "Numbers 0123456789 and émigré café naïve Ünïcödé 東京 日本語 😀 🚀",
    "a",
    _LONG * 24,  # ~1000 tokens on the real tokenizer: longer than the sliding window (513 keys)
)


def _stats(a: np.ndarray, b: np.ndarray, scale: float) -> dict[str, float]:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    return {"max_abs": max_abs, "rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-300)


def _reference_available() -> bool:
    try:
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_side(
    source: Path, texts: Sequence[str], prompt: str, ids: np.ndarray, mask: np.ndarray, num_layers: int
) -> dict[str, Any]:
    """Reference outputs: hidden states and module outputs on our ids; encode() on its own tokenization."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(source), device="cpu")
    st.eval()
    ref = st.preprocess(list(texts), prompt=prompt or None)
    ref_mask = ref["attention_mask"].numpy().astype(bool)
    ref_ids = [row[m].tolist() for row, m in zip(ref["input_ids"].numpy(), ref_mask, strict=True)]
    with torch.no_grad():
        t_ids = torch.as_tensor(ids, dtype=torch.long)
        t_mask = torch.as_tensor(mask, dtype=torch.long)
        hidden = st[0].auto_model(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True).hidden_states
        feats: dict[str, Any] = {"input_ids": t_ids, "attention_mask": t_mask, "modality": "text"}
        if "prompt_length" in ref:
            feats["prompt_length"] = ref["prompt_length"]
        module_outputs = []
        for module in st:
            feats = module(feats)
            if "sentence_embedding" in feats:
                module_outputs.append(feats["sentence_embedding"].double().numpy())
        encoded = st.encode(list(texts), prompt=prompt or None, convert_to_numpy=True, batch_size=8)
    if len(hidden) != num_layers + 1:
        raise RuntimeError(f"transformers returned {len(hidden)} hidden states; expected {num_layers + 1}")
    return {
        "ids": ref_ids,
        "hidden": [h.double().numpy() for h in hidden],
        "modules": module_outputs,  # pooled, dense..., normalized
        "encode": np.asarray(encoded, np.float64),
    }


def parity_report(
    model: str | Path,
    texts: Sequence[str] | None = None,
    *,
    dtype: str = "float32",
    prompt_name: str | None = None,
    prompt: str | None = None,
    reference: bool | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Compares our JAX model with the float64 oracle and (if available) the PyTorch reference.

    Args:
      model: a Hub id or a local checkpoint directory. The PyTorch reference needs the
        sentence-transformers layout (a converted directory is compared with the oracle only).
      texts: texts to run (default :data:`DEFAULT_TEXTS`, which includes one longer than the window).
      dtype: JAX compute dtype, "float32" or "bfloat16" (the oracle and the reference stay f64/f32).
      prompt_name, prompt: the prompt prepended to every text, as in ``encode``.
      reference: compare with PyTorch: True requires it, False skips it, None uses it when importable.
      batch_size: batch size of the ``encode`` run.
      progress: print each step and its time to stderr (the float64 oracle on the real model takes minutes).

    Returns:
      A JSON-serializable dict: ``stages`` (one entry per stage with ``scale`` and per-pair
      ``max_abs``/``rel``), ``embeddings`` (per-pair ``max_abs``/``min_cosine`` of the final vectors),
      ``tokens`` (agreement with the reference tokenizer) and run metadata.
    """
    import jax

    from embgemma_jax.checkpoint.load import load_checkpoint
    from embgemma_jax.config import FULL
    from embgemma_jax.encode import EmbeddingGemma
    from embgemma_jax.prompts import resolve_prompt
    from embgemma_jax.research.oracle import oracle_forward

    texts = list(DEFAULT_TEXTS if texts is None else texts)
    if not texts:
        raise ValueError("no texts to compare")
    use_torch = _reference_available() if reference is None else bool(reference)
    if use_torch and not _reference_available():
        raise ValueError("reference=True needs torch, transformers and sentence-transformers installed")

    started = time.perf_counter()

    def step(what: str) -> None:
        if progress:
            print(f"parity: {what} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)

    step("loading the model")
    jmodel = EmbeddingGemma.from_pretrained(model, dtype=dtype)
    cfg = jmodel.config
    step("loading float32 weights for the float64 oracle")
    ckpt = load_checkpoint(jmodel.source, dtype=np.float32)  # float32 weights for the oracle
    if use_torch and not (Path(jmodel.source) / "modules.json").is_file():
        if reference:
            raise ValueError(f"{jmodel.source} is not a sentence-transformers directory; the reference cannot load it")
        use_torch = False
    p = resolve_prompt(jmodel.prompts, prompt_name, prompt, jmodel.default_prompt_name) or ""

    step(f"JAX: intermediates and encode of {len(texts)} texts")
    it = jmodel.inspect(texts, prompt=p, mark_padding=False)
    encoded = jmodel.encode(texts, prompt=p, batch_size=batch_size)
    ids, mask = it.input_ids, it.attention_mask.astype(bool)
    step(f"float64 oracle on {ids.shape[0]} x {ids.shape[1]} tokens")
    oracle = oracle_forward(ckpt.params, cfg, ids, it.attention_mask, it.pool_mask)
    if use_torch:
        step("PyTorch reference (transformers + sentence-transformers)")
    torch_out = _torch_side(jmodel.source, texts, p, ids, it.attention_mask, cfg.num_layers) if use_torch else None
    step("comparing")

    n = cfg.num_layers
    stages: list[dict[str, Any]] = []

    def add(
        name: str, jax_v: np.ndarray, f64_v: np.ndarray, torch_v: np.ndarray | None, tokens: bool, layer: int = -1
    ) -> None:
        sel = (lambda x: np.asarray(x)[mask]) if tokens else (lambda x: np.asarray(x))
        j, o = sel(jax_v), sel(f64_v)
        scale = float(np.abs(o).max()) if o.size else 0.0
        kind = ("full" if cfg.layer_types[layer] == FULL else "sliding") if layer >= 0 else None
        entry: dict[str, Any] = {"name": name, "kind": kind, "scale": scale, "jax_vs_f64": _stats(j, o, scale)}
        if torch_v is not None:
            t = sel(torch_v)
            entry["torch_vs_f64"] = _stats(t, o, scale)
            entry["jax_vs_torch"] = _stats(j, t, scale)
        stages.append(entry)

    th = torch_out["hidden"] if torch_out else None
    tm = torch_out["modules"] if torch_out else None
    add("embed", it.embeddings, oracle.token_embeddings, th[0] if th else None, True)
    for i in range(n):
        add(f"L{i}.attn", it.after_attention[i], oracle.after_attention[i], None, True, i)
        last = i == n - 1
        add(f"L{i}.out", it.layer_outputs[i], oracle.layer_outputs[i], th[i + 1] if th and not last else None, True, i)
    add("final_norm", it.final_normed, oracle.final_normed, th[n] if th else None, True)
    add("pooled", it.pooled, oracle.pooled, tm[0] if tm else None, False)
    for j, (dj, oj) in enumerate(zip(it.dense_outputs, oracle.dense_outputs, strict=True)):
        add(f"dense_{j}", dj, oj, tm[1 + j] if tm else None, False)
    add("embedding", it.embedding, oracle.embeddings, tm[-1] if tm else None, False)

    finals = {"jax": np.asarray(it.embedding), "jax_encode": encoded, "f64": oracle.embeddings}
    if torch_out:
        finals["torch_encode"] = torch_out["encode"]
    emb_pairs = [("jax", "f64"), ("jax_encode", "f64")]
    if torch_out:
        emb_pairs += [("torch_encode", "f64"), ("jax_encode", "torch_encode")]
    embeddings = {}
    for a, b in emb_pairs:
        cos = _cosines(finals[a], finals[b])
        embeddings[f"{a}_vs_{b}"] = {
            "max_abs": float(np.abs(finals[a] - finals[b]).max()),
            "min_cosine": float(cos.min()),
        }

    ours = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
    tokens: dict[str, Any] = {"n_texts": len(texts), "n_tokens": int(mask.sum()), "max_len": int(ids.shape[1])}
    if torch_out:
        same = [a == b for a, b in zip(ours, torch_out["ids"], strict=True)]
        tokens["agreement"] = sum(same) / len(same)
        tokens["mismatched_texts"] = [i for i, s in enumerate(same) if not s]

    devices = jax.devices()
    return {
        "model": str(model),
        "dtype": jmodel.dtype.name,
        "backend": jax.default_backend(),
        "device": devices[0].device_kind if devices else "?",
        "prompt": p,
        "num_layers": n,
        "layer_types": list(cfg.layer_types),
        "reference": "torch" if torch_out else None,
        "tokens": tokens,
        "stages": stages,
        "embeddings": embeddings,
    }


# ---------------------------------------------------------------------------------------------------
# Tolerances, table, plot


def check_tolerances(
    report: dict[str, Any],
    *,
    max_abs_tol: float | None = None,
    max_rel_tol: float | None = None,
    min_cosine: float | None = None,
    min_token_agreement: float | None = None,
) -> list[str]:
    """Failed checks, as messages (empty when all pass).

    Args:
      max_abs_tol: max abs error of our final embeddings (``inspect`` and ``encode``) against the oracle
        and the reference.
      max_rel_tol: max relative error of our model against the oracle (and the reference) at every stage.
      min_cosine: minimum cosine of our final embeddings against the oracle and the reference.
      min_token_agreement: minimum fraction of texts whose ids equal the reference tokenizer's.
    """
    for name, value, lo, hi in (
        ("max_abs_tol", max_abs_tol, 0.0, math.inf),
        ("max_rel_tol", max_rel_tol, 0.0, math.inf),
        ("min_cosine", min_cosine, -1.0, 1.0),
        ("min_token_agreement", min_token_agreement, 0.0, 1.0),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")

    failures = []
    ours = [k for k in report["embeddings"] if k.startswith("jax")]
    if max_abs_tol is not None:
        for k in ours:
            v = report["embeddings"][k]["max_abs"]
            if not v <= max_abs_tol:
                failures.append(f"embeddings {k}: max abs error {v:.3g} > {max_abs_tol:g}")
    if min_cosine is not None:
        for k in ours:
            v = report["embeddings"][k]["min_cosine"]
            if not v >= min_cosine:
                failures.append(f"embeddings {k}: min cosine {v:.8f} < {min_cosine:g}")
    if max_rel_tol is not None:
        for st in report["stages"]:
            for pair in ("jax_vs_f64", "jax_vs_torch"):
                if pair in st and not st[pair]["rel"] <= max_rel_tol:
                    rel = st[pair]["rel"]
                    failures.append(f"stage {st['name']} {pair}: relative error {rel:.3g} > {max_rel_tol:g}")
    if min_token_agreement is not None:
        agreement = report["tokens"].get("agreement")
        if agreement is None:
            failures.append("token agreement needs the reference tokenizer (torch/transformers not available)")
        elif agreement < min_token_agreement:
            failures.append(f"token ids agree on {agreement:.3f} of texts < {min_token_agreement:g}")
    return failures


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table."""
    pairs = [p for p in PAIRS if any(p in s for s in report["stages"])]
    lines = [
        f"parity: model={report['model']} dtype={report['dtype']} backend={report['backend']} "
        f"({report['device']}) reference={report['reference'] or 'none (oracle only)'}",
        f"texts={report['tokens']['n_texts']} tokens={report['tokens']['n_tokens']} "
        f"longest={report['tokens']['max_len']} prompt={report['prompt']!r}",
    ]
    if "agreement" in report["tokens"]:
        t = report["tokens"]
        lines.append(
            f"token ids identical to the reference tokenizer on {t['agreement']:.0%} of texts"
            + (f" (mismatched: {t['mismatched_texts']})" if t["mismatched_texts"] else "")
        )
    head = f"{'stage':<12} {'attn':<4} {'scale':>9}" + "".join(f" | {p:^21}" for p in pairs)
    sub = f"{'':<12} {'':<4} {'(f64)':>9}" + "".join(f" | {'max_abs':>10} {'rel':>10}" for _ in pairs)
    lines += ["", head, sub, "-" * len(head)]
    for s in report["stages"]:
        kind = {"full": "full", "sliding": "win"}.get(s.get("kind") or "", "")
        row = f"{s['name']:<12} {kind:<4} {s['scale']:>9.2e}"
        for p in pairs:
            v = s.get(p)
            row += f" | {_fmt(v and v['max_abs']):>10} {_fmt(v and v['rel']):>10}"
        lines.append(row)
    lines += ["", f"{'final embeddings':<28} {'max_abs':>10} {'min_cosine':>13} {'1-min_cosine':>13}"]
    for k, v in report["embeddings"].items():
        lines.append(f"{k:<28} {v['max_abs']:>10.2e} {v['min_cosine']:>13.10f} {1.0 - v['min_cosine']:>13.2e}")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Saves a PNG of the relative error per stage (log scale), one line per compared pair."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install 'embgemma-jax[plot]'") from e
    path = Path(path)
    stages = report["stages"]
    names = [s["name"] for s in stages]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * len(names)), 4.5))
    for i, s in enumerate(stages):
        if s.get("kind") == "full":
            ax.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0)
    positive = [s[p]["rel"] for s in stages for p in PAIRS if p in s and 0 < s[p]["rel"] < math.inf]
    floor = min(positive) / 10 if positive else 1e-12
    for pair, marker in zip(PAIRS, "osd", strict=True):
        pts = [(i, s[pair]["rel"]) for i, s in enumerate(stages) if pair in s and math.isfinite(s[pair]["rel"])]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        line = ax.plot(
            xs, [max(y, floor) for y in ys], marker=marker, markersize=3, linewidth=1, label=pair.replace("_", " ")
        )[0]
        exact = [x for x, y in pts if y == 0]
        if exact:  # identical values: drawn on the floor with a hollow marker
            ax.plot(
                exact,
                [floor] * len(exact),
                marker="v",
                linestyle="none",
                markerfacecolor="none",
                color=line.get_color(),
                label=f"{pair.replace('_', ' ')}: exactly 0",
            )
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("max abs error / max |f64 activation|")
    ax.set_title(
        f"{Path(str(report['model'])).name}  {report['dtype']}  {report['backend']}  (shaded: full-attention layers)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x
