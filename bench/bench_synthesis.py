#!/usr/bin/env python
"""Throughput of the synthesis pipeline against its floor, measured in one run.

The floor is the work no design can avoid: tokenize every pool chunk once, embed every chunk once, and write
the output bytes once. The script runs the whole pipeline (fresh work directory), then times those three
steps alone on the same data, and prints per-stage throughput, the floor and the ratio pipeline / floor.

    python bench/bench_synthesis.py --input ../shared/data/openstax_textbooks.jsonl.gz --target-length 16384
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "preprocessing"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, help="corpus (repeatable), as for the pipeline")
    p.add_argument("--tokenizer", default="builtin:cl100k_base", help="tokenizer spec, as for the pipeline")
    p.add_argument("--target-length", type=int, default=16384, help="tokens per sample")
    p.add_argument("--max-samples", type=int, default=None, help="samples to write (default: all)")
    p.add_argument("--index-factory", default="Flat", help="FAISS factory string")
    p.add_argument("--tasks", type=int, default=1, help="synthesis tasks")
    p.add_argument("--emit-labels", action="store_true", help="also write the label dataset")
    p.add_argument("--out-dir", default=None, help="where to write (default: a temporary directory, removed)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import pyarrow.parquet as pq
    from nextlong.config import SynthesisConfig
    from nextlong.embedding import make_embedder
    from nextlong.indexed import IndexedDatasetWriter, read_indexed
    from nextlong.pipeline import run
    from nextlong.pool import load_texts
    from nextlong.tokenization import load_tokenizer

    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="nextlong_bench_"))
    shutil.rmtree(out_dir / "run", ignore_errors=True)
    cfg = SynthesisConfig(inputs=args.input, output_prefix=str(out_dir / "run" / "bench"), tokenizer=args.tokenizer,
                          target_length=args.target_length, max_samples=args.max_samples,
                          index_factory=args.index_factory, tasks=args.tasks, emit_labels=args.emit_labels)
    t0 = time.perf_counter()
    manifest = run(cfg, progress=False)
    pipeline_s = time.perf_counter() - t0
    work = Path(cfg.resolved_work_dir)
    counts = manifest["counts"]
    # wall seconds per stage of this run (the manifest keeps every run under "runs")
    stages = {k: v["wall_seconds"] for k, v in manifest["runs"][-1]["stages"].items()}

    # --- the floor, on the same data ---
    texts = load_texts(work)
    tok = load_tokenizer(args.tokenizer)  # loaded before the timed steps, as the pipeline does
    t0 = time.perf_counter()
    for i in range(0, len(texts), 8192):
        tok.encode_batch(texts[i : i + 8192])
    tokenize_s = time.perf_counter() - t0
    emb = make_embedder(cfg.embedder, cfg.seed, cfg.embedding_dim)
    t0 = time.perf_counter()
    if hasattr(emb, "fit_embed"):
        emb.fit_embed(texts)  # hashing: one pass over the text for both IDF and vectors
    else:
        for i in range(0, len(texts), 4096):
            emb.embed(texts[i : i + 4096])
    embed_s = time.perf_counter() - t0
    names = ["text", "lossweight"] + (["label"] if args.emit_labels else [])
    arrays = {n: [np.array(x) for x in read_indexed(f"{cfg.output_prefix}_{n}_document")] for n in names}
    spans = pq.read_table(f"{cfg.output_prefix}_spans.parquet")
    floor_dir = out_dir / "floor"
    floor_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for n in names:
        with IndexedDatasetWriter(floor_dir / n, arrays[n][0].dtype) as w:
            for a in arrays[n]:
                w.add_document(a)
    pq.write_table(spans, floor_dir / "spans.parquet", compression="zstd")
    write_s = time.perf_counter() - t0
    floor_s = tokenize_s + embed_s + write_s

    tokens_out = counts["tokens_out"]
    def rate(n: float, stage: str, unit: str) -> str:
        return f"{n / max(stages.get(stage, 0.0), 1e-9):,.0f} {unit}"

    rows = [
        ("chunk", stages.get("chunk", 0.0), rate(counts["pool_tokens"], "chunk", "pool tok/s (read+chunk+tokenize)")),
        ("embed", stages.get("embed", 0.0), rate(counts["chunks"], "embed", "chunk/s")),
        ("gather", stages.get("gather", 0.0), rate(counts["chunks"], "gather", "chunk/s")),
        ("index", stages.get("index", 0.0), rate(counts["chunks"], "index", "vec/s")),
        ("synth", stages.get("synth", 0.0), rate(tokens_out, "synth", "out tok/s")),
        ("merge", stages.get("merge", 0.0), rate(tokens_out, "merge", "out tok/s")),
    ]
    print(f"corpus: {counts['documents_in']} documents, {counts['chunks']} chunks, "
          f"{counts['pool_tokens']:,} pool tokens")
    print(f"output: {counts['samples_out']} samples x {args.target_length} = {tokens_out:,} tokens; "
          f"dropped {counts['dropped'] or 'none'}")
    print(f"{'stage':<12}{'seconds':>10}  throughput")
    for name, s, thr in rows:
        print(f"{name:<12}{s:>10.2f}  {thr}")
    print(f"{'pipeline':<12}{pipeline_s:>10.2f}  {tokens_out / pipeline_s:,.0f} out tok/s "
          f"(includes tokenizer load and manifest; peak RSS {manifest['peak_rss_mib']:.0f} MiB)")
    print("floor:")
    print(f"  tokenize every pool chunk once {tokenize_s:>8.2f} s")
    print(f"  embed every chunk once         {embed_s:>8.2f} s")
    print(f"  write the output once          {write_s:>8.2f} s")
    print(f"  floor                          {floor_s:>8.2f} s")
    print(f"ratio pipeline / floor: {pipeline_s / floor_s:.2f}x (target <= 1.5x)")
    result = {"pipeline_s": pipeline_s, "stages": stages, "floor": {"tokenize_s": tokenize_s, "embed_s": embed_s,
              "write_s": write_s, "total_s": floor_s}, "ratio": pipeline_s / floor_s, "counts": counts,
              "peak_rss_mib": manifest["peak_rss_mib"], "target_length": args.target_length}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
