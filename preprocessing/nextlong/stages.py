"""The pool stages (chunk+tokenize, embed, gather, index) with completion markers, run by local tasks.

A unit of work (one shard of a stage, or a whole single-task stage) is done when its marker
``<name>.done.json`` exists and holds the hash of every setting the output depends on; a rerun skips it,
a changed setting redoes it. Outputs are renamed into place before their marker is written, so a killed
task leaves either nothing or a complete unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(path: Path, key: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s: unreadable marker; the unit is redone", path)
        return None
    return m if m.get("key_hash") == key_hash(key) else None


def write_marker(path: Path, key: dict, stats: dict, seconds: float) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "key_hash": key_hash(key), "stats": stats, "seconds": round(seconds, 3)},
                              indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def stage_keys(cfg, tokenizer_sha256: str) -> dict[str, dict]:
    """Settings each stage depends on, cumulatively (a change redoes the stage and every later one)."""
    chunk = dict(inputs=cfg.inputs, mix=cfg.mix, input_names=cfg.input_names, text_field=cfg.text_field,
                 id_field=cfg.id_field, granularity=cfg.granularity, tokenizer_sha256=tokenizer_sha256,
                 hashing_df=cfg.embedder == "hashing")
    embed = dict(chunk, embedder=cfg.embedder, embedding_dim=cfg.embedding_dim, seed=cfg.seed,
                 embedding_dtype=cfg.embedding_dtype)
    if cfg.embedder != "hashing":  # batch composition and precision change a neural embedder's bytes
        embed.update(embed_precision=cfg.embed_precision, embed_batch_tokens=cfg.embed_batch_tokens,
                     embed_batch_size=cfg.embed_batch_size)
    index = dict(embed, index_factory=cfg.index_factory, index_train_size=cfg.index_train_size)
    return {"chunk": chunk, "embed": embed, "gather": embed, "index": index}


def _shard_key(base: dict, shard) -> dict:
    path = Path(shard.spec.pattern)
    ident = {"file": str(path)}
    if path.exists():
        st = path.stat()
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return dict(base, shard=shard.index, **ident)


# --- task bodies: module level so that spawned processes can run them ---
_STATE: dict = {}


def _init(cfg_dict: dict, work: str, tokenizer_path: str, slots) -> None:
    from .config import SynthesisConfig

    logging.basicConfig(level=logging.WARNING)
    _STATE.clear()  # a previous run in this process may have left another tokenizer or embedder
    _STATE.update(cfg=SynthesisConfig(**cfg_dict), work=Path(work), tokenizer_path=tokenizer_path,
                  slot=slots.get() if slots is not None else 0)


def _tokenizer():
    if "tok" not in _STATE:
        from .tokenization import load_tokenizer

        _STATE["tok"] = load_tokenizer(_STATE["tokenizer_path"], "none", "none")
    return _STATE["tok"]


def _embedder():
    if "emb" not in _STATE:
        from .embedding import make_embedder

        cfg = _STATE["cfg"]
        _STATE["emb"] = make_embedder(cfg.embedder, cfg.seed, cfg.embedding_dim, cfg.embed_batch_size,
                                      device=_device_for_slot(_STATE.get("slot", 0)),
                                      trust_remote_code=cfg.trust_remote_code, precision=cfg.embed_precision,
                                      batch_tokens=cfg.embed_batch_tokens,
                                      # tasks share the cores instead of each spawning one thread per core
                                      threads=cfg.embed_threads or (max(1, (os.cpu_count() or 1) // cfg.tasks)
                                                                    if cfg.tasks > 1 else 0))
    return _STATE["emb"]


def _device_for_slot(slot: int) -> str | None:
    """One task per GPU: task slot i uses GPU i mod n (None = the embedder's own choice)."""
    try:
        import torch
    except ImportError:
        return None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{slot % n}" if n else None


def _do_chunk(shard, key: dict) -> dict:
    from .pool import chunk_shard, shard_dir

    t0, c0 = time.time(), time.process_time()
    stats = chunk_shard(_STATE["cfg"], _STATE["work"], shard, _tokenizer())
    stats["cpu_seconds"] = round(time.process_time() - c0, 3)
    write_marker(shard_dir(_STATE["work"], shard) / "chunk.done.json", key, stats, time.time() - t0)
    return stats


def _do_embed(shard, key: dict, shards: list, idf_path: Path) -> dict:
    from .pool import embed_shard, hashing_idf, shard_dir

    t0, c0 = time.time(), time.process_time()
    cfg, work = _STATE["cfg"], _STATE["work"]
    emb = _embedder()
    idf = hashing_idf(idf_path, work, shards, emb.n_features) if cfg.embedder == "hashing" else None
    stats = embed_shard(cfg, work, shard, emb, idf)
    stats["cpu_seconds"] = round(time.process_time() - c0, 3)
    write_marker(shard_dir(work, shard) / "embed.done.json", key, stats, time.time() - t0)
    return stats


def _run_tasks(fn, jobs: list[tuple], cfg, work: Path, tokenizer_path: str, desc: str, progress) -> list[dict]:
    """Run ``fn(*job)`` for every job: in this process when ``--tasks 1``, else in spawned processes."""
    if not jobs:
        return []
    bar = progress(total=len(jobs), desc=desc, unit="shard")
    results: list[dict] = []
    if cfg.tasks == 1 or len(jobs) == 1:
        _init(cfg.to_dict(), str(work), tokenizer_path, None)
        for job in jobs:
            results.append(fn(*job))
            bar.update(1)
    else:
        ctx = mp.get_context("spawn")
        slots = ctx.Manager().Queue()
        n = min(cfg.tasks, len(jobs))
        for i in range(n):
            slots.put(i)
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init,
                                 initargs=(cfg.to_dict(), str(work), tokenizer_path, slots)) as ex:
            for res in ex.map(fn, *zip(*jobs, strict=True)):
                results.append(res)
                bar.update(1)
    bar.close()
    return results


