"""Stage ``synth``: mine hard negatives and assemble the samples of one block of meta-documents (paper
Algorithm 1 l. 21-24, Eq. 4-5).

Unit: ``block-XXXXX``, the slots ``[i * --block-docs, (i + 1) * --block-docs)`` of the global meta-document
order (:func:`nextlong.synthesize.meta_document_order`). Writes ``synth/block-XXXXX_{text,lossweight,label}
_document.{bin,idx}`` and ``synth/block-XXXXX_spans.parquet`` (:func:`nextlong.synthesize.run_part`).
Key: the pool (gather) and index keys, the tokenizer, every synthesis setting (target length, method,
ablations, negative allocation, budget, candidates and their cap, threshold, separator, special tokens,
``--split`` and its fractions, seed, mix, ``--block-docs``, ``--nprobe``, ``--emit-labels``) and the unit's
slot range. With ``--split train|valid|test`` the order holds only that split's meta-documents
(:mod:`nextlong.split`); the pool and the index are shared by all splits. Not ``--max-samples``: units are run in order
until the complete leading units hold enough samples (:func:`enough`); not ``--tasks``.
"""

from __future__ import annotations

from pathlib import Path

from . import gather, index
from .base import Ctx, Unit, key_hash

NAME = "synth"
AFTER = ("index",)
PARALLEL = True

#: settings that change a unit's bytes
SETTINGS = ("target_length", "candidates", "max_candidates", "near_duplicate_threshold", "separator", "bos_token",
            "eos_token", "budget", "paper_w", "method", "negative_order", "negative_selection", "negative_allocation",
            "split", "valid_fraction", "test_fraction", "seed", "block_docs", "nprobe", "emit_labels")


def plan(ctx: Ctx) -> dict:
    """Meta-document order and unit ranges (main process), with the special tokens the workers need."""
    if "synth_plan" not in ctx.memo:
        from ..pool import load_pool
        from ..readers import parse_input_specs
        from ..split import allowed_documents, restrict_order, split_counts
        from ..synthesize import meta_document_order, plan_blocks

        cfg, tok = ctx.cfg, ctx.tokenizer()
        p = load_pool(ctx.work)
        weights = {s.name: s.weight for s in parse_input_specs(cfg.inputs, cfg.mix, cfg.input_names)}
        order = meta_document_order(p, weights, cfg.seed)
        order = restrict_order(order, allowed_documents(p, cfg, ctx.work))  # --split
        sep = tok.encode(cfg.separator) if cfg.separator else []
        ctx.memo["synth_plan"] = {
            "order": order, "blocks": plan_blocks(len(order), cfg.block_docs), "weights": weights,
            "n_chunks": p.n_chunks, "pool_tokens": int(p.offsets[-1]),
            "specials": {"bos": [tok.bos_id] if tok.bos_id is not None else [],
                         "eos": [tok.eos_id] if tok.eos_id is not None else [], "sep": [int(x) for x in sep]},
            "chars_per_token": _chars_per_token(ctx),
            "split": split_counts(p, cfg, ctx.work) if cfg.split != "all" else None,
        }
    return ctx.memo["synth_plan"]


def _chars_per_token(ctx: Ctx) -> float:
    """Characters per token of the whole pool (from the chunk markers); the paper budget's E."""
    from . import chunk
    from .base import read_marker

    chars = tokens = 0
    for u in chunk.units(ctx):
        st = (read_marker(ctx.work, "chunk", u.name) or {}).get("stats", {})
        chars += int(st.get("chars", 0))
        tokens += int(st.get("tokens", 0))
    return chars / max(1, tokens)


def units(ctx: Ctx) -> list[Unit]:
    p = plan(ctx)
    return [Unit(f"block-{i:05d}", (a, b)) for i, (a, b) in enumerate(p["blocks"])]


def key(ctx: Ctx, unit: Unit) -> dict:
    cfg = ctx.cfg
    base = ctx.memo.get("synth_base_key")
    if base is None:
        p = plan(ctx)
        base = {"pool": key_hash(gather.key(ctx, gather.units(ctx)[0])),
                "index": key_hash(index.key(ctx, index.units(ctx)[0])),
                "tokenizer_sha256": ctx.shared["tokenizer_sha256"], "specials": p["specials"],
                "mix": sorted(p["weights"].items()), **{k: getattr(cfg, k) for k in SETTINGS}}
        ctx.memo["synth_base_key"] = base
    return {**base, "slots": list(unit.data)}


def outputs(ctx: Ctx, unit: Unit) -> list[Path]:
    from ..synthesize import unit_paths

    paths = unit_paths(ctx.work, unit.name)
    names = ("text", "lossweight") + (("label",) if ctx.cfg.emit_labels else ())
    return [Path(f"{paths[n]}.{e}") for n in names for e in ("bin", "idx")] + [paths["spans"]]


def shared(ctx: Ctx) -> dict:
    p = plan(ctx)
    return {"specials": p["specials"], "chars_per_token": p["chars_per_token"], "order": p["order"]}


def run(ctx: Ctx, unit: Unit) -> dict:
    from ..synthesize import PartContext, run_part

    if "part_ctx" not in ctx.memo:
        ctx.memo["part_ctx"] = PartContext(ctx.cfg, ctx.work, ctx.shared["specials"],
                                           ctx.shared["chars_per_token"], ctx.tokenizer().vocab_size)
    a, b = unit.data
    return run_part(ctx.memo["part_ctx"], unit.name, ctx.shared["order"][a:b], a)


def enough(ctx: Ctx, markers: list[dict | None]) -> bool:
    """With ``--max-samples``: the complete leading units already hold that many samples (the merge takes
    samples in unit order), so no further unit is needed; stopping there changes no output byte."""
    limit = ctx.cfg.max_samples
    if limit is None:
        return False
    total = 0
    for m in markers:
        if m is None:
            return False
        total += m["stats"]["samples"]
        if total >= limit:
            return True
    return False
