#!/usr/bin/env python
"""Scale benchmark: a pool of >= 1,000,000 chunks through the real pipeline with an IVF index.

The pool is built from one JSONL(.gz) corpus in two ways at once, both printed in the output:

* a small chunk size (``--granularity``, default 256 characters instead of the paper's 2048), and
* ``--copies`` copies of the corpus written as separate JSONL shard files, each document with a distinct id
  (``<id>~c<k>``). Copy 0 is the corpus as it is; copy k >= 1 drops every word independently with
  probability ``--word-drop`` (seeded by copy and document), which shifts every chunk boundary after the
  first dropped word and turns most chunks into near duplicates rather than exact copies. The fraction of
  exact duplicates left (same normalized-text hash) is measured and printed.

Then the pipeline (:func:`nextlong.pipeline.run`) runs end to end on the shard directory with an IVF index,
``--tasks`` local tasks, and a modest ``--max-samples``. Printed afterwards:

* wall time per stage (from the manifest) and of the whole run, with throughput;
* peak RSS: the manifest's figure (largest single process) and the peak of the sum over this process and
  all its descendants, sampled every 0.5 s from ``/proc`` (what the machine must actually hold);
* on-disk sizes of the pool files (embeddings, index, tokens, chunk table);
* recall@k (k = 10 and 100) of the IVF index against exact search (``faiss.IndexFlatIP`` on the same
  ``embeddings.npy`` in float32) on ``--recall-queries`` pool chunks drawn with a seed, the query chunk itself
  left out of both lists; also the tie-aware recall (an IVF hit counts when its exact similarity reaches the
  k-th exact similarity, so interchangeable duplicates are not counted as misses), for several nprobe values.

Example (about 20-30 minutes on 2 CPU cores)::

    python bench/bench_scale.py --corpus ../shared/data/openstax_textbooks.jsonl.gz --work-dir /tmp/nextlong_scale
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "preprocessing"))

log = logging.getLogger("bench_scale")

_WORDS = re.compile(r"\s*\S+")


# ------------------------------------------------------------------------------------------ corpus


def perturb(text: str, rng: random.Random, p: float) -> str:
    """``text`` with each word dropped with probability ``p`` (line structure kept; a line never empties)."""
    out = []
    for line in text.split("\n"):
        words = _WORDS.findall(line)
        kept = [w for w in words if rng.random() >= p]
        if words and not kept:
            kept = words[:1]
        out.append("".join(kept))
    return "\n".join(out)


def write_copies(corpus: Path, out_dir: Path, copies: int, word_drop: float, seed: int) -> dict:
    """Write ``copies`` JSONL shard files ``copy-XXX.jsonl`` (see the module docstring). Idempotent: a
    ``copies.json`` marker with the same settings means the files are complete and are reused."""
    settings = {"corpus": str(corpus), "size": corpus.stat().st_size, "copies": copies, "word_drop": word_drop,
                "seed": seed}
    marker = out_dir.parent / f"{out_dir.name}.json"  # beside the shard directory: not an input file
    if marker.exists() and json.loads(marker.read_text()).get("settings") == settings:
        log.info("corpus copies up to date in %s", out_dir)
        return json.loads(marker.read_text())["stats"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("copy-*.jsonl"):
        old.unlink()
    opener = gzip.open if corpus.name.endswith(".gz") else open
    with opener(corpus, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    chars = 0
    for k in range(copies):
        path = out_dir / f"copy-{k:03d}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i, rec in enumerate(records):
                text = rec.get("text")
                if not isinstance(text, str):
                    continue
                if k > 0:
                    text = perturb(text, random.Random(f"{seed}:{k}:{i}"), word_drop)
                chars += len(text)
                f.write(json.dumps({"id": f"{rec.get('id', i)}~c{k}", "text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    stats = {"documents_per_copy": len(records), "documents": len(records) * copies, "chars": chars}
    marker.write_text(json.dumps({"settings": settings, "stats": stats}, indent=1))
    return stats


# ------------------------------------------------------------------------------------------ memory


class TreeRSSSampler:
    """Peak of the summed RSS of this process and all its descendants, sampled from ``/proc``."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _tree_rss(self) -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
                rss[int(entry)] = int(fields[21]) * self._page
            except (OSError, IndexError, ValueError):
                continue
        me = os.getpid()
        total = 0
        for pid in rss:
            p, hops = pid, 0
            while p not in (0, 1) and p != me and hops < 64:
                p, hops = parents.get(p, 0), hops + 1
            if p == me:
                total += rss[pid]
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSSSampler:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ------------------------------------------------------------------------------------------ recall