def _select(units: list, task_index: int | None, tasks: int) -> list:
    """All units, or those of one array task (round-robin: unit i belongs to task i mod tasks)."""
    if task_index is None:
        return units
    return [u for i, u in enumerate(units) if i % tasks == task_index]


def prepare(cfg, work: Path, tok) -> tuple[list, dict[str, dict], str]:
    """Shards, stage keys and the work directory's tokenizer.json (what every stage task loads)."""
    from .pool import plan_shards

    work.mkdir(parents=True, exist_ok=True)
    tokenizer_path = work / "tokenizer.json"
    tmp = tokenizer_path.with_name(f".tokenizer.json.tmp-{os.getpid()}")
    tok.tokenizer.save(str(tmp))
    if tokenizer_path.exists() and tokenizer_path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, tokenizer_path)
    return plan_shards(cfg), stage_keys(cfg, tok.sha256), str(tokenizer_path)


def stage_chunk(cfg, work: Path, tok, progress, task_index: int | None = None) -> None:
    """Read, chunk and tokenize every shard not done yet (or only those of ``task_index``)."""
    from .pool import shard_dir

    shards, keys, tokenizer_path = prepare(cfg, work, tok)
    todo = []
    for s in _select(shards, task_index, cfg.tasks):
        key = _shard_key(keys["chunk"], s)
        if read_marker(shard_dir(work, s) / "chunk.done.json", key) is None:
            todo.append((s, key))
    if len(todo) < len(_select(shards, task_index, cfg.tasks)):
        log.info("chunk: %d shard(s) already done", len(_select(shards, task_index, cfg.tasks)) - len(todo))
    run_cfg = cfg if task_index is None else _single_task(cfg)
    _run_tasks(_do_chunk, todo, run_cfg, work, tokenizer_path, "chunk+tokenize", progress)


