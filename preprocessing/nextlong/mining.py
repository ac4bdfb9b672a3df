"""Hard-negative mining (paper Section 3.1.2, Algorithm 1 lines 21-24, Appendix C.1).

For a block of meta-documents, every meta-chunk's embedding is searched in ONE batched FAISS call for
``candidates`` + (chunks of the largest document in the block) neighbours, so that after removing the
document's own chunks the pool still holds ``candidates`` entries. The similarities of the returned ids
are then recomputed from the stored vectors (float32 products summed along the embedding axis) and the list re-sorted
by (similarity desc, chunk id asc): the order is thus independent of FAISS's batching, threading and index
type, and byte-identical whatever the task layout.

Filtering, per meta-chunk, keeps the similarity order and drops:
  * chunks of the same source document;
  * exact duplicates of the meta-chunk (same normalized-text hash) and near duplicates
    (similarity >= ``near_duplicate_threshold``);
and, while a sample is assembled (:mod:`nextlong.assemble`), chunks already used anywhere in the same
sample (by chunk id and by text hash: a pool that is not perfectly deduplicated cannot repeat text).
With ``--split train|valid|test`` it also drops chunks of documents of another split (:mod:`nextlong.split`);
held-out splits search with a FAISS ID selector over their own chunks, so those never enter the list.

List length (top-k selection): the paper's k has no cap (Appendix C.1), but the retrieved list must have
one. A document is first mined with a list of about twice what its budget needs (at most ``--candidates``);
when a meta-chunk's list runs out before its budget is met, the document is mined again with lists of
``--candidates``, then twice that, ... up to ``--max-candidates`` (the documented limit); only a document
that runs out at that limit is dropped as ``insufficient_negatives``. Because lists are prefixes of one
ranking and a sample that did not exhaust a list never looked past it, the sample is the one the longest
list would give. Short meta-documents need long lists (a 1-chunk document at 512K tokens needs about 1,200
negatives from one meta-chunk), so without this they would be dropped and the dataset would lean towards
long documents. The ablation selections ``tailk`` and ``random-retrieved`` use exactly ``--candidates``
(the paper's "we retrieve 512 documents ... and select k from these", Section 5.3).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .assemble import RETRY_MORE_CANDIDATES, Dropped, Sample, build_nextlong
from .index import search


@dataclass
class Candidates:
    """Ranked candidates of one meta-chunk after the static filters."""

    ids: np.ndarray  # int64 chunk ids, most similar first
    sims: np.ndarray  # float32 similarity to the meta-chunk
    ranks: np.ndarray  # int32 position in the retrieved list (0 = most similar)
    dropped_same_doc: int = 0
    dropped_duplicate: int = 0
    truncated: bool = False  #: a wider search is allowed (list shorter than ``--max-candidates``); more may exist
    dropped_other_split: int = 0


def retrieve_block(pool, index, meta_chunk_ids: np.ndarray, k: int,
                   allowed_chunks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS search for all ``meta_chunk_ids``; returns (ids [q, k], exact sims [q, k]) re-sorted.
    With ``allowed_chunks`` (bool per chunk) the search only returns those chunks (FAISS ID selector on a
    CPU index; an IVF index then probes proportionally more lists, see :func:`_selector_params`)."""
    queries = np.asarray(pool.embeddings[meta_chunk_ids], dtype=np.float32)
    if allowed_chunks is None:
        _, ids = search(index, queries, k)
    else:
        bitmap = np.packbits(np.asarray(allowed_chunks, dtype=bool), bitorder="little")
        params, _keep = _selector_params(index, bitmap, len(allowed_chunks), int(np.count_nonzero(allowed_chunks)))
        k = max(1, min(k, int(np.count_nonzero(allowed_chunks))))
        _, ids = index.search(np.ascontiguousarray(queries), k, params=params)
    ids = ids.astype(np.int64)
    valid = ids >= 0
    sims = np.empty(ids.shape, dtype=np.float32)
    step = max(1, (1 << 22) // max(1, ids.shape[1] * queries.shape[1]))  # ~16 MiB of float32 per step
    for s in range(0, len(ids), step):
        # exact re-scoring, summed (pairwise, by numpy) along the embedding axis only: the value of a
        # (query, chunk) pair never depends on k, on the block or on a BLAS kernel
        rows = np.where(valid[s : s + step], ids[s : s + step], 0)
        vecs = np.asarray(pool.embeddings[rows.ravel()], dtype=np.float32).reshape(*rows.shape, -1)
        vecs *= queries[s : s + step, None, :]
        sims[s : s + step] = vecs.sum(axis=2)
    sims = np.where(valid, sims, -np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), -sims), axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)


