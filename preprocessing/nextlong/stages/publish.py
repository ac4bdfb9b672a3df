"""Stage ``publish``: write the manifest into the staged dataset, then make it the published one at once.

Unit: the output prefix (``current``); it runs on every full run (it is cheap and the only stage that
looks at what is published). Layout, for ``--output-prefix out/nl``::

    out/nl.data/<version>/nl_text_document.bin ...   complete datasets (``merge``), one folder per version
    out/nl.data/current -> <version>                  the published version
    out/nl_text_document.bin -> nl.data/current/nl_text_document.bin   (one link per file, never changed)

Switching ``current`` is one ``rename``: a reader of ``out/nl_*`` sees either the previous complete
dataset (text, mask, labels, spans, rejects, manifest) or the new one, never a mix; a crash or a full disk
at any moment before the switch leaves the previous one in place. After the switch the dataset is verified
(:func:`nextlong.pipeline.verify_outputs`); on a failure ``current`` goes back to the previous version.
Older versions are removed once the new one is verified.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

from ..failpoints import failpoint
from . import merge
from .base import Ctx, Unit, key_hash, tmp_name

log = logging.getLogger(__name__)

NAME = "publish"
AFTER = ("merge",)
PARALLEL = False
ALWAYS = True  #: runs even when its marker matches: the published state can change behind our back


def units(ctx: Ctx) -> list[Unit]:
    return [Unit("current")]


def key(ctx: Ctx, unit: Unit) -> dict:
    return {"version": merge.version_dir(ctx).name}


def manifest_name(cfg) -> str:
    return f"{Path(cfg.output_prefix).name}_manifest.json"


def outputs(ctx: Ctx, unit: Unit) -> list[Path]:
    return [merge.version_dir(ctx) / manifest_name(ctx.cfg)]


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` with one rename (replaces whatever ``link`` was)."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = tmp_name(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def current_version(cfg) -> str | None:
    cur = merge.data_root(cfg) / "current"
    return os.readlink(cur) if cur.is_symlink() else None


def run(ctx: Ctx, unit: Unit) -> dict:
    cfg = ctx.cfg
    prefix = Path(cfg.output_prefix)
    out_dir = prefix.parent
    root = merge.data_root(cfg)
    version = merge.version_dir(ctx)
    manifest = build_manifest(ctx)
    mpath = version / manifest_name(cfg)
    tmp = tmp_name(mpath)
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, mpath)
    names = merge.file_names(cfg) + [manifest_name(cfg)]
    for f in names:  # data written and durable before anything points at it
        with open(version / f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(version)
    # the per-file links never change: they resolve through `current`, which is switched in one rename
    for f in names:
        link = out_dir / f
        if link.exists() and not link.is_symlink():
            log.warning("%s: a file from an earlier layout is replaced by a link into %s", link, root.name)
        _symlink(f"{root.name}/current/{f}", link)
    _fsync_dir(out_dir)
    failpoint("publish:before_switch")
    previous = current_version(cfg)
    _symlink(version.name, root / "current")
    _fsync_dir(root)
    failpoint("publish:after_switch")
    ctx.memo["previous_version"] = previous
    log.info("published %s (version %s)", prefix, version.name)
    return {"version": version.name, "previous": previous}


def roll_back(ctx: Ctx) -> None:
    """The new version failed verification: publish the previous one again (or none)."""
    root = merge.data_root(ctx.cfg)
    previous = ctx.memo.get("previous_version")
    if previous and (root / previous).is_dir():
        _symlink(previous, root / "current")
        log.error("the previous dataset (version %s) stays published; the failed one is kept in %s", previous,
                  merge.version_dir(ctx))
    else:
        (root / "current").unlink(missing_ok=True)
        log.error("nothing is published; the failed dataset is kept in %s", merge.version_dir(ctx))
    _fsync_dir(root)


def remove_old_versions(ctx: Ctx) -> None:
    """Delete every version but the published one, and links to files the published version lacks."""
    root = merge.data_root(ctx.cfg)
    keep = current_version(ctx.cfg)
    for d in root.iterdir():
        if d.is_dir() and not d.is_symlink() and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)
    prefix = Path(ctx.cfg.output_prefix)
    for link in prefix.parent.glob(f"{prefix.name}_*"):
        if link.is_symlink() and os.readlink(link).startswith(f"{root.name}/current/") and not link.exists():
            link.unlink()


# ------------------------------------------------------------------------------------------ manifest


def _versions() -> dict:
    import sys

    out = {"python": platform.python_version()}
    for mod in ("numpy", "pyarrow", "faiss", "tokenizers", "transformers", "scipy", "sentence_transformers",
                "torch"):
        if mod in ("sentence_transformers", "torch") and mod not in sys.modules:
            continue
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = None
    from .. import __version__

    out["nextlong"] = __version__
    return out


def _git_commit() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        if res.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() + ("-dirty" if dirty else "")


def _markers(ctx: Ctx, stage: str, units: list[Unit]) -> list[dict]:
    from .base import read_marker

    return [m for m in (read_marker(ctx.work, stage, u.name) for u in units) if m is not None]


def build_manifest(ctx: Ctx) -> dict:
    """The manifest: config, versions, counts that reconcile, per-stage times kept across reruns."""
    import numpy as np

    from ..synthesize import token_dtype_for_vocab
    from . import chunk, embed, synth
    from .base import read_marker

    cfg, tok = ctx.cfg, ctx.tokenizer()
    prefix = Path(cfg.output_prefix)
    name = prefix.name
    chunk_m = _markers(ctx, "chunk", chunk.units(ctx))
    embed_m = _markers(ctx, "embed", embed.units(ctx))
    gather_m = read_marker(ctx.work, "gather", "pool")
    index_m = read_marker(ctx.work, "index", "faiss")
    taken_units, synth_m = merge.taken(ctx)
    merge_m = read_marker(ctx.work, "merge", "dataset")
    ms = merge_m["stats"]
    p = synth.plan(ctx)
    rejected: dict[str, int] = {}
    per_input: dict[str, int] = {}
    for s, m in zip(chunk.shards(ctx), chunk_m, strict=True):
        for r, n in m["stats"]["rejected"].items():
            rejected[r] = rejected.get(r, 0) + n
        per_input[s.spec.name] = per_input.get(s.spec.name, 0) + m["stats"]["documents"]
    totals = {k: sum(m["stats"][k] for m in chunk_m) for k in ("documents", "chunks", "tokens", "chars")}
    inputs = _input_audit(ctx, chunk_m)
    overfill = [x for m in synth_m for x in m["stats"].get("paper_budget_overfill_tokens", [])]
    filt = {k: sum(m["stats"].get("filtered_candidates", {}).get(k, 0) for m in synth_m)
            for k in ("same_document", "duplicate", "adaptive_k_retries", "other_split")}
    dropped = ms["dropped"]
    stage_markers = {"chunk": chunk_m, "embed": embed_m, "gather": [gather_m], "index": [index_m],
                     "synth": synth_m, "merge": [merge_m]}
    runs = list(ctx.shared.get("runs", []))
    wall = sum(r.get("wall_seconds", 0.0) for r in runs)
    return {
        "format": "nextlong-neox/1 (docs/format.md)",
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "tokenizer": {"spec": cfg.tokenizer, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_token": tok.bos_token, "bos_id": tok.bos_id, "eos_token": tok.eos_token,
                      "eos_id": tok.eos_id, "separator_ids": p["specials"]["sep"],
                      "token_dtype": str(np.dtype(token_dtype_for_vocab(tok.vocab_size)))},
        "files": {
            "text": f"{name}_text_document",
            "lossweight": f"{name}_lossweight_document",
            "label": f"{name}_label_document" if cfg.emit_labels else None,
            "spans": f"{name}_spans.parquet",
            "rejects": f"{name}_rejects.jsonl",
            "work_dir": os.path.relpath(ctx.work, prefix.parent),
            "version": merge.version_dir(ctx).name,
        },
        "counts": {
            "documents_in": totals["documents"],
            "documents_per_input": per_input,
            "inputs_rejected": dict(sorted(rejected.items())),
            # documents read = used + dropped + rejected, and what was noted about them (docs/format.md)
            "inputs": inputs,
            "shards": len(chunk_m),
            "chunks": totals["chunks"],
            "pool_tokens": totals["tokens"],
            "chars_per_token": p["chars_per_token"],
            "meta_documents_ordered": len(p["order"]),
            # meta_documents_processed = samples_out + sum(dropped): the slots the published samples consumed
            "meta_documents_processed": ms["meta_documents_processed"],
            "samples_out": ms["samples"],
            "tokens_out": ms["tokens"],
            "dropped": dropped,
            "filtered_candidates": filt,
            "synth_units": {"total": len(synth.units(ctx)), "taken": len(taken_units)},
        },
        # documents, chunks and tokens per split (--split); None for --split all
        "split": p["split"],
        # drop rate by chunks per document; negatives, mean rank and similarity by meta-chunk position: the
        # published samples and the meta-documents dropped among them (nextlong.assemble.Tally)
        "synthesis_balance": ms.get("balance"),
        "paper_budget": None if cfg.budget != "paper" else {
            "samples_overfilled": int(sum(1 for x in overfill if x > 0)),
            "mean_overfill_tokens": float(np.mean(overfill)) if overfill else 0.0,
            "underfilled_dropped": dropped.get("paper_budget_underfill", 0),
        },
        "stages": {
            "chunk": {**totals, "shards": len(chunk_m), "documents_per_input": per_input,
                      "rejected": dict(sorted(rejected.items())), "inputs": inputs,
                      "chars_per_token": p["chars_per_token"]},
            "embed": {**embed.record(ctx, [m["stats"] for m in embed_m]),
                      "key_hash": key_hash([m["key_hash"] for m in embed_m])},
            "gather": gather_m["stats"] if gather_m else None,
            "index": index_m["stats"] if index_m else None,
        },
        # task seconds of the units that made this dataset, whichever run made them
        "stage_seconds": {s: round(sum(m.get("seconds", 0.0) for m in ms_ if m), 3)
                          for s, ms_ in stage_markers.items()},
        "stage_cpu_seconds": {s: round(sum(m.get("cpu_seconds", 0.0) for m in ms_ if m), 3)
                              for s, ms_ in stage_markers.items()},
        "runs": runs,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(ms["tokens"] / wall, 1) if wall > 0 else None,
        "peak_rss_mib": max((r.get("peak_rss_mib", 0.0) for r in runs), default=None),
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _input_audit(ctx: Ctx, chunk_m: list[dict]) -> dict:
    """Documents read = used + dropped + rejected, over all shards, plus repeats across input files."""
    import pyarrow.parquet as pq

    from ..pool import shard_dir
    from ..readers import merge_audits, repeated_across_inputs
    from . import chunk

    audit = merge_audits(m["stats"]["inputs"] for m in chunk_m if "inputs" in m["stats"])
    hashes = (pq.read_table(shard_dir(ctx.work, s) / "docs.parquet", columns=["text_hash"]).column(0).to_numpy()
              for s in chunk.shards(ctx))
    audit["noted"]["repeated_across_inputs"] = repeated_across_inputs(hashes)
    return audit
