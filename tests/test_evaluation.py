"""The retrieval evaluator (metrics checked by hand and against pytrec_eval) and the MTEB adapter
(against MTEB's own sentence-transformers wrapper on a local task)."""

import json
import math
import types
import typing

import numpy as np
import pytest

from embgemma_jax.research.evaluation import (
    MTEBEncoder,
    evaluate_retrieval,
    evaluate_retrieval_files,
    load_qrels,
    mteb_prompt_name,
    ndcg_at_k,
    rank,
    recall_at_k,
)

QUERIES = {
    "q1": "Which planet is known as the Red Planet?",
    "q2": "What does a function return?",
    "q3": "Where is the biggest city of Japan?",
    "q4": "no judged relevant document",
}
CORPUS = {
    "d1": ("Mars", "Mars, known for its reddish appearance, is often referred to as the Red Planet."),
    "d2": (None, "A function returns a value to its caller."),
    "d3": ("Tokyo", "Tokyo is the capital of Japan and its largest city."),
    "d4": ("Venus", "Venus is the hottest planet of the solar system."),
    "d5": (None, "Jupiter is a gas giant."),
}
QRELS = {"q1": {"d1": 2, "d4": 1}, "q2": {"d2": 1}, "q3": {"d3": 1, "d5": 0}, "q4": {"d5": 0}}


def test_ndcg_and_recall_by_hand():
    qrels = {"a": 3, "b": 2, "c": 0, "z": 1}  # z is never retrieved
    ranking = ["c", "b", "x", "a"]
    # DCG@4 = 0/log2(2) + 2/log2(3) + 0/log2(4) + 3/log2(5); ideal order 3, 2, 1
    dcg = 2 / math.log2(3) + 3 / math.log2(5)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranking, qrels, 10) == pytest.approx(dcg / idcg, abs=1e-12)
    assert ndcg_at_k(ranking, qrels, 2) == pytest.approx((2 / math.log2(3)) / (3 + 2 / math.log2(3)), abs=1e-12)
    assert ndcg_at_k(["a", "b", "z"], qrels, 3) == pytest.approx(1.0)
    assert recall_at_k(ranking, qrels, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, qrels, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no relevant document"):
        ndcg_at_k(ranking, {"c": 0}, 10)
    with pytest.raises(ValueError, match="k must be a positive int"):
        recall_at_k(ranking, qrels, 0)


def test_rank_breaks_ties_by_corpus_order():
    scores = np.array([[0.5, 0.9, 0.5, 0.1]])
    assert rank(scores, ["a", "b", "c", "d"], 3) == [["b", "a", "c"]]


def test_metrics_agree_with_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(30)]
    qrels, runs = {}, {}
    for q in range(8):
        rel = {d: int(r) for d, r in zip(docs, rng.integers(0, 4, size=30), strict=True) if rng.random() < 0.3}
        rel[docs[q]] = 2
        qrels[f"q{q}"] = rel
        runs[f"q{q}"] = {d: float(s) for d, s in zip(docs, rng.permutation(30), strict=True)}  # no ties
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.5"})
    expected = ev.evaluate(runs)
    for q, run in runs.items():
        ranking = sorted(run, key=run.get, reverse=True)
        assert ndcg_at_k(ranking, qrels[q], 10) == pytest.approx(expected[q]["ndcg_cut_10"], abs=1e-9)
        assert recall_at_k(ranking, qrels[q], 5) == pytest.approx(expected[q]["recall_5"], abs=1e-9)


def _write_beir(tmp_path):
    (tmp_path / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items()), encoding="utf-8"
    )
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": t or "", "text": x}) + "\n" for k, (t, x) in CORPUS.items()),
        encoding="utf-8",
    )
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{r}" for q, rel in QRELS.items() for d, r in rel.items()]
    (tmp_path / "qrels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_evaluate_retrieval_files_matches_st_embeddings(tmp_path, st_model, jax_model):
    """Files -> our evaluator, against the same metrics over sentence-transformers' embeddings."""
    _write_beir(tmp_path)
    got = evaluate_retrieval_files(
        jax_model, tmp_path / "queries.jsonl", tmp_path / "corpus.jsonl", tmp_path / "qrels.tsv", k_values=(1, 3, 10)
    )
    assert got["n_queries"] == 3 and got["skipped_queries"] == ["q4"] and got["n_documents"] == 5

    evaluated = ["q1", "q2", "q3"]
    q = st_model.encode_query([QUERIES[k] for k in evaluated])
    d = np.stack([st_model.encode(x, prompt=f"title: {t or 'none'} | text: ") for t, x in CORPUS.values()])
    rankings = rank(q @ d.T, list(CORPUS), 10)
    for k in (1, 3, 10):
        exp_ndcg = np.mean([ndcg_at_k(r, QRELS[qid], k) for qid, r in zip(evaluated, rankings, strict=True)])
        exp_rec = np.mean([recall_at_k(r, QRELS[qid], k) for qid, r in zip(evaluated, rankings, strict=True)])
        assert got[f"ndcg_at_{k}"] == pytest.approx(exp_ndcg, abs=1e-9)
        assert got[f"recall_at_{k}"] == pytest.approx(exp_rec, abs=1e-9)


def test_file_errors_name_file_and_line(tmp_path, jax_model):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"q\.jsonl:2: field 'text' must be a string"):
        evaluate_retrieval_files(jax_model, bad, bad, bad)
    bad.write_text('{"_id": "q1", "text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"q\.jsonl:2: not valid JSON"):
        evaluate_retrieval_files(jax_model, bad, bad, bad)
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1 d1 1\nq1 d2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"qrels\.tsv:2: expected 3 \(BEIR\) or 4 \(TREC\) columns"):
        load_qrels(qrels)
    qrels.write_text("q1 0 d1 1\nq2 0 d3 2\n", encoding="utf-8")  # TREC format
    assert load_qrels(qrels) == {"q1": {"d1": 1.0}, "q2": {"d3": 2.0}}
    with pytest.raises(ValueError, match="not in queries"):
        evaluate_retrieval(jax_model, {"q1": "x"}, {"d1": "y"}, {"q9": {"d1": 1}})


