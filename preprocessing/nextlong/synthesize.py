"""Synthesis library: meta-document order, mining + assembly of one unit of slots, and the merge.

Determinism across layouts: meta-documents are put in one global order (a seeded shuffle per input,
interleaved by ``--mix`` weights); that order is cut into blocks of ``--block-docs`` slots, one unit of the
``synth`` stage each (:mod:`nextlong.stages.synth`). Every slot draws its random numbers from its own stream
``default_rng([seed, slot])``; FAISS similarities are recomputed exactly (see :mod:`nextlong.mining`). So a
slot's sample does not depend on which task made it, and the merged output is byte-identical for any
``--tasks``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from .assemble import ROLE_CODE, ROLE_NEG, ROLES, Dropped, Specials, Tally, build_concat
from .failpoints import failpoint
from .indexed import IndexedDatasetWriter, read_indexed, token_dtype_for_vocab, write_index
from .mining import filter_candidates, mine_and_build, retrieve_block
from .split import allowed_documents

log = logging.getLogger(__name__)

DATASETS = ("text", "lossweight", "label")
SPAN_COLUMNS = ("sample", "span", "start", "length", "role", "meta_index", "corpus", "doc_id", "chunk_id",
                "rank", "similarity", "truncated")


def meta_document_order(pool, corpus_weights: dict[str, float], seed: int) -> np.ndarray:
    """Doc ordinals in synthesis order: each input shuffled with its own seeded stream, then interleaved
    by smooth weighted round-robin; stops when an input runs out, so the mix holds."""
    per: list[np.ndarray] = []
    weights: list[float] = []
    for code, name in enumerate(pool.corpora):
        docs = np.flatnonzero(pool.doc_corpus_code == code)
        # order by the document's position in its input, then shuffle: independent of other inputs
        docs = docs[np.argsort(pool.doc_corpus_index[docs], kind="stable")]
        rng = np.random.default_rng([seed, 0xD0C, code])
        per.append(docs[rng.permutation(len(docs))])
        weights.append(float(corpus_weights.get(name, 1.0)))
    if len(per) == 1:
        return per[0]
    total = sum(weights)
    current = [0.0] * len(per)
    pos = [0] * len(per)
    out: list[int] = []
    while True:
        for i, w in enumerate(weights):
            current[i] += w
        i = max(range(len(per)), key=lambda j: (current[j], -j))
        current[i] -= total
        if pos[i] >= len(per[i]):
            break
        out.append(int(per[i][pos[i]]))
        pos[i] += 1
    return np.asarray(out, dtype=np.int64)


def unit_paths(work: Path, unit: str) -> dict[str, Path]:
    """Files of one synthesis unit under ``<work>/synth/``: its datasets (prefixes) and its spans."""
    base = work / "synth" / unit
    return {
        "spans": Path(f"{base}_spans.parquet"),
        **{name: Path(f"{base}_{name}_document") for name in DATASETS},
    }


def plan_blocks(n_slots: int, block: int) -> list[tuple[int, int]]:
    """Slot ranges [start, end) of the synthesis units: consecutive blocks of ``block`` slots. Fixed by the
    data and ``--block-docs``, never by the number of tasks."""
    return [(a, min(n_slots, a + block)) for a in range(0, n_slots, block)]


class PartContext:
    """What a synthesis task loads once: the pool, the index, the special tokens."""

    def __init__(self, cfg, work: Path, specials: dict, chars_per_token: float, vocab_size: int) -> None:
        from .index import load_index
        from .pool import load_pool

        self.cfg = cfg
        self.work = work
        self.pool = load_pool(work)
        self.allowed_doc = allowed_documents(self.pool, cfg, work)  # None, or bool per document of the run's split
        heldout = cfg.split in ("valid", "test")  # searched with an ID selector, on CPU (nextlong.mining)
        self.allowed_chunks = self.allowed_doc[self.pool.chunk_doc] if heldout else None
        self.n_available = (self.pool.n_chunks if self.allowed_doc is None
                            else int(np.count_nonzero(self.allowed_doc[self.pool.chunk_doc])))
        self.index = (load_index(work / "index.faiss", nprobe=cfg.nprobe, use_gpu=False if heldout else None)
                      if cfg.method == "nextlong" else None)
        self.specials = Specials(*(np.asarray(specials[k], dtype=np.int32) for k in ("bos", "eos", "sep")))
        self.chars_per_token = chars_per_token
        self.token_dtype = token_dtype_for_vocab(vocab_size)
        self._doc_index = None

    def retrieve(self, docs: list[int], adaptive: bool, limit: int | None = None) -> dict:
        """One batched search for the meta-chunks of ``docs``, lists of ``limit`` (default ``--candidates``).
        With ``adaptive`` (top-k selection only), ask FAISS for about twice the negatives a sample can use
        instead; a document whose list runs out is redone with wider lists (:func:`nextlong.mining.
        mine_and_build`), so the result is the same."""
        cfg, pool = self.cfg, self.pool
        meta_ids = np.concatenate([np.arange(pool.doc_first[d], pool.doc_first[d] + pool.doc_nchunks[d])
                                   for d in docs])
        most = int(max(pool.doc_nchunks[d] for d in docs))
        fewest = int(min(pool.doc_nchunks[d] for d in docs))
        want = limit or cfg.candidates
        if adaptive and limit is None:
            mean_tokens = max(1.0, float(pool.offsets[-1]) / max(1, pool.n_chunks))
            want = min(cfg.candidates, 2 * int(np.ceil(cfg.target_length / fewest / mean_tokens)) + 32)
        cap = cfg.max_candidates if cfg.negative_selection == "topk" else cfg.candidates
        ids, sims = retrieve_block(pool, self.index, meta_ids, want + most, self.allowed_chunks)
        return {"ids": ids, "sims": sims, "row": {int(c): r for r, c in enumerate(meta_ids)}, "limit": want,
                "truncated": want < cap and want + most < self.n_available}

    def candidates(self, doc: int, retrieved: dict | None, filt: Counter) -> list:
        """Filtered candidate lists of every meta-chunk of ``doc`` (empty for retrieval-free selections)."""
        if retrieved is None:
            return []
        cfg, pool = self.cfg, self.pool
        out = []
        for m in range(pool.doc_first[doc], pool.doc_first[doc] + pool.doc_nchunks[doc]):
            r = retrieved["row"][int(m)]
            c = filter_candidates(pool, int(m), retrieved["ids"][r], retrieved["sims"][r], retrieved["limit"],
                                  cfg.near_duplicate_threshold, retrieved["truncated"], self.allowed_doc)
            filt["same_document"] += c.dropped_same_doc
            filt["duplicate"] += c.dropped_duplicate
            filt["other_split"] += c.dropped_other_split
            out.append(c)
        return out

    def doc_neighbours(self, docs: list[int], k: int):
        """knn baseline: documents most similar to each of ``docs`` (mean chunk embedding, inner product)."""
        import faiss

        pool = self.pool
        if self._doc_index is None:
            emb = np.add.reduceat(np.asarray(pool.embeddings, dtype=np.float32), pool.doc_first, axis=0)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            self._doc_emb = emb
            # only documents of the run's split are neighbours (row r of the index is document _doc_ids[r])
            self._doc_ids = np.arange(pool.n_docs) if self.allowed_doc is None else np.flatnonzero(self.allowed_doc)
            self._doc_index = faiss.IndexFlatIP(emb.shape[1])
            self._doc_index.add(np.ascontiguousarray(emb[self._doc_ids]))
        _, ids = self._doc_index.search(self._doc_emb[docs], min(k, len(self._doc_ids)))
        out = []
        for q, d in enumerate(docs):
            row = self._doc_ids[ids[q][ids[q] >= 0]]
            sims = self._doc_emb[row] @ self._doc_emb[d]
            order = np.lexsort((row, -sims))
            out.append((row[order], sims[order].astype(np.float32)))
        return out


def run_part(ctx: PartContext, unit: str, slots: np.ndarray, slot_start: int, progress=None) -> dict:
    """Synthesize the samples of ``slots`` (global slot numbers ``slot_start``...) into unit ``unit``.
    Returns its statistics; ``dropped_slots`` maps the position of every dropped slot to its reason, so
    that the samples taken from a unit can be traced back to the meta-documents they consumed."""
    cfg, pool = ctx.cfg, ctx.pool
    paths = unit_paths(ctx.work, unit)
    paths["spans"].parent.mkdir(parents=True, exist_ok=True)
    writers = {
        "text": IndexedDatasetWriter(paths["text"], ctx.token_dtype),
        "lossweight": IndexedDatasetWriter(paths["lossweight"], np.uint8),
    }
    if cfg.emit_labels:
        writers["label"] = IndexedDatasetWriter(paths["label"], np.int32)
    rows: list[tuple[int, dict]] = []  # (sample number, span arrays) of the current block
    spans_out = _SpanWriter(paths["spans"], pool)  # one row group per block: memory bounded by a block
    dropped: Counter[str] = Counter()
    dropped_slots: dict[int, str] = {}
    filt: Counter[str] = Counter()
    tally = Tally()  # drop rate by document length, negatives by meta-chunk position
    overfill: list[int] = []
    produced = 0
    try:
        step = cfg.block_docs
        for b in range(0, len(slots), step):
            block = [int(d) for d in slots[b : b + step]]
            retrieved = None
            if cfg.method == "nextlong" and cfg.negative_selection not in ("random-doc", "self-repeat"):
                retrieved = ctx.retrieve(block, adaptive=cfg.negative_selection == "topk")
            neighbours = ctx.doc_neighbours(block, cfg.candidates + 1) if cfg.method == "knn" else None
            for j, d in enumerate(block):
                slot = slot_start + b + j
                rng = np.random.default_rng([cfg.seed, slot])
                try:
                    if cfg.method == "nextlong":
                        sample = mine_and_build(ctx, d, retrieved, slot, filt)
                    else:
                        sample = build_concat(pool, cfg, ctx.specials, d, neighbours[j] if neighbours else None,
                                              rng, ctx.allowed_doc)
                except Dropped as e:
                    dropped[e.reason] += 1
                    dropped_slots[b + j] = e.reason
                    tally.dropped(int(pool.doc_nchunks[d]), e.reason)
                    continue
                tally.sample(int(pool.doc_nchunks[d]), sample)
                if "overfill_tokens" in sample.stats:
                    overfill.append(sample.stats["overfill_tokens"])
                writers["text"].add_document(sample.tokens)
                writers["lossweight"].add_document(sample.mask)
                if "label" in writers:
                    writers["label"].add_document(np.where(sample.mask == 1, sample.tokens, -100).astype(np.int32))
                rows.append((produced, sample.spans))
                produced += 1
            spans_out.write(rows)
            rows = []
            if progress is not None:
                progress(len(block))
        n_negative = spans_out.close()
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        spans_out.abort()
        raise
    return {
        "slot_start": slot_start, "slots": len(slots), "samples": produced,
        "dropped": dict(sorted(dropped.items())), "dropped_slots": {str(k): v for k, v in dropped_slots.items()},
        "filtered_candidates": dict(filt), "negative_spans": n_negative, "paper_budget_overfill_tokens": overfill,
        "balance": tally.to_dict(),
    }


def slots_consumed(stats: dict, samples: int) -> tuple[int, dict[str, int]]:
    """Meta-documents a unit consumed to give its first ``samples`` samples, and their drops by reason."""
    if samples >= stats["samples"]:
        return stats["slots"], dict(stats["dropped"])
    dropped_at = {int(k): v for k, v in stats.get("dropped_slots", {}).items()}
    made, used = 0, 0
    drops: Counter[str] = Counter()
    while made < samples:
        if used in dropped_at:
            drops[dropped_at[used]] += 1
        else:
            made += 1
        used += 1
    return used, dict(drops)


class _SpanWriter:
    """Streams a part's spans (columns of docs/format.md) into Parquet under a temporary name."""

    def __init__(self, path: Path, pool) -> None:
        self.path, self.pool = path, pool
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = None
        self.n_negative = 0

    def write(self, rows: list[tuple[int, dict]]) -> None:
        import pyarrow.parquet as pq

        table = _spans_table(rows, self.pool)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
        if table.num_rows:
            self.writer.write_table(table)
        self.n_negative += int(sum(int(np.sum(s["role"] == ROLE_CODE[ROLE_NEG])) for _, s in rows))

    def close(self) -> int:
        if self.writer is None:
            self.write([])
        self.writer.close()
        os.replace(self.tmp, self.path)
        return self.n_negative

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _spans_table(rows: list[tuple[int, dict]], pool):
    import pyarrow as pa

    names = ("start", "length", "role", "meta_index", "chunk_id", "rank", "similarity", "truncated")
    dtypes = (np.int64, np.int32, np.int8, np.int32, np.int64, np.int32, np.float32, bool)
    if rows:
        col = {n: np.concatenate([s[n] for _, s in rows]).astype(t, copy=False) for n, t in zip(names, dtypes,
                                                                                                   strict=True)}
        sample = np.concatenate([np.full(len(s["start"]), k, dtype=np.int64) for k, s in rows])
        span = np.concatenate([np.arange(len(s["start"]), dtype=np.int32) for _, s in rows])
    else:
        col = {n: np.zeros(0, dtype=t) for n, t in zip(names, dtypes, strict=True)}
        sample, span = np.zeros(0, np.int64), np.zeros(0, np.int32)
    cid = col["chunk_id"]
    has = cid >= 0
    docs = pool.chunk_doc[np.where(has, cid, 0)] if len(cid) else np.zeros(0, np.int64)
    doc_col = np.asarray(pool.doc_ids_of(docs), dtype=object) if len(cid) else np.zeros(0, dtype=object)
    doc_col[~has] = ""
    corpora = np.asarray([*pool.corpora, ""], dtype=object)
    corpus_col = corpora[np.where(has, pool.doc_corpus_code[docs] if len(cid) else cid, len(pool.corpora))]
    return pa.table({
        "sample": pa.array(sample),
        "span": pa.array(span),
        "start": pa.array(col["start"]),
        "length": pa.array(col["length"]),
        "role": pa.array(np.asarray(ROLES, dtype=object)[col["role"]], pa.string()),
        "meta_index": pa.array(col["meta_index"]),
        "corpus": pa.array(corpus_col, pa.string()),
        "doc_id": pa.array(doc_col, pa.string()),
        "chunk_id": pa.array(cid),
        "rank": pa.array(col["rank"]),
        "similarity": pa.array(col["similarity"]),
        "truncated": pa.array(col["truncated"]),
    })


