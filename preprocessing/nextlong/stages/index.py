"""Stage ``index``: one FAISS inner-product index over every chunk embedding (paper 3.1.2).

Unit: the whole pool (``faiss``). Writes ``index.faiss`` (:func:`nextlong.index.build_index`, trained on
a sample drawn with the fixed seed :data:`INDEX_SEED`; faiss-gpu when available).
Key: the embed keys of every shard in order, ``--index-factory`` and ``--index-train-size``. Not the input
names (they change no vector), not ``--nprobe`` (set when the index is loaded), not the seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import chunk, embed
from .base import Ctx, Unit, key_hash

log = logging.getLogger(__name__)

NAME = "index"
AFTER = ("gather",)
PARALLEL = False

#: seed of the index's training sample and k-means: fixed, so that a seed sweep reuses the index
INDEX_SEED = 0


def units(ctx: Ctx) -> list[Unit]:
    return [Unit("faiss")]


def key(ctx: Ctx, unit: Unit) -> dict:
    return {"embeddings": key_hash([embed.key(ctx, u) for u in chunk.units(ctx)]),
            "factory": ctx.cfg.index_factory, "train_size": ctx.cfg.index_train_size, "seed": INDEX_SEED}


def outputs(ctx: Ctx, unit: Unit) -> list[Path]:
    return [ctx.work / "index.faiss"]


def run(ctx: Ctx, unit: Unit) -> dict:
    from .. import index as faiss_index

    cfg = ctx.cfg
    vecs = np.load(ctx.work / "embeddings.npy", mmap_mode="r")
    idx = faiss_index.build_index(vecs, cfg.index_factory, cfg.index_train_size, INDEX_SEED, nprobe=cfg.nprobe)
    faiss_index.save_index(idx, ctx.work / "index.faiss")
    log.info("index: %s over %d vectors", cfg.index_factory, idx.ntotal)
    return {"factory": cfg.index_factory, "ntotal": int(idx.ntotal), "gpus": faiss_index.gpu_count()}