def stage_embed(cfg, work: Path, tok, progress, task_index: int | None = None) -> None:
    """Embed every shard not done yet (or only those of ``task_index``)."""
    from .pool import shard_dir

    shards, keys, tokenizer_path = prepare(cfg, work, tok)
    _require(work, shards, keys, "chunk")
    # the idf is named after every shard's identity: a changed pool never reads a stale one
    idf_path = work / "pool" / f"idf-{key_hash(_gather_key(keys, shards))}.npy"
    todo = []
    for s in _select(shards, task_index, cfg.tasks):
        key = _shard_key(keys["embed"], s)
        if read_marker(shard_dir(work, s) / "embed.done.json", key) is None:
            todo.append((s, key, shards, idf_path))
    run_cfg = cfg if task_index is None else _single_task(cfg)
    _run_tasks(_do_embed, todo, run_cfg, work, tokenizer_path, "embed", progress)


def _single_task(cfg):
    import dataclasses

    return dataclasses.replace(cfg, tasks=1)


def _require(work: Path, shards: list, keys: dict, stage: str) -> list[dict]:
    """Markers of ``stage`` for every shard; an error naming the shards that are not done."""
    from .pool import shard_dir

    out, missing = [], []
    for s in shards:
        m = read_marker(shard_dir(work, s) / f"{stage}.done.json", _shard_key(keys[stage], s))
        if m is None:
            missing.append(f"{s.name} ({s.spec.pattern})")
        else:
            out.append(m)
    if missing:
        from .pipeline import SynthesisError

        raise SynthesisError(f"stage {stage!r} is not complete for {len(missing)} shard(s): {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}; run --stage {stage} first")
    return out


def _gather_key(keys: dict, shards: list) -> dict:
    return dict(keys["gather"], shards=[_shard_key({}, s) for s in shards])


def _index_key(keys: dict, shards: list) -> dict:
    g = _gather_key(keys, shards)
    return dict(g, **{k: v for k, v in keys["index"].items() if k not in g})


def stage_gather(cfg, work: Path, tok, progress) -> None:
    from .pool import gather

    shards, keys, _ = prepare(cfg, work, tok)
    _require(work, shards, keys, "embed")
    gkey = _gather_key(keys, shards)
    if read_marker(work / "gather.done.json", gkey) is None:
        t0, c0 = time.time(), time.process_time()
        g = gather(work, shards, sorted({s.spec.name for s in shards}), progress)
        write_marker(work / "gather.done.json", gkey, dict(g, cpu_seconds=round(time.process_time() - c0, 3)),
                     time.time() - t0)


def stage_index(cfg, work: Path, tok, progress) -> None:
    from . import index as faiss_index

    shards, keys, _ = prepare(cfg, work, tok)
    ikey = _index_key(keys, shards)
    if read_marker(work / "gather.done.json", _gather_key(keys, shards)) is None:
        from .pipeline import SynthesisError

        raise SynthesisError("stage 'gather' is not complete; run --stage gather first")
    if read_marker(work / "index.done.json", ikey) is None:
        t0, c0 = time.time(), time.process_time()
        vecs = np.load(work / "embeddings.npy", mmap_mode="r")
        idx = faiss_index.build_index(vecs, cfg.index_factory, cfg.index_train_size, cfg.seed, nprobe=cfg.nprobe)
        faiss_index.save_index(idx, work / "index.faiss")
        write_marker(work / "index.done.json", ikey,
                     {"factory": cfg.index_factory, "ntotal": int(idx.ntotal), "gpus": faiss_index.gpu_count(),
                      "cpu_seconds": round(time.process_time() - c0, 3)}, time.time() - t0)
        log.info("index: %s over %d vectors", cfg.index_factory, idx.ntotal)


