"""Stage ``gather``: give the pool global ids and write its global files (streamed shard by shard).

Unit: the whole pool (``pool``). Writes, in the work directory, chunks.parquet, tokens.npy,
token_offsets.npy, embeddings.npy, chunk_doc.npy, chunk_hash.npy, doc_*.npy, docs.arrow, corpora.json and
rejects.jsonl (:func:`nextlong.pool.gather`; the module docstring of :mod:`nextlong.pool` lists them).
Key: every shard's embed key in shard order, and the name and input of each shard.
"""

from __future__ import annotations

from pathlib import Path

from . import chunk, embed
from .base import Ctx, Unit, key_hash

NAME = "gather"
AFTER = ("embed",)
PARALLEL = False

FILES = ("chunks.parquet", "tokens.npy", "token_offsets.npy", "embeddings.npy", "chunk_doc.npy", "chunk_hash.npy",
         "doc_first.npy", "doc_nchunks.npy", "doc_chars.npy", "doc_corpus.npy", "doc_corpus_index.npy",
         "docs.arrow", "corpora.json", "rejects.jsonl")


def units(ctx: Ctx) -> list[Unit]:
    return [Unit("pool")]


def key(ctx: Ctx, unit: Unit) -> dict:
    return {"shards": [[s.spec.name, s.input_index, key_hash(embed.key(ctx, u))]
                       for s, u in zip(chunk.shards(ctx), chunk.units(ctx), strict=True)]}


def outputs(ctx: Ctx, unit: Unit) -> list[Path]:
    return [ctx.work / f for f in FILES]


def run(ctx: Ctx, unit: Unit) -> dict:
    from ..pool import gather

    shards = chunk.shards(ctx)
    return gather(ctx.work, shards, sorted({s.spec.name for s in shards}), ctx.progress)
