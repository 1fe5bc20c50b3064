"""Evaluation hooks: an MTEB 2.x encoder adapter and a small local retrieval evaluator.

:class:`MTEBEncoder` implements MTEB's ``EncoderProtocol`` so ``mteb.evaluate(MTEBEncoder(model), tasks)``
runs our JAX model. Prompts are chosen exactly as MTEB's ``SentenceTransformerEncoderWrapper`` chooses
them for a sentence-transformers model with the same prompt table: the first of
``{task name}-{prompt type}``, ``{task name}``, ``{task type}-{prompt type}``, ``{task type}``,
``{prompt type}`` that the table holds is passed as the prompt, to ``encode_query`` for queries,
``encode_document`` for documents and ``encode`` otherwise (so a query with no match still gets the
"query" prompt, as in sentence-transformers). mteb itself is only imported for the model metadata.

:func:`evaluate_retrieval` scores a model on local queries / corpus / relevance judgments (BEIR files:
``queries.jsonl``, ``corpus.jsonl``, ``qrels.tsv``) with NDCG@k and recall@k. Metric conventions follow
trec_eval / pytrec_eval (what MTEB and BEIR report): linear gain (the judged relevance), log2(rank + 1)
discount, ideal DCG over all judged relevant documents; queries with no positively judged document are
skipped; equal scores keep corpus order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embgemma_jax.pooling import normalize_rows

if TYPE_CHECKING:
    from embgemma_jax.encode import EmbeddingGemma


# ---------------------------------------------------------------------------------------------------
# Metrics


def _positive(qrels: Mapping[str, float]) -> dict[str, float]:
    return {d: float(r) for d, r in qrels.items() if r > 0}


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def dcg_at_k(gains: Sequence[float], k: int) -> float:
    """sum over the first k ranks r = 1.. of gain_r / log2(r + 1)."""
    _check_k(k)
    return float(sum(g / math.log2(r + 2) for r, g in enumerate(list(gains)[:k])))


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int = 10) -> float:
    """NDCG@k of one ranked list of document ids against judged relevances (doc id -> relevance).

    Unjudged documents and non-positive judgments gain 0. Raises if no document is judged relevant.
    """
    rel = _positive(qrels)
    if not rel:
        raise ValueError("NDCG is undefined for a query with no relevant document")
    ideal = dcg_at_k(sorted(rel.values(), reverse=True), k)
    return dcg_at_k([rel.get(d, 0.0) for d in ranking], k) / ideal


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int = 10) -> float:
    """Fraction of the relevant documents (relevance > 0) found in the first k ranks."""
    _check_k(k)
    rel = _positive(qrels)
    if not rel:
        raise ValueError("recall is undefined for a query with no relevant document")
    return len(set(ranking[:k]) & set(rel)) / len(rel)


def rank(scores: np.ndarray, doc_ids: Sequence[str], top_k: int) -> list[list[str]]:
    """Top-k document ids per query from a [Q, N] score matrix, best first; ties keep corpus order."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(doc_ids):
        raise ValueError(f"scores must be [queries, {len(doc_ids)}], got shape {scores.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return [[doc_ids[j] for j in row] for row in order]


# ---------------------------------------------------------------------------------------------------
# Files


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _row_id(row: dict[str, Any], path: Path, n: int) -> str:
    for key in ("_id", "id"):
        if key in row:
            return str(row[key])
    raise ValueError(f"{path}:{n}: missing '_id' (or 'id') field")


def _row_text(row: dict[str, Any], key: str, path: Path, n: int, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{path}:{n}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def load_queries(path: str | Path) -> dict[str, str]:
    """BEIR ``queries.jsonl``: one ``{"_id": ..., "text": ...}`` per line -> id -> text."""
    path = Path(path)
    out: dict[str, str] = {}
    for n, row in _read_jsonl(path):
        qid = _row_id(row, path, n)
        if qid in out:
            raise ValueError(f"{path}:{n}: duplicate query id {qid!r}")
        out[qid] = _row_text(row, "text", path, n)  # type: ignore[assignment]
    if not out:
        raise ValueError(f"{path} holds no queries")
    return out


def load_corpus(path: str | Path) -> dict[str, tuple[str | None, str]]:
    """BEIR ``corpus.jsonl``: ``{"_id", "text", "title"?}`` per line -> id -> (title or None, text)."""
    path = Path(path)
    out: dict[str, tuple[str | None, str]] = {}
    for n, row in _read_jsonl(path):
        did = _row_id(row, path, n)
        if did in out:
            raise ValueError(f"{path}:{n}: duplicate document id {did!r}")
        title = _row_text(row, "title", path, n, required=False)
        out[did] = (title or None, _row_text(row, "text", path, n))  # type: ignore[assignment]
    if not out:
        raise ValueError(f"{path} holds no documents")
    return out


def load_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    """Relevance judgments: BEIR ``qrels.tsv`` (``query-id corpus-id score``, optional header) or TREC
    qrels (``query-id 0 corpus-id score``) -> query id -> doc id -> relevance."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    out: dict[str, dict[str, float]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (3, 4):
            raise ValueError(f"{path}:{n}: expected 3 (BEIR) or 4 (TREC) columns, got {len(parts)}")
        qid, did, score = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[2], parts[3])
        try:
            rel = float(score)
        except ValueError:
            if n == 1:
                continue  # header line
            raise ValueError(f"{path}:{n}: relevance {score!r} is not a number") from None
        out.setdefault(qid, {})[did] = rel
    if not out:
        raise ValueError(f"{path} holds no judgments")
    return out


# ---------------------------------------------------------------------------------------------------
# Retrieval evaluation


def evaluate_retrieval(
    model: EmbeddingGemma,
    queries: Mapping[str, str],
    corpus: Mapping[str, str | tuple[str | None, str]],
    qrels: Mapping[str, Mapping[str, float]],
    *,
    k_values: Sequence[int] = (1, 5, 10, 100),
    batch_size: int = 32,
    truncate_dim: int | None = None,
    **encode_kwargs: Any,
) -> dict[str, Any]:
    """Dense retrieval with the model's query/document prompts, scored with NDCG@k and recall@k.

    Queries go through ``encode_query``; documents through ``encode_document`` (with their titles when
    the corpus has any, as ``title: {title} | text: ``). Scores are cosine similarities.

    Args:
      model: the model.
      queries: query id -> text.
      corpus: doc id -> text, or -> (title or None, text).
      qrels: query id -> doc id -> relevance (> 0 is relevant).
      k_values: cut-offs.
      batch_size, truncate_dim, encode_kwargs: passed to the encode calls (e.g. ``pooling=...``).

    Returns:
      ``{"ndcg_at_10": ..., "recall_at_10": ..., ..., "n_queries": ..., "skipped_queries": [...]}``
      (metrics averaged over the evaluated queries).
    """
    for k in k_values:
        _check_k(k)
    if not queries or not corpus:
        raise ValueError("need at least one query and one document")
    unknown = sorted(set(qrels) - set(queries))
    if unknown:
        raise ValueError(f"qrels mention query ids that are not in queries: {unknown[:5]}")
    doc_ids = list(corpus)
    titles: list[str | None] = []
    texts: list[str] = []
    for d in doc_ids:
        v = corpus[d]
        title, text = v if isinstance(v, tuple) else (None, v)
        titles.append(title)
        texts.append(text)
    evaluated = [q for q in queries if _positive(qrels.get(q, {}))]
    skipped = [q for q in queries if q not in set(evaluated)]
    if not evaluated:
        raise ValueError("no query has a relevant document in qrels; nothing to evaluate")

    kw = dict(batch_size=batch_size, truncate_dim=truncate_dim, **encode_kwargs)
    q_emb = model.encode_query([queries[q] for q in evaluated], **kw)
    if any(t is not None for t in titles):
        d_emb = model.encode_document(texts, titles=titles, **kw)
    else:
        d_emb = model.encode_document(texts, **kw)
    scores = model.similarity(q_emb, d_emb)
    rankings = rank(scores, doc_ids, max(k_values))

    result: dict[str, Any] = {}
    pairs = list(zip(evaluated, rankings, strict=True))
    for k in k_values:
        result[f"ndcg_at_{k}"] = float(np.mean([ndcg_at_k(r, qrels[q], k) for q, r in pairs]))
        result[f"recall_at_{k}"] = float(np.mean([recall_at_k(r, qrels[q], k) for q, r in pairs]))
    result["n_queries"] = len(evaluated)
    result["n_documents"] = len(doc_ids)
    result["skipped_queries"] = skipped
    return result


def evaluate_retrieval_files(
    model: EmbeddingGemma, queries: str | Path, corpus: str | Path, qrels: str | Path, **kwargs: Any
) -> dict[str, Any]:
    """:func:`evaluate_retrieval` over BEIR-style files (queries.jsonl, corpus.jsonl, qrels.tsv)."""
    return evaluate_retrieval(model, load_queries(queries), load_corpus(corpus), load_qrels(qrels), **kwargs)


# ---------------------------------------------------------------------------------------------------
# MTEB adapter


def mteb_prompt_name(
    prompts: Mapping[str, str] | None, task_name: str | None, task_type: str | None, prompt_type: str | None
) -> str | None:
    """The prompt name MTEB picks for a task (``mteb.models.abs_encoder.get_prompt_name``): the first of
    ``{task}-{prompt_type}``, ``{task}``, ``{type}-{prompt_type}``, ``{type}``, ``{prompt_type}`` present."""
    if not prompts:
        return None
    candidates = []
    if task_name and prompt_type:
        candidates.append(f"{task_name}-{prompt_type}")
    if task_name:
        candidates.append(task_name)
    if task_type and prompt_type:
        candidates.append(f"{task_type}-{prompt_type}")
    if task_type:
        candidates.append(task_type)
    if prompt_type:
        candidates.append(prompt_type)
    return next((c for c in candidates if c in prompts), None)


def _prompt_type_value(prompt_type: Any) -> str | None:
    if prompt_type is None:
        return None
    value = getattr(prompt_type, "value", prompt_type)
    if value not in ("query", "document"):
        raise ValueError(f"unknown prompt type {prompt_type!r}; expected 'query', 'document' or None")
    return value


class MTEBEncoder:
    """Our model behind MTEB 2.x's encoder protocol: ``mteb.evaluate(MTEBEncoder(model), tasks)``.

    Args:
      model: the JAX model.
      model_prompts: prompt table to use instead of the checkpoint's (as the sentence-transformers
        wrapper's ``model_prompts``).
      name, revision: reported in MTEB's results (default: the checkpoint directory name).
      **encode_kwargs: fixed keyword arguments for every encode call (``truncate_dim``, ``pooling``, ...).
    """

    def __init__(
        self,
        model: EmbeddingGemma,
        *,
        model_prompts: Mapping[str, str] | None = None,
        name: str | None = None,
        revision: str | None = None,
        **encode_kwargs: Any,
    ) -> None:
        self.model = model
        self.model_prompts = dict(model_prompts) if model_prompts else dict(model.prompts)
        self.name = name or f"embgemma_jax/{Path(str(model.source)).name}"
        self.revision = revision or "local"
        self.encode_kwargs = encode_kwargs

    def get_prompt_name(self, task_metadata: Any, prompt_type: Any = None) -> str | None:
        return mteb_prompt_name(
            self.model_prompts,
            getattr(task_metadata, "name", None),
            getattr(task_metadata, "type", None),
            _prompt_type_value(prompt_type),
        )

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embeds MTEB's batches (dicts with a "text" list) or a plain list of str. Returns [N, E] float32."""
        if isinstance(inputs, str):
            raise TypeError("inputs must be MTEB batches or a sequence of str, not a single str")
        if isinstance(inputs, Sequence) and all(isinstance(x, str) for x in inputs):
            texts = list(inputs)
        else:
            texts = []
            for batch in inputs:
                if not isinstance(batch, Mapping) or "text" not in batch:
                    raise TypeError(
                        f"expected MTEB text batches (mappings with a 'text' key), got {type(batch).__name__}"
                    )
                texts.extend(batch["text"])
        name = self.get_prompt_name(task_metadata, prompt_type)
        prompt = self.model_prompts[name] if name is not None else None
        kw = dict(self.encode_kwargs)
        if "batch_size" in kwargs:
            kw["batch_size"] = int(kwargs["batch_size"])
        if "show_progress_bar" in kwargs:
            kw["show_progress_bar"] = bool(kwargs["show_progress_bar"])
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        ptype = _prompt_type_value(prompt_type)
        if prompt is None and ptype in ("query", "document"):
            # encode_query / encode_document would fall back to the model's table: resolve the prompt from this
            # encoder's table here instead ("" for none), so the shared model is never modified
            prompt = self.model_prompts.get(ptype, "")
        if ptype == "query":
            return self.model.encode_query(texts, prompt=prompt, **kw)
        if ptype == "document":
            return self.model.encode_document(texts, prompt=prompt, **kw)
        return self.model.encode(texts, prompt=prompt, **kw)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity matrix (the model's similarity function)."""
        return self.model.similarity(np.asarray(embeddings1), np.asarray(embeddings2))

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity of corresponding rows."""
        a = np.atleast_2d(np.asarray(embeddings1, dtype=np.float32))
        b = np.atleast_2d(np.asarray(embeddings2, dtype=np.float32))
        if a.shape != b.shape:
            raise ValueError(f"pairwise similarity needs equal shapes, got {a.shape} and {b.shape}")
        return np.sum(normalize_rows(a) * normalize_rows(b), axis=-1)

    @property
    def mteb_model_meta(self) -> Any:
        """MTEB's ``ModelMeta`` for the results (needs mteb installed)."""
        from mteb.models import ModelMeta

        cfg = self.model.config
        return ModelMeta.create_empty(
            overwrites=dict(
                name=self.name,
                revision=self.revision,
                n_parameters=cfg.num_params(),
                embed_dim=cfg.embedding_dim,
                max_tokens=cfg.max_seq_length,
                similarity_fn_name="cosine",
                framework=["JAX"] if "JAX" in _mteb_frameworks() else [],
                open_weights=True,
            )
        )


def _mteb_frameworks() -> tuple[str, ...]:
    try:
        import typing

        from mteb.models.model_meta import FRAMEWORKS  # type: ignore[attr-defined]

        return tuple(typing.get_args(FRAMEWORKS))
    except Exception:
        return ()
