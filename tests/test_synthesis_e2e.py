"""End to end: main() on real prose, outputs read back with megatron-core's reader (independent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from nextlong.cli import main
from nextlong.readers import normalized_hash
from nextlong.tokenization import load_tokenizer

mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")

T = 4096
NAMES = ("text", "lossweight", "label")


def run(tmp: Path, corpus: Path, tok: Path, *extra: str, name: str = "out") -> Path:
    prefix = tmp / name / "nl"
    args = ["--input", str(corpus), "--tokenizer", str(tok), "--output-prefix", str(prefix),
            "--target-length", str(T), "--max-samples", "24", "--seed", "7", "--emit-labels", "--no-progress",
            *extra]
    assert main(args) == 0
    return prefix


def data_bytes(prefix: Path) -> dict[str, bytes]:
    out = {}
    for n in NAMES:
        for ext in ("bin", "idx"):
            p = Path(f"{prefix}_{n}_document.{ext}")
            if p.exists():
                out[f"{n}.{ext}"] = p.read_bytes()
    out["spans"] = pq.read_table(f"{prefix}_spans.parquet").to_pandas().to_csv().encode()
    return out


@pytest.fixture(scope="module")
def cl100k_run(tmp_path_factory, docs_corpus, cl100k_json):
    return run(tmp_path_factory.mktemp("e2e"), docs_corpus, cl100k_json)


def test_outputs_read_back_with_megatron_core(cl100k_run, cl100k_json):
    prefix = cl100k_run
    text = mc.IndexedDataset(f"{prefix}_text_document")
    mask = mc.IndexedDataset(f"{prefix}_lossweight_document")
    label = mc.IndexedDataset(f"{prefix}_label_document")
    assert len(text) == 24
    assert text.index.dtype == np.int32  # vocabulary > 65,500
    assert mask.index.dtype == np.uint8 and label.index.dtype == np.int32
    assert set(text.sequence_lengths.tolist()) == {T}
    for other in (mask, label):
        np.testing.assert_array_equal(other.sequence_lengths, text.sequence_lengths)
        np.testing.assert_array_equal(other.document_indices, text.document_indices)
    tok = load_tokenizer(cl100k_json)
    spans = pq.read_table(f"{prefix}_spans.parquet").to_pandas()
    chunks = pq.read_table(Path(f"{prefix}.work") / "chunks.parquet").to_pandas().set_index("chunk_id")
    manifest = json.loads(Path(f"{prefix}_manifest.json").read_text())
    assert manifest["counts"]["samples_out"] == 24 and manifest["counts"]["tokens_out"] == 24 * T
    for i in range(len(text)):
        ids, m, lab = text[i], mask[i], label[i]
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert set(np.unique(m).tolist()) <= {0, 1}
        np.testing.assert_array_equal(lab == -100, m == 0)
        np.testing.assert_array_equal(lab[m == 1], ids[m == 1])
        s = spans[spans["sample"] == i]
        assert s["start"].iloc[0] == 0 and (s["start"] + s["length"]).iloc[-1] == T
        assert (s["start"].values[1:] == (s["start"] + s["length"]).values[:-1]).all()  # tiles the sample
        meta = s[s["role"] == "meta"]
        negs = s[s["role"] == "negative"]
        assert len(meta) >= 1 and len(negs) >= 1
        assert meta["doc_id"].nunique() == 1
        # no negative from the meta-document, none repeated inside the sample
        assert not set(negs["doc_id"]) & set(meta["doc_id"])
        assert negs["chunk_id"].is_unique
        for _, r in s.iterrows():
            piece = m[r.start : r.start + r.length]
            assert (piece == (0 if r.role == "negative" else 1)).all()
        for _, r in meta.iterrows():  # meta-chunks decode to the source text
            assert tok.decode(ids[r.start : r.start + r.length]) == chunks.loc[r.chunk_id, "text"]
        # negatives follow their meta-chunk in similarity order (top-k, head)
        for _, g in negs.groupby("meta_index"):
            assert (np.diff(g["similarity"].values) <= 1e-6).all()
            assert (g["start"].values > meta[meta["meta_index"] == g["meta_index"].iloc[0]]["start"].values[0]).all()


def test_same_seed_same_bytes_any_task_count_and_resume(tmp_path, docs_corpus, cl100k_json, cl100k_run):
    ref = data_bytes(cl100k_run)
    a = run(tmp_path, docs_corpus, cl100k_json, "--tasks", "3", "--block-docs", "8", name="tasks3")
    assert data_bytes(a) == ref
    # a rerun on the same work dir skips every stage and rewrites identical bytes
    b = run(tmp_path, docs_corpus, cl100k_json, "--tasks", "3", "--block-docs", "8", name="tasks3")
    assert data_bytes(b) == ref
    c = run(tmp_path, docs_corpus, cl100k_json, "--seed", "8", name="seed8")
    assert data_bytes(c)["text.bin"] != ref["text.bin"]


def test_adaptive_retrieval_equals_full_candidate_lists(tmp_path, docs_corpus, cl100k_json, cl100k_run, monkeypatch):
    from nextlong import synthesize

    orig = synthesize.PartContext.retrieve
    monkeypatch.setattr(synthesize.PartContext, "retrieve", lambda self, docs, adaptive: orig(self, docs, False))
    full = run(tmp_path, docs_corpus, cl100k_json, name="full")
    assert data_bytes(full) == data_bytes(cl100k_run)


def test_uint16_tokenizer_and_paper_budget(tmp_path, docs_corpus, small_tokenizer_json):
    prefix = run(tmp_path, docs_corpus, small_tokenizer_json, "--budget", "paper", "--negative-order", "tail")
    text = mc.IndexedDataset(f"{prefix}_text_document")
    assert text.index.dtype == np.uint16
    assert set(text.sequence_lengths.tolist()) == {T}
    manifest = json.loads(Path(f"{prefix}_manifest.json").read_text())
    assert manifest["paper_budget"]["samples_overfilled"] >= 1
    assert manifest["tokenizer"]["token_dtype"] == "uint16"


def test_bad_input_is_counted_and_tiny_corpus_is_an_error(tmp_path, docs_corpus, cl100k_json, caplog):
    lines = docs_corpus.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(("\n".join(lines[:200]) + "\n{broken\n" + json.dumps({"id": "nt"}) + "\n"
                     + json.dumps({"id": "e", "text": ""}) + "\n").encode() + b'{"text": "\xff"}\n'
                    + ("\n".join(lines[200:]) + "\n").encode())
    prefix = run(tmp_path, bad, cl100k_json)
    rejects = [json.loads(x) for x in Path(f"{prefix}_rejects.jsonl").read_text().splitlines()]
    # the corpus itself repeats two documents (Python's docs share some texts): dropped as duplicate_text
    assert {r["reason"] for r in rejects} == {"malformed_json", "missing_text_field", "empty_document",
                                              "invalid_utf8", "duplicate_text"}
    assert any(r["where"] == f"{bad}:201" for r in rejects)
    manifest = json.loads(Path(f"{prefix}_manifest.json").read_text())
    assert manifest["counts"]["inputs_rejected"]["malformed_json"] == 1
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("\n".join(lines[:3]) + "\n")
    assert main(["--input", str(tiny), "--tokenizer", str(cl100k_json), "--output-prefix",
                 str(tmp_path / "tiny" / "x"), "--target-length", "131072", "--no-progress"]) == 2
    assert "--target-length 131072: the inputs hold only about" in caplog.text  # caught before any work
    assert "lower --target-length" in caplog.text
    assert not Path(f"{tmp_path}/tiny/x_text_document.bin").exists()


def test_baselines_and_ablations(tmp_path, docs_corpus, cl100k_json):
    work = tmp_path / "shared.work"  # the pool stages run once; each switch redoes only the synthesis

    def spans(*flags, name):
        p = run(tmp_path, docs_corpus, cl100k_json, "--work-dir", str(work), *flags, name=name)
        return pq.read_table(f"{p}_spans.parquet").to_pandas()

    top = spans(name="topk")
    tail = spans("--negative-selection", "tailk", name="tailk")
    neg = lambda s: s[s["role"] == "negative"]  # noqa: E731
    assert neg(tail)["similarity"].mean() < neg(top)["similarity"].mean()
    rep = spans("--negative-selection", "self-repeat", name="repeat")
    for _, g in rep.groupby("sample"):
        metas = set(g[g["role"] == "meta"]["chunk_id"])
        assert set(neg(g)["chunk_id"]) <= metas
    std = spans("--method", "standard", name="standard")
    assert neg(std).empty and std["rank"].max() == -1  # no retrieval at all
    knn = spans("--method", "knn", name="knn")
    first = knn[knn["sample"] == 0]
    assert first[first["role"] == "negative"]["rank"].is_monotonic_increasing
    rnd = spans("--negative-selection", "random-doc", name="randomdoc")
    assert neg(rnd)["similarity"].mean() < neg(top)["similarity"].mean()


def test_two_inputs_mixed_by_weight(tmp_path, docs_corpus, cl100k_json):
    lines = docs_corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    a.write_text("".join(lines[::2]), encoding="utf-8")
    import pyarrow as pa

    recs = [json.loads(x) for x in lines[1::2]]
    pq.write_table(pa.table({"id": [r["id"] for r in recs], "text": [r["text"] for r in recs]}), b)
    prefix = tmp_path / "mix" / "nl"
    assert main(["--input", str(a), "--input", str(b), "--mix", "1", "--mix", "2", "--tokenizer", str(cl100k_json),
                 "--output-prefix", str(prefix), "--target-length", "2048", "--max-samples", "60", "--no-progress",
                 "--negative-order", "random"]) == 0
    spans = pq.read_table(f"{prefix}_spans.parquet").to_pandas()
    meta = spans[spans["role"] == "meta"].drop_duplicates("sample")
    counts = meta["corpus"].value_counts().to_dict()
    assert counts == {"a": 20, "b": 40}  # meta-documents drawn 1:2
    negs = spans[spans["role"] == "negative"]
    assert set(negs["corpus"]) == {"a", "b"}  # both inputs are in the retrieval pool
    manifest = json.loads(Path(f"{prefix}_manifest.json").read_text())
    # every document of each input, less the repeats within the file (--duplicates drop, the default)
    distinct = {name: len({normalized_hash(json.loads(x)["text"]) for x in part})
                for name, part in (("a", lines[::2]), ("b", lines[1::2]))}
    assert manifest["counts"]["documents_per_input"] == distinct
