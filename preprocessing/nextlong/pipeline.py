"""Run the stages in order, each skipped when its completion marker matches the configuration.

Stages (each a function of the configuration and files on disk):

====== ================================================ =============================================
stage  reads                                            writes (in the work directory)
====== ================================================ =============================================
chunk  the inputs                                       chunks.parquet, docs.parquet, rejects.jsonl
tokens chunks.parquet                                   tokens.npy, token_offsets.npy
embed  chunks.parquet                                   embeddings.npy
index  embeddings.npy                                   index.faiss
synth  all of the above                                 synth/part-XXXXX_* (one set per task)
merge  synth/                                           <prefix>_{text,lossweight,label}_document.*,
                                                        <prefix>_spans.parquet, _manifest.json
====== ================================================ =============================================

A stage's marker ``<stage>.done.json`` holds the settings it depends on (its own and every earlier
stage's) and its statistics; a rerun with the same settings skips it, a changed setting redoes it and
everything after it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .assemble import merge_tallies
from .config import SynthesisConfig
from .stages import key_hash

log = logging.getLogger(__name__)



class SynthesisError(RuntimeError):
    """The run cannot produce a dataset (e.g. the corpus is too small to fill one sample)."""


def _progress_factory(enabled: bool):
    def make(total=None, desc="", unit="it"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=2.0, dynamic_ncols=True)

    return make


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "pyarrow", "faiss", "tokenizers", "transformers", "scipy", "sentence_transformers",
                "torch"):
        if mod in ("sentence_transformers", "torch") and mod not in sys.modules:
            continue
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = None
    from . import __version__

    out["nextlong"] = __version__
    return out


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return res.stdout.strip() + ("-dirty" if dirty else "")


def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0  # Linux reports KiB


def _synth_key(cfg: SynthesisConfig) -> dict:
    keep = {k: v for k, v in cfg.to_dict().items()
            if k not in ("output_prefix", "work_dir", "tasks", "verify", "extra", "max_samples")}
    return keep


# --- worker entry points (module level so that a spawned process can import them) ---
_CTX = None


def _init_worker(cfg_dict: dict, work: str, specials: dict, cpt: float, vocab: int) -> None:
    global _CTX
    from .synthesize import PartContext

    logging.basicConfig(level=logging.WARNING)
    _CTX = PartContext(SynthesisConfig(**cfg_dict), Path(work), specials, cpt, vocab)


def _run_worker(part: int, start: int, slots: np.ndarray) -> dict:
    from .synthesize import run_part

    return run_part(_CTX, part, slots, start)


STAGES = ("chunk", "embed", "gather", "index", "synth", "merge")


def _load_tok(cfg: SynthesisConfig):
    from .tokenization import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token)
    log.info("tokenizer %s: vocabulary %d, bos %s (%s), eos %s (%s), sha256 %s", cfg.tokenizer, tok.vocab_size,
             tok.bos_token, tok.bos_id, tok.eos_token, tok.eos_id, tok.sha256[:12])
    return tok


class _SynthPlan:
    """What the synthesis and merge stages share: meta-document order, parts, special tokens."""

    def __init__(self, cfg: SynthesisConfig, work: Path, tok, summary: dict) -> None:
        from . import pool, split, synthesize
        from .readers import parse_input_specs

        p = pool.load_pool(work)
        weights = {s.name: s.weight for s in parse_input_specs(cfg.inputs, cfg.mix, cfg.input_names)}
        self.order = synthesize.meta_document_order(p, weights, cfg.seed)
        self.order = split.restrict_order(self.order, split.allowed_documents(p, cfg, work))  # --split
        self.split_counts = split.split_counts(p, cfg, work) if cfg.split != "all" else None
        self.plan = synthesize.plan_parts(len(self.order), cfg.tasks, cfg.block_docs)
        self.sep_ids = tok.encode(cfg.separator) if cfg.separator else []
        self.specials = {"bos": [tok.bos_id] if tok.bos_id is not None else [],
                         "eos": [tok.eos_id] if tok.eos_id is not None else [], "sep": self.sep_ids}
        self.cpt = float(summary["chunk"]["chars_per_token"])
        self.n_chunks, self.pool_tokens = p.n_chunks, int(p.offsets[-1])
        self.key = {**_synth_key(cfg), "pool_key": summary["index_key_hash"], "tokenizer_sha256": tok.sha256,
                    "plan": self.plan, "max_samples": cfg.max_samples}

    def claim(self, work: Path) -> None:
        """Discard parts written under other settings, then record the current ones."""
        from . import synthesize

        key_file = work / "synth" / "key.json"
        if key_file.exists() and json.loads(key_file.read_text()).get("key_hash") != key_hash(self.key):
            log.info("synth: settings changed since the last run; previous parts are discarded")
            synthesize.clear_parts(work)
        key_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = key_file.with_name(f".key.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key_hash": key_hash(self.key), "key": self.key}, default=str, sort_keys=True))
        os.replace(tmp, key_file)

    def done_parts(self, work: Path) -> list[dict | None]:
        from . import synthesize

        key_file = work / "synth" / "key.json"
        if not key_file.exists() or json.loads(key_file.read_text()).get("key_hash") != key_hash(self.key):
            return [None] * len(self.plan)
        out: list[dict | None] = []
        for i in range(len(self.plan)):
            m = synthesize.part_paths(work, i)["marker"]
            out.append(json.loads(m.read_text()) if m.exists() else None)
        return out


def stage_synth(cfg: SynthesisConfig, work: Path, tok, summary: dict, prog, task_index: int | None = None) -> None:
    """Synthesize every part not done yet (or only part ``task_index``, for a Slurm array task)."""
    from . import synthesize

    sp = _SynthPlan(cfg, work, tok, summary)
    if task_index is None:
        sp.claim(work)
    elif not (work / "synth" / "key.json").exists() or sp.done_parts(work) == [None] * len(sp.plan):
        sp.claim(work)  # the first array task to start; the others find the same key
    part_stats = sp.done_parts(work)
    todo = [i for i, s in enumerate(part_stats) if s is None and (task_index is None or i == task_index)]
    if task_index is not None and task_index >= len(sp.plan):
        log.info("synth: task %d has no part (the pool gives %d parts)", task_index, len(sp.plan))
        return
    log.info("synth: %d meta-documents in %d part(s) (%d to do), target %d tokens, method %s", len(sp.order),
             len(sp.plan), len(todo), cfg.target_length, cfg.method)
    if not todo:
        return
    if cfg.tasks == 1 or len(todo) == 1:
        ctx = synthesize.PartContext(cfg, work, sp.specials, sp.cpt, tok.vocab_size)
        for i in todo:
            a, b = sp.plan[i]
            bar = prog(total=b - a, desc=f"synth part {i}", unit="doc")
            synthesize.run_part(ctx, i, sp.order[a:b], a, progress=bar.update)
            bar.close()
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=min(cfg.tasks, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(cfg.to_dict(), str(work), sp.specials, sp.cpt, tok.vocab_size)) as ex:
        futs = {i: ex.submit(_run_worker, i, sp.plan[i][0], sp.order[sp.plan[i][0] : sp.plan[i][1]]) for i in todo}
        for i, f in futs.items():
            log.info("synth: part %d done: %d samples", i, f.result()["samples"])


def stage_merge(cfg: SynthesisConfig, work: Path, tok, summary: dict, timings: dict, t_start: float) -> dict:
    """Merge the parts into the final datasets and write the manifest."""
    from . import synthesize

    sp = _SynthPlan(cfg, work, tok, summary)
    part_stats = sp.done_parts(work)
    missing = [i for i, s in enumerate(part_stats) if s is None]
    if missing:
        raise SynthesisError(f"synthesis parts {missing[:10]} are not complete; run --stage synth first")
    dropped: dict[str, int] = {}
    for s in part_stats:
        for r, n in s["dropped"].items():
            dropped[r] = dropped.get(r, 0) + n
    produced = sum(s["samples"] for s in part_stats)
    if produced == 0:
        raise SynthesisError(
            f"the corpus is too small to fill even one sample of {cfg.target_length} tokens: "
            f"{len(sp.order)} meta-documents, {sp.n_chunks} chunks ({sp.pool_tokens} tokens) in the pool; "
            f"dropped {dropped}. Lower --target-length or add input documents."
        )
    t0 = time.time()
    merged = synthesize.merge_parts(work, len(sp.plan), cfg.output_prefix, cfg.emit_labels, cfg.max_samples)
    timings["merge"] = round(time.time() - t0, 3)

    rejects_src = work / "rejects.jsonl"
    rejects_dst = Path(f"{cfg.output_prefix}_rejects.jsonl")
    tmp = rejects_dst.with_name(f".{rejects_dst.name}.tmp-{os.getpid()}")
    tmp.write_bytes(rejects_src.read_bytes() if rejects_src.exists() else b"")
    os.replace(tmp, rejects_dst)

    overfill = [x for s in part_stats for x in s.get("paper_budget_overfill_tokens", [])]
    wall = time.time() - t_start
    prefix_name = Path(cfg.output_prefix).name
    task_seconds = dict(summary["task_seconds"], synth=round(sum(s["seconds"] for s in part_stats), 3))
    cpu_seconds = dict(summary["cpu_seconds"], synth=round(sum(s.get("cpu_seconds", 0.0) for s in part_stats), 3))
    chunk = summary["chunk"]
    manifest = {
        "format": "nextlong-neox/1 (docs/format.md)",
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "tokenizer": {"spec": cfg.tokenizer, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_token": tok.bos_token, "bos_id": tok.bos_id, "eos_token": tok.eos_token,
                      "eos_id": tok.eos_id, "separator_ids": sp.sep_ids,
                      "token_dtype": str(np.dtype(synthesize.token_dtype_for_vocab(tok.vocab_size)))},
        "files": {
            "text": f"{prefix_name}_text_document",
            "lossweight": f"{prefix_name}_lossweight_document",
            "label": f"{prefix_name}_label_document" if cfg.emit_labels else None,
            "spans": f"{prefix_name}_spans.parquet",
            "rejects": f"{prefix_name}_rejects.jsonl",
            "work_dir": os.path.relpath(work, Path(cfg.output_prefix).parent),
        },
        "counts": {
            "documents_in": chunk["documents"],
            "documents_per_input": chunk["documents_per_input"],
            "inputs_rejected": chunk["rejected"],
            "shards": chunk["shards"],
            "chunks": chunk["chunks"],
            "pool_tokens": chunk["tokens"],
            "chars_per_token": sp.cpt,
            "meta_documents_ordered": len(sp.order),
            "meta_documents_processed": sum(s["slots_processed"] for s in part_stats),
            "samples_out": merged["samples"],
            "tokens_out": merged["tokens"],
            "dropped": dict(sorted(dropped.items())),
            "filtered_candidates": {k: sum(s.get("filtered_candidates", {}).get(k, 0) for s in part_stats)
                                    for k in ("same_document", "duplicate", "adaptive_k_retries", "other_split")},
        },
        "split": sp.split_counts,
        "synthesis_balance": merge_tallies([s.get("balance") for s in part_stats]),
        "paper_budget": None if cfg.budget != "paper" else {
            "samples_overfilled": int(sum(1 for x in overfill if x > 0)),
            "mean_overfill_tokens": float(np.mean(overfill)) if overfill else 0.0,
            "underfilled_dropped": dropped.get("paper_budget_underfill", 0),
        },
        "stages": {"chunk": chunk, "embed": summary["embed"], "index": summary["index"]},
        "stage_seconds": timings,
        "stage_task_seconds": task_seconds,
        "stage_cpu_seconds": cpu_seconds,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(merged["tokens"] / wall, 1) if wall > 0 else None,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }
    _write_manifest(cfg.output_prefix, manifest)
    log.info(
        "done: %d documents in -> %d samples x %d tokens (%d tokens) in %.1f s (%.0f tokens/s), dropped %s, "
        "peak RSS %.0f MiB; stages %s",
        chunk["documents"], merged["samples"], cfg.target_length, merged["tokens"], wall,
        manifest["tokens_per_second"] or 0, dropped or "none", manifest["peak_rss_mib"], timings,
    )
    return manifest


def run(cfg: SynthesisConfig, progress: bool = True, stage: str = "all", task_index: int | None = None) -> dict | None:
    """Run every stage (``stage="all"``), or one stage, or one array task of one stage. Returns the manifest
    when the merge ran (it is also written to ``<prefix>_manifest.json``)."""
    from . import stages

    if stage != "all" and stage not in STAGES:
        raise SynthesisError(f"--stage {stage!r}: choose from all, {', '.join(STAGES)}")
    t_start = time.time()
    work = Path(cfg.resolved_work_dir)
    work.mkdir(parents=True, exist_ok=True)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    prog = _progress_factory(progress)
    tok = _load_tok(cfg)
    if stage == "all":
        summary, timings = stages.run_pool_stages(cfg, work, tok, prog)
        t0 = time.time()
        stage_synth(cfg, work, tok, summary, prog)
        timings["synthesize"] = round(time.time() - t0, 3)
        return stage_merge(cfg, work, tok, summary, timings, t_start)
    if stage == "chunk":
        stages.stage_chunk(cfg, work, tok, prog, task_index)
    elif stage == "embed":
        stages.stage_embed(cfg, work, tok, prog, task_index)
    elif stage == "gather":
        stages.stage_gather(cfg, work, tok, prog)
    elif stage == "index":
        stages.stage_index(cfg, work, tok, prog)
    elif stage == "synth":
        stage_synth(cfg, work, tok, stages.pool_summary(cfg, work, tok), prog, task_index)
    else:
        return stage_merge(cfg, work, tok, stages.pool_summary(cfg, work, tok), {}, t_start)
    log.info("stage %s%s done in %.1f s", stage, "" if task_index is None else f" task {task_index}",
             time.time() - t_start)
    return None


def _write_manifest(prefix: str, manifest: dict) -> Path:
    path = Path(f"{prefix}_manifest.json")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def verify_outputs(cfg: SynthesisConfig, manifest: dict) -> bool:
    """Check the written dataset with :mod:`nextlong.verify`; log every failure. Returns True when sound."""
    from .verify import verify_dataset

    res = verify_dataset(cfg.output_prefix, decode=2)
    if res.ok:
        log.info("verify: %s: all checks passed", cfg.output_prefix)
    for f in res.failures:
        log.error("verify: %s", f)
    return bool(res.ok)
