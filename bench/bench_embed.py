"""Embed stage against a plain PyTorch loop: speed and agreement, measured in one run on the same chunks.

    python bench/bench_embed.py --embedder DIR --input FILE [--max-chunks N]

(a) baseline: ``transformers.AutoModel`` in float32 with the model's own pooling (``1_Pooling/config.json``)
    and L2 normalization, texts sorted by length (longest first) in batches of 64, truncated at the model's
    ``max_seq_length`` (``sentence_bert_config.json``, or the tokenizer's ``model_max_length`` in newer
    sentence-transformers saves), as a straightforward implementation would do;
(b) the pipeline's embed stage with its defaults (:class:`nextlong.embedding.SentenceTransformerEmbedder`),
    its vectors read back from the float16 store the stage writes; ``--embed-batch-tokens`` and
    ``--embed-streams`` change those two settings for ablations.

The chunks are split into ``--blocks`` consecutive blocks and each block is timed under (a) and (b) back to
back, alternating which goes first (ABBA...), so that load from other processes on a shared machine falls on
both sides alike. (b) deduplicates within a block only, which can only understate it. Model loading is
timed apart and not counted. Printed: chunks/s of each, the speed-up, the mean cosine between the two
vectors of every chunk, and the top-10 neighbour overlap of (b) against (a) for ``--queries`` query chunks
(exact inner-product search over all chunks, the query itself excluded). The last line reads
``speed-up: X.XX×  cosine: 0.YYYY  top-10 overlap: 0.ZZZ``. With a GPU present, both sides are also timed
there and printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "preprocessing"))

log = logging.getLogger("bench_embed")


def load_chunks(path: str, max_chunks: int, granularity: int, text_field: str = "text") -> list[str]:
    """The first ``max_chunks`` chunks of a JSONL(.gz) corpus, cut as the pipeline cuts them."""
    from nextlong.chunking import chunk_spans

    opener = gzip.open if path.endswith(".gz") else open
    chunks: list[str] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            text = json.loads(line).get(text_field) or ""
            chunks.extend(text[a:b] for a, b in chunk_spans(text, granularity))
            if len(chunks) >= max_chunks:
                break
    return chunks[:max_chunks]


class PlainLoop:
    """The baseline: AutoModel in float32, the model's pooling, fixed batches of texts sorted by length."""

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        d = Path(model_dir)
        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        st_cfg = d / "sentence_bert_config.json"
        # sentence-transformers' own limit: sentence_bert_config.json (older saves) or the tokenizer's
        # model_max_length (newer saves), never beyond the position table
        st_max = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.exists() else None
        self.max_len = st_max or min(self.tok.model_max_length, self.model.config.max_position_embeddings)
        self.pooling = "mean"
        modules = d / "modules.json"
        if modules.exists():
            for m in json.loads(modules.read_text()):
                if m["type"].endswith("Pooling"):
                    pc = json.loads((d / m["path"] / "config.json").read_text())
                    self.pooling = "cls" if pc.get("pooling_mode_cls_token") else "mean"
        self.device, self.batch_size, self.torch = device, batch_size, torch

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for i in range(0, len(texts), self.batch_size):
            idx = order[i : i + self.batch_size]
            enc = self.tok([texts[j] for j in idx], padding=True, truncation=True, max_length=self.max_len,
                           return_tensors="pt").to(self.device)
            with torch.inference_mode():
                h = self.model(**enc).last_hidden_state
                if self.pooling == "cls":
                    e = h[:, 0]
                else:
                    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                e = torch.nn.functional.normalize(e, dim=1)
            out[idx] = e.float().cpu().numpy()
        return out