def merge_parts(work: Path, units: list[str], out_prefix: str, emit_labels: bool, max_samples: int | None) -> dict:
    """Concatenate the units, in order, into the datasets ``<out_prefix>_*`` (document index rebuilt), keeping
    at most ``max_samples`` samples. Every byte is copied: the result shares no inode with the work files.
    Each file is written under a temporary name and renamed into place (the ``.idx`` after its ``.bin``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = ["text", "lossweight"] + (["label"] if emit_labels else [])
    parts = [unit_paths(work, u) for u in units]
    readers = [{n: read_indexed(p[n]) for n in names} for p in parts]
    takes = []
    left = max_samples if max_samples is not None else float("inf")
    for r in readers:
        n = int(min(len(r["text"]), left))
        takes.append(n)
        left -= n
    total = sum(takes)
    for name in names:
        final = f"{out_prefix}_{name}_document"
        dtype = readers[0][name].dtype if readers else np.dtype(np.int32)
        bin_path = Path(f"{final}.bin")
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_bin = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
        lengths: list[np.ndarray] = []
        try:
            _concat_bins(readers, takes, name, tmp_bin, lengths)
        except BaseException:
            tmp_bin.unlink(missing_ok=True)
            raise
        lengths_arr = np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths_arr), dtype=np.int64)
        if len(lengths_arr) > 1:
            np.cumsum(lengths_arr[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
        write_index(Path(f"{final}.idx"), dtype, lengths_arr, pointers, np.arange(total + 1, dtype=np.int64),
                    before_rename=lambda tb=tmp_bin, bp=bin_path: os.replace(tb, bp))
        failpoint("merge:between_files")
    spans_path = Path(f"{out_prefix}_spans.parquet")
    tmp = spans_path.with_name(f".{spans_path.name}.tmp-{os.getpid()}")
    writer = None
    offset = 0
    try:
        for p, n in zip(parts, takes, strict=True):
            pf = pq.ParquetFile(p["spans"])
            for g in range(pf.num_row_groups):  # streamed: one row group in memory at a time
                t = pf.read_row_group(g)
                t = t.filter(pc.less(t.column("sample"), n))
                t = t.set_column(0, "sample", pc.add(t.column("sample"), pa.scalar(offset, pa.int64())))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema, compression="zstd")
                if t.num_rows:
                    writer.write_table(t)
            offset += n
        if writer is None:
            writer = pq.ParquetWriter(tmp, pq.read_schema(parts[0]["spans"]), compression="zstd")
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, spans_path)
    tokens = sum(int(np.sum(r["text"].lengths[:n], dtype=np.int64)) for r, n in zip(readers, takes, strict=True))
    return {"samples": total, "tokens": tokens, "takes": takes}


def _concat_bins(readers, takes, name: str, tmp_bin: Path, lengths: list) -> None:
    with open(tmp_bin, "wb") as out:
        for r, n in zip(readers, takes, strict=True):
            ds = r[name]
            if n == 0:
                continue
            nbytes = int(ds.pointers[n - 1]) + int(ds.lengths[n - 1]) * ds.dtype.itemsize
            with open(f"{ds.prefix}.bin", "rb") as src:
                _copy_bytes(src, out, nbytes)
            lengths.append(np.asarray(ds.lengths[:n]))
        out.flush()
        os.fsync(out.fileno())


def _copy_bytes(src, dst, nbytes: int, bufsize: int = 64 << 20) -> None:
    """Copy ``nbytes`` from the current position of ``src`` to ``dst``: in the kernel (copy_file_range) where
    the platform has it, else through a buffer."""
    left = nbytes
    if hasattr(os, "copy_file_range"):
        dst.flush()
        try:
            while left > 0:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30))
                if n == 0:
                    raise OSError(f"{src.name}: ended {left} bytes early")
                left -= n
            return
        except OSError:
            if left != nbytes:
                raise  # failed midway: the file positions are no longer those of the buffered objects
            # nothing copied (e.g. EXDEV on old kernels, unsupported filesystem): copy through a buffer
    while left > 0:
        buf = src.read(min(bufsize, left))
        if not buf:
            raise OSError(f"{src.name}: ended {left} bytes early")
        dst.write(buf)
        left -= len(buf)
