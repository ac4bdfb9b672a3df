"""Chunk embedders, pluggable by ``--embedder``.

* ``hashing`` (default, offline, no weights): hashed word uni+bigram TF-IDF (sublinear tf, smoothed idf
  over the pool), projected to ``dim`` dimensions by a fixed sparse random sign matrix drawn from the
  seed, then L2-normalized. Deterministic: the same texts and seed give the same bytes on any machine.
* anything else: a sentence-transformers model by local path (or a name already in the local cache;
  nothing is downloaded: ``HF_HUB_OFFLINE`` is honoured and ``local_files_only`` is set). Batched,
  length-sorted, bf16 on GPU when one is present, L2-normalized. The paper's README names
  jina-embeddings-v3.

All embedders return float32 rows of unit norm, so inner product = cosine similarity.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)
_MASK32 = np.uint64(0xFFFFFFFF)


class Embedder:
    """Interface: ``fit`` sees every pool text once (may be a no-op), ``embed`` maps texts to unit rows."""

    name: str = "embedder"
    dim: int = 0

    def fit(self, texts: Sequence[str]) -> None:  # pragma: no cover - default no-op
        return None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim}


class HashingEmbedder(Embedder):
    """Hashed word n-gram TF-IDF with a seeded sparse random projection (see module docstring)."""

    name = "hashing"

    def __init__(self, dim: int = 256, n_features: int = 1 << 20, nnz_per_feature: int = 8, seed: int = 0) -> None:
        if dim < 8:
            raise ValueError(f"--embedding-dim must be >= 8, got {dim}")
        self.dim = dim
        self.n_features = n_features
        self.nnz = nnz_per_feature
        self.seed = seed
        self.idf: np.ndarray | None = None
        self._proj = None
        self._word_hash: dict[str, int] = {}

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "n_features": self.n_features,
                "nnz_per_feature": self.nnz, "seed": self.seed}

    def _projection(self):
        if self._proj is None:
            import scipy.sparse as sp

            rng = np.random.default_rng([self.seed, 0x4E584C])
            cols = rng.integers(0, self.dim, size=(self.n_features, self.nnz), dtype=np.int32)
            signs = rng.integers(0, 2, size=(self.n_features, self.nnz), dtype=np.int8).astype(np.float32) * 2 - 1
            rows = np.repeat(np.arange(self.n_features, dtype=np.int32), self.nnz)
            self._proj = sp.csr_matrix(
                (signs.ravel() / np.sqrt(self.nnz), (rows, cols.ravel())), shape=(self.n_features, self.dim),
                dtype=np.float32,
            )
        return self._proj

    def count_matrix(self, texts: Sequence[str]):
        """Sparse [len(texts), n_features] matrix of n-gram counts."""
        import scipy.sparse as sp

        cache = self._word_hash
        row_ids: list[np.ndarray] = []
        feats: list[np.ndarray] = []
        for r, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            if not words:
                continue
            h = np.fromiter((cache[w] if w in cache else cache.setdefault(w, zlib.crc32(w.encode("utf-8")))
                             for w in words), dtype=np.uint64, count=len(words))
            big = ((h[:-1] * np.uint64(0x9E3779B1)) ^ (h[1:] + np.uint64(0x7F4A7C15))) & _MASK32
            f = np.concatenate([h, big]) % np.uint64(self.n_features)
            feats.append(f.astype(np.int64))
            row_ids.append(np.full(len(f), r, dtype=np.int64))
        if len(self._word_hash) > 5_000_000:  # bound the cache on huge vocabularies
            self._word_hash.clear()
        if not feats:
            return sp.csr_matrix((len(texts), self.n_features), dtype=np.float32)
        rows = np.concatenate(row_ids)
        cols = np.concatenate(feats)
        m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                          shape=(len(texts), self.n_features), dtype=np.float32)
        m.sum_duplicates()
        return m

    def document_frequency(self, texts: Sequence[str]) -> np.ndarray:
        """Per-feature number of texts containing it (summed over shards by a sharded fit)."""
        return self.document_frequency_of(self.count_matrix(texts))

    def document_frequency_of(self, m) -> np.ndarray:
        """Per-feature number of rows of a count matrix containing it."""
        return np.bincount(m.indices, minlength=self.n_features).astype(np.int64)

    def set_idf(self, df: np.ndarray, n_docs: int) -> None:
        self.idf = (np.log((1.0 + n_docs) / (1.0 + df)) + 1.0).astype(np.float32)

    def fit(self, texts: Sequence[str], batch_size: int = 8192) -> None:
        df = np.zeros(self.n_features, dtype=np.int64)
        for i in range(0, len(texts), batch_size):
            df += self.document_frequency(texts[i : i + batch_size])
        self.set_idf(df, len(texts))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_counts(self.count_matrix(texts))

    def fit_embed(self, texts: Sequence[str], batch_size: int = 8192) -> np.ndarray:
        """``fit`` then ``embed`` with one hashing pass over the texts."""
        import scipy.sparse as sp

        m = sp.vstack([self.count_matrix(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)],
                      format="csr") if len(texts) else self.count_matrix([])
        self.set_idf(self.document_frequency_of(m), m.shape[0])
        return self.embed_counts(m)

    def embed_counts(self, m) -> np.ndarray:
        """Unit rows from a count matrix (:meth:`count_matrix`): sublinear tf x idf, projected, normalized."""
        if self.idf is None:
            raise RuntimeError("HashingEmbedder.embed called before fit() / set_idf()")
        m = m.astype(np.float32, copy=True)
        m.data = (1.0 + np.log(m.data)) * self.idf[m.indices]
        dense = np.asarray((m @ self._projection()).todense(), dtype=np.float32)
        norms = np.linalg.norm(dense, axis=1, keepdims=True)
        np.divide(dense, norms, out=dense, where=norms > 0)
        return dense


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model; bf16 on CUDA, fp32 on CPU; never downloads."""

    def __init__(self, model: str, batch_size: int = 64, device: str | None = None, max_seq_length: int | None = None,
                 trust_remote_code: bool = False):
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                f"--embedder {model}: sentence-transformers embedding needs the 'st' extra "
                "(pip install torch==2.13.0 && pip install -e '.[st]')"
            ) from e
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = SentenceTransformer(model, device=self.device, local_files_only=True,
                                             trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - re-raised naming the flag
            raise ValueError(
                f"--embedder {model}: cannot load a sentence-transformers model from this path or the local "
                f"cache ({e}). Download it once (e.g. huggingface-cli download) and pass its directory."
            ) from e
        if self.device.startswith("cuda"):
            self.model = self.model.to(torch.bfloat16)
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.name = model
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = batch_size

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "device": self.device, "batch_size": self.batch_size,
                "max_seq_length": int(self.model.max_seq_length)}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        # length-sorted batches waste no padding; encode() restores the input order
        out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


def make_embedder(spec: str, seed: int, dim: int = 256, batch_size: int = 64, device: str | None = None,
                  trust_remote_code: bool = False) -> Embedder:
    """``hashing`` or a sentence-transformers model path/name (on ``device``, default: CUDA if present).
    ``trust_remote_code`` runs the model directory's own code (jina-embeddings-v3 needs it)."""
    if spec == "hashing":
        return HashingEmbedder(dim=dim, seed=seed)
    return SentenceTransformerEmbedder(spec, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)
