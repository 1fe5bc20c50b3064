"""Streaming corpus readers: parts, resume positions, ids, and malformed input."""

import hashlib
import json
import os
import re
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embgemma_jax.corpus.readers import CorpusError, open_corpus, read_text_lines


def _records(corpus, nparts=1):
    """All records, reading part by part with line numbers carried across parts as the job does."""
    out, line = [], 1
    for part in corpus.parts(nparts):
        recs = list(corpus.read(part, first_line=line))
        out += recs
        line += corpus.count(part)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.text(alphabet="ab \t\r\né東", max_size=6), min_size=1, max_size=12),
    trailing_newline=st.booleans(),
    nparts=st.integers(1, 7),
)
def test_txt_parts_cover_every_line_once(tmp_path, lines, trailing_newline, nparts):
    data = "\n".join(lines) + ("\n" if trailing_newline else "")
    if not data:
        data = "\n"
    path = tmp_path / "c.txt"
    path.write_bytes(data.encode("utf-8"))
    corpus = open_corpus(path)
    expected = data.split("\n")
    if data.endswith("\n"):
        expected = expected[:-1]
    expected = [x.removesuffix("\r") for x in expected]

    recs = _records(corpus, nparts)
    assert [r.text for r in recs] == expected
    assert [r.id for r in recs] == [r.line for r in recs] == list(range(1, len(expected) + 1))
    assert sum(corpus.count(p) for p in corpus.parts(nparts)) == len(expected)
    # Resuming from any record's next_position yields exactly the records after it.
    part = corpus.parts(1)[0]
    for k in range(len(recs)):
        rest = list(corpus.read(part, recs[k].next_position, recs[k].line + 1))
        assert rest == recs[k + 1 :]


def test_txt_bom_crlf_and_bad_utf8(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\r\nthird \xff\xfe bad\nlast")
    recs = list(open_corpus(path).read(open_corpus(path).parts(1)[0]))
    assert [(r.line, r.text) for r in recs if r.error is None] == [(1, "first"), (2, ""), (4, "last")]
    bad = [r for r in recs if r.error is not None]
    assert len(bad) == 1 and bad[0].line == 3 and "invalid UTF-8 at byte 6" in bad[0].error


def test_jsonl_malformed_records_name_their_line(tmp_path):
    rows = [
        json.dumps({"id": "a", "text": "fine"}),
        "{not json",
        "",
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "text": 42}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "no id"}),
        json.dumps({"id": True, "text": "bool id"}),
        json.dumps({"id": 7, "text": None}),
        json.dumps({"id": 8, "text": "ok too"}),
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(("\n".join(rows) + "\n").encode() + b'{"id": 9, "text": "\xff"}\n')
    corpus = open_corpus(path, id_field="id")
    recs = list(corpus.read(corpus.parts(1)[0]))
    got = {r.line: (r.id, r.text, r.error) for r in recs}
    assert sorted(got) == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]  # the blank line 3 is not a record
    assert got[1] == ("a", "fine", None)
    assert got[10] == (8, "ok too", None)
    assert "invalid JSON" in got[2][2]
    assert "text field 'text' is missing" in got[4][2]
    assert "text field 'text' is int (42), expected a string" in got[5][2]
    assert "expected a JSON object, got list" in got[6][2]
    assert "id field 'id' is missing" in got[7][2]
    assert "ids must be strings or integers" in got[8][2]
    assert "text field 'text' is NoneType" in got[9][2]
    assert "invalid UTF-8" in got[11][2]
    assert corpus.location(5) == f"{path}:5"
    # Without an id field, ids are line numbers.
    plain = open_corpus(path)
    assert [r.id for r in plain.read(plain.parts(1)[0]) if r.error is None] == [1, 7, 8, 10]


def test_file_level_problems_raise(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match=r"e\.jsonl is empty \(0 bytes\)"):
        open_corpus(empty)
    with pytest.raises(CorpusError, match="input file not found"):
        open_corpus(tmp_path / "missing.txt")
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"unsupported input format '\.csv'"):
        open_corpus(tmp_path / "c.csv")


def test_parquet_parts_ids_nulls_and_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 23
    texts = [f"doc {i}" if i != 5 else None for i in range(n)]
    table = pa.table({"doc_id": [f"d{i}" for i in range(n)], "body": texts, "num": list(range(n))})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=4)

    corpus = open_corpus(path, text_field="body", id_field="doc_id")
    for nparts in (1, 3, 7):
        recs = _records(corpus, nparts)
        assert [r.line for r in recs] == list(range(n))
        assert [r.id for r in recs] == [f"d{i}" for i in range(n)]
        assert [r.text for r in recs if r.error is None] == [t for t in texts if t is not None]
    (bad,) = [r for r in _records(corpus) if r.error is not None]
    assert bad.line == 5 and "text column 'body' is null" in bad.error
    assert corpus.location(5) == f"{path} row 5"
    # Resume mid row group, inside a part.
    part = corpus.parts(2)[1]
    assert [r.line for r in corpus.read(part, 17)] == list(range(17, n))
    # Positional ids are row indices.
    assert [r.id for r in open_corpus(path, text_field="body").read(corpus.parts(1)[0])][:3] == [0, 1, 2]

    with pytest.raises(CorpusError, match=r"no text column 'text' \(columns: \['doc_id', 'body', 'num'\]\)"):
        open_corpus(path)
    with pytest.raises(CorpusError, match="text column 'num' has type int64; expected a string column"):
        open_corpus(path, text_field="num")


# ---------------------------------------------------------------------------------------------------
# One line rule for every reader (embed --input and embed-corpus)

SEPARATORS = "ab \t\r\n\f\v\x1c\x1d\x1e\x85\u2028\u2029\ufeffé"