def test_mteb_prompt_name_matches_mteb():
    mteb_encoder = pytest.importorskip("mteb.models.abs_encoder")
    from mteb.abstasks.task_metadata import TaskType
    from mteb.types import PromptType

    prompts = {
        "query": "Q: ",
        "document": "D: ",
        "Retrieval-query": "RQ: ",
        "STS": "S: ",
        "Classification": "C: ",
        "MyTask": "T: ",
        "MyTask-document": "TD: ",
        "Clustering-document": "CD: ",
    }
    for table in (prompts, {"STS": "s"}, None):
        for task_type in typing.get_args(TaskType):
            for task_name in ("MyTask", "OtherTask"):
                for ptype in (None, PromptType.query, PromptType.document):
                    meta = types.SimpleNamespace(name=task_name, type=task_type)
                    expected = mteb_encoder.get_prompt_name(table, meta, ptype)
                    ours = mteb_prompt_name(table, task_name, task_type, ptype.value if ptype else None)
                    assert ours == expected, (table, task_type, task_name, ptype)


def _local_retrieval_task():
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            type="Retrieval",
            name="EmbgemmaLocalRetrieval",
            main_score="ndcg_at_10",
            description="local test task",
            reference="https://example.org",
            dataset={"path": "NA", "revision": "NA"},
            category="t2t",
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            date=("2024-01-01", "2024-01-02"),
            dialect=["Written"],
            domains=[],
            task_subtypes=[],
            license="cc-by-4.0",
            annotations_creators="derived",
            modalities=["text"],
            sample_creation="found",
            bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": k, "text": v} for k, v in QUERIES.items() if k != "q4"]),
                corpus=Dataset.from_list([{"id": k, "title": t or "", "text": x} for k, (t, x) in CORPUS.items()]),
                relevant_docs={k: {d: int(r) for d, r in v.items()} for k, v in QRELS.items() if k != "q4"},
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


def _record_calls(monkeypatch, model, log):
    """Logs (method, prompt, texts) of the outermost encode/encode_query/encode_document calls."""
    depth = [0]
    for method in ("encode", "encode_query", "encode_document"):
        original = getattr(model, method)

        def spy(*args, _original=original, _method=method, **kwargs):
            if depth[0] == 0:
                texts = args[0] if args else kwargs.get("inputs", kwargs.get("sentences"))
                log.append((_method, kwargs.get("prompt"), list(texts)))
            depth[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(model, method, spy)


def test_mteb_evaluate_matches_sentence_transformers_wrapper(monkeypatch, tmp_path, st_model, jax_model):
    """mteb.evaluate on a local retrieval task: same encode calls (method, prompt, texts) and the same
    retrieval scores as MTEB's own wrapper around the reference model."""
    mteb = pytest.importorskip("mteb")
    ours_log, ref_log = [], []
    _record_calls(monkeypatch, jax_model, ours_log)
    _record_calls(monkeypatch, st_model, ref_log)
    adapter = MTEBEncoder(jax_model)
    kwargs = dict(cache=None, show_progress_bar=False, co2_tracker=False)
    ours = mteb.evaluate(adapter, _local_retrieval_task(), prediction_folder=tmp_path / "ours", **kwargs)
    ref = mteb.evaluate(st_model, _local_retrieval_task(), prediction_folder=tmp_path / "ref", **kwargs)

    assert ours_log and [(m, p, sorted(t)) for m, p, t in ours_log] == [(m, p, sorted(t)) for m, p, t in ref_log]
    assert {p for _, p, _ in ours_log} == {"task: search result | query: ", "title: none | text: "}
    pred_ours = json.loads(next((tmp_path / "ours").glob("*.json")).read_text())
    pred_ref = json.loads(next((tmp_path / "ref").glob("*.json")).read_text())
    scores = lambda p: {(q, d): v for q, ds in p["default"]["test"].items() for d, v in ds.items()}  # noqa: E731
    a, b = scores(pred_ours), scores(pred_ref)
    assert a and a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) < 1e-5
    assert ours.task_results[0].get_score() == pytest.approx(ref.task_results[0].get_score(), abs=1e-6)


def test_mteb_adapter_plain_and_errors(jax_model, st_model):
    adapter = MTEBEncoder(jax_model)
    sts = types.SimpleNamespace(name="STS12", type="STS")
    texts = ["a cat sits", "a dog runs"]
    emb = adapter.encode([{"text": texts}], task_metadata=sts, hf_split="test", hf_subset="default")
    np.testing.assert_allclose(emb, st_model.encode(texts, prompt=st_model.prompts["STS"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(adapter.similarity_pairwise(emb, emb), [1.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown prompt type 'passage'"):
        adapter.encode(texts, task_metadata=sts, hf_split="test", hf_subset="default", prompt_type="passage")
    with pytest.raises(TypeError, match="mappings with a 'text' key"):
        adapter.encode([{"image": [1]}], task_metadata=sts, hf_split="test", hf_subset="default")
