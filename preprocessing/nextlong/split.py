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

import numpy as np

SPLITS = ("all", "train", "valid", "test")  #: ``--split`` choices; ``all`` = no split (every document)
SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}  #: codes of :func:`document_splits`


def unit_of(corpus: str, doc_id: str) -> float:
    """The document's position in [0, 1): first 8 bytes of BLAKE2b(corpus, newline, id), big-endian."""
    h = hashlib.blake2b(f"{corpus}\n{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def document_splits(pool, valid_fraction: float, test_fraction: float, step: int = 1 << 20) -> np.ndarray:
    """Split code (0 train, 1 valid, 2 test) of every document of ``pool`` (int8 [n_docs])."""
    out = np.empty(pool.n_docs, dtype=np.int8)
    ids = pool.doc_table.column("doc_id")
    corpora = pool.corpora
    codes = np.asarray(pool.doc_corpus_code)
    for a in range(0, pool.n_docs, step):
        chunk_ids = ids.slice(a, step).to_pylist()
        u = np.fromiter((unit_of(corpora[c], d) for c, d in zip(codes[a:a + step].tolist(), chunk_ids, strict=True)),
                        dtype=np.float64, count=len(chunk_ids))
        out[a:a + len(chunk_ids)] = np.where(u < test_fraction, 2, np.where(u < test_fraction + valid_fraction, 1, 0))
    return out


def allowed_documents(pool, cfg) -> np.ndarray | None:
    """Bool per document: in the run's ``--split`` (``None`` for ``--split all``)."""
    if cfg.split == "all":
        return None
    return document_splits(pool, cfg.valid_fraction, cfg.test_fraction) == SPLIT_CODE[cfg.split]


def restrict_order(order: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """The meta-document order without the documents of other splits (relative order kept)."""
    return order if allowed is None else order[allowed[order]]


def split_counts(pool, cfg) -> dict:
    """Documents, chunks and tokens per split (for the manifest); empty for ``--split all``."""
    if cfg.split == "all":
        return {}
    codes = document_splits(pool, cfg.valid_fraction, cfg.test_fraction)
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
