"""The chunk pool on disk: every document chunked, tokenized and embedded exactly once (paper Eq. 2-3).

The pool is built in *shards*, one per input file (a built-in corpus is one shard), so that the same
stages run as parallel local tasks or as a Slurm job array. A shard's outputs depend only on its file and
the settings, never on the task layout; global ids (documents, chunks) are assigned afterwards by the
``gather`` step in shard order.

Per shard, ``pool/shard-XXXXX/`` (stage ``chunk``, then stage ``embed``):

``chunks.parquet``     doc_id, doc_local, chunk_in_doc, text, n_chars, n_tokens, text_hash
``docs.parquet``       doc_id, n_chunks, n_chars
``tokens.npy``         int32, the tokens of every chunk back to back; ``token_offsets.npy`` int64 [n + 1]
``df.npy``             document frequencies of the hashing embedder's features (``hashing`` only)
``embeddings.npy``     float16 or float32 [n, dim], unit rows (``--embedding-dtype``)

Gathered, in the work directory (stage ``gather``; everything streamed, memory bounded by one shard):

``chunks.parquet``     all chunks, ``chunk_id`` = row number, plus ``doc_ordinal`` (global document id)
``tokens.npy``, ``token_offsets.npy``, ``embeddings.npy``   concatenations in chunk-id order
``chunk_doc.npy`` (int64), ``chunk_hash.npy`` (int64)        per chunk, memory-mapped by the synthesis tasks
``doc_first.npy``, ``doc_nchunks.npy``, ``doc_chars.npy``, ``doc_corpus.npy``, ``doc_corpus_index.npy``
``docs.arrow``         document ids and corpus names (Arrow IPC, memory-mapped)
``rejects.jsonl``      every skipped input record
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chunking import chunk_spans
from .readers import InputPolicy, InputSpec, Rejects, iter_documents, parse_input_specs

log = logging.getLogger(__name__)

_WS = re.compile(r"\s+")


def text_hash(text: str) -> int:
    """Signed 64-bit hash of the normalized text (exact duplicates up to case and whitespace)."""
    norm = _WS.sub(" ", text).strip().lower()
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _tmp(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = _tmp(path, ".npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def atomic_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Shard:
    """One input file (or built-in corpus) of one ``--input``."""

    index: int
    spec: InputSpec  #: the --input it belongs to (its pattern is replaced by this file)
    input_index: int
    file_index: int  #: position of the file among its input's files

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def plan_shards(cfg) -> list[Shard]:
    """Every input file, in input order then sorted file order: the unit of work of the pool stages."""
    shards: list[Shard] = []
    for i, spec in enumerate(parse_input_specs(cfg.inputs, cfg.mix, cfg.input_names)):
        files = [spec.pattern] if spec.pattern.startswith("builtin:") else [str(p) for p in spec.files()]
        for j, f in enumerate(files):
            shards.append(Shard(len(shards), InputSpec(f, spec.name, spec.weight), i, j))
    return shards


def shard_dir(work: Path, shard: Shard) -> Path:
    return work / "pool" / shard.name


def chunk_shard(cfg, work: Path, shard: Shard, tokenizer, progress=None) -> dict:
    """Read, chunk and tokenize one shard (and count the hashing embedder's document frequencies)."""
    import pyarrow as pa

    out = shard_dir(work, shard)
    out.mkdir(parents=True, exist_ok=True)
    rejects = Rejects()
    cols: dict[str, list] = {k: [] for k in ("doc_id", "doc_local", "chunk_in_doc", "text", "n_chars", "text_hash")}
    docs: dict[str, list] = {k: [] for k in ("doc_id", "n_chunks", "n_chars", "text_hash")}
    bar = progress(desc=f"chunk {shard.name}", unit="doc") if progress else None
    policy = InputPolicy(cfg.duplicates, cfg.control_chars)
    for doc in iter_documents(shard.spec, cfg.text_field, cfg.id_field, rejects, policy):
        spans = chunk_spans(doc.text, cfg.granularity)
        if not spans:
            rejects.add("empty_document", doc.source)
            continue
        local = len(docs["doc_id"])
        docs["doc_id"].append(doc.doc_id)
        docs["n_chunks"].append(len(spans))
        docs["n_chars"].append(len(doc.text))
        docs["text_hash"].append(doc.text_hash)
        for j, (a, b) in enumerate(spans):
            t = doc.text[a:b]
            cols["doc_id"].append(doc.doc_id)
            cols["doc_local"].append(local)
            cols["chunk_in_doc"].append(j)
            cols["text"].append(t)
            cols["n_chars"].append(len(t))
            cols["text_hash"].append(text_hash(t))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    texts = cols["text"]
    # tokenize every chunk exactly once
    lengths = np.zeros(len(texts), dtype=np.int64)
    parts: list[np.ndarray] = []
    for i in range(0, len(texts), 8192):
        enc = tokenizer.encode_batch(texts[i : i + 8192])
        lens = np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc))
        lengths[i : i + len(enc)] = lens
        parts.append(np.fromiter((t for e in enc for t in e), dtype=np.int32, count=int(lens.sum())))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    atomic_npy(out / "tokens.npy", np.concatenate(parts) if parts else np.zeros(0, np.int32))
    atomic_npy(out / "token_offsets.npy", offsets)
    if cfg.embedder == "hashing":
        import scipy.sparse as sp

        from .embedding import HashingEmbedder

        # hash every chunk's n-grams once: the counts serve the IDF now and the embedding stage later
        emb = HashingEmbedder(dim=cfg.embedding_dim)  # n-gram counts depend on neither dim nor seed
        blocks = [emb.count_matrix(texts[i : i + 8192]) for i in range(0, len(texts), 8192)]
        counts = sp.vstack(blocks, format="csr") if blocks else emb.count_matrix([])
        counts.indices = counts.indices.astype(np.int32)
        atomic_npy(out / "df.npy", emb.document_frequency_of(counts).astype(np.int32))
        tmp = _tmp(out / "counts.npz", ".npz")
        sp.save_npz(tmp, counts, compressed=False)
        os.replace(tmp, out / "counts.npz")
    n = len(texts)
    # no input name here: a shard's bytes depend on its file and the chunking settings only (gather adds it)
    atomic_parquet(out / "chunks.parquet", pa.table({
        "doc_id": pa.array(cols["doc_id"], pa.string()),
        "doc_local": pa.array(cols["doc_local"], pa.int64()),
        "chunk_in_doc": pa.array(cols["chunk_in_doc"], pa.int32()),
        "text": pa.array(texts, pa.large_string()),
        "n_chars": pa.array(cols["n_chars"], pa.int32()),
        "n_tokens": pa.array(lengths.astype(np.int32)),
        "text_hash": pa.array(cols["text_hash"], pa.int64()),
    }))
    atomic_parquet(out / "docs.parquet", pa.table({
        "doc_id": pa.array(docs["doc_id"], pa.string()),
        "n_chunks": pa.array(docs["n_chunks"], pa.int32()),
        "n_chars": pa.array(docs["n_chars"], pa.int64()),
        "text_hash": pa.array(docs["text_hash"], pa.int64()),
    }))
    rejects.write(out / "rejects.jsonl")
    chars = int(sum(cols["n_chars"]))
    return {"documents": len(docs["doc_id"]), "chunks": n, "tokens": int(offsets[-1]), "chars": chars,
            "rejected": dict(sorted(rejects.counts.items())), "inputs": rejects.audit(len(docs["doc_id"]))}


