"""Chunk embedders, pluggable by ``--embedder``.

* ``hashing`` (default, offline, no weights): hashed word uni+bigram TF-IDF (sublinear tf, smoothed idf
  over the pool), projected to ``dim`` dimensions by a fixed sparse random sign matrix drawn from the
  seed, then L2-normalized. Deterministic: the same texts and seed give the same bytes on any machine.
* anything else: a sentence-transformers model by local path (or a name already in the local cache;
  nothing is downloaded: ``HF_HUB_OFFLINE`` is honoured and ``local_files_only`` is set), run by
  :meth:`SentenceTransformerEmbedder.encode`: exact duplicates embedded once, each text tokenized once, texts
  packed into token-budget batches by token count (by default 16,384 tokens on a GPU, 4,096 on a CPU), bf16
  where the device has it natively (on CPU with the linear layers fused, :mod:`nextlong.embed_fused`), on a
  CPU one batch per thread at a time, on a GPU the next batch prepared while the current one runs,
  truncation at the model's ``max_seq_length`` counted. The paper's README names
  jina-embeddings-v3.

All embedders return float32 rows of unit norm, so inner product = cosine similarity.
"""

from __future__ import annotations

import logging
import os
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


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def bf16_supported(device: str) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (CUDA with bf16, or a CPU with AVX-512 BF16/AMX)."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` where the device supports it natively, else ``fp32``; explicit choices are checked."""
    if precision not in PRECISIONS:
        raise ValueError(f"--embed-precision: choose from {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise ValueError("--embed-precision fp16: only on CUDA (use bf16 or fp32 on CPU)")
    return precision


#: ``--embed-batch-tokens 0`` (the default): padded tokens per forward pass by device. A GPU wants large
#: batches; on a CPU a smaller batch keeps a layer's activations in cache (all-MiniLM-L6-v2 on 2 cores, bf16:
#: 4,096 tokens ran about 1.2x faster than 16,384, and 3,072-8,192 alike; a BERT-large-sized layer was flat
#: within 10% from 1,024 to 16,384).
BATCH_TOKENS_GPU = 16384
BATCH_TOKENS_CPU = 4096


def resolve_batch_tokens(batch_tokens: int, device: str) -> int:
    """``batch_tokens``, or the device's default for 0 (:data:`BATCH_TOKENS_GPU`, :data:`BATCH_TOKENS_CPU`)."""
    if batch_tokens < 0:
        raise ValueError(f"--embed-batch-tokens: must be >= 0 (0: by device), got {batch_tokens}")
    if batch_tokens:
        return batch_tokens
    return BATCH_TOKENS_CPU if device.startswith("cpu") else BATCH_TOKENS_GPU


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Batches of row indices over ``lengths`` sorted longest first (ties by index), each holding as many rows
    as fit ``rows * longest <= batch_tokens`` (at least one row, at most ``max_batch_size``). Every index
    appears in exactly one batch; the order is a pure function of the lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    batches: list[np.ndarray] = []
    i, n = 0, len(order)
    while i < n:
        longest = max(1, int(lengths[order[i]]))  # sorted longest first: the first row sets the padded width
        rows = max(1, min(max_batch_size, batch_tokens // longest, n - i))
        batches.append(order[i : i + rows])
        i += rows
    return batches


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model run by its own modules, never downloaded (see :meth:`encode`).

    * exact-duplicate texts are embedded once;
    * texts are sorted by token count and packed into batches of at most ``batch_tokens`` padded tokens
      (0: :func:`resolve_batch_tokens`, by device);
    * the transformer runs in ``precision`` (``auto``: bf16 on CUDA and on CPUs with native bf16, else fp32)
      with the model's attention implementation (SDPA, or flash attention where installed); pooling and
      normalization run in float32; on a CPU in bf16 the linear layers run as oneDNN matmuls on weights packed
      once, with the bias, a BERT-style GELU and residual add fused in (:mod:`nextlong.embed_fused`; ``fuse``);
    * every text is tokenized once (length and ids) when that reproduces the model's own preprocessing;
    * on a CPU, ``streams`` batches run at once, each on its own share of the torch threads (default: one
      batch per thread); otherwise the next batch is prepared in a background thread while the current one
      runs (GPU, or spare CPU cores);
    * texts longer than the model's ``max_seq_length`` (``sentence_bert_config.json``) are truncated,
      counted and reported.
    """

    def __init__(self, model: str, batch_size: int = 1024, device: str | None = None,
                 max_seq_length: int | None = None, trust_remote_code: bool = False, precision: str = "auto",
                 batch_tokens: int = 0, threads: int = 0, fuse: bool = True, streams: int = 0):
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                f"--embedder {model}: sentence-transformers embedding needs the 'st' extra "
                "(pip install torch==2.13.0 && pip install -e '.[st]')"
            ) from e
        if batch_size < 1:
            raise ValueError(f"--embed-batch-size: must be >= 1, got {batch_size}")
        if threads < 0:
            raise ValueError(f"--embed-threads: must be >= 0, got {threads}")
        if streams < 0:
            raise ValueError(f"--embed-streams: must be >= 0 (0: one per CPU thread), got {streams}")
        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_tokens = resolve_batch_tokens(batch_tokens, self.device)  # refused before the model loads
        self.precision = resolve_precision(precision, self.device)
        try:
            self.model = SentenceTransformer(model, device=self.device, local_files_only=True,
                                             trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - re-raised naming the flag
            raise ValueError(
                f"--embedder {model}: cannot load a sentence-transformers model from this path or the local "
                f"cache ({e}). Download it once (e.g. huggingface-cli download) and pass its directory."
            ) from e
        self.model.eval()
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        # the transformer (first module) runs in the chosen precision; pooling and the rest stay float32
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        self._dtype = dtype
        self.model[0].to(dtype)
        # CPU bf16: linear layers as oneDNN matmuls on weights packed once, bias / GELU / residual add fused in
        self.fused: dict = {}
        auto = getattr(self.model[0], "auto_model", None)
        if fuse and self.device == "cpu" and self.precision == "bf16" and isinstance(auto, torch.nn.Module):
            from .embed_fused import fuse_cpu_bf16

            self.fused = {k: v for k, v in fuse_cpu_bf16(auto).items() if v}
        self.name = model
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = batch_size
        self.max_seq_length = int(self.model.max_seq_length)
        self.threads = torch.get_num_threads()
        # batches run at once: on a CPU one per torch thread by default (at most that many), on a GPU one
        self.streams = (min(streams or self.threads, self.threads) if self.device.startswith("cpu") else 1)
        self.attention = getattr(getattr(auto, "config", None), "_attn_implementation", None) or "unknown"
        self.last_stats: dict = {}
        # tokenize every text once (for its length and its features) when that reproduces the model's own
        # preprocessing exactly on probe texts; else lengths first, then the model's preprocessing per batch
        self._direct = self._setup_direct_tokenization()

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "device": self.device, "precision": self.precision,
                "batch_tokens": self.batch_tokens, "max_batch_size": self.batch_size,
                "max_seq_length": self.max_seq_length, "attention": self.attention, "fused_modules": self.fused,
                "torch_threads": self.threads if self.device == "cpu" else None,
                "streams": self.streams}

    def _preprocess(self, texts: list[str]) -> dict:
        fn = getattr(self.model, "preprocess", None) or self.model.tokenize
        return fn(texts)

    def _setup_direct_tokenization(self) -> bool:
        """Whether :meth:`_tokenize` + :meth:`_features` reproduce the model's own preprocessing exactly on probe
        texts (one of them truncated); sets the number of special tokens kept after a truncated text."""
        import torch

        tok = self.model.tokenizer
        if not getattr(tok, "is_fast", False) or getattr(tok, "padding_side", "right") != "right" \
                or tok.pad_token_id is None:
            return False
        probes = [" ".join(f"Probe{i}, text." for i in range(self.max_seq_length)) + " The end?",  # truncated
                  "A short probe sentence.", "Another probe, a little longer than the short one: 3.5 km/h."]
        try:
            ref = self._preprocess(probes)
        except Exception as e:  # noqa: BLE001 - the per-batch path is kept
            log.info("embedder: direct tokenization not checked (%s)", e)
            return False
        tensors = {k for k, v in ref.items() if isinstance(v, torch.Tensor)}
        if not {"input_ids", "attention_mask"} <= tensors <= {"input_ids", "attention_mask", "token_type_ids"}:
            return False
        self._pad_id = int(tok.pad_token_id)
        self._token_types = "token_type_ids" in tensors
        self._extra_features = {k: v for k, v in ref.items() if k not in tensors}
        # special tokens the tokenizer puts after the text: where the plain ids sit inside the full ones
        sample = probes[2]
        full = tok(sample, add_special_tokens=True)["input_ids"]
        plain = tok(sample, add_special_tokens=False)["input_ids"]
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        if not plain or len(starts) != 1:
            return False
        self._tail = len(full) - len(plain) - starts[0]
        _, ids = self._tokenize(probes)
        mine = self._features(ids)
        return all(torch.equal(mine[k], ref[k]) for k in tensors)

    def _tokenize(self, texts: list[str], block: int = 4096) -> tuple[np.ndarray, list[np.ndarray]]:
        """Token count of every text with special tokens before truncation, and its ids as the model sees them
        (the first ``max_seq_length - tail`` tokens and the last ``tail`` special tokens when longer)."""
        tok = self.model.tokenizer
        lengths = np.empty(len(texts), dtype=np.int64)
        ids: list[np.ndarray] = []
        keep = self.max_seq_length - self._tail
        for s in range(0, len(texts), block):
            enc = tok(texts[s : s + block], add_special_tokens=True, truncation=False, return_attention_mask=False,
                      return_token_type_ids=False, verbose=False)["input_ids"]
            for j, e in enumerate(enc):
                lengths[s + j] = len(e)
                ids.append(np.asarray(e if len(e) <= self.max_seq_length else e[:keep] + e[len(e) - self._tail:],
                                      dtype=np.int64))
        return lengths, ids

    def _features(self, rows: list[np.ndarray]) -> dict:
        """Right-padded ``input_ids`` / ``attention_mask`` (/ zero ``token_type_ids``) tensors of id rows."""
        import torch

        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        feats = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self._token_types:
            feats["token_type_ids"] = torch.zeros_like(feats["input_ids"])
        feats.update(self._extra_features)
        return feats

    def _prepare(self, rows: np.ndarray, texts: list[str], ids: list[np.ndarray] | None) -> dict:
        """The model's input features of ``texts[rows]``: padded from ``ids`` when tokenized already."""
        if ids is not None:
            return self._features([ids[i] for i in rows])
        return self._preprocess([texts[i] for i in rows])

    def _token_lengths(self, texts: list[str]) -> np.ndarray:
        """Token count of every text with the model's special tokens, before truncation."""
        tok = self.model.tokenizer
        enc = tok(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                  return_token_type_ids=False, verbose=False)["input_ids"]
        return np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(texts))

    def _forward(self, features: dict) -> np.ndarray:
        import torch

        feats = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
        with torch.inference_mode():
            out = self.model[0](feats)
            for key, v in list(out.items()):
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    out[key] = v.float()
            for module in list(self.model)[1:]:
                out = module(out)
            emb = out["sentence_embedding"].float()
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb.cpu().numpy()

    def encode(self, texts: Sequence[str], out: np.ndarray | None = None, progress=None,
               window: int = 65536) -> tuple[np.ndarray, dict]:
        """Unit rows for ``texts`` written into ``out`` (float32 ``[n, dim]`` when not given; a float16 memmap is
        fine), and the statistics of the call (also kept in ``last_stats``). ``progress(n)`` is called with
        the number of chunks finished after every batch. Unique texts are processed ``window`` at a time:
        each window is tokenized for its lengths, sorted and batched by the token budget. On a CPU with
        ``streams`` > 1, that many batches run at once (:meth:`_run_streams`)."""
        import time

        t0 = time.perf_counter()
        texts = list(texts)
        n = len(texts)
        if out is None:
            out = np.zeros((n, self.dim), dtype=np.float32)
        first: dict[str, int] = {}
        inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64, count=n)
        uniq = list(first)
        del first
        by_unique = np.argsort(inverse, kind="stable")  # input positions grouped by unique text
        bounds = np.searchsorted(inverse[by_unique], np.arange(0, len(uniq) + window, window))
        stats = {"chunks": n, "unique": len(uniq), "duplicates": n - len(uniq), "truncated": 0, "tokens": 0,
                 "padded_tokens": 0, "batches": 0}
        chars = full_tokens = 0
        stats["streams"] = self.streams
        # one stream: overlap tokenization with compute when they do not fight over the same cores (on a GPU,
        # or when torch leaves CPU cores free); else a tokenizer thread would stall torch's threads at every
        # barrier. Several streams: batches are prepared in line while the streams compute
        overlap = self.streams == 1 and (not self.device.startswith("cpu") or (os.cpu_count() or 1) > self.threads)
        stats["tokenize_overlapped"] = bool(overlap or self.streams > 1)
        stats["tokenized_once"] = bool(self._direct)
        for w, w0 in enumerate(range(0, len(uniq), window)):
            wt = uniq[w0 : w0 + window]
            if self._direct:
                lengths, ids = self._tokenize(wt)
            else:
                lengths, ids = self._token_lengths(wt), None
            chars += sum(len(t) for t in wt)
            stats["truncated"] += int((lengths > self.max_seq_length).sum())
            full_tokens += int(lengths.sum())
            used = np.minimum(lengths, self.max_seq_length)
            stats["tokens"] += int(used.sum())
            batches = token_budget_batches(used, self.batch_tokens, self.batch_size)
            buf = np.zeros((len(wt), self.dim), dtype=np.float32)
            if self.streams > 1:
                self._run_streams(batches, wt, ids, buf, stats, progress)
            else:
                self._run_one(batches, wt, ids, buf, stats, progress, overlap)
            pos = by_unique[bounds[w] : bounds[w + 1]]
            out[pos] = buf[inverse[pos] - w0]
            if progress is not None and len(pos) > len(wt):
                progress(len(pos) - len(wt))  # duplicates of this window's texts
        seconds = time.perf_counter() - t0
        stats["truncated_share"] = round(stats["truncated"] / max(1, len(uniq)), 4)
        stats["padding_waste"] = round(1.0 - stats["tokens"] / stats["padded_tokens"], 4) if stats["padded_tokens"] \
            else 0.0
        stats["chars_per_token"] = round(chars / max(1, full_tokens), 3)  # before truncation
        stats["seconds"] = round(seconds, 3)
        stats["chunks_per_second"] = round(n / seconds, 2) if seconds > 0 else None
        self.last_stats = stats
        log_truncation(stats, self.max_seq_length)
        return out, stats

    @staticmethod
    def _count(features: dict, stats: dict) -> None:
        mask = features.get("attention_mask")
        if mask is not None:
            stats["padded_tokens"] += int(mask.numel())
        stats["batches"] += 1

    def _run_one(self, batches: list[np.ndarray], wt: list[str], ids, buf: np.ndarray, stats: dict, progress,
                 overlap: bool) -> None:
        """One batch at a time (the torch threads share each op), the next one prepared in a background thread
        when ``overlap``."""
        from concurrent.futures import ThreadPoolExecutor

        prepare = self._prepare
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(prepare, batches[0], wt, ids) if overlap and batches else None
            for b, rows in enumerate(batches):
                features = pending.result() if overlap else prepare(rows, wt, ids)
                if overlap and b + 1 < len(batches):  # prepare the next batch while this one runs
                    pending = pool.submit(prepare, batches[b + 1], wt, ids)
                self._count(features, stats)
                buf[rows] = self._forward(features)
                if progress is not None:
                    progress(len(rows))

    def _run_streams(self, batches: list[np.ndarray], wt: list[str], ids, buf: np.ndarray, stats: dict,
                     progress) -> None:
        """``streams`` batches at once on a CPU, each on ``threads // streams`` torch threads of its own: the
        cores do not wait for each other inside every op, and each keeps its own batch's activations in its
        cache (all-MiniLM-L6-v2, 2 cores, bf16: 1.3-1.5x the forward passes of one 2-thread batch at a time).
        A batch's rows do not depend on which stream computes them; results are collected in batch order."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        import torch

        before = torch.get_num_threads()
        per = max(1, self.threads // self.streams)
        # set before the worker threads exist: each takes the thread count when it first runs an op
        torch.set_num_threads(per)
        pending: deque = deque()

        def collect() -> None:
            rows, fut = pending.popleft()
            buf[rows] = fut.result()
            if progress is not None:
                progress(len(rows))

        try:
            with ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="embed-stream") as pool:
                try:
                    for rows in batches:
                        features = self._prepare(rows, wt, ids)
                        self._count(features, stats)
                        pending.append((rows, pool.submit(self._forward, features)))
                        if len(pending) >= 2 * self.streams:  # bound the batches in memory
                            collect()
                    while pending:
                        collect()
                except BaseException:
                    for _, fut in pending:
                        fut.cancel()
                    raise
        finally:
            torch.set_num_threads(before)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)[0]


def suggested_granularity(max_seq_length: int, chars_per_token: float) -> int:
    """A ``--granularity`` whose chunks fit ``max_seq_length`` tokens at the measured chars per token (90%)."""
    return max(16, int(0.9 * max_seq_length * chars_per_token) // 16 * 16)


def log_truncation(stats: dict, max_seq_length: int) -> None:
    """Warn when the embedder cuts a noticeable share of chunks (their tail is not embedded)."""
    if stats.get("truncated", 0) and stats["truncated_share"] >= 0.01:
        log.warning("embedder: %.1f%% of chunks (%d) exceed its max_seq_length of %d tokens and are embedded from "
                    "their first %d tokens only; a smaller --granularity (about %d chars) keeps chunks within it",
                    100 * stats["truncated_share"], stats["truncated"], max_seq_length, max_seq_length,
                    suggested_granularity(max_seq_length, stats.get("chars_per_token") or 4.0))


def merge_embed_stats(stats: Sequence[dict]) -> dict:
    """Totals over the embed units' statistics (counts summed, shares recomputed)."""
    keys = ("chunks", "unique", "duplicates", "truncated", "tokens", "padded_tokens", "batches")
    total = {k: sum(int(s.get(k, 0)) for s in stats) for k in keys if any(k in s for s in stats)}
    if "truncated" in total:
        total["truncated_share"] = round(total["truncated"] / max(1, total.get("unique", total["chunks"])), 4)
    if any("tokenized_once" in s for s in stats):
        total["tokenized_once"] = all(bool(s.get("tokenized_once")) for s in stats)
    if total.get("padded_tokens"):
        total["padding_waste"] = round(1.0 - total["tokens"] / total["padded_tokens"], 4)
    return total


def make_embedder(spec: str, seed: int, dim: int = 256, batch_size: int = 1024, device: str | None = None,
                  trust_remote_code: bool = False, precision: str = "auto", batch_tokens: int = 0,
                  threads: int = 0, streams: int = 0) -> Embedder:
    """``hashing`` or a sentence-transformers model path/name (on ``device``, default: CUDA if present).
    ``trust_remote_code`` runs the model directory's own code (jina-embeddings-v3 needs it)."""
    if spec == "hashing":
        return HashingEmbedder(dim=dim, seed=seed)
    return SentenceTransformerEmbedder(spec, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code,
                                       precision=precision, batch_tokens=batch_tokens, threads=threads,
                                       streams=streams)
