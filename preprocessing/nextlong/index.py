"""FAISS index over chunk embeddings (paper Eq. 3): build, save atomically, load, search in batches.

``--index-factory`` is any FAISS factory string (inner-product metric): ``Flat`` (exact, default; good up
to a few million chunks), ``IVF4096,Flat``, ``IVF65536,PQ64`` ... for large pools. IVF indexes are trained
on a seeded sample of ``--index-train-size`` vectors. With faiss-gpu and a visible GPU the index is built
and searched on all GPUs; the saved file is always a CPU index.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("FAISS is missing: pip install faiss-cpu (or faiss-gpu on a GPU node)") from e
    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(
    embeddings: np.ndarray,
    factory: str = "Flat",
    train_size: int = 262144,
    seed: int = 0,
    add_batch: int = 65536,
    use_gpu: bool | None = None,
    nprobe: int | None = None,
):
    """Build an inner-product index over ``embeddings`` (rows in chunk-id order)."""
    faiss = _faiss()
    n, d = embeddings.shape
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"--index-factory {factory!r}: FAISS cannot build it ({e})") from e
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        m = min(n, train_size)
        rng = np.random.default_rng([seed, 0x1D])
        sample = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        xt = np.ascontiguousarray(embeddings[sample], dtype=np.float32)
        log.info("training %s on %d of %d vectors", factory, m, n)
        try:
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
        except (RuntimeError, AttributeError):
            pass  # not an IVF index: nothing to seed
        index.train(xt)
    for i in range(0, n, add_batch):
        index.add(np.ascontiguousarray(embeddings[i : i + add_batch], dtype=np.float32))
    if use_gpu:
        index = faiss.index_gpu_to_cpu(index)
    set_nprobe(index, nprobe)
    return index


def set_nprobe(index, nprobe: int | None) -> None:
    if not nprobe:
        return
    faiss = _faiss()
    try:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    except RuntimeError:
        log.debug("--nprobe ignored: not an IVF index")


def save_index(index, path: str | os.PathLike) -> None:
    faiss = _faiss()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def load_index(path: str | os.PathLike, nprobe: int | None = None, use_gpu: bool | None = None):
    faiss = _faiss()
    index = faiss.read_index(str(path))
    set_nprobe(index, nprobe)
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One batched FAISS call: (similarities [q, k] float32, chunk ids [q, k] int64; -1 = no result)."""
    k = min(k, index.ntotal)
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return sims, ids