def _selector_params(index, bitmap: np.ndarray, n: int, n_allowed: int):
    """FAISS search parameters that return only the chunks set in ``bitmap``. An IVF index scans only the
    lists it probes, so ``nprobe`` is raised in proportion to the share of the pool that is allowed
    (n / n_allowed, at most every list): a held-out split then sees about as many candidates per query as
    an unrestricted search. Returns (params, objects that must outlive the search)."""
    import faiss

    sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))

    def params_for(idx):
        idx = faiss.downcast_index(idx)
        if isinstance(idx, faiss.IndexPreTransform):
            inner = params_for(idx.index)
            return faiss.SearchParametersPreTransform(index_params=inner)
        if isinstance(idx, faiss.IndexIVF):
            nprobe = min(idx.nlist, math.ceil(idx.nprobe * n / max(1, n_allowed)))
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        return faiss.SearchParameters(sel=sel)

    return params_for(index), (sel, bitmap)


def filter_candidates(pool, meta_chunk: int, ids: np.ndarray, sims: np.ndarray, limit: int,
                      near_dup: float, truncated: bool = False, allowed_doc: np.ndarray | None = None) -> Candidates:
    """Static filters for one meta-chunk (see module docstring); keeps at most ``limit`` candidates.
    ``allowed_doc`` (bool per document) removes chunks of documents outside the run's split."""
    valid = ids >= 0
    ranks = np.arange(len(ids), dtype=np.int32)
    doc = pool.chunk_doc[meta_chunk]
    ids_safe = np.where(valid, ids, 0)
    cdoc = pool.chunk_doc[ids_safe]
    same_doc = valid & (cdoc == doc)
    other = valid & ~same_doc & ~allowed_doc[cdoc] if allowed_doc is not None else np.zeros(len(ids), bool)
    dup = valid & ~same_doc & ~other & ((pool.chunk_hash[ids_safe] == pool.chunk_hash[meta_chunk])
                                        | (sims >= near_dup))
    # the retrieved list is "limit" long once the document's own chunks (and other splits') are taken out
    within = np.cumsum(valid & ~same_doc & ~other) <= limit
    keep = valid & ~same_doc & ~other & ~dup & within
    return Candidates(ids[keep], sims[keep], ranks[keep], int(same_doc.sum()), int((dup & within).sum()),
                      truncated, int((other & within).sum()))


def wider_limits(cfg, first: int) -> list[int]:
    """List lengths tried after a first list of ``first`` ran out: ``--candidates``, doubling, up to
    ``--max-candidates`` (top-k selection only; the other selections use exactly ``--candidates``)."""
    cap = cfg.max_candidates if cfg.negative_selection == "topk" else cfg.candidates
    out = []
    limit = cfg.candidates
    while limit < cap:
        if limit > first:
            out.append(limit)
        limit *= 2
    if cap > first:
        out.append(cap)
    return out


def mine_and_build(ctx, doc: int, retrieved: dict, slot: int, filt: Counter) -> Sample:
    """The NExtLong sample of meta-document ``doc`` (global slot ``slot``): from the block's lists, and if a
    list ran out, again with wider lists (:func:`wider_limits`). ``ctx`` is the synthesis task's context
    (pool, cfg, specials, chars_per_token, allowed_doc, retrieve, candidates). Raises :class:`Dropped`."""
    cfg, pool = ctx.cfg, ctx.pool
    allowed = getattr(ctx, "allowed_doc", None)
    first = retrieved["limit"] if retrieved else cfg.candidates
    for limit in (None, *wider_limits(cfg, first)):  # the block's lists first, then wider ones
        if limit is None:
            cands = ctx.candidates(doc, retrieved, filt)
        else:
            filt["adaptive_k_retries"] += 1
            cands = ctx.candidates(doc, ctx.retrieve([doc], adaptive=False, limit=limit), Counter())
        try:
            return build_nextlong(pool, cfg, ctx.specials, doc, cands, np.random.default_rng([cfg.seed, slot]),
                                  ctx.chars_per_token, allowed)
        except Dropped as e:
            if e.reason != RETRY_MORE_CANDIDATES:
                raise
    raise Dropped("insufficient_negatives")  # not reached: the widest list is never marked truncated