def pool_summary(cfg, work: Path, tok) -> dict:
    """Statistics of the finished pool stages, from their markers (any task layout, local or Slurm)."""
    shards, keys, _ = prepare(cfg, work, tok)
    chunk = [m["stats"] | {"seconds": m.get("seconds", 0.0)} for m in _require(work, shards, keys, "chunk")]
    embed = [m["stats"] | {"seconds": m.get("seconds", 0.0)} for m in _require(work, shards, keys, "embed")]
    rejected: Counter[str] = Counter()
    per_input: dict[str, int] = {}
    for s, st in zip(shards, chunk, strict=True):
        rejected.update(st["rejected"])
        per_input[s.spec.name] = per_input.get(s.spec.name, 0) + st["documents"]
    totals = {k: sum(st[k] for st in chunk) for k in ("documents", "chunks", "tokens", "chars")}
    g = read_marker(work / "gather.done.json", _gather_key(keys, shards))
    ix = read_marker(work / "index.done.json", _index_key(keys, shards))
    return {
        "chunk": {**totals, "shards": len(shards), "documents_per_input": per_input,
                  "rejected": dict(sorted(rejected.items())),
                  "chars_per_token": totals["chars"] / max(1, totals["tokens"])},
        "embed": embed_record(cfg, embed),
        "index": ix["stats"] if ix else None,
        "index_key_hash": ix["key_hash"] if ix else None,
        "task_seconds": {"chunk": round(sum(st["seconds"] for st in chunk), 3),
                         "embed": round(sum(st["seconds"] for st in embed), 3),
                         "gather": g.get("seconds", 0.0) if g else None,
                         "index": ix.get("seconds", 0.0) if ix else None},
        "cpu_seconds": {"chunk": round(sum(st.get("cpu_seconds", 0.0) for st in chunk), 3),
                        "embed": round(sum(st.get("cpu_seconds", 0.0) for st in embed), 3),
                        "gather": g["stats"].get("cpu_seconds") if g else None,
                        "index": ix["stats"].get("cpu_seconds") if ix else None},
    }


def embed_record(cfg, embed: list[dict]) -> dict:
    """The manifest's embed record: the embedder as it ran (true dimension, device, precision, batching, max
    tokens) and the totals of its units (duplicates, truncation, padding)."""
    from .embedding import merge_embed_stats

    rec = {"embedder": cfg.embedder, "dtype": cfg.embedding_dtype, "dim": embed[0].get("dim") if embed else None}
    described = next((st["embedder"] for st in embed if isinstance(st.get("embedder"), dict)), None)
    if described:
        rec.update({k: v for k, v in described.items() if k != "name"})
    rec.update(merge_embed_stats(embed))
    return rec


def run_pool_stages(cfg, work: Path, tok, progress) -> tuple[dict, dict]:
    """chunk -> embed -> gather -> index, all in this run. Returns (summary, wall seconds by stage)."""
    seconds: dict[str, float] = {}
    for name, fn in (("chunk", stage_chunk), ("embed", stage_embed), ("gather", stage_gather),
                     ("index", stage_index)):
        t0 = time.time()
        fn(cfg, work, tok, progress)
        seconds[name] = round(time.time() - t0, 3)
        if name == "chunk":
            summary = pool_summary_partial(cfg, work, tok)
            log.info("chunk: %d documents -> %d chunks -> %d tokens (%.2f chars/token) in %d shard(s); rejected %s",
                     summary["documents"], summary["chunks"], summary["tokens"], summary["chars_per_token"],
                     summary["shards"], summary["rejected"] or "none")
            if summary["chunks"] == 0:
                from .pipeline import SynthesisError

                raise SynthesisError(f"no usable document in {cfg.inputs} (rejected: {summary['rejected']})")
    return pool_summary(cfg, work, tok), seconds


def pool_summary_partial(cfg, work: Path, tok) -> dict:
    shards, keys, _ = prepare(cfg, work, tok)
    chunk = [m["stats"] for m in _require(work, shards, keys, "chunk")]
    rejected: Counter[str] = Counter()
    for st in chunk:
        rejected.update(st["rejected"])
    totals = {k: sum(st[k] for st in chunk) for k in ("documents", "chunks", "tokens", "chars")}
    return {**totals, "shards": len(shards), "rejected": dict(sorted(rejected.items())),
            "chars_per_token": totals["chars"] / max(1, totals["tokens"])}
