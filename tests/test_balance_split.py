"""Even negative allocation, wider candidate lists (no length bias), the held-out split, baseline masks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from nextlong.assemble import Specials, build_nextlong, merge_tallies
from nextlong.cli import main
from nextlong.indexed import read_indexed
from nextlong.mining import Candidates, wider_limits
from nextlong.split import SPLIT_CODE, document_splits, document_units, unit_of

# ------------------------------------------------------------------------------------- allocation (unit)


class _Pool:
    """The slice of :class:`nextlong.pool.Pool` that the assembly reads: one meta-document of ``p`` chunks
    (ids 0..p-1) and ``n`` candidate chunks of 40-59 tokens from one other document each."""

    def __init__(self, p: int, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        lens = np.concatenate([np.full(p, 30), rng.integers(40, 60, n)])
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.tokens = rng.integers(0, 1000, int(self.offsets[-1])).astype(np.int32)
        self.chunk_hash = np.arange(p + n, dtype=np.int64)
        self.chunk_doc = np.concatenate([np.zeros(p), np.arange(1, n + 1)]).astype(np.int64)
        self.doc_first = np.concatenate([[0], np.arange(p, p + n)]).astype(np.int64)
        self.doc_nchunks = np.concatenate([[p], np.ones(n)]).astype(np.int32)
        self.doc_chars = self.doc_nchunks.astype(np.int64) * 100
        self.embeddings = np.eye(p + n, 8, dtype=np.float32)
        self.n_chunks, self.n_docs = p + n, n + 1

    def chunk_len(self, c: int) -> int:
        return int(self.offsets[c + 1] - self.offsets[c])


def _overlapping(pool: _Pool, p: int, n: int) -> list[Candidates]:
    """Every meta-chunk retrieves the same ranked list: the worst case for a shared "used" set."""
    ids = np.arange(p, p + n, dtype=np.int64)
    return [Candidates(ids, np.linspace(0.9, 0.1, n).astype(np.float32), np.arange(n, dtype=np.int32))
            for _ in range(p)]


def _cfg(T: int, allocation: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(target_length=T, budget="exact", negative_selection="topk", negative_order="head",
                           negative_allocation=allocation, granularity=2048, paper_w=1.5, **kw)


SPEC = Specials(np.array([1], np.int32), np.array([2], np.int32), np.array([3], np.int32))


@pytest.mark.parametrize("p", [2, 6])
def test_even_allocation_gives_every_meta_chunk_the_top_of_its_list(p):
    n, T = 600, 6000
    pool = _Pool(p, n)
    out = {}
    for alloc in ("even", "sequential"):
        s = build_nextlong(pool, _cfg(T, alloc), SPEC, 0, _overlapping(pool, p, n), np.random.default_rng(0), 4.0)
        assert len(s.tokens) == T  # exact length, whatever the allocation
        neg = s.spans["role"] == 2
        cid = s.spans["chunk_id"][neg]
        assert len(np.unique(cid)) == len(cid)  # no negative twice in a sample
        mi, rank = s.spans["meta_index"][neg], s.spans["rank"][neg]
        out[alloc] = [float(rank[mi == i].mean()) for i in range(p)]
        tokens = np.bincount(mi, weights=s.spans["length"][neg] + 1, minlength=p)  # + separator
        share = (T - 2 - p * 30 - (p - 1)) / p
        assert np.all(tokens[:-1] <= share + 60) and np.all(tokens[:-1] >= share - 60)  # within one chunk
    even, seq = out["even"], out["sequential"]
    # sequential: the first meta-chunk takes the head of the shared list, the last one its tail
    assert seq[-1] - seq[0] > 10 * p
    # even: turns, so every meta-chunk's mean rank is about the same (they differ only by how many they take)
    assert max(even) - min(even) < 0.15 * (seq[-1] - seq[0])


def test_even_allocation_hands_a_dry_list_on():
    p, n, T = 3, 300, 4000
    pool = _Pool(p, n)
    cands = _overlapping(pool, p, n)
    cands[1] = Candidates(cands[1].ids[:3], cands[1].sims[:3], cands[1].ranks[:3])  # runs out almost at once
    s = build_nextlong(pool, _cfg(T, "even"), SPEC, 0, cands, np.random.default_rng(0), 4.0)
    mi = s.spans["meta_index"][s.spans["role"] == 2]
    assert len(s.tokens) == T and np.sum(mi == 1) <= 3 and np.sum(mi == 2) > np.sum(mi == 0)


def test_wider_limits_double_up_to_the_cap():
    cfg = SimpleNamespace(candidates=512, max_candidates=2048, negative_selection="topk")
    assert wider_limits(cfg, 100) == [512, 1024, 2048]
    assert wider_limits(cfg, 512) == [1024, 2048]
    assert wider_limits(SimpleNamespace(candidates=512, max_candidates=2048, negative_selection="tailk"), 512) == []


def test_merge_tallies_gives_drop_rate_by_length():
    a = {"by_length": {"1": {"meta_documents": 4, "samples": 1, "dropped": {"insufficient_negatives": 3}}},
         "by_position": np.zeros((18, 4)).tolist()}
    b = {"by_length": {"1": {"meta_documents": 4, "samples": 4, "dropped": {}},
                       "9-16": {"meta_documents": 2, "samples": 2, "dropped": {}}},
         "by_position": (np.arange(72).reshape(18, 4) + 1).tolist()}
    m = merge_tallies([a, b, None])
    rate = m["drop_rate_by_chunks_per_document"]
    assert list(rate) == ["1", "9-16"] and rate["1"]["drop_rate"] == 3 / 8 and rate["9-16"]["drop_rate"] == 0
    assert m["negatives_by_meta_chunk_position"]["0"] == {"negatives": 1, "mean_rank": 3 / 2, "mean_similarity": 4}


# ------------------------------------------------------------------------------------------ split (unit)


def test_split_is_a_stable_function_of_the_id():
    assert unit_of("fineweb-edu", "<urn:uuid:1>") == unit_of("fineweb-edu", "<urn:uuid:1>")
    assert unit_of("fineweb-edu", "a") != unit_of("cosmopedia-v2", "a")  # the input name is part of the key
    us = np.array([unit_of("c", str(i)) for i in range(20000)])
    assert us.min() >= 0 and us.max() < 1 and abs(np.mean(us < 0.1) - 0.1) < 0.01  # uniform


def test_document_splits_follow_the_fractions(shared_work):
    from nextlong.pool import load_pool

    pool = load_pool(shared_work)
    cached = document_units(pool, shared_work)  # written to, then read from the work directory
    assert list(shared_work.glob("doc_split_units-*.npy")) and np.array_equal(document_units(pool, shared_work), cached)
    assert np.array_equal(cached, document_units(pool))
    small = document_splits(pool, 0.1, 0.1)
    big = document_splits(pool, 0.3, 0.1)
    assert set(np.unique(small)) == {0, 1, 2}
    assert np.array_equal(small == SPLIT_CODE["test"], big == SPLIT_CODE["test"])  # test unchanged
    assert np.all(big[small == 1] == 1)  # raising a fraction only moves documents into the held-out side
    assert abs(float(np.mean(big == 1)) - 0.3) < 0.08


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory, docs_corpus, cl100k_json) -> Path:
    """One pool (chunks, embeddings, index) for every run of this module; each run redoes only synthesis."""
    work = tmp_path_factory.mktemp("balance") / "pool.work"
    _run(work.parent, work, docs_corpus, cl100k_json, "pool", n=1)
    return work


def _run(tmp: Path, work: Path, corpus: Path, tok: Path, name: str, *extra: str, T: int = 4096, n: int = 16,
         verify: bool = False) -> Path:
    prefix = tmp / name / "nl"
    args = ["--input", str(corpus), "--tokenizer", str(tok), "--output-prefix", str(prefix), "--work-dir",
            str(work), "--target-length", str(T), "--max-samples", str(n), "--seed", "7", "--no-progress", *extra]
    assert main(args + ([] if verify else ["--no-verify"])) == 0
    return prefix


def _manifest(prefix: Path) -> dict:
    return json.loads(Path(f"{prefix}_manifest.json").read_text())


def _spans(prefix: Path):
    return pq.read_table(f"{prefix}_spans.parquet").to_pandas()


def test_position_balance_in_manifest_and_report(tmp_path, shared_work, docs_corpus, cl100k_json):
    rise, prefixes = {}, {}
    for alloc in ("even", "sequential"):
        prefix = prefixes[alloc] = _run(tmp_path, shared_work, docs_corpus, cl100k_json, alloc,
                                        "--negative-allocation", alloc, n=16)
        pos = _manifest(prefix)["synthesis_balance"]["negatives_by_meta_chunk_position"]
        sp = _spans(prefix)
        neg = sp[sp["role"] == "negative"]
        assert pos["0"]["negatives"] == int((neg["meta_index"] == 0).sum())
        assert pos["0"]["mean_rank"] == pytest.approx(float(neg[neg["meta_index"] == 0]["rank"].mean()))
        rise[alloc] = pos["last"]["mean_rank"] - pos["first"]["mean_rank"]
    assert rise["sequential"] > 0 and rise["even"] < rise["sequential"]
    pytest.importorskip("matplotlib")
    from nextlong.report import write_report

    rep = write_report(prefixes["even"], [prefixes["sequential"]], output=tmp_path / "rep", verify=False)
    page = rep.html.read_text()
    assert 'id="position"' in page and 'id="droprate"' in page
    runs = json.loads(rep.json.read_text())["runs"]
    for run, alloc in zip(runs, ("even", "sequential"), strict=True):
        bal = _manifest(prefixes[alloc])["synthesis_balance"]
        assert run["drop_rate_by_chunks_per_document"] == bal["drop_rate_by_chunks_per_document"]
        for k, v in bal["negatives_by_meta_chunk_position"].items():  # recomputed from the spans: the same
            assert run["negatives_by_meta_chunk_position"][k]["negatives"] == v["negatives"]
            assert run["negatives_by_meta_chunk_position"][k]["mean_rank"] == pytest.approx(v["mean_rank"])


def test_wider_lists_keep_short_documents(tmp_path, shared_work, docs_corpus, cl100k_json):
    """A 1-chunk document needs ~20 negatives at 8192 tokens: with lists capped at 8 it is dropped; with
    wider lists it is not, and the output equals a run that retrieved the widest list at once."""
    flags = ("--target-length", "8192")
    args = (tmp_path, shared_work, docs_corpus, cl100k_json)
    capped = _run(*args, "capped", *flags, "--candidates", "8", "--max-candidates", "8", n=8)
    wide = _run(*args, "wide", *flags, "--candidates", "8", "--max-candidates", "256", n=8)
    full = _run(*args, "full", *flags, "--candidates", "256", "--max-candidates", "256", n=8)
    rc = _manifest(capped)["synthesis_balance"]["drop_rate_by_chunks_per_document"]
    rw = _manifest(wide)["synthesis_balance"]["drop_rate_by_chunks_per_document"]
    assert rc["1"]["dropped"].get("insufficient_negatives", 0) > 0
    assert all("insufficient_negatives" not in row["dropped"] for row in rw.values())
    assert _manifest(wide)["counts"]["filtered_candidates"]["adaptive_k_retries"] > 0
    for name in ("text", "lossweight"):
        for ext in ("bin", "idx"):
            got, want = Path(f"{wide}_{name}_document.{ext}"), Path(f"{full}_{name}_document.{ext}")
            assert got.read_bytes() == want.read_bytes()


def test_heldout_splits_share_the_pool_and_never_cross(tmp_path, shared_work, docs_corpus, cl100k_json):
    work = shared_work
    index_marker = (work / "index" / "done" / "faiss.json").stat().st_mtime_ns
    frac = ("--valid-fraction", "0.2", "--test-fraction", "0.2")
    out = {s: _run(tmp_path, work, docs_corpus, cl100k_json, s, "--split", s, *frac, n=8)
           for s in ("train", "valid", "test")}
    assert (work / "index" / "done" / "faiss.json").stat().st_mtime_ns == index_marker  # pool and index built once
    from nextlong.pool import load_pool

    pool = load_pool(work)
    codes = document_splits(pool, 0.2, 0.2)
    split_of = dict(zip(pool.doc_ids_of(np.arange(pool.n_docs)), codes.tolist(), strict=True))
    metas = {}
    for name, prefix in out.items():
        m = _manifest(prefix)
        assert m["split"]["split"] == name and m["counts"]["samples_out"] == 8
        assert m["split"][name]["documents"] == int(np.sum(codes == SPLIT_CODE[name]))
        sp = _spans(prefix)
        content = sp[sp["role"].isin(["meta", "negative"])]
        assert {split_of[d] for d in content["doc_id"]} == {SPLIT_CODE[name]}  # meta-chunks and negatives alike
        metas[name] = set(content[content["role"] == "meta"]["doc_id"])
        assert (content["role"] == "negative").sum() > 0
    assert not (metas["train"] & metas["valid"]) and not (metas["valid"] & metas["test"])
    assert _manifest(out["train"])["counts"]["filtered_candidates"]["other_split"] > 0  # filtered at mining time


@pytest.mark.parametrize("method", ["standard", "knn"])
def test_baselines_write_mask_one_everywhere(tmp_path, shared_work, docs_corpus, cl100k_json, method):
    prefix = _run(tmp_path, shared_work, docs_corpus, cl100k_json, method, "--method", method, "--split", "valid",
                  "--valid-fraction", "0.5", n=6, verify=True)
    mask = read_indexed(f"{prefix}_lossweight_document")
    assert len(mask) == 6 and np.all(np.asarray(mask.data) == 1)
    sp = _spans(prefix)
    assert set(sp["role"]) <= {"bos", "meta", "separator", "eos"} and sp["doc_id"][sp["role"] == "meta"].nunique() > 6
    codes = _manifest(prefix)["split"]
    assert codes["split"] == "valid"


def test_heldout_search_on_an_ivf_index_returns_only_allowed_chunks():
    """A held-out split searches the shared IVF index with an ID selector and a proportionally larger nprobe:
    every returned id is allowed and the lists are full, although the probed lists hold few allowed chunks."""
    from nextlong.index import build_index
    from nextlong.mining import retrieve_block

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((4000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = build_index(emb, "IVF32,Flat", train_size=4000, seed=0, nprobe=2, use_gpu=False)
    pool = SimpleNamespace(embeddings=emb)
    allowed = rng.random(4000) < 0.05
    queries = np.flatnonzero(allowed)[:20]
    ids, sims = retrieve_block(pool, index, queries, 64, allowed_chunks=allowed)
    assert ids.shape == (20, 64) and np.all(ids >= 0) and np.all(allowed[ids])
    assert np.all(np.diff(sims, axis=1) <= 0)
    exact = np.argsort(-(emb[queries] @ emb[allowed].T), axis=1)[:, :10]  # the true top-10 among allowed chunks
    recall = np.mean([len(set(np.flatnonzero(allowed)[exact[q]]) & set(ids[q, :10])) / 10 for q in range(20)])
    assert recall > 0.8
    plain, _ = retrieve_block(pool, index, queries, 64)  # without the selector: mostly other chunks
    assert np.mean(allowed[plain]) < 0.5


@pytest.mark.parametrize(("flags", "named"), [
    ({"max_candidates": 100}, "--max-candidates"),
    ({"negative_allocation": "random"}, "--negative-allocation"),
    ({"split": "dev"}, "--split"),
    ({"split": "valid", "valid_fraction": 0.0}, "--valid-fraction"),
    ({"split": "test", "test_fraction": 0.0}, "--test-fraction"),
    ({"valid_fraction": 0.6, "test_fraction": 0.5}, "--valid-fraction"),
])
def test_bad_flags_are_named(flags, named):
    from nextlong.config import ConfigError, SynthesisConfig

    with pytest.raises(ConfigError, match=named):
        SynthesisConfig(inputs=["x"], output_prefix="o", tokenizer="t", **flags)
