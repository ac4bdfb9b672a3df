"""Held-out validation and test documents: a stable split of the corpus by a hash of each document's id.

Every document gets a number u in [0, 1) from the BLAKE2b hash of ``<input name>\\n<document id>`` (the
``--input-name``, the file stem by default, and the ``--id-field`` value, ``<file name>:<line or row>``
when the record has none). ``u < test_fraction`` is test, ``u < test_fraction + valid_fraction`` is
validation, the rest is train. The split depends on nothing else: not on the seed, the order of the files,
the other documents or the machine; adding documents never moves an existing one, and raising a fraction
only moves documents into the held-out side.

A run with ``--split train|valid|test`` takes its meta-documents from that split only, and every negative
(and every document of a baseline sample) from the same split: candidates of other splits are removed at
mining time, so the pool, its embeddings and the FAISS index are built once and shared by the three runs.
Held-out splits search the index with a FAISS ID selector restricted to their own chunks (on CPU), so their
candidate lists are as long as the train split's; see :func:`nextlong.mining.retrieve_block`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

SPLITS = ("all", "train", "valid", "test")  #: ``--split`` choices; ``all`` = no split (every document)
SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}  #: codes of :func:`document_splits`


def unit_of(corpus: str, doc_id: str) -> float:
    """The document's position in [0, 1): first 8 bytes of BLAKE2b(corpus, newline, id), big-endian."""
    h = hashlib.blake2b(f"{corpus}\n{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def document_units(pool, work: Path | None = None, step: int = 1 << 20) -> np.ndarray:
    """:func:`unit_of` of every document of ``pool`` (float64 [n_docs]). With ``work`` (the pool's work
    directory), the values are cached there under the identity of ``docs.arrow``, so the synthesis and merge
    stages and every task hash the ids once (tens of millions of documents take minutes)."""
    cache = None
    if work is not None and (work / "docs.arrow").exists():
        st = (work / "docs.arrow").stat()
        cache = work / f"doc_split_units-{st.st_size}-{st.st_mtime_ns}.npy"
        if cache.exists():
            units = np.load(cache)
            if len(units) == pool.n_docs:
                return units
    units = np.empty(pool.n_docs, dtype=np.float64)
    ids = pool.doc_table.column("doc_id")
    corpora = pool.corpora
    codes = np.asarray(pool.doc_corpus_code)
    for a in range(0, pool.n_docs, step):
        chunk_ids = ids.slice(a, step).to_pylist()
        units[a:a + len(chunk_ids)] = np.fromiter(
            (unit_of(corpora[c], d) for c, d in zip(codes[a:a + step].tolist(), chunk_ids, strict=True)),
            dtype=np.float64, count=len(chunk_ids))
    if cache is not None:
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}.npy")
        np.save(tmp, units)
        os.replace(tmp, cache)
    return units


def document_splits(pool, valid_fraction: float, test_fraction: float, work: Path | None = None) -> np.ndarray:
    """Split code (0 train, 1 valid, 2 test) of every document of ``pool`` (int8 [n_docs])."""
    u = document_units(pool, work)
    return np.where(u < test_fraction, 2, np.where(u < test_fraction + valid_fraction, 1, 0)).astype(np.int8)


def allowed_documents(pool, cfg, work: Path | None = None) -> np.ndarray | None:
    """Bool per document: in the run's ``--split`` (``None`` for ``--split all``)."""
    if cfg.split == "all":
        return None
    return document_splits(pool, cfg.valid_fraction, cfg.test_fraction, work) == SPLIT_CODE[cfg.split]


def restrict_order(order: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """The meta-document order without the documents of other splits (relative order kept)."""
    return order if allowed is None else order[allowed[order]]


def split_counts(pool, cfg, work: Path | None = None) -> dict:
    """Documents, chunks and tokens per split (for the manifest); empty for ``--split all``."""
    if cfg.split == "all":
        return {}
    codes = document_splits(pool, cfg.valid_fraction, cfg.test_fraction, work)
    nchunks = np.asarray(pool.doc_nchunks, dtype=np.int64)
    first = np.asarray(pool.doc_first, dtype=np.int64)
    offsets = np.asarray(pool.offsets)
    doc_tokens = offsets[first + nchunks] - offsets[first]
    out = {"split": cfg.split, "valid_fraction": cfg.valid_fraction, "test_fraction": cfg.test_fraction,
           "key": "blake2b-64(input name, newline, document id)"}
    for name, code in SPLIT_CODE.items():
        sel = codes == code
        out[name] = {"documents": int(sel.sum()), "chunks": int(nchunks[sel].sum()),
                     "tokens": int(doc_tokens[sel].sum())}
    return out
