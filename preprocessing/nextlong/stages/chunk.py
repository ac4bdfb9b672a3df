"""Stage ``chunk``: read, chunk and tokenize one input file (paper 3.1.1, Algorithm 1).

Unit: one input file (``shard-XXXXX``, in input order then sorted file order; a built-in corpus is one).
Writes ``pool/shard-XXXXX/``: chunks.parquet, docs.parquet, tokens.npy, token_offsets.npy, rejects.jsonl and,
for the hashing embedder, df.npy and counts.npz (:func:`nextlong.pool.chunk_shard`).
Key: the file's content identity, the text/id fields, ``--duplicates``, ``--control-chars``, ``--granularity``,
the tokenizer's hash, and whether hashing counts are kept. Not the seed, the mix, the input names, the target
length or the method.
"""

from __future__ import annotations

from pathlib import Path

from .base import Ctx, Unit
from .inputs import input_identity

NAME = "chunk"
AFTER: tuple[str, ...] = ()
PARALLEL = True

_FILES = ("chunks.parquet", "docs.parquet", "tokens.npy", "token_offsets.npy", "rejects.jsonl")


def shards(ctx: Ctx) -> list:
    if "shards" not in ctx.memo:
        from ..pool import plan_shards

        ctx.memo["shards"] = plan_shards(ctx.cfg)
    return ctx.memo["shards"]


def units(ctx: Ctx) -> list[Unit]:
    return [Unit(s.name, s) for s in shards(ctx)]


def key(ctx: Ctx, unit: Unit) -> dict:
    cfg = ctx.cfg
    memo = ctx.memo.setdefault("chunk_keys", {})
    if unit.name not in memo:
        memo[unit.name] = {
            "input": input_identity(ctx.work, unit.data.spec.pattern, ctx.memo),
            "text_field": cfg.text_field, "id_field": cfg.id_field, "duplicates": cfg.duplicates,
            "control_chars": cfg.control_chars, "granularity": cfg.granularity,
            "tokenizer_sha256": ctx.shared["tokenizer_sha256"], "hashing_counts": cfg.embedder == "hashing",
        }
    return memo[unit.name]


def outputs(ctx: Ctx, unit: Unit) -> list[Path]:
    from ..pool import shard_dir

    d = shard_dir(ctx.work, unit.data)
    extra = ("df.npy", "counts.npz") if ctx.cfg.embedder == "hashing" else ()
    return [d / f for f in _FILES + extra]


def run(ctx: Ctx, unit: Unit) -> dict:
    from ..pool import chunk_shard

    return chunk_shard(ctx.cfg, ctx.work, unit.data, ctx.tokenizer())
