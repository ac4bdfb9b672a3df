"""Stage ``merge``: concatenate the synthesis units, in order, into one staged dataset.

Unit: the whole output (``dataset``). Writes a complete new dataset version
``<output dir>/<name>.data/<key hash>/`` holding ``<name>_{text,lossweight,label}_document.{bin,idx}``,
``<name>_spans.parquet`` and ``<name>_rejects.jsonl``: every byte copied (no file shares an inode with the
work directory), nothing visible under the final names until ``publish`` switches to it.
Key: the keys of the synthesis units it takes (in order), ``--max-samples``, ``--emit-labels`` and the
output prefix (absolute: runs to other prefixes may share the work directory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import synth
from .base import Ctx, SynthesisError, Unit, key_hash, read_marker, tmp_name

NAME = "merge"
AFTER = ("synth",)
PARALLEL = False


def units(ctx: Ctx) -> list[Unit]:
    return [Unit("dataset")]


def taken(ctx: Ctx) -> tuple[list[Unit], list[dict]]:
    """The synthesis units the dataset takes, in order, with their markers (up to ``--max-samples``)."""
    if "merge_taken" not in ctx.memo:
        limit = ctx.cfg.max_samples
        out, markers, total, missing = [], [], 0, []
        for u in synth.units(ctx):
            if limit is not None and total >= limit:
                break
            m = read_marker(ctx.work, "synth", u.name)
            if m is None or m.get("key_hash") != key_hash(synth.key(ctx, u)):
                missing.append(u.name)
                continue
            out.append(u)
            markers.append(m)
            total += m["stats"]["samples"]
        if missing:
            raise SynthesisError(f"synthesis units {missing[:5]}{' ...' if len(missing) > 5 else ''} are not "
                                 "complete; run --stage synth first")
        ctx.memo["merge_taken"] = (out, markers)
    return ctx.memo["merge_taken"]


def key(ctx: Ctx, unit: Unit) -> dict:
    units_, markers = taken(ctx)
    return {"units": [m["key_hash"] for m in markers], "max_samples": ctx.cfg.max_samples,
            "emit_labels": ctx.cfg.emit_labels,
            # the whole output prefix: runs to other prefixes may share the work directory
            "output_prefix": str(Path(ctx.cfg.output_prefix).resolve())}


def data_root(cfg) -> Path:
    """``<output dir>/<name>.data``: the dataset versions and the ``current`` link."""
    p = Path(cfg.output_prefix)
    return p.parent / f"{p.name}.data"


def version_dir(ctx: Ctx) -> Path:
    return data_root(ctx.cfg) / key_hash(key(ctx, units(ctx)[0]))


def file_names(cfg) -> list[str]:
    """The dataset's files, by name (without the manifest, which ``publish`` writes)."""
    name = Path(cfg.output_prefix).name
    sets = ("text", "lossweight") + (("label",) if cfg.emit_labels else ())
    return ([f"{name}_{s}_document.{e}" for s in sets for e in ("bin", "idx")]
            + [f"{name}_spans.parquet", f"{name}_rejects.jsonl"])


def outputs(ctx: Ctx, unit: Unit) -> list[Path]:
    d = version_dir(ctx)
    return [d / f for f in file_names(ctx.cfg)]


def _advice(dropped: dict[str, int]) -> str:
    too_long = dropped.get("meta_document_longer_than_target", 0)
    if too_long and too_long >= sum(dropped.values()) / 2:
        return "Raise --target-length (documents are longer than one sample) or give shorter documents."
    return "Lower --target-length or add input documents."


def run(ctx: Ctx, unit: Unit) -> dict:
    from ..assemble import merge_tallies
    from ..synthesize import merge_parts, slots_consumed

    cfg = ctx.cfg
    units_, markers = taken(ctx)
    produced = sum(m["stats"]["samples"] for m in markers)
    if produced == 0:
        dropped: dict[str, int] = {}
        for m in markers:
            for r, n in m["stats"]["dropped"].items():
                dropped[r] = dropped.get(r, 0) + n
        p = synth.plan(ctx)
        what = ("no meta-document fits in" if _advice(dropped).startswith("Raise")
                else "the corpus is too small to fill even")
        raise SynthesisError(
            f"{what} one sample of {cfg.target_length} tokens: {len(p['order'])} "
            f"meta-documents, {p['n_chunks']} chunks ({p['pool_tokens']} tokens) in the pool; dropped "
            f"{dict(sorted(dropped.items()))}. {_advice(dropped)}")
    d = version_dir(ctx)
    d.mkdir(parents=True, exist_ok=True)
    name = Path(cfg.output_prefix).name
    merged = merge_parts(ctx.work, [u.name for u in units_], str(d / name), cfg.emit_labels, cfg.max_samples)
    rejects = d / f"{name}_rejects.jsonl"
    tmp = tmp_name(rejects)
    shutil.copyfile(ctx.work / "rejects.jsonl", tmp)
    os.replace(tmp, rejects)
    # what the taken samples consumed: meta-documents processed = samples out + dropped, exactly
    processed, dropped_used = 0, {}
    for m, n in zip(markers, merged["takes"], strict=True):
        used, drops = slots_consumed(m["stats"], n)
        processed += used
        for r, k in drops.items():
            dropped_used[r] = dropped_used.get(r, 0) + k
    balance = [m["stats"].get("balance") if n >= m["stats"]["samples"] else _partial_balance(ctx, u, m, n)
               for u, m, n in zip(units_, markers, merged["takes"], strict=True)]
    return {"samples": merged["samples"], "tokens": merged["tokens"], "units": len(units_),
            "meta_documents_processed": processed, "dropped": dict(sorted(dropped_used.items())),
            "balance": merge_tallies(balance)}


def _partial_balance(ctx: Ctx, unit: Unit, marker: dict, samples: int) -> dict:
    """The balance tally of the first ``samples`` samples of a unit the merge cuts (``--max-samples``), and
    of the meta-documents dropped before them, from the unit's spans and its dropped slots: the manifest
    describes exactly the published samples."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..assemble import ROLE_CODE, Tally
    from ..pool import load_pool
    from ..synthesize import unit_paths

    pool = load_pool(ctx.work)
    order = synth.plan(ctx)["order"]
    a, _ = unit.data
    table = pq.read_table(unit_paths(ctx.work, unit.name)["spans"],
                          columns=["sample", "role", "meta_index", "rank", "similarity"])
    table = table.filter(pc.less(table["sample"], samples))
    cols = {k: table[k].to_numpy(zero_copy_only=False) for k in ("sample", "meta_index", "rank", "similarity")}
    # roles are names in spans.parquet, codes in a sample's spans
    cols["role"] = np.asarray([ROLE_CODE[r] for r in table["role"].to_pylist()], dtype=np.int8)
    bounds = np.searchsorted(cols["sample"], np.arange(samples + 1))  # rows are in sample order
    dropped_at = {int(k): v for k, v in marker["stats"].get("dropped_slots", {}).items()}
    tally, made, pos = Tally(), 0, 0
    while made < samples:
        p = int(pool.doc_nchunks[order[a + pos]])
        if pos in dropped_at:
            tally.dropped(p, dropped_at[pos])
        else:
            lo, hi = bounds[made], bounds[made + 1]
            tally.spans(p, {k: v[lo:hi] for k, v in cols.items()})
            made += 1
        pos += 1
    return tally.to_dict()