def test_embed_input_lines_are_corpus_lines(tmp_path):
    """The issue's file: splitlines() made 5 rows (the first with a BOM); only \\n separates records."""
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfpage one\fpage two\nline\xe2\x80\xa8sep\nthird\r\n")
    expected = ["page one\fpage two", "line\u2028sep", "third"]
    assert read_text_lines(path) == expected
    corpus = open_corpus(path)
    assert [r.text for r in corpus.read(corpus.parts(1)[0])] == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=SEPARATORS, min_size=1, max_size=30), bom=st.booleans())
def test_read_text_lines_equals_txt_corpus(tmp_path, text, bom):
    path = tmp_path / "c.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    corpus = open_corpus(path)
    assert read_text_lines(path) == [r.text for r in corpus.read(corpus.parts(1)[0])]


def test_read_text_lines_from_a_pipe_and_bad_utf8(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes("\ufeffone\r\ntwo\x85\u2028\nthree".encode()))
    writer.start()
    try:
        assert read_text_lines(fifo) == ["one", "two\x85\u2028", "three"]
    finally:
        writer.join()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nfine\nnot \xff utf8\n")
    with pytest.raises(CorpusError, match=re.escape(f"{bad}:3: invalid UTF-8 at byte 4")):
        read_text_lines(bad)
    with pytest.raises(CorpusError, match="is a directory"):
        read_text_lines(tmp_path)


def test_directory_and_fifo_inputs_are_named(tmp_path):
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(CorpusError, match=r"d\.txt is a directory; expected a file"):
        open_corpus(tmp_path / "d.txt")
    os.mkfifo(tmp_path / "f.jsonl")
    with pytest.raises(CorpusError, match=r"f\.jsonl is a FIFO \(named pipe\).*must be a regular file"):
        open_corpus(tmp_path / "f.jsonl")


# ---------------------------------------------------------------------------------------------------
# Records that used to abort a whole run: now located, skippable errors


def test_hostile_jsonl_records_are_located_errors(tmp_path):
    deep = '{"id": 4, "text": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows = [
        '{"id": "x\\ud800", "text": "lone surrogate in the id"}',
        '{"id": 2, "text": "lone surrogate \\udfff in the text"}',
        '{"id": 3, "text": "huge int elsewhere", "n": ' + "7" * 5000 + "}",
        deep,
        '{"id": 5, "text": "fine"}',
        '{"id": ' + "9" * 5000 + ', "text": "huge id"}',
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    corpus = open_corpus(path, id_field="id")
    got = {r.line: r for r in corpus.read(corpus.parts(1)[0])}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert "id field 'id' holds a lone surrogate ('\\ud800' at character 1)" in got[1].error
    assert "text field 'text' holds a lone surrogate ('\\udfff' at character 15)" in got[2].error
    assert "invalid JSON: Exceeds the limit (4300 digits)" in got[3].error
    assert got[4].error == "invalid JSON: nested too deeply to parse"
    assert (got[5].id, got[5].text, got[5].error) == (5, "fine", None)
    assert "invalid JSON: Exceeds the limit" in got[6].error
    # A bad value's description stays short however large or deep it is.
    path.write_text(json.dumps({"id": [[[["x" * 10_000]]]], "text": "t"}) + "\n", encoding="utf-8")
    (rec,) = open_corpus(path, id_field="id").read(open_corpus(path).parts(1)[0])
    assert "ids must be strings or integers" in rec.error and len(rec.error) < 200


# ---------------------------------------------------------------------------------------------------
# Input hashes (what a resumed run checks)


def _hash_at_every_record(corpus, nparts):
    for part in corpus.parts(nparts):
        h = corpus.start_hash(part)
        for rec in corpus.read(part, None, 1, h):
            assert h.position == rec.next_position
            again = corpus.input_hash(part, rec.next_position)
            assert (again.position, again.hexdigest()) == (h.position, h.hexdigest())
        if h.position != corpus.start_hash(part).position:  # a part with records: rolled back to the last
            assert h.hexdigest() == corpus.input_hash(part, h.position).hexdigest()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.sampled_from(['{"text": "a"}', "", " ", '{"text": "bé"}', "{bad"]), min_size=1, max_size=10),
    bom=st.booleans(),
    nparts=st.integers(1, 4),
)
def test_input_hash_at_a_record_equals_the_hash_of_the_bytes_before_it(tmp_path, lines, bom, nparts):
    path = tmp_path / "c.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())
    corpus = open_corpus(path)
    _hash_at_every_record(corpus, nparts)
    # txt: hash of the raw bytes [part start, position)
    part = corpus.parts(1)[0]
    data = path.read_bytes()
    for rec in open_corpus(path.rename(tmp_path / "c.txt")).read(part):
        h = open_corpus(tmp_path / "c.txt").input_hash(part, rec.next_position)
        assert h.hexdigest() == hashlib.sha256(data[: rec.next_position]).hexdigest()
    (tmp_path / "c.txt").unlink()


def test_input_hash_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    ids = [f"d{i}" for i in range(11)]
    pq.write_table(pa.table({"id": ids, "text": [f"t{i}" for i in range(11)]}), path, row_group_size=3)
    corpus = open_corpus(path, id_field="id")
    _hash_at_every_record(corpus, 3)
    # Another text in a row changes the hash of every position after it, and only those.
    before = [corpus.input_hash(corpus.parts(1)[0], n).hexdigest() for n in range(12)]
    texts = [f"t{i}" if i != 6 else "changed" for i in range(11)]
    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=3)
    corpus = open_corpus(path, id_field="id")
    after = [corpus.input_hash(corpus.parts(1)[0], n).hexdigest() for n in range(12)]
    assert [a == b for a, b in zip(before, after, strict=True)] == [True] * 7 + [False] * 5