def recall_figures(work: Path, nprobes: list[int], ks: list[int], n_queries: int, seed: int) -> dict:
    """recall@k of the saved IVF index against exact inner-product search, per nprobe (module docstring)."""
    import faiss
    import numpy as np
    from nextlong.index import load_index, set_nprobe

    emb16 = np.load(work / "embeddings.npy", mmap_mode="r")
    n, d = emb16.shape
    rng = np.random.default_rng([seed, 0x5CA1E])
    q_ids = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    kmax = max(ks) + 1  # +1: the query chunk itself is removed from both lists
    t0 = time.perf_counter()
    exact = faiss.IndexFlatIP(d)
    for i in range(0, n, 262144):
        exact.add(np.ascontiguousarray(emb16[i : i + 262144], dtype=np.float32))
    queries = np.ascontiguousarray(emb16[q_ids], dtype=np.float32)
    ex_sims, ex_ids = exact.search(queries, kmax)
    exact_s = time.perf_counter() - t0
    del exact

    def drop_self(ids: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out_i = np.full((len(ids), k), -1, dtype=np.int64)
        out_s = np.full((len(ids), k), -np.inf, dtype=np.float32)
        for r in range(len(ids)):
            keep = ids[r] != q_ids[r]
            row_i, row_s = ids[r][keep][:k], sims[r][keep][:k]
            out_i[r, : len(row_i)] = row_i
            out_s[r, : len(row_s)] = row_s
        return out_i, out_s

    ivf = load_index(work / "index.faiss", use_gpu=False)
    rows = []
    for nprobe in nprobes:
        set_nprobe(ivf, nprobe)
        t0 = time.perf_counter()
        ivf_sims, ivf_ids = ivf.search(queries, kmax)
        search_s = time.perf_counter() - t0
        row: dict = {"nprobe": nprobe, "search_seconds": round(search_s, 3),
                     "queries_per_second": round(len(q_ids) / max(search_s, 1e-9), 1)}
        for k in ks:
            e_i, e_s = drop_self(ex_ids, ex_sims, k)
            a_i, _ = drop_self(ivf_ids, ivf_sims, k)
            hits = tie_hits = 0
            for r in range(len(q_ids)):
                truth = set(e_i[r][e_i[r] >= 0].tolist())
                got = a_i[r][a_i[r] >= 0]
                hits += len(truth.intersection(got.tolist()))
                # tie-aware: exact similarity of each returned id vs the k-th exact similarity
                if len(got):
                    got_sims = np.asarray(emb16[np.sort(got)], dtype=np.float32) @ queries[r]
                    tie_hits += int(np.sum(got_sims >= e_s[r][min(k, len(truth)) - 1] - 1e-6))
            denom = sum(int(np.sum(e_i[r] >= 0)) for r in range(len(q_ids)))
            row[f"recall@{k}"] = round(hits / max(denom, 1), 4)
            row[f"recall@{k}_tie_aware"] = round(min(tie_hits, denom) / max(denom, 1), 4)
        rows.append(row)
    return {"queries": len(q_ids), "pool_vectors": int(n), "dim": int(d), "exact_seconds": round(exact_s, 3),
            "by_nprobe": rows}


# ------------------------------------------------------------------------------------------ main


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="JSONL(.gz) corpus with a 'text' field (and 'id')")
    p.add_argument("--work-dir", required=True,
                   help="directory for the corpus copies, the pipeline's work files and outputs (reused by reruns)")
    p.add_argument("--copies", type=int, default=7, help="copies of the corpus in the pool (copy 0 unchanged)")
    p.add_argument("--word-drop", type=float, default=0.05,
                   help="probability of dropping each word in copies 1.. (light perturbation)")
    p.add_argument("--granularity", type=int, default=256, help="maximum chunk size, in characters")
    p.add_argument("--tokenizer", default="builtin:cl100k_base", help="tokenizer spec, as for the pipeline")
    p.add_argument("--index-factory", default="IVF4096,Flat", help="FAISS factory string of the pipeline's index")
    p.add_argument("--index-train-size", type=int, default=262144, help="vectors sampled to train the IVF index")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query in the pipeline")
    p.add_argument("--recall-nprobe", type=int, action="append",
                   help="nprobe values for the recall table (repeatable; default: 8 16 32 64 128 and --nprobe)")
    p.add_argument("--target-length", type=int, default=16384, help="tokens per sample")
    p.add_argument("--max-samples", type=int, default=1000, help="samples to write")
    p.add_argument("--tasks", type=int, default=2, help="local pipeline tasks")
    p.add_argument("--recall-queries", type=int, default=1000, help="pool chunks used as recall queries")
    p.add_argument("--min-chunks", type=int, default=1_000_000, help="fail when the pool has fewer chunks")
    p.add_argument("--seed", type=int, default=1234, help="seed of the copies, the pipeline and the query sample")
    p.add_argument("--no-verify", action="store_true", help="skip verifying the written dataset")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)

    import numpy as np
    from nextlong.config import SynthesisConfig
    from nextlong.pipeline import run, verify_outputs

    root = Path(args.work_dir)
    corpus_dir = root / "corpus"
    t0 = time.perf_counter()
    copy_stats = write_copies(Path(args.corpus), corpus_dir, args.copies, args.word_drop, args.seed)
    copies_s = time.perf_counter() - t0
    cfg = SynthesisConfig(
        inputs=[str(corpus_dir)], input_names=["openstax_copies"], output_prefix=str(root / "out" / "scale"),
        tokenizer=args.tokenizer, granularity=args.granularity, index_factory=args.index_factory,
        index_train_size=args.index_train_size, nprobe=args.nprobe, target_length=args.target_length,
        max_samples=args.max_samples, tasks=args.tasks, seed=args.seed, work_dir=str(root / "work"),
    )
    log.info("pipeline: %s", {k: v for k, v in cfg.to_dict().items() if k != "extra"})
    with TreeRSSSampler() as rss:
        t0 = time.perf_counter()
        manifest = run(cfg, progress=False)
        pipeline_s = time.perf_counter() - t0
        verify_s = None
        verified = None
        if not args.no_verify:
            t0 = time.perf_counter()
            verified = verify_outputs(cfg, manifest)
            verify_s = time.perf_counter() - t0
    work = Path(cfg.resolved_work_dir)
    counts = manifest["counts"]
    if counts["chunks"] < args.min_chunks:
        log.error("the pool has %d chunks, fewer than --min-chunks %d: raise --copies or lower --granularity",
                  counts["chunks"], args.min_chunks)
    hashes = np.load(work / "chunk_hash.npy", mmap_mode="r")
    dup_fraction = 1.0 - len(np.unique(hashes)) / max(1, len(hashes))

    nprobes = sorted(set(args.recall_nprobe or [8, 16, 32, 64, 128]) | {args.nprobe})
    t0 = time.perf_counter()
    recall = recall_figures(work, nprobes, [10, 100], args.recall_queries, args.seed)
    recall_s = time.perf_counter() - t0

    # wall seconds per stage of this run (the manifest keeps every run under "runs")
    stages = {k: v["wall_seconds"] for k, v in manifest["runs"][-1]["stages"].items()}
    sizes = {name: _size(work / name) for name in ("embeddings.npy", "index.faiss", "tokens.npy", "chunks.parquet")}
    out_bytes = sum(_size(Path(f"{cfg.output_prefix}_{n}_document.{e}"))
                    for n in ("text", "lossweight", "label") for e in ("bin", "idx"))
    out_bytes += _size(Path(f"{cfg.output_prefix}_spans.parquet"))
    throughput = {
        "chunk": (counts["pool_tokens"], "pool tok/s"), "embed": (counts["chunks"], "chunk/s"),
        "gather": (counts["chunks"], "chunk/s"), "index": (counts["chunks"], "vec/s"),
        "synth": (counts["tokens_out"], "out tok/s"), "merge": (counts["tokens_out"], "out tok/s"),
    }

    mib = 1024.0 ** 2
    print(f"pool: corpus {Path(args.corpus).name} x {args.copies} copies (copy 0 as is, copies 1..{args.copies - 1} "
          f"with each word dropped at p={args.word_drop}), distinct ids, granularity {args.granularity} chars")
    print(f"      {counts['documents_in']:,} documents -> {counts['chunks']:,} chunks -> {counts['pool_tokens']:,} "
          f"tokens ({counts['chars_per_token']:.2f} chars/token); exact-duplicate chunks {dup_fraction:.1%}")
    print(f"run:  {cfg.index_factory}, nprobe {cfg.nprobe}, --tasks {cfg.tasks}, {counts['samples_out']} samples x "
          f"{cfg.target_length} tokens = {counts['tokens_out']:,} tokens; dropped {counts['dropped'] or 'none'}")
    print(f"{'stage':<12}{'seconds':>10}  throughput")
    print(f"{'copies':<12}{copies_s:>10.1f}  (writing the JSONL shards; 0 when reused)")
    for name, s in stages.items():
        n, unit = throughput.get(name, (0, ""))
        print(f"{name:<12}{s:>10.1f}  {n / max(s, 1e-9):,.0f} {unit}" if unit else f"{name:<12}{s:>10.1f}")
    print(f"{'pipeline':<12}{pipeline_s:>10.1f}  (manifest wall {manifest['wall_seconds']:.1f} s)")
    if verify_s is not None:
        print(f"{'verify':<12}{verify_s:>10.1f}  {'passed' if verified else 'FAILED'}")
    print(f"peak RSS: largest process {manifest['peak_rss_mib']:,.0f} MiB; this process + all tasks together "
          f"{rss.peak_bytes / mib:,.0f} MiB (sampled every 0.5 s)")
    print("sizes: " + ", ".join(f"{k} {v / mib:,.0f} MiB" for k, v in sizes.items())
          + f", output {out_bytes / mib:,.0f} MiB")
    print(f"recall of {cfg.index_factory} vs exact IndexFlatIP (float32), {recall['queries']} query chunks, "
          f"self excluded; exact search {recall['exact_seconds']:.1f} s")
    print(f"{'nprobe':>7} {'R@10':>7} {'R@100':>7} {'R@10 tie':>9} {'R@100 tie':>10} {'queries/s':>10}")
    for r in recall["by_nprobe"]:
        mark = " <- pipeline" if r["nprobe"] == cfg.nprobe else ""
        print(f"{r['nprobe']:>7} {r['recall@10']:>7.4f} {r['recall@100']:>7.4f} {r['recall@10_tie_aware']:>9.4f} "
              f"{r['recall@100_tie_aware']:>10.4f} {r['queries_per_second']:>10,.0f}{mark}")
    result = {"copies": {**copy_stats, "copies": args.copies, "word_drop": args.word_drop, "seconds": copies_s},
              "counts": counts, "exact_duplicate_fraction": dup_fraction, "stage_seconds": stages,
              "pipeline_seconds": pipeline_s, "verify_seconds": verify_s, "verified": verified,
              "peak_rss_mib": {"largest_process": manifest["peak_rss_mib"], "process_tree": rss.peak_bytes / mib},
              "sizes_bytes": {**sizes, "output": out_bytes}, "recall": recall, "recall_seconds": recall_s,
              "config": {k: v for k, v in cfg.to_dict().items() if k != "extra"}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    ok = counts["chunks"] >= args.min_chunks and verified is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
