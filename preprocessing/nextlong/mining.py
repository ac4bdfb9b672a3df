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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .index import search


@dataclass
class Candidates:
    """Ranked candidates of one meta-chunk after the static filters."""

    ids: np.ndarray  # int64 chunk ids, most similar first
    sims: np.ndarray  # float32 similarity to the meta-chunk
    ranks: np.ndarray  # int32 position in the retrieved list (0 = most similar)
    dropped_same_doc: int = 0
    dropped_duplicate: int = 0
    truncated: bool = False  #: retrieved fewer than ``candidates`` (adaptive k); more may exist


def retrieve_block(pool, index, meta_chunk_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS search for all ``meta_chunk_ids``; returns (ids [q, k], exact sims [q, k]) re-sorted."""
    queries = np.asarray(pool.embeddings[meta_chunk_ids], dtype=np.float32)
    _, ids = search(index, queries, k)
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


def filter_candidates(pool, meta_chunk: int, ids: np.ndarray, sims: np.ndarray, limit: int,
                      near_dup: float, truncated: bool = False) -> Candidates:
    """Static filters for one meta-chunk (see module docstring); keeps at most ``limit`` candidates."""
    valid = ids >= 0
    ranks = np.arange(len(ids), dtype=np.int32)
    doc = pool.chunk_doc[meta_chunk]
    ids_safe = np.where(valid, ids, 0)
    same_doc = valid & (pool.chunk_doc[ids_safe] == doc)
    dup = valid & ~same_doc & ((pool.chunk_hash[ids_safe] == pool.chunk_hash[meta_chunk]) | (sims >= near_dup))
    keep = valid & ~same_doc & ~dup
    # the retrieved list is "candidates" long once the document's own chunks are taken out
    within = np.cumsum(valid & ~same_doc) <= limit
    keep &= within
    return Candidates(ids[keep], sims[keep], ranks[keep], int(same_doc.sum()), int((dup & within).sum()),
                      truncated and bool(within[-1]) if len(within) else truncated)
