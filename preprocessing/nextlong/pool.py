"""The chunk pool on disk: chunk, tokenize and embed every document once (paper Eq. 2-3).

Work-directory layout (all written atomically; see :mod:`nextlong.stages` for completion markers):

``chunks.parquet``   one row per chunk, ``chunk_id`` = row number: corpus, doc_id, doc_ordinal,
                     chunk_in_doc, text, n_chars, text_hash (64-bit hash of the whitespace-normalized,
                     lower-cased text, for exact-duplicate filtering)
``docs.parquet``     one row per document, ``doc_ordinal`` = row number: corpus, corpus_index, doc_id,
                     first_chunk, n_chunks, n_chars
``tokens.npy``       int32, the token ids of every chunk back to back (no special tokens)
``token_offsets.npy`` int64 [n_chunks + 1]: chunk i is ``tokens[offsets[i]:offsets[i+1]]``
``embeddings.npy``   float32 [n_chunks, dim], unit rows
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chunking import chunk_spans
from .readers import Rejects, iter_documents, parse_input_specs

log = logging.getLogger(__name__)

_WS = re.compile(r"\s+")


def text_hash(text: str) -> int:
    """Signed 64-bit hash of the normalized text (exact duplicates up to case and whitespace)."""
    norm = _WS.sub(" ", text).strip().lower()
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _atomic_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def build_chunks(cfg, work: Path, progress) -> dict:
    """Read every input, chunk every document; write chunks.parquet, docs.parquet and rejects.jsonl."""
    import pyarrow as pa

    specs = parse_input_specs(cfg.inputs, cfg.mix, cfg.input_names)
    rejects = Rejects()
    cols: dict[str, list] = {k: [] for k in ("corpus", "doc_id", "doc_ordinal", "chunk_in_doc", "text",
                                             "n_chars", "text_hash")}
    docs: dict[str, list] = {k: [] for k in ("corpus", "corpus_index", "doc_id", "first_chunk", "n_chunks",
                                             "n_chars")}
    per_corpus: dict[str, int] = {}
    bar = progress(desc="chunk", unit="doc")
    for spec in specs:
        n_in = 0
        for doc in iter_documents(spec, cfg.text_field, cfg.id_field, rejects):
            spans = chunk_spans(doc.text, cfg.granularity)
            if not spans:
                rejects.add("empty_document", doc.source)
                continue
            ordinal = len(docs["doc_id"])
            docs["corpus"].append(spec.name)
            docs["corpus_index"].append(n_in)
            docs["doc_id"].append(doc.doc_id)
            docs["first_chunk"].append(len(cols["text"]))
            docs["n_chunks"].append(len(spans))
            docs["n_chars"].append(len(doc.text))
            for j, (a, b) in enumerate(spans):
                t = doc.text[a:b]
                cols["corpus"].append(spec.name)
                cols["doc_id"].append(doc.doc_id)
                cols["doc_ordinal"].append(ordinal)
                cols["chunk_in_doc"].append(j)
                cols["text"].append(t)
                cols["n_chars"].append(len(t))
                cols["text_hash"].append(text_hash(t))
            n_in += 1
            bar.update(1)
        per_corpus[spec.name] = n_in
    bar.close()
    n_chunks = len(cols["text"])
    chunks = pa.table({
        "chunk_id": pa.array(np.arange(n_chunks, dtype=np.int64)),
        "corpus": pa.array(cols["corpus"], pa.string()),
        "doc_id": pa.array(cols["doc_id"], pa.string()),
        "doc_ordinal": pa.array(cols["doc_ordinal"], pa.int64()),
        "chunk_in_doc": pa.array(cols["chunk_in_doc"], pa.int32()),
        "text": pa.array(cols["text"], pa.large_string()),
        "n_chars": pa.array(cols["n_chars"], pa.int32()),
        "text_hash": pa.array(cols["text_hash"], pa.int64()),
    })
    doc_table = pa.table({
        "doc_ordinal": pa.array(np.arange(len(docs["doc_id"]), dtype=np.int64)),
        "corpus": pa.array(docs["corpus"], pa.string()),
        "corpus_index": pa.array(docs["corpus_index"], pa.int64()),
        "doc_id": pa.array(docs["doc_id"], pa.string()),
        "first_chunk": pa.array(docs["first_chunk"], pa.int64()),
        "n_chunks": pa.array(docs["n_chunks"], pa.int32()),
        "n_chars": pa.array(docs["n_chars"], pa.int64()),
    })
    _atomic_parquet(work / "chunks.parquet", chunks)
    _atomic_parquet(work / "docs.parquet", doc_table)
    rejects.write(work / "rejects.jsonl")
    stats = {"documents": len(docs["doc_id"]), "chunks": n_chunks, "documents_per_input": per_corpus,
             "chars": int(sum(docs["n_chars"])), "rejected": dict(sorted(rejects.counts.items()))}
    log.info("chunk: %d documents -> %d chunks (granularity %d chars); rejected %s", stats["documents"], n_chunks,
             cfg.granularity, stats["rejected"] or "none")
    return stats


def load_texts(work: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(work / "chunks.parquet", columns=["text"]).column("text").to_pylist()


def tokenize_chunks(tokenizer, work: Path, progress, batch_size: int = 8192) -> dict:
    """Tokenize every chunk exactly once into tokens.npy / token_offsets.npy."""
    texts = load_texts(work)
    lengths = np.zeros(len(texts), dtype=np.int64)
    parts: list[np.ndarray] = []
    bar = progress(total=len(texts), desc="tokenize", unit="chunk")
    for i in range(0, len(texts), batch_size):
        enc = tokenizer.encode_batch(texts[i : i + batch_size])
        for j, ids in enumerate(enc):
            lengths[i + j] = len(ids)
        parts.append(np.fromiter((t for ids in enc for t in ids), dtype=np.int32,
                                 count=int(lengths[i : i + len(enc)].sum())))
        bar.update(len(enc))
    bar.close()
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    _atomic_npy(work / "tokens.npy", tokens)
    _atomic_npy(work / "token_offsets.npy", offsets)
    chars = sum(len(t) for t in texts)
    stats = {"tokens": int(offsets[-1]), "chars_per_token": chars / max(1, int(offsets[-1]))}
    log.info("tokenize: %d chunks -> %d tokens (%.2f chars/token)", len(texts), stats["tokens"],
             stats["chars_per_token"])
    return stats


def embed_chunks(embedder, work: Path, progress, batch_size: int = 4096) -> dict:
    """Embed every chunk exactly once into embeddings.npy (float32, unit rows)."""
    texts = load_texts(work)
    embedder.fit(texts)
    out = None
    tmp = work / f".embeddings.npy.tmp-{os.getpid()}.npy"
    bar = progress(total=len(texts), desc="embed", unit="chunk")
    for i in range(0, len(texts), batch_size):
        e = embedder.embed(texts[i : i + batch_size])
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(texts), e.shape[1]))
        out[i : i + len(e)] = e
        bar.update(len(e))
    bar.close()
    if out is None:
        raise ValueError("no chunk to embed: every input document was rejected (see the rejects file)")
    out.flush()
    del out
    os.replace(tmp, work / "embeddings.npy")
    stats = {"dim": int(embedder.dim), "embedder": embedder.describe()}
    log.info("embed: %d chunks -> %d-dim vectors with %s", len(texts), embedder.dim, embedder.name)
    return stats


@dataclass
class Pool:
    """Read-only view of a built pool, as the synthesis stage needs it (arrays memory-mapped)."""

    chunk_doc: np.ndarray  # int64 [n_chunks]: doc_ordinal of every chunk
    chunk_hash: np.ndarray  # int64 [n_chunks]
    chunk_corpus_code: np.ndarray  # int16 [n_chunks]: index into corpora
    corpora: list[str]
    doc_first: np.ndarray  # int64 [n_docs]
    doc_nchunks: np.ndarray  # int32 [n_docs]
    doc_chars: np.ndarray  # int64 [n_docs]
    doc_corpus_code: np.ndarray  # int16 [n_docs]
    doc_corpus_index: np.ndarray  # int64 [n_docs]
    doc_ids: list[str]
    tokens: np.ndarray  # int32 memmap
    offsets: np.ndarray  # int64 [n_chunks + 1]
    embeddings: np.ndarray  # float32 memmap [n_chunks, dim]

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_doc)

    @property
    def n_docs(self) -> int:
        return len(self.doc_first)

    def chunk_tokens(self, cid: int) -> np.ndarray:
        return self.tokens[self.offsets[cid] : self.offsets[cid + 1]]

    def chunk_len(self, cid: int) -> int:
        return int(self.offsets[cid + 1] - self.offsets[cid])


def load_pool(work: Path) -> Pool:
    import pyarrow.parquet as pq

    ch = pq.read_table(work / "chunks.parquet", columns=["doc_ordinal", "text_hash", "corpus"])
    dt = pq.read_table(work / "docs.parquet")
    corpora = sorted(set(dt.column("corpus").to_pylist()))
    code = {c: i for i, c in enumerate(corpora)}
    doc_code = np.array([code[c] for c in dt.column("corpus").to_pylist()], dtype=np.int16)
    chunk_doc = ch.column("doc_ordinal").to_numpy()
    return Pool(
        chunk_doc=chunk_doc,
        chunk_hash=ch.column("text_hash").to_numpy(),
        chunk_corpus_code=doc_code[chunk_doc] if len(chunk_doc) else np.zeros(0, np.int16),
        corpora=corpora,
        doc_first=dt.column("first_chunk").to_numpy(),
        doc_nchunks=dt.column("n_chunks").to_numpy(),
        doc_chars=dt.column("n_chars").to_numpy(),
        doc_corpus_code=doc_code,
        doc_corpus_index=dt.column("corpus_index").to_numpy(),
        doc_ids=dt.column("doc_id").to_pylist(),
        # plain ndarray views of the memory maps: slicing them is much cheaper than slicing np.memmap
        tokens=np.load(work / "tokens.npy", mmap_mode="r").view(np.ndarray),
        offsets=np.load(work / "token_offsets.npy"),
        embeddings=np.load(work / "embeddings.npy", mmap_mode="r").view(np.ndarray),
    )
