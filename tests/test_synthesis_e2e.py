"""End to end: main() on real prose. Every test runs without megatron-core; only the cross-check that reads
the outputs with megatron-core's reader (an independent implementation) skips when it is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from nextlong.cli import main
from nextlong.indexed import read_indexed
from nextlong.readers import normalized_hash
from nextlong.tokenization import load_tokenizer

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


def megatron_indexed_dataset():
    """megatron-core's ``indexed_dataset`` module, or a skip that names the extra to install."""
    try:
        from megatron.core.datasets import indexed_dataset
    except ImportError:
        pytest.skip('megatron-core is not installed: pip install -e ".[megatron]" (or ".[dev]") for this '
                    "cross-check with its reader")
    return indexed_dataset


@pytest.fixture(scope="module")
def cl100k_run(tmp_path_factory, docs_corpus, cl100k_json):
    return run(tmp_path_factory.mktemp("e2e"), docs_corpus, cl100k_json)


@pytest.fixture(scope="module")
def uint16_run(tmp_path_factory, docs_corpus, small_tokenizer_json):
    return run(tmp_path_factory.mktemp("e2e16"), docs_corpus, small_tokenizer_json, "--budget", "paper",
               "--negative-order", "tail")


@pytest.mark.parametrize("which", ["cl100k_run", "uint16_run"])
def test_megatron_core_reads_the_same_datasets(which, request):
    """megatron-core's reader (not ours) sees the same dtype, sizes, document index and values."""
    mc = megatron_indexed_dataset()
    prefix = request.getfixturevalue(which)
    for name in NAMES:
        ours = read_indexed(f"{prefix}_{name}_document")
        theirs = mc.IndexedDataset(f"{prefix}_{name}_document")
        assert theirs.index.dtype == ours.dtype
        np.testing.assert_array_equal(theirs.sequence_lengths, ours.lengths)
        np.testing.assert_array_equal(theirs.document_indices, ours.doc_index)
        assert len(theirs) == len(ours) == 24
        for i in range(len(ours)):
            np.testing.assert_array_equal(theirs[i], ours[i])


def test_outputs_contract(cl100k_run, cl100k_json):
    prefix = cl100k_run
    text = read_indexed(f"{prefix}_text_document")
    mask = read_indexed(f"{prefix}_lossweight_document")
    label = read_indexed(f"{prefix}_label_document")
    assert len(text) == 24
    assert text.dtype == np.int32  # vocabulary > 65,500
    assert mask.dtype == np.uint8 and label.dtype == np.int32
    assert set(text.lengths.tolist()) == {T}
    for other in (mask, label):
        np.testing.assert_array_equal(other.lengths, text.lengths)
        np.testing.assert_array_equal(other.doc_index, text.doc_index)
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
        # negatives of each meta-chunk in similarity order (top-k); where they sit: test_negative_order_*
        for _, g in negs.groupby("meta_index"):
            assert (np.diff(g["similarity"].values) <= 1e-6).all()


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


def test_uint16_tokenizer_and_paper_budget(uint16_run):
    prefix = uint16_run
    text = read_indexed(f"{prefix}_text_document")
    assert text.dtype == np.uint16 and text.dtype_code == 8  # Megatron's code for uint16
    assert set(text.lengths.tolist()) == {T}
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


# ------------------------------------------------------------------ where the negatives land, on pipeline output


@pytest.fixture(scope="module")
def same_pool(cl100k_run, docs_corpus, cl100k_json):
    """``spans(*flags, name=...)``: a run on cl100k_run's pool (its work directory: chunks, embeddings and
    index are reused, only the synthesis is redone), as (spans table, pool embeddings)."""
    work = Path(f"{cl100k_run}.work")
    cache: dict[str, object] = {}

    def spans(*flags: str, name: str):
        if name not in cache:
            prefix = run(cl100k_run.parent.parent, docs_corpus, cl100k_json, "--work-dir", str(work), *flags,
                         name=name)
            cache[name] = pq.read_table(f"{prefix}_spans.parquet").to_pandas().sort_values(["sample", "start"])
        return cache[name]

    spans.embeddings = np.load(work / "embeddings.npy", mmap_mode="r")
    chunks = pq.read_table(work / "chunks.parquet", columns=["chunk_id", "corpus", "doc_id"]).to_pandas()
    assert (chunks["chunk_id"].values == np.arange(len(chunks))).all() and len(chunks) == len(spans.embeddings)
    spans.chunk_doc = (chunks["corpus"] + "/" + chunks["doc_id"]).values
    return spans


def extended_chunks(sample_spans) -> list[tuple[int, list]]:
    """One sample's meta and negative spans in position order, cut where meta_index changes:
    [(meta_index, [row, ...]), ...] with rows as namedtuples."""
    out: list[tuple[int, list]] = []
    for r in sample_spans[sample_spans["role"].isin(["meta", "negative"])].itertuples():
        if not out or out[-1][0] != r.meta_index:
            out.append((r.meta_index, []))
        out[-1][1].append(r)
    return out