def top_k_overlap(a: np.ndarray, b: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean |top-k(a) & top-k(b)| / k over ``queries`` (exact inner product over all rows, self excluded)."""
    def top(x: np.ndarray) -> np.ndarray:
        s = x[queries] @ x.T
        s[np.arange(len(queries)), queries] = -np.inf
        return np.argsort(-s, axis=1, kind="stable")[:, :k]

    ta, tb = top(a), top(b)
    return float(np.mean([len(set(r) & set(q)) / k for r, q in zip(ta, tb, strict=True)]))


def run_device(args, chunks: list[str], device: str) -> dict:
    from nextlong.config import SynthesisConfig
    from nextlong.embedding import make_embedder

    defaults = SynthesisConfig(inputs=["-"], output_prefix="-", tokenizer="-")
    t0 = time.perf_counter()
    base = PlainLoop(args.embedder, device=device, batch_size=64)
    load_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = make_embedder(args.embedder, seed=0, batch_size=defaults.embed_batch_size, device=device,
                         precision=defaults.embed_precision,
                         batch_tokens=defaults.embed_batch_tokens if args.embed_batch_tokens is None
                         else args.embed_batch_tokens,
                         threads=defaults.embed_threads,
                         streams=defaults.embed_streams if args.embed_streams is None else args.embed_streams)
    load_b = time.perf_counter() - t0
    log.info("%s: models loaded (plain %.1f s, stage %.1f s); stage settings %s", device, load_a, load_b,
             ours.describe())
    n = len(chunks)
    a = np.zeros((n, base.model.config.hidden_size), dtype=np.float32)
    b = np.zeros((n, ours.dim), dtype=np.float16)  # the stage's store
    secs = {"a": 0.0, "b": 0.0}
    cpu = {"a": 0.0, "b": 0.0}  # CPU seconds of this process: less sensitive than wall time to other jobs' load
    stats: list[dict] = []
    edges = np.linspace(0, n, args.blocks + 1).astype(int)
    for k in range(args.blocks):
        s, e = edges[k], edges[k + 1]
        block = chunks[s:e]
        for side in ("ab" if k % 2 == 0 else "ba"):
            t0, c0 = time.perf_counter(), time.process_time()
            if side == "a":
                a[s:e] = base.encode(block)
            else:
                _, st = ours.encode(block, out=b[s:e])
                stats.append(st)
            secs[side] += time.perf_counter() - t0
            cpu[side] += time.process_time() - c0
        done = b[:e].astype(np.float32)
        q = np.random.default_rng(0).choice(e, size=min(args.queries, e), replace=False)
        log.info("%s after block %d/%d (%d chunks): plain %.1f s, stage %.1f s, speed-up %.2fx (CPU seconds "
                 "%.2fx), cosine %.4f, top-10 overlap %.3f (%d queries)", device, k + 1, args.blocks, e, secs["a"],
                 secs["b"], secs["a"] / secs["b"], cpu["a"] / max(1e-9, cpu["b"]),
                 float(np.mean(np.sum(a[:e] * done, axis=1))),
                 top_k_overlap(a[:e], done, np.sort(q), 10), len(q))
    from nextlong.embedding import merge_embed_stats

    b32 = b.astype(np.float32)
    rng = np.random.default_rng(0)
    queries = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
    return {"device": device, "chunks": n, "seconds_plain": secs["a"], "seconds_stage": secs["b"],
            "cps_plain": n / secs["a"], "cps_stage": n / secs["b"], "speedup": secs["a"] / secs["b"],
            "cpu_seconds_plain": cpu["a"], "cpu_seconds_stage": cpu["b"], "cpu_speedup": cpu["a"] / max(1e-9, cpu["b"]),
            "cosine": float(np.mean(np.sum(a * b32, axis=1))), "cosine_min": float(np.min(np.sum(a * b32, axis=1))),
            "overlap": top_k_overlap(a, b32, queries, 10), "queries": len(queries),
            "stage": ours.describe(), "stage_stats": merge_embed_stats(stats)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--embedder", required=True, help="local sentence-transformers model directory")
    p.add_argument("--input", required=True, help="JSONL or JSONL.gz corpus with a 'text' field")
    p.add_argument("--max-chunks", type=int, default=4000, help="chunks embedded by each side")
    p.add_argument("--granularity", type=int, default=2048, help="maximum characters per chunk (as --granularity)")
    p.add_argument("--queries", type=int, default=1000, help="query chunks of the top-10 overlap")
    p.add_argument("--blocks", type=int, default=8, help="interleaved timing blocks (ABBA order)")
    p.add_argument("--embed-batch-tokens", type=int,
                   help="the stage's --embed-batch-tokens, for ablations (default: the stage's default)")
    p.add_argument("--embed-streams", type=int,
                   help="the stage's --embed-streams, for ablations (default: the stage's default)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for flag, path in (("--embedder", args.embedder), ("--input", args.input)):
        if not os.path.exists(path):
            print(f"bench_embed: {flag} {path}: not found", file=sys.stderr)
            return 2
    try:
        import torch
    except ImportError:
        print("bench_embed: needs torch and sentence-transformers (pip install -e '.[st]')", file=sys.stderr)
        return 2
    chunks = load_chunks(args.input, args.max_chunks, args.granularity)
    log.info("%d chunks from %s (granularity %d chars); %d CPU threads", len(chunks), args.input, args.granularity,
             torch.get_num_threads())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = [run_device(args, chunks, d) for d in devices]
    for r in results:
        st = r["stage_stats"]
        print(f"[{r['device']}] {r['chunks']} chunks, {r['queries']} queries; stage: {r['stage']['precision']}, "
              f"{r['stage']['batch_tokens']} tokens/batch, {r['stage']['streams']} batch stream(s), "
              f"attention {r['stage']['attention']}, "
              f"max_seq_length {r['stage']['max_seq_length']}, "
              f"fused modules {r['stage'].get('fused_modules') or 'none'}")
        print(f"[{r['device']}] stage stats: duplicates {st['duplicates']}, truncated {st['truncated']} "
              f"({100 * st['truncated_share']:.1f}%), padding waste {100 * st['padding_waste']:.1f}%, "
              f"{st['batches']} batches, tokenized once: {'yes' if st.get('tokenized_once') else 'no'}")
        print(f"[{r['device']}] plain fp32 loop: {r['cps_plain']:.2f} chunks/s ({r['seconds_plain']:.1f} s)   "
              f"embed stage: {r['cps_stage']:.2f} chunks/s ({r['seconds_stage']:.1f} s)   "
              f"cosine min {r['cosine_min']:.4f}")
        print(f"[{r['device']}] CPU seconds of this process: plain {r['cpu_seconds_plain']:.1f}, stage "
              f"{r['cpu_seconds_stage']:.1f} (ratio {r['cpu_speedup']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for r in results[1:]:
        print(f"GPU ({r['device']}): speed-up: {r['speedup']:.2f}×  cosine: {r['cosine']:.4f}  "
              f"top-10 overlap: {r['overlap']:.3f}")
    r = results[0]
    print(f"speed-up: {r['speedup']:.2f}×  cosine: {r['cosine']:.4f}  top-10 overlap: {r['overlap']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
