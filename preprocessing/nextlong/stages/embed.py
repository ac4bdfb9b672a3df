"""Stage ``embed``: embed every chunk of one input file once (paper Eq. 2).

Unit: one input file (``shard-XXXXX``), as for ``chunk``. Writes ``pool/shard-XXXXX/embeddings.npy``
(:func:`nextlong.pool.embed_shard`); the hashing embedder also reads every shard's document frequencies
(its IDF is global, cached as ``pool/idf-<hash>.npy``).
Key: the shard's chunk key, the embedder (model files by content), ``--embedding-dtype`` and, for a neural
embedder, ``--embed-batch-size``, ``--embed-batch-tokens`` and ``--embed-precision`` (batch composition and
precision change a neural embedder's bytes; ``--embed-threads`` does not); for the hashing embedder
``--embedding-dim`` and every shard's chunk key (the IDF). Not the seed: the hashing embedder's projection
uses the fixed seed :data:`HASHING_SEED`.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import chunk
from .base import Ctx, Unit, key_hash
from .inputs import input_identity

NAME = "embed"
AFTER = ("chunk",)
PARALLEL = True

#: seed of the hashing embedder's random projection: fixed, so that a seed sweep reuses the embeddings
HASHING_SEED = 0


def requires(ctx: Ctx) -> list[tuple[str, str, str]]:
    """Optional packages this stage needs with these settings: (module, pip name, flag)."""
    if ctx.cfg.embedder == "hashing":
        return [("scipy", "scipy", "--embedder hashing")]
    return [("sentence_transformers", "sentence-transformers", f"--embedder {ctx.cfg.embedder}"),
            ("torch", "torch", f"--embedder {ctx.cfg.embedder}")]


def units(ctx: Ctx) -> list[Unit]:
    return chunk.units(ctx)


def _pool_chunk_hash(ctx: Ctx) -> str:
    return key_hash([chunk.key(ctx, u) for u in chunk.units(ctx)])


def _embedder_identity(ctx: Ctx) -> dict:
    cfg = ctx.cfg
    if "embedder_id" not in ctx.memo:
        if cfg.embedder == "hashing":
            ident = {"embedder": "hashing", "dim": cfg.embedding_dim, "seed": HASHING_SEED,
                     "idf_over": _pool_chunk_hash(ctx)}
        else:
            d = Path(cfg.embedder)
            files = sorted(q for q in d.rglob("*") if q.is_file() and ".git" not in q.parts) if d.is_dir() else []
            ident = {"embedder": d.name or cfg.embedder, "batch_size": cfg.embed_batch_size,
                     "batch_tokens": cfg.embed_batch_tokens, "precision": cfg.embed_precision,
                     "trust_remote_code": cfg.trust_remote_code,
                     "files": {str(q.relative_to(d)): input_identity(ctx.work, str(q), ctx.memo) for q in files}}
        ctx.memo["embedder_id"] = ident
    return ctx.memo["embedder_id"]


def key(ctx: Ctx, unit: Unit) -> dict:
    return {"chunk": key_hash(chunk.key(ctx, unit)), "embedding_dtype": ctx.cfg.embedding_dtype,
            **_embedder_identity(ctx)}


def outputs(ctx: Ctx, unit: Unit) -> list[Path]:
    from ..pool import shard_dir

    return [shard_dir(ctx.work, unit.data) / "embeddings.npy"]


def _device_for_slot(slot: int) -> str | None:
    """One task per GPU: worker slot i uses GPU i mod n (None = the embedder's own choice)."""
    try:
        import torch
    except ImportError:
        return None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{slot % n}" if n else None


def embedder(ctx: Ctx):
    """The embedder of this process, loaded once."""
    if "embedder" not in ctx.memo:
        from ..embedding import make_embedder

        cfg = ctx.cfg
        device = _device_for_slot(ctx.memo.get("slot", 0)) if cfg.embedder != "hashing" else None
        # worker processes share the cores instead of each starting one thread per core
        threads = cfg.embed_threads or (max(1, (os.cpu_count() or 1) // cfg.tasks) if cfg.tasks > 1 else 0)
        ctx.memo["embedder"] = make_embedder(cfg.embedder, HASHING_SEED, cfg.embedding_dim, cfg.embed_batch_size,
                                             device=device, trust_remote_code=cfg.trust_remote_code,
                                             precision=cfg.embed_precision, batch_tokens=cfg.embed_batch_tokens,
                                             threads=threads, streams=cfg.embed_streams)
    return ctx.memo["embedder"]


def run(ctx: Ctx, unit: Unit) -> dict:
    from ..pool import embed_shard, hashing_idf

    cfg, work = ctx.cfg, ctx.work
    emb = embedder(ctx)
    idf = None
    if cfg.embedder == "hashing":
        idf_path = work / "pool" / f"idf-{ctx.shared['idf_hash']}.npy"
        idf = hashing_idf(idf_path, work, chunk.shards(ctx), emb.n_features)
    stats = embed_shard(cfg, work, unit.data, emb, idf, progress=ctx.progress)
    describe = getattr(emb, "describe", None)
    if describe is not None and "embedder" not in stats:
        stats["embedder"] = describe()
    return stats


def record(ctx: Ctx, stats: list[dict]) -> dict:
    """The manifest's embed record: the embedder as it ran (true dimension, device, precision, batching, max
    tokens) and the totals of its units (duplicates, truncation, padding)."""
    from ..embedding import merge_embed_stats

    cfg = ctx.cfg
    rec = {"embedder": cfg.embedder, "dtype": cfg.embedding_dtype, "dim": stats[0].get("dim") if stats else None}
    described = next((st["embedder"] for st in stats if isinstance(st.get("embedder"), dict)), None)
    if described:
        rec.update({k: v for k, v in described.items() if k != "name"})
    rec.update(merge_embed_stats(stats))
    return rec


def shared(ctx: Ctx) -> dict:
    """What the worker processes need from the main process."""
    return {"idf_hash": _pool_chunk_hash(ctx)}


def cleanup_stale(ctx: Ctx) -> None:
    """Remove IDF caches of other pools."""
    keep = f"idf-{_pool_chunk_hash(ctx)}.npy"
    d = ctx.work / "pool"
    if d.is_dir():
        for q in d.glob("idf-*.npy"):
            if q.name != keep:
                os.unlink(q)
