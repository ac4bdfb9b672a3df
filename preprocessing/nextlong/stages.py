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
                                      device=_device_for_slot(_STATE.get("slot", 0)))
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

    t0 = time.time()
    stats = chunk_shard(_STATE["cfg"], _STATE["work"], shard, _tokenizer())
    write_marker(shard_dir(_STATE["work"], shard) / "chunk.done.json", key, stats, time.time() - t0)
    return stats


def _do_embed(shard, key: dict, shards: list) -> dict:
    from .pool import embed_shard, hashing_idf, shard_dir

    t0 = time.time()
    cfg, work = _STATE["cfg"], _STATE["work"]
    emb = _embedder()
    idf = hashing_idf(work, shards, emb.n_features) if cfg.embedder == "hashing" else None
    stats = embed_shard(cfg, work, shard, emb, idf)
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


def run_pool_stages(cfg, work: Path, tok, progress) -> tuple[dict, dict]:
    """chunk -> embed -> gather -> index. Returns (stats by stage, seconds by stage)."""
    from . import index as faiss_index
    from .pool import gather, plan_shards, shard_dir

    keys = stage_keys(cfg, tok.sha256)
    shards = plan_shards(cfg)
    tokenizer_path = str(work / "tokenizer.json")
    if not Path(tokenizer_path).exists():
        tmp = f"{tokenizer_path}.tmp-{os.getpid()}"
        tok.tokenizer.save(tmp)
        os.replace(tmp, tokenizer_path)
    stats: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    # chunk + tokenize, per shard
    t0 = time.time()
    todo, chunk_stats = [], {}
    for s in shards:
        key = _shard_key(keys["chunk"], s)
        m = read_marker(shard_dir(work, s) / "chunk.done.json", key)
        if m is None:
            todo.append((s, key))
        else:
            chunk_stats[s.index] = m["stats"]
    if len(todo) < len(shards):
        log.info("chunk: %d of %d shards already done", len(shards) - len(todo), len(shards))
    for (s, _), st in zip(todo, _run_tasks(_do_chunk, todo, cfg, work, tokenizer_path, "chunk+tokenize", progress),
                          strict=True):
        chunk_stats[s.index] = st
    rejected: Counter[str] = Counter()
    per_input: dict[str, int] = {}
    for s in shards:
        rejected.update(chunk_stats[s.index]["rejected"])
        per_input[s.spec.name] = per_input.get(s.spec.name, 0) + chunk_stats[s.index]["documents"]
    totals = {k: sum(chunk_stats[s.index][k] for s in shards) for k in ("documents", "chunks", "tokens", "chars")}
    stats["chunk"] = {**totals, "shards": len(shards), "documents_per_input": per_input,
                      "rejected": dict(sorted(rejected.items())),
                      "chars_per_token": totals["chars"] / max(1, totals["tokens"])}
    seconds["chunk"] = round(time.time() - t0, 3)
    log.info("chunk: %d documents -> %d chunks -> %d tokens (%.2f chars/token) in %d shard(s); rejected %s",
             totals["documents"], totals["chunks"], totals["tokens"], stats["chunk"]["chars_per_token"], len(shards),
             stats["chunk"]["rejected"] or "none")
    if totals["chunks"] == 0:
        from .pipeline import SynthesisError

        raise SynthesisError(f"no usable document in {cfg.inputs} (rejected: {dict(rejected)})")

    # embed, per shard
    t0 = time.time()
    todo = []
    for s in shards:
        key = _shard_key(keys["embed"], s)
        if read_marker(shard_dir(work, s) / "embed.done.json", key) is None:
            todo.append((s, key, shards))
    if cfg.embedder == "hashing" and todo:
        (work / "pool" / "idf.npy").unlink(missing_ok=True)  # recomputed from the current shards
    _run_tasks(_do_embed, todo, cfg, work, tokenizer_path, "embed", progress)
    seconds["embed"] = round(time.time() - t0, 3)
    stats["embed"] = {"embedder": cfg.embedder, "dim": int(np.load(shard_dir(work, shards[0]) / "embeddings.npy",
                                                                   mmap_mode="r").shape[1]),
                      "dtype": cfg.embedding_dtype, "shards_embedded": len(todo)}
    log.info("embed: %d chunks with %s (%d shard(s) embedded, %d up to date)", totals["chunks"], cfg.embedder,
             len(todo), len(shards) - len(todo))

    # gather: global ids and files
    t0 = time.time()
    gkey = dict(keys["gather"], shards=[_shard_key({}, s) for s in shards])
    if read_marker(work / "gather.done.json", gkey) is None:
        corpora = sorted({s.spec.name for s in shards})
        g = gather(work, shards, corpora, progress)
        write_marker(work / "gather.done.json", gkey, g, time.time() - t0)
    seconds["gather"] = round(time.time() - t0, 3)

    # index
    t0 = time.time()
    ikey = dict(gkey, **{k: v for k, v in keys["index"].items() if k not in gkey})
    m = read_marker(work / "index.done.json", ikey)
    if m is None:
        vecs = np.load(work / "embeddings.npy", mmap_mode="r")
        idx = faiss_index.build_index(vecs, cfg.index_factory, cfg.index_train_size, cfg.seed, nprobe=cfg.nprobe)
        faiss_index.save_index(idx, work / "index.faiss")
        m = {"stats": {"factory": cfg.index_factory, "ntotal": int(idx.ntotal)}}
        write_marker(work / "index.done.json", ikey, m["stats"], time.time() - t0)
        log.info("index: %s over %d vectors", cfg.index_factory, idx.ntotal)
    stats["index"] = m["stats"]
    seconds["index"] = round(time.time() - t0, 3)
    return stats, seconds