def shard_texts(work: Path, shard: Shard) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(shard_dir(work, shard) / "chunks.parquet", columns=["text"]).column("text").to_pylist()


def hashing_idf(path: Path, work: Path, shards: list[Shard], n_features: int) -> np.ndarray:
    """The global idf of the hashing embedder, from every shard's document frequencies (cached at ``path``)."""
    if path.exists():
        return np.load(path)
    df = np.zeros(n_features, dtype=np.int64)
    n = 0
    for s in shards:
        df += np.load(shard_dir(work, s) / "df.npy")
        n += len(np.load(shard_dir(work, s) / "token_offsets.npy")) - 1
    idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
    atomic_npy(path, idf)  # every task computes the same bytes; the rename makes the race harmless
    return idf


def embed_shard(cfg, work: Path, shard: Shard, embedder, idf: np.ndarray | None, progress=None,
                batch_size: int = 4096) -> dict:
    """Embed every chunk of one shard once into its embeddings.npy (``--embedding-dtype``, unit rows)."""
    if idf is not None:
        embedder.idf = idf
    counts_path = shard_dir(work, shard) / "counts.npz"
    counts = texts = None
    if hasattr(embedder, "embed_counts") and counts_path.exists():
        import scipy.sparse as sp

        counts = sp.load_npz(counts_path).tocsr()  # hashed in the chunk stage: no second pass over the text
        n = counts.shape[0]
    else:
        texts = shard_texts(work, shard)
        n = len(texts)
    dtype = np.dtype(cfg.embedding_dtype)
    final = shard_dir(work, shard) / "embeddings.npy"
    tmp = _tmp(final, ".npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, embedder.dim))
    bar = progress(total=n, desc=f"embed {shard.name}", unit="chunk") if progress else None
    extra: dict = {}
    if counts is None and hasattr(embedder, "encode"):
        # the embedder batches, deduplicates and reports itself; rows go straight into the store
        _, extra = embedder.encode(texts, out=out, progress=bar.update if bar is not None else None)
        extra = {"embedder": embedder.describe(), **extra}
        batch_size = max(1, n)
        n_done = n
    else:
        n_done = 0
    for i in range(n_done, n, batch_size):
        if counts is not None:
            e = embedder.embed_counts(counts[i : i + batch_size])
        else:
            e = embedder.embed(texts[i : i + batch_size])
        out[i : i + len(e)] = e
        if bar is not None:
            bar.update(len(e))
    if bar is not None:
        bar.close()
    out.flush()
    del out
    os.replace(tmp, final)
    return {"chunks": n, "dim": int(embedder.dim), "dtype": str(dtype), **extra}


# ------------------------------------------------------------------------------------------ gather


def gather(work: Path, shards: list[Shard], corpus_names: list[str], progress=None) -> dict:
    """Give global ids and write the pool's global files (module docstring), streaming shard by shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus_code = {name: i for i, name in enumerate(corpus_names)}
    sizes = []
    for s in shards:
        d = shard_dir(work, s)
        sizes.append((len(np.load(d / "token_offsets.npy")) - 1, pq.ParquetFile(d / "docs.parquet").metadata.num_rows,
                      int(np.load(d / "token_offsets.npy")[-1])))
    n_chunks = sum(x[0] for x in sizes)
    n_docs = sum(x[1] for x in sizes)
    n_tokens = sum(x[2] for x in sizes)
    if n_chunks == 0:
        return {"documents": 0, "chunks": 0, "tokens": 0}
    dim_dtype = np.load(shard_dir(work, shards[0]) / "embeddings.npy", mmap_mode="r")
    dim, edtype = dim_dtype.shape[1], dim_dtype.dtype
    single = len(shards) == 1
    mm: dict = {}
    if single:
        # one shard: hard links instead of copies (falls back to copying across filesystems)
        for name in ("tokens", "embeddings"):
            try:
                _tmp(work / f"{name}.npy", ".npy").unlink(missing_ok=True)
                os.link(shard_dir(work, shards[0]) / f"{name}.npy", _tmp(work / f"{name}.npy", ".npy"))
            except OSError:
                single = False
    if not single:
        mm = {
            "tokens": np.lib.format.open_memmap(_tmp(work / "tokens.npy", ".npy"), "w+", np.int32, (n_tokens,)),
            "embeddings": np.lib.format.open_memmap(_tmp(work / "embeddings.npy", ".npy"), "w+", edtype,
                                                    (n_chunks, dim)),
        }
    offsets = np.zeros(n_chunks + 1, dtype=np.int64)
    chunk_doc = np.zeros(n_chunks, dtype=np.int64)
    chunk_hash = np.zeros(n_chunks, dtype=np.int64)
    doc = {k: np.zeros(n_docs, dtype=t) for k, t in (("first", np.int64), ("nchunks", np.int32), ("chars", np.int64),
                                                     ("corpus", np.int16), ("corpus_index", np.int64))}
    doc_ids: list = []
    doc_corpus_names: list = []
    per_input_seen: dict[int, int] = {}
    chunks_tmp = _tmp(work / "chunks.parquet")
    writer = None
    rejects_tmp = _tmp(work / "rejects.jsonl")
    c0 = d0 = t0 = 0
    bar = progress(total=len(shards), desc="gather", unit="shard") if progress else None
    with open(rejects_tmp, "wb") as rej:
        for s, (nc, nd, nt) in zip(shards, sizes, strict=True):
            d = shard_dir(work, s)
            ct = pq.read_table(d / "chunks.parquet")
            dt = pq.read_table(d / "docs.parquet")
            local_off = np.load(d / "token_offsets.npy")
            if mm:
                mm["tokens"][t0 : t0 + nt] = np.load(d / "tokens.npy", mmap_mode="r")
                mm["embeddings"][c0 : c0 + nc] = np.load(d / "embeddings.npy", mmap_mode="r")
            offsets[c0 + 1 : c0 + nc + 1] = local_off[1:] + t0
            doc_local = ct.column("doc_local").to_numpy()
            chunk_doc[c0 : c0 + nc] = doc_local + d0
            chunk_hash[c0 : c0 + nc] = ct.column("text_hash").to_numpy()
            nchunks = dt.column("n_chunks").to_numpy()
            doc["nchunks"][d0 : d0 + nd] = nchunks
            doc["first"][d0 : d0 + nd] = c0 + np.concatenate([[0], np.cumsum(nchunks[:-1])]) if nd else []
            doc["chars"][d0 : d0 + nd] = dt.column("n_chars").to_numpy()
            doc["corpus"][d0 : d0 + nd] = corpus_code[s.spec.name]
            start = per_input_seen.get(s.input_index, 0)
            doc["corpus_index"][d0 : d0 + nd] = np.arange(start, start + nd)
            per_input_seen[s.input_index] = start + nd
            doc_ids.extend(dt.column("doc_id").to_pylist())
            doc_corpus_names.extend([s.spec.name] * nd)
            ct = ct.drop_columns(["doc_local"])
            ct = ct.add_column(0, "corpus", pa.array([s.spec.name] * nc, pa.string()))
            ct = ct.add_column(0, "chunk_id", pa.array(np.arange(c0, c0 + nc, dtype=np.int64)))
            ct = ct.add_column(3, "doc_ordinal", pa.array(doc_local + d0))
            if writer is None:
                writer = pq.ParquetWriter(chunks_tmp, ct.schema, compression="zstd")
            writer.write_table(ct, row_group_size=65536)
            rp = d / "rejects.jsonl"
            if rp.exists():
                rej.write(rp.read_bytes())
            c0, d0, t0 = c0 + nc, d0 + nd, t0 + nt
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    writer.close()
    for arr in mm.values():
        arr.flush()
    mm.clear()
    for name in ("tokens", "embeddings"):
        os.replace(_tmp(work / f"{name}.npy", ".npy"), work / f"{name}.npy")
    atomic_npy(work / "token_offsets.npy", offsets)
    atomic_npy(work / "chunk_doc.npy", chunk_doc)
    atomic_npy(work / "chunk_hash.npy", chunk_hash)
    for k, v in doc.items():
        atomic_npy(work / f"doc_{k}.npy", v)
    table = pa.table({"doc_id": pa.array(doc_ids, pa.string()), "corpus": pa.array(doc_corpus_names, pa.string())})
    tmp = _tmp(work / "docs.arrow")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    os.replace(tmp, work / "docs.arrow")
    tmp = _tmp(work / "corpora.json")
    tmp.write_text(json.dumps(corpus_names))
    os.replace(tmp, work / "corpora.json")
    os.replace(chunks_tmp, work / "chunks.parquet")
    os.replace(rejects_tmp, work / "rejects.jsonl")
    return {"documents": n_docs, "chunks": n_chunks, "tokens": n_tokens}


# ------------------------------------------------------------------------------------------ view


@dataclass
class Pool:
    """Read-only view of a gathered pool, as the synthesis tasks need it (large arrays memory-mapped)."""

    chunk_doc: np.ndarray  # int64 [n_chunks]: doc_ordinal of every chunk
    chunk_hash: np.ndarray  # int64 [n_chunks]
    corpora: list[str]
    doc_first: np.ndarray  # int64 [n_docs]
    doc_nchunks: np.ndarray  # int32 [n_docs]
    doc_chars: np.ndarray  # int64 [n_docs]
    doc_corpus_code: np.ndarray  # int16 [n_docs]
    doc_corpus_index: np.ndarray  # int64 [n_docs]
    doc_table: object  # pyarrow Table (memory-mapped): doc_id, corpus
    tokens: np.ndarray  # int32, memory-mapped
    offsets: np.ndarray  # int64 [n_chunks + 1]
    embeddings: np.ndarray  # float16/float32 [n_chunks, dim], memory-mapped

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_doc)

    @property
    def n_docs(self) -> int:
        return len(self.doc_first)

    @property
    def chunk_corpus_code(self) -> np.ndarray:
        return self.doc_corpus_code[self.chunk_doc]

    def chunk_tokens(self, cid: int) -> np.ndarray:
        return self.tokens[self.offsets[cid] : self.offsets[cid + 1]]

    def chunk_len(self, cid: int) -> int:
        return int(self.offsets[cid + 1] - self.offsets[cid])

    def doc_ids_of(self, docs: np.ndarray) -> list[str]:
        import pyarrow as pa

        return self.doc_table.column("doc_id").take(pa.array(np.asarray(docs, dtype=np.int64))).to_pylist()


def load_pool(work: Path) -> Pool:
    import pyarrow as pa

    def mm(name: str) -> np.ndarray:
        # plain ndarray views of the memory maps: slicing them is much cheaper than slicing np.memmap
        return np.load(work / name, mmap_mode="r").view(np.ndarray)

    reader = pa.ipc.open_file(pa.memory_map(str(work / "docs.arrow"), "r"))
    return Pool(
        chunk_doc=mm("chunk_doc.npy"),
        chunk_hash=mm("chunk_hash.npy"),
        corpora=json.loads((work / "corpora.json").read_text()),
        doc_first=mm("doc_first.npy"),
        doc_nchunks=mm("doc_nchunks.npy"),
        doc_chars=mm("doc_chars.npy"),
        doc_corpus_code=mm("doc_corpus.npy"),
        doc_corpus_index=mm("doc_corpus_index.npy"),
        doc_table=reader.read_all(),
        tokens=mm("tokens.npy"),
        offsets=np.load(work / "token_offsets.npy", mmap_mode="r").view(np.ndarray),
        embeddings=mm("embeddings.npy"),
    )


def load_texts(work: Path) -> list[str]:
    """All chunk texts in chunk-id order (benchmarks and small pools)."""
    import pyarrow.parquet as pq

    return pq.read_table(work / "chunks.parquet", columns=["text"]).column("text").to_pylist()