def check_layout(spans, emb, order: str) -> list[int]:
    """Each extended chunk is one meta-chunk and its own negatives, contiguous, in meta-chunk order; the meta
    sits first (head), last (tail) or anywhere (random). Returns the meta's position in every extended chunk."""
    positions = []
    for _, s in spans.groupby("sample"):
        groups = extended_chunks(s)
        assert [mi for mi, _ in groups] == list(range(len(groups)))  # no meta_index comes back after another
        metas = [r.chunk_id for _, rows in groups for r in rows if r.role == "meta"]
        assert len(metas) == len(groups)  # exactly one meta-chunk per extended chunk
        assert metas == list(range(metas[0], metas[0] + len(metas)))  # the document's chunks, in order
        for _, rows in groups:
            at = next(k for k, r in enumerate(rows) if r.role == "meta")
            meta = rows[at].chunk_id
            negs = [r for r in rows if r.role == "negative"]
            # "its own": each negative's stated similarity is its inner product with THIS meta-chunk
            got = np.array([np.dot(emb[meta].astype(np.float32), emb[r.chunk_id].astype(np.float32)) for r in negs])
            np.testing.assert_allclose([r.similarity for r in negs], got, atol=2e-3)
            if order == "head":
                assert at == 0
            elif order == "tail":
                assert at == len(rows) - 1
            positions.append(at)
    return positions


def negative_lists(spans) -> dict[tuple[int, int], tuple[int, list[int]]]:
    """(sample, meta_index) -> (meta chunk id, negative chunk ids in position order)."""
    out = {}
    for smp, s in spans.groupby("sample"):
        for mi, rows in extended_chunks(s):
            meta = next(r.chunk_id for r in rows if r.role == "meta")
            out[(smp, mi)] = (meta, [r.chunk_id for r in rows if r.role == "negative"])
    return out


def test_negative_order_head_and_tail(same_pool):
    head = same_pool(name="head")
    assert set(check_layout(head, same_pool.embeddings, "head")) == {0}
    tail = same_pool("--negative-order", "tail", name="tail")
    check_layout(tail, same_pool.embeddings, "tail")
    # the order moves the meta-chunk and nothing else: same meta-chunks, same negatives in the same order
    assert negative_lists(tail) == negative_lists(head)
    assert sum(len(n) > 0 for _, n in negative_lists(head).values()) >= 24


def test_negative_order_random(same_pool):
    head = same_pool(name="head")
    rnd = same_pool("--negative-order", "random", name="random")
    positions = check_layout(rnd, same_pool.embeddings, "random")
    assert negative_lists(rnd) == negative_lists(head)
    # seeded: the same seed puts every meta-chunk at the same place
    again = same_pool("--negative-order", "random", name="random_again")
    assert check_layout(again, same_pool.embeddings, "random") == positions
    # random: first, last and in between all occur, and the samples do not share one pattern
    sizes = [len(rows) for s in (rnd[rnd["sample"] == i] for i in sorted(set(rnd["sample"])))
             for _, rows in extended_chunks(s)]
    assert any(a == 0 for a in positions) and any(a == n - 1 for a, n in zip(positions, sizes, strict=True))
    assert any(0 < a < n - 1 for a, n in zip(positions, sizes, strict=True))
    first = [extended_chunks(s)[0] for _, s in rnd.groupby("sample")]
    assert len({next(k for k, r in enumerate(rows) if r.role == "meta") for _, rows in first}) > 1


def test_random_retrieved_draws_from_the_retrieved_set(same_pool):
    k = 64
    head = same_pool(name="head")
    rr = same_pool("--negative-selection", "random-retrieved", "--candidates", str(k), name="random_retrieved")
    check_layout(rr, same_pool.embeddings, "head")
    emb = same_pool.embeddings
    negs = rr[rr["role"] == "negative"]
    assert len(negs) >= 24
    pool = np.asarray(emb, dtype=np.float32)
    ordered, groups = 0, 0
    for _, s in rr.groupby("sample"):
        for _, rows in extended_chunks(s):
            meta = next(r.chunk_id for r in rows if r.role == "meta")
            sims = pool @ pool[meta]
            # the retrieved set: the k most similar chunks of other documents (exact search; Flat index)
            kth = np.sort(sims[same_pool.chunk_doc != same_pool.chunk_doc[meta]])[::-1][k - 1]
            ranks = [r.rank for r in rows if r.role == "negative"]
            for r in rows:
                if r.role == "negative":
                    assert sims[r.chunk_id] >= kth - 2e-3, (r.chunk_id, sims[r.chunk_id], kth)
            if len(ranks) >= 3:
                groups += 1
                ordered += ranks == sorted(ranks)
    # drawn at random from the set, not taken in rank order (top-k takes them in rank order)
    assert groups >= 10 and ordered <= groups // 4, (ordered, groups)
    top = head[head["role"] == "negative"]
    assert all(g["rank"].is_monotonic_increasing for _, g in top.groupby(["sample", "meta_index"]))
    assert negs["rank"].mean() > 2 * top["rank"].mean()
