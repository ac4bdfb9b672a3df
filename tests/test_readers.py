"""Readers: formats, globs, mixing specs, and bad input reported with file and line, never fatal."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from nextlong.readers import InputError, Rejects, iter_documents, parse_input_specs


def _lines(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_jsonl_plain_gz_zst_and_glob(tmp_path):
    recs = [{"id": f"d{i}", "text": f"text {i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_bytes(_lines(recs[:2]))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(_lines(recs[2:4])))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_lines(recs[4:])))
    [spec] = parse_input_specs([str(tmp_path / "*.json*")], None, None)
    docs = list(iter_documents(spec, "text", "id", Rejects()))
    assert [d.doc_id for d in docs] == [f"d{i}" for i in range(5)]
    assert docs[3].source.endswith("b.jsonl.gz:2")


def test_bad_lines_are_named_and_counted(tmp_path):
    raw = (_lines([{"id": "ok1", "text": "fine"}]) + b"{not json\n" + _lines([{"id": "x", "body": "no text"}])
           + b'{"id": "bad", "text": "\xff\xfe"}\n' + _lines([{"id": "e", "text": "   "}, {"text": 5},
                                                               {"id": "ok2", "text": "also fine"}]))
    p = tmp_path / "in.jsonl"
    p.write_bytes(raw)
    rej = Rejects()
    [spec] = parse_input_specs([str(p)], None, None)
    docs = list(iter_documents(spec, "text", "id", rej))
    assert [d.doc_id for d in docs] == ["ok1", "ok2"]
    assert dict(rej.counts) == {"malformed_json": 1, "missing_text_field": 1, "invalid_utf8": 1,
                                "empty_document": 1, "text_not_a_string": 1}
    wheres = {r["reason"]: r["where"] for r in rej.records}
    assert wheres["malformed_json"] == f"{p}:2"
    assert wheres["invalid_utf8"] == f"{p}:4"
    out = rej.write(tmp_path / "rejects.jsonl")
    assert len(out.read_text().splitlines()) == 5


def test_fineweb_edu_parquet_layout(tmp_path):
    # FineWeb-Edu's columns: text, id, dump, url, file_path, language, language_score, token_count, score, int_score
    table = pa.table({"text": ["An essay.", "", "A lesson."], "id": ["<urn:uuid:1>", "<urn:uuid:2>", "<urn:uuid:3>"],
                      "dump": ["CC-MAIN-2024-10"] * 3, "url": ["u"] * 3, "score": [3.1, 2.9, 4.0],
                      "token_count": [3, 0, 3]})
    pq.write_table(table, tmp_path / "000_00000.parquet")
    rej = Rejects()
    [spec] = parse_input_specs([str(tmp_path)], None, ["fineweb-edu"])
    docs = list(iter_documents(spec, "text", "id", rej))
    assert [(d.corpus, d.doc_id) for d in docs] == [("fineweb-edu", "<urn:uuid:1>"), ("fineweb-edu", "<urn:uuid:3>")]
    assert rej.counts["empty_document"] == 1
    with pytest.raises(InputError, match="no column 'content'"):
        list(iter_documents(spec, "content", "id", rej))


def test_spec_errors(tmp_path):
    with pytest.raises(InputError, match="no file matches"):
        parse_input_specs([str(tmp_path / "none*.jsonl")], None, None)[0].files()
    with pytest.raises(InputError, match="--mix"):
        parse_input_specs(["a", "b"], [1.0], None)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="neither JSONL"):
        parse_input_specs([str(tmp_path / "x.txt")], None, None)[0].files()
