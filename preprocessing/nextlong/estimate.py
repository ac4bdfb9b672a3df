"""Cost model of a synthesis run (``--dry-run``): what a corpus of a given size will cost, before running it.

Two steps:

1. :func:`measure_sample` reads the first ``sample_docs`` documents of the real inputs, chunks them with the
   run's ``--granularity`` and tokenizes the chunks with the run's ``--tokenizer``: characters per document,
   chunks per document, characters per token, tokens per chunk; and the CPU throughput of chunking +
   tokenizing and of the ``hashing`` embedder on this machine.
2. :func:`estimate_from_sample` extrapolates to the corpus size (``documents`` and/or ``chunks``; by default
   the number of records in the whole input) with closed-form formulas. Every figure in the result carries
   its value, unit, formula and, where it rests on an assumption, a note. Nothing here is measured on a
   GPU: GPU figures are ESTIMATES from FLOP counts, a peak throughput and an assumed utilization (MFU).

:func:`estimate` does both; :func:`format_estimate` prints the result.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time

import numpy as np

log = logging.getLogger(__name__)

#: bf16 dense tensor-core peak, TFLOP/s (vendor datasheets, without sparsity)
GPU_BF16_TFLOPS = {"H100": 989.0, "H100-SXM": 989.0, "H100-PCIE": 756.0, "H200": 989.0, "A100": 312.0,
                   "L40S": 362.0, "A10G": 125.0}
#: fp32 (non-tensor-core) peak, TFLOP/s: FAISS's brute-force and IVF list scans run as fp32 GEMMs
GPU_FP32_TFLOPS = {"H100": 67.0, "H100-SXM": 67.0, "H100-PCIE": 51.0, "H200": 67.0, "A100": 19.5,
                   "L40S": 91.6, "A10G": 31.2}
#: bytes per row of the spans sidecar after zstd (measured: 9.6 on the demo, 11.6 on bench/bench_scale.py)
SPAN_ROW_BYTES = 12.0
#: FAISS k-means iterations (``ClusteringParameters.niter``) and its minimum training points per centroid
KMEANS_NITER = 25
KMEANS_MIN_POINTS_PER_CENTROID = 39

GiB = 1024.0**3


def _fig(value, unit: str, formula: str, note: str | None = None) -> dict:
    out = {"value": value, "unit": unit, "formula": formula}
    if note:
        out["note"] = note
    return out


# ------------------------------------------------------------------------------------------ sample


def count_input_records(cfg) -> int:
    """Documents in the whole input: Parquet row counts from the file footers, JSONL non-blank lines,
    built-in corpora by iterating. Counted before rejects (malformed or empty records are counted too)."""
    from .readers import _format_of, _open_text_bytes, iter_documents, parse_input_specs

    total = 0
    for spec in parse_input_specs(cfg.inputs, cfg.mix, cfg.input_names):
        if spec.pattern.startswith("builtin:"):
            from .readers import Rejects

            total += sum(1 for _ in iter_documents(spec, cfg.text_field, cfg.id_field, Rejects()))
            continue
        for path in spec.files():
            if _format_of(path) == "parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            else:
                with _open_text_bytes(path) as fh:
                    total += sum(1 for line in fh if line.strip())
    return total


def measure_sample(cfg, sample_docs: int = 2000, measure_throughput: bool = True, max_tokens: int | None = None,
                   embed_on_cpu: bool = False, embed_sample_chunks: int = 64) -> dict:
    """Read up to ``sample_docs`` documents (split evenly over the inputs, first documents of each), chunk
    and tokenize them as the pipeline does, and return the raw counts (see :func:`estimate_from_sample`).

    For a sentence-transformers embedder, the chunks' token counts (capped at ``max_tokens``, the embedder's
    ``max_seq_length``) are packed into the embed stage's token-budget batches (``--embed-batch-tokens``) to
    measure its padding waste and truncated share. With ``embed_on_cpu`` (no GPU) the real embedder runs
    on ``embed_sample_chunks`` sample chunks here, to measure its CPU throughput."""
    from .chunking import chunk_spans
    from .readers import Rejects, iter_documents, parse_input_specs
    from .tokenization import load_tokenizer

    specs = parse_input_specs(cfg.inputs, cfg.mix, cfg.input_names)
    per_input = max(1, math.ceil(sample_docs / len(specs)))
    tok = load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token)
    rejects = Rejects(max_logged=0)
    texts: list[str] = []
    n_docs = doc_chars = 0
    t0 = time.perf_counter()
    for spec in specs:
        taken = 0
        for doc in iter_documents(spec, cfg.text_field, cfg.id_field, rejects):
            spans = chunk_spans(doc.text, cfg.granularity)
            if not spans:
                continue
            n_docs += 1
            doc_chars += len(doc.text)
            texts.extend(doc.text[a:b] for a, b in spans)
            taken += 1
            if taken >= per_input:
                break
    if not texts:
        raise ValueError("estimate: the inputs hold no usable document to measure")
    lengths = np.fromiter((len(e) for e in tok.encode_batch(texts)), dtype=np.int64, count=len(texts))
    chunk_tok_s = time.perf_counter() - t0
    chunk_chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    sample = {
        "documents": n_docs, "document_chars": int(doc_chars), "chunks": len(texts),
        "chunk_chars": int(chunk_chars.sum()), "tokens": int(lengths.sum()),
        "tokens_per_chunk_p50": float(np.percentile(lengths, 50)),
        "tokens_per_chunk_p95": float(np.percentile(lengths, 95)), "tokens_per_chunk_max": int(lengths.max()),
        "vocab_size": int(tok.vocab_size),
        "special_tokens": int(tok.bos_id is not None) + int(tok.eos_id is not None),
        "separator_tokens": len(tok.encode(cfg.separator)) if cfg.separator else 0,
        "rejected": int(sum(rejects.counts.values())),
        "read_chunk_tokenize_seconds": round(chunk_tok_s, 4),
    }
    if cfg.embedder != "hashing":
        from .embedding import resolve_batch_tokens, token_budget_batches

        capped = np.minimum(lengths, max_tokens) if max_tokens else lengths
        budget = resolve_batch_tokens(cfg.embed_batch_tokens, "cpu" if embed_on_cpu else "cuda")
        padded = sum(len(b) * int(capped[b].max()) for b in token_budget_batches(capped, budget,
                                                                                 cfg.embed_batch_size))
        sample["embed_batch_tokens"] = budget
        sample["embed_tokens_per_chunk"] = float(capped.mean())
        sample["embed_padding_waste"] = 1.0 - float(capped.sum()) / max(1, padded)
        sample["embed_truncated_share"] = float((lengths > max_tokens).mean()) if max_tokens else 0.0
    if measure_throughput and embed_on_cpu and cfg.embedder != "hashing":
        sample.update(_measure_embedder_cpu(cfg, texts, embed_sample_chunks))
    if measure_throughput:
        sample["chunk_tokenize_chars_per_second"] = sample["chunk_chars"] / max(chunk_tok_s, 1e-9)
        if cfg.embedder == "hashing":
            from .embedding import HashingEmbedder

            emb = HashingEmbedder(dim=cfg.embedding_dim, seed=cfg.seed)
            t0 = time.perf_counter()
            emb.fit(texts)  # the pipeline's document-frequency pass
            for i in range(0, len(texts), 4096):
                emb.embed(texts[i : i + 4096])
            sample["hashing_chunks_per_second"] = len(texts) / max(time.perf_counter() - t0, 1e-9)
    return sample


def _measure_embedder_cpu(cfg, texts: list[str], n: int) -> dict:
    """Chunks/s of the embed stage's own encoder on ``n`` chunks spread over the sample, on this CPU."""
    from .embedding import make_embedder

    try:
        emb = make_embedder(cfg.embedder, cfg.seed, cfg.embedding_dim, cfg.embed_batch_size, device="cpu",
                            trust_remote_code=cfg.trust_remote_code, precision=cfg.embed_precision,
                            batch_tokens=cfg.embed_batch_tokens, threads=cfg.embed_threads, streams=cfg.embed_streams)
    except (ImportError, ValueError) as e:
        log.warning("estimate: the embedder is not measured on this CPU (%s)", e)
        return {}
    pick = [texts[i] for i in np.linspace(0, len(texts) - 1, min(n, len(texts))).astype(int)]
    _, st = emb.encode(pick)
    d = emb.describe()
    return {"embedder_cpu_chunks_per_second": st["chunks_per_second"], "embedder_cpu_chunks": len(pick),
            "embedder_cpu_precision": d["precision"], "embedder_cpu_threads": d["torch_threads"],
            "embedder_dim_measured": d["dim"], "embedder_max_tokens_measured": d["max_seq_length"]}


def detect_gpus() -> int:
    """CUDA devices visible to torch here (0 without torch or without a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def measure_cpu_gflops(size: int = 1024, repeats: int = 3) -> float:
    """float32 GEMM throughput of this machine (numpy/BLAS, all threads), GFLOP/s, best of ``repeats``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def describe_local_model(path: str) -> dict:
    """Shape of a local embedder directory, read without loading it: parameter count from the safetensors
    headers, and ``hidden_size``/``num_hidden_layers``/``vocab_size``/``max_position_embeddings`` from
    ``config.json``. Keys are left out when not found; an empty dict for a path that is not a directory."""
    import json
    import struct
    from pathlib import Path

    d = Path(path)
    out: dict = {}
    if not d.is_dir():
        return out
    cfgp = d / "config.json"
    if cfgp.exists():
        try:
            c = json.loads(cfgp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            c = {}
        for key, name in (("hidden_size", "embedder_hidden"), ("num_hidden_layers", "embedder_layers"),
                          ("max_position_embeddings", "embedder_max_tokens")):
            if isinstance(c.get(key), int):
                out[name] = c[key]
        if isinstance(c.get("hidden_size"), int):
            out["embedder_dim"] = c["hidden_size"]
            if isinstance(c.get("vocab_size"), int):
                out["embedder_embedding_params"] = c["vocab_size"] * c["hidden_size"]
    st_cfg = d / "sentence_bert_config.json"  # sentence-transformers truncates here, not at config.json's limit
    if st_cfg.exists():
        try:
            msl = json.loads(st_cfg.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, json.JSONDecodeError):
            msl = None
        if isinstance(msl, int):
            out["embedder_max_tokens"] = msl
    for pooling in sorted(d.glob("*_Pooling/config.json")):
        try:
            dim = json.loads(pooling.read_text(encoding="utf-8")).get("word_embedding_dimension")
        except (OSError, json.JSONDecodeError):
            dim = None
        if isinstance(dim, int):
            out["embedder_dim"] = dim
    params = 0
    for f in sorted(d.rglob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            continue
        for name, t in header.items():
            if name != "__metadata__" and isinstance(t, dict) and "shape" in t:
                params += math.prod(t["shape"])
    if params:
        out["embedder_params"] = params
    return out


# ------------------------------------------------------------------------------------------ index


def parse_factory(factory: str) -> dict:
    """What the cost model needs from a FAISS factory string; ``kind`` is ``unknown`` when not understood.

    Understood: optional transforms (``OPQm[_d]``, ``PCA[R|W]d``, ``L2norm``, ``RR``), then ``Flat``,
    ``IVFn[_HNSWm|_Flat]`` followed by ``Flat``/``PQm[xb][fs|np]``/``SQ8``/``SQ4``/``SQfp16``, ``PQm[xb]``,
    ``SQ*``, ``HNSWm[,Flat|,PQm|,SQ8]``; an optional refine (``RFlat``, ``Refine(Flat)``) at the end.
    """
    s = factory.replace(" ", "")
    out: dict = {"factory": factory, "kind": "unknown", "nlist": None, "hnsw_m": None, "code": None,
                 "pq_m": None, "pq_nbits": None, "out_dim": None, "refine_flat": False}
    parts = [p for p in s.split(",") if p]
    if parts and parts[-1] in ("RFlat", "Refine(Flat)"):
        out["refine_flat"] = True
        parts = parts[:-1]
    while parts:
        m = re.fullmatch(r"OPQ(\d+)(?:_(\d+))?|PCAR?W?(\d+)|L2norm|RR(\d+)?|ITQ(\d+)?", parts[0])
        if not m:
            break
        dim = m.group(2) or m.group(3)
        if dim:
            out["out_dim"] = int(dim)
        parts = parts[1:]

    def code(tok: str) -> bool:
        if tok == "Flat":
            out["code"] = "flat"
            return True
        m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs|fsr|np)?", tok)
        if m:
            out["code"], out["pq_m"] = "pq", int(m.group(1))
            out["pq_nbits"] = 4 if (m.group(3) or "").startswith("fs") else int(m.group(2) or 8)
            return True
        m = re.fullmatch(r"SQ(8|4|6|fp16|bf16)", tok)
        if m:
            out["code"] = "sq" + m.group(1)
            return True
        return False

    if parts == ["Flat"] or parts == ["IDMap,Flat"]:
        out["kind"], out["code"] = "flat", "flat"
    elif len(parts) == 2 and (m := re.fullmatch(r"IVF(\d+)(?:_HNSW\d+|_Flat)?", parts[0])) and code(parts[1]):
        out["kind"], out["nlist"] = "ivf", int(m.group(1))
    elif len(parts) == 1 and (m := re.fullmatch(r"HNSW(\d+)(?:_?(.*))?", parts[0])):
        rest = m.group(2) or "Flat"
        if code(rest):
            out["kind"], out["hnsw_m"] = "hnsw", int(m.group(1))
    elif len(parts) == 2 and (m := re.fullmatch(r"HNSW(\d+)", parts[0])) and code(parts[1]):
        out["kind"], out["hnsw_m"] = "hnsw", int(m.group(1))
    elif len(parts) == 1 and code(parts[0]):
        out["kind"] = "pq" if out["code"] == "pq" else ("flat" if out["code"] == "flat" else "sq")
    if out["kind"] == "unknown":
        out["code"] = None
    return out


def _code_bytes(p: dict, d: int) -> tuple[float | None, str]:
    """Bytes of one stored vector code, and its formula."""
    c = p["code"]
    if c == "flat":
        return 4.0 * d, "d*4"
    if c == "pq":
        return math.ceil(p["pq_m"] * p["pq_nbits"] / 8), f"ceil(m*nbits/8) = ceil({p['pq_m']}*{p['pq_nbits']}/8)"
    sq = {"sq8": (1.0, "d*1"), "sq4": (0.5, "d/2"), "sq6": (0.75, "d*6/8"), "sqfp16": (2.0, "d*2"),
          "sqbf16": (2.0, "d*2")}
    if c in sq:
        return sq[c][0] * d, sq[c][1]
    return None, "unknown"


def index_memory(factory: str, n: int, d: int) -> dict:
    """RAM of the index over ``n`` vectors of dimension ``d``: value (bytes or None), formula, note."""
    p = parse_factory(factory)
    dd = p["out_dim"] or d
    if p["kind"] == "unknown":
        return {**_fig(None, "bytes", "unknown", f"factory {factory!r} not understood by the cost model"),
                "parsed": p}
    code, code_f = _code_bytes(p, dd)
    value = n * code
    formula = f"n*{code_f}"
    note = None
    if p["kind"] == "ivf":
        nlist = p["nlist"]
        value += n * 8 + nlist * dd * 4
        formula = f"n*({code_f} + 8 id bytes) + nlist*d*4 centroids"
    elif p["kind"] == "hnsw":
        M = p["hnsw_m"]
        value += n * 2 * M * 4 * 1.05 + n * 8
        formula = f"n*{code_f} + n*2*M*4*1.05 graph links (level 0 has 2M int32 links; upper levels ~5%) + n*8"
        note = "HNSW graph size approximate"
    if p["code"] == "pq":
        value += (1 << p["pq_nbits"]) * dd * 4
        formula += " + 2^nbits*d*4 PQ codebooks"
    if p["out_dim"]:
        value += d * dd * 4
        formula += f" + d*{dd}*4 transform matrix (d -> {dd})"
    if p["refine_flat"]:
        value += n * d * 4
        formula += " + n*d*4 refine vectors"
    return {**_fig(float(value), "bytes", formula, note), "parsed": p}


# ------------------------------------------------------------------------------------------ estimate


def estimate_from_sample(cfg, sample: dict, *, documents: int | None = None, chunks: int | None = None,
                         samples: int | None = None, input_records: int | None = None, gpus: int | None = None,
                         gpu: str = "H100", mfu: float = 0.4, gpu_tflops: float | None = None,
                         embedder_params: int | None = None, embedder_embedding_params: int | None = None,
                         embedder_dim: int | None = None, embedder_max_tokens: int | None = None,
                         embedder_layers: int | None = None, embedder_hidden: int | None = None,
                         search_on: str | None = None, search_efficiency: float = 0.5,
                         cpu_gflops: float | None = None, synth_tokens_per_second: float | None = None) -> dict:
    """The cost model proper: pure arithmetic on the measured ``sample`` (see :func:`estimate`).
    ``gpus`` None means the GPUs present here (:func:`detect_gpus`); 0 estimates for the CPU."""
    if gpus is None:
        gpus = detect_gpus()
    if gpus < 0:
        from .config import ConfigError

        raise ConfigError(f"--gpus: must be >= 0, got {gpus}")
    assumptions: list[str] = []
    warnings: list[str] = []
    sd, sc = sample["documents"], sample["chunks"]
    chunks_per_doc_sample = sc / sd
    tokens_per_chunk = sample["tokens"] / sc
    chars_per_chunk = sample["chunk_chars"] / sc
    chars_per_token = sample["chunk_chars"] / max(1, sample["tokens"])
    measured = {
        "documents": sd, "chunks": sc, "tokens": sample["tokens"],
        "chars_per_document": _fig(sample["document_chars"] / sd, "chars", "document chars / documents"),
        "chunks_per_document": _fig(chunks_per_doc_sample, "chunks", "chunks / documents"),
        "chars_per_token": _fig(chars_per_token, "chars", "chunk chars / tokens"),
        "tokens_per_chunk": _fig(tokens_per_chunk, "tokens", "tokens / chunks",
                                 f"p50 {sample['tokens_per_chunk_p50']:.0f}, p95 {sample['tokens_per_chunk_p95']:.0f}, "
                                 f"max {sample['tokens_per_chunk_max']}"),
    }

    # --- corpus size ---
    if documents is not None and chunks is not None:
        D, N = int(documents), int(chunks)
        d_src, n_src = "given", "given"
    elif chunks is not None:
        N = int(chunks)
        D = round(N / chunks_per_doc_sample)
        d_src, n_src = "chunks / measured chunks per document", "given"
    else:
        if documents is not None:
            D, d_src = int(documents), "given"
        elif input_records is not None:
            D, d_src = int(input_records), "counted in the whole input (records, before rejects)"
        else:
            D, d_src = sd, "the sample (whole input read)"
        N = round(D * chunks_per_doc_sample)
        n_src = "documents * measured chunks per document"
    chunks_per_doc = N / max(1, D)
    pool_tokens = N * tokens_per_chunk
    corpus = {
        "documents": _fig(D, "documents", d_src),
        "chunks": _fig(N, "chunks", n_src),
        "chunks_per_document": _fig(chunks_per_doc, "chunks", "chunks / documents"),
        "pool_tokens": _fig(pool_tokens, "tokens", "chunks * measured tokens per chunk"),
        "pool_chars": _fig(N * chars_per_chunk, "chars", "chunks * measured chars per chunk"),
    }
    if "chunk_tokenize_chars_per_second" in sample:
        rate = sample["chunk_tokenize_chars_per_second"]
        h = N * chars_per_chunk / rate / 3600
        corpus["chunk_tokenize_hours"] = _fig(
            h, "process-hours", "pool chars / measured chars per second (read + chunk + tokenize, one process)",
            f"measured here: {rate:,.0f} chars/s by one process whose tokenizer threads use all {os.cpu_count()} "
            "cores; the pipeline's chunk stage also counts hashed n-grams, hashes texts and writes Parquet: "
            "a lower bound")

    # --- samples and queries ---
    if samples is not None:
        S, s_src = int(samples), "given"
    elif cfg.max_samples is not None:
        S, s_src = int(cfg.max_samples), "--max-samples"
    else:
        S, s_src = D, "one per meta-document (no --max-samples)"
    Q = S * chunks_per_doc
    k_query = cfg.candidates + math.ceil(chunks_per_doc)
    assumptions.append("every meta-document yields a sample (documents dropped for lack of negatives or for "
                       "exceeding the target add queries not counted here)")
    per_sample_chunks = (cfg.target_length - sample["special_tokens"]) / (tokens_per_chunk + sample["separator_tokens"])
    synth = {
        "samples": _fig(S, "samples", s_src),
        "meta_documents": _fig(S, "documents", "samples (one meta-document per sample)"),
        "queries": _fig(Q, "meta-chunks", "samples * chunks per document"),
        "k_per_query": _fig(k_query, "neighbours", "--candidates + chunks of the meta-document (upper bound; "
                                                   "the top-k path asks for fewer)"),
        "chunks_per_sample": _fig(per_sample_chunks, "chunks",
                                  "(target_length - BOS/EOS) / (tokens per chunk + separator tokens)"),
        "pool_reuse": _fig(S * per_sample_chunks / max(1, N), "x",
                           "samples * chunks per sample / pool chunks (how often an average chunk is used)"),
    }

    if synth_tokens_per_second:
        h = float(S) * cfg.target_length / synth_tokens_per_second / 3600
        synth["assembly_cpu_hours"] = _fig(
            h, "process-hours", f"samples * target_length / {synth_tokens_per_second:,.0f} output tokens/s",
            f"stated rate of one synthesis task (mining + assembly + writing); wall with --tasks {cfg.tasks}: "
            f"{h / cfg.tasks:,.2f} h")

    # --- embedding ---
    emb: dict = {}
    hashing = cfg.embedder == "hashing"
    if hashing:
        dim = cfg.embedding_dim
        emb["embedder"] = "hashing (CPU)"
        if "hashing_chunks_per_second" in sample:
            r = sample["hashing_chunks_per_second"]
            h = N / r / 3600
            emb["cpu_hours"] = _fig(h, "process-hours", "chunks / measured chunks per second (fit + embed)",
                                    f"measured here: {r:,.0f} chunks/s in one process; wall with --tasks "
                                    f"{cfg.tasks}: {h / cfg.tasks:,.2f} h")
    else:
        dim = embedder_dim or sample.get("embedder_dim_measured")
        if embedder_max_tokens is None:
            embedder_max_tokens = sample.get("embedder_max_tokens_measured")
        on_gpu = gpus > 0
        from .embedding import resolve_batch_tokens

        budget = resolve_batch_tokens(cfg.embed_batch_tokens, "cuda" if on_gpu else "cpu")
        prec = cfg.embed_precision
        if prec == "auto":
            prec = "bf16" if on_gpu else sample.get("embedder_cpu_precision", "auto (bf16 where the CPU has it)")
        where = f"{gpus} x {gpu}" if on_gpu else "CPU"
        emb["embedder"] = f"{cfg.embedder} (sentence-transformers, {where}, {prec})"
        t_chunk = sample.get("embed_tokens_per_chunk", tokens_per_chunk)
        if embedder_max_tokens is not None and sample["tokens_per_chunk_max"] > embedder_max_tokens:
            share = sample.get("embed_truncated_share")
            warnings.append(f"some chunks (up to {sample['tokens_per_chunk_max']} tokens"
                            + (f"; {100 * share:.1f}% of the sample" if share is not None else "")
                            + f") exceed the embedder's {embedder_max_tokens} max tokens and are truncated: "
                            "a smaller --granularity keeps them whole")
            t_chunk = min(t_chunk, embedder_max_tokens)
        waste = float(sample.get("embed_padding_waste", 0.0))
        t_pad = t_chunk / max(1e-9, 1.0 - waste)
        emb["tokens_per_chunk"] = _fig(t_chunk, "tokens", "measured tokens per chunk, each capped at the "
                                       f"embedder's max tokens ({embedder_max_tokens or 'unknown'})")
        emb["padding_waste"] = _fig(waste, "fraction",
                                    f"1 - tokens / padded tokens, chunks sorted by length and packed into "
                                    f"--embed-batch-tokens {budget:,} batches",
                                    "measured on the sample" if "embed_padding_waste" in sample else "assumed 0")
        emb["batches"] = _fig(N * t_pad / budget, "batches",
                              "chunks * tokens per chunk / (1 - padding waste) / --embed-batch-tokens")
        assumptions.append("the embedder's tokenizer produces as many tokens per chunk as --tokenizer "
                           f"({t_chunk:.0f} measured); the embedder's own tokenizer is not run here")
        per_chunk = None
        if embedder_params is not None:
            per_chunk = 2.0 * embedder_params * t_pad
            f = f"2 * params * tokens per chunk / (1 - padding waste) = 2 * {embedder_params:,} * {t_pad:.1f}"
            if embedder_layers and embedder_hidden:
                per_chunk += 4.0 * embedder_layers * t_pad**2 * embedder_hidden
                f += f" + attention 4 * layers * t^2 * hidden = 4 * {embedder_layers} * {t_pad:.1f}^2 * " \
                     f"{embedder_hidden}"
            emb["flops_per_chunk"] = _fig(per_chunk, "FLOP", f, "forward pass only; every parameter counted as a "
                                          "matmul weight; padded tokens are computed too")
            emb["total_flops"] = _fig(per_chunk * N, "FLOP", "flops per chunk * chunks")
        else:
            emb["flops_per_chunk"] = _fig(None, "FLOP", "2 * params * tokens per chunk",
                                          "unknown: give the embedder's parameter count")
        if on_gpu:
            table = GPU_FP32_TFLOPS if prec == "fp32" else GPU_BF16_TFLOPS
            peak = gpu_tflops if gpu_tflops is not None else table.get(gpu.upper())
            kind = "fp32" if prec == "fp32" else "bf16 dense"
            if peak is None:
                warnings.append(f"unknown GPU {gpu!r}: give its {kind} TFLOP/s (known: {sorted(table)})")
            elif per_chunk is not None:
                rate = peak * 1e12 * mfu
                gpu_hours = per_chunk * N / rate / 3600
                emb["throughput_per_gpu"] = _fig(
                    rate / per_chunk, "chunks/s",
                    f"{peak:g} TFLOP/s {kind} peak ({gpu}) * MFU {mfu:g} / flops per chunk", "ESTIMATE")
                emb["gpu_hours"] = _fig(gpu_hours, "GPU-hours", "total flops / (peak * MFU) / 3600", "ESTIMATE")
                emb["wall_hours"] = _fig(gpu_hours / gpus, "hours", f"GPU-hours / {gpus} GPUs (one task per GPU)",
                                         "ESTIMATE, also the hours each GPU works")
                if embedder_embedding_params:
                    share = (embedder_params - embedder_embedding_params) / embedder_params
                    emb["gpu_hours_non_embedding"] = _fig(
                        gpu_hours * share, "GPU-hours",
                        f"gpu_hours * (params - embedding-table params) / params = gpu_hours * {share:.3f}",
                        "ESTIMATE: the token-embedding table is a lookup, not a matmul; lower bound of the same "
                        "model")
                assumptions.append(
                    f"embedding runs at MFU {mfu:g} of the {gpu} {kind} peak ({peak:g} TFLOP/s) in {prec} with "
                    f"fused attention (SDPA/flash: memory linear in length, FLOPs as counted), length-sorted "
                    f"batches of {budget:,} padded tokens with the measured padding waste, "
                    "tokenization overlapped with compute (no data-loading stall), one task per GPU")
        elif "embedder_cpu_chunks_per_second" in sample:
            r = sample["embedder_cpu_chunks_per_second"]
            h = N / r / 3600
            emb["cpu_hours"] = _fig(h, "process-hours", "chunks / measured chunks per second",
                                    f"measured here: {r:,.2f} chunks/s by the embed stage's encoder on "
                                    f"{sample['embedder_cpu_chunks']} sample chunks, {prec}, "
                                    f"{sample.get('embedder_cpu_threads')} threads; wall with --tasks "
                                    f"{cfg.tasks}: {h / cfg.tasks:,.2f} h if each task has its own cores")
        elif per_chunk is not None:
            if cpu_gflops is None:
                cpu_gflops = measure_cpu_gflops()
            h = per_chunk * N / (cpu_gflops * 1e9 * 0.5) / 3600
            emb["cpu_hours"] = _fig(h, "process-hours",
                                    f"total flops / (0.5 * {cpu_gflops:,.0f} GFLOP/s float32 GEMM measured here)",
                                    "ESTIMATE: the embedder was not run here; bf16 on a CPU with AMX/AVX-512 BF16 "
                                    "is faster")
    if dim is not None:
        itemsize = np.dtype(cfg.embedding_dtype).itemsize
        emb["storage"] = _fig(float(N) * dim * itemsize, "bytes",
                              f"chunks * dim * {itemsize} ({cfg.embedding_dtype}) = {N:,} * {dim} * {itemsize}")
        emb["dim"] = dim
    else:
        emb["storage"] = _fig(None, "bytes", "chunks * dim * 2", "unknown: give the embedding dimension")

    # --- index ---
    index: dict = {"factory": cfg.index_factory}
    p = parse_factory(cfg.index_factory)
    if dim is not None:
        index["memory"] = index_memory(cfg.index_factory, N, dim)
        dd = p["out_dim"] or dim
    else:
        index["memory"] = _fig(None, "bytes", "needs the embedding dimension")
        dd = None
    index["kind"] = p["kind"]
    if p["nlist"]:
        need = KMEANS_MIN_POINTS_PER_CENTROID * p["nlist"]
        if cfg.index_train_size < need:
            warnings.append(f"--index-train-size {cfg.index_train_size:,} < {KMEANS_MIN_POINTS_PER_CENTROID} * "
                            f"nlist = {need:,}: FAISS warns and the IVF lists are poorly trained; use >= {need:,}")
        if N / p["nlist"] < 100:
            warnings.append(f"nlist {p['nlist']} is large for {N:,} vectors ({N / p['nlist']:.0f} per list)")
    if cfg.nprobe and p["nlist"] and cfg.nprobe > p["nlist"]:
        warnings.append(f"--nprobe {cfg.nprobe} > nlist {p['nlist']}")

    # --- search (and index build) ---
    if search_on is None or gpus == 0:
        search_on = "gpu" if (gpus > 0 and not hashing) else "cpu"
    if search_on == "gpu":
        fp32 = GPU_FP32_TFLOPS.get(gpu.upper())
        thr = None if fp32 is None else fp32 * 1e12 * search_efficiency * gpus
        thr_f = (f"{gpus} x {fp32:g} TFLOP/s fp32 peak ({gpu}) * efficiency {search_efficiency:g}"
                 if fp32 else "unknown GPU")
        assumptions.append(f"FAISS GEMM/scan work runs at {search_efficiency:g} of the GPUs' fp32 peak, "
                           "index sharded over all GPUs")
    else:
        if cpu_gflops is None:
            cpu_gflops = measure_cpu_gflops()
            thr_f = f"{cpu_gflops:,.0f} GFLOP/s float32 GEMM measured on this machine"
        else:
            thr_f = f"{cpu_gflops:,.0f} GFLOP/s float32 (stated)"
        thr = cpu_gflops * 1e9
        assumptions.append(f"CPU FAISS runs at {thr_f}; list scans of PQ codes count 2 FLOP per lookup-add "
                           "(memory-bound in practice)")
    search: dict = {"device": search_on, "throughput": _fig(thr, "FLOP/s", thr_f)}
    if dd is not None and p["kind"] != "unknown":
        if p["kind"] in ("flat",) and p["code"] == "flat":
            per_q = N * dd * 2.0
            f = "n * d * 2 (brute force)"
        elif p["kind"] == "ivf":
            nlist, nprobe = p["nlist"], min(cfg.nprobe, p["nlist"])
            scanned = N * nprobe / nlist
            if p["code"] == "pq":
                scan = scanned * p["pq_m"] * 2.0 + nprobe * (1 << p["pq_nbits"]) * dd * 2.0
                scan_f = "n*nprobe/nlist * m * 2 + nprobe * 2^nbits * d * 2 (lookup tables)"
            else:
                scan = scanned * dd * 2.0
                scan_f = "n*nprobe/nlist * d * 2"
            per_q = nlist * dd * 2.0 + scan
            f = f"nlist*d*2 (coarse) + {scan_f}; nprobe {nprobe}, nlist {nlist}"
        elif p["kind"] == "hnsw":
            ef = max(16, k_query)
            per_q = ef * 2.0 * p["hnsw_m"] * dd * 2.0
            f = f"~ efSearch * 2M * d * 2 with efSearch ~ k = {ef} (approximate; graph walk, latency-bound)"
        else:
            per_q = N * (_code_bytes(p, dd)[0] or dd) * 2.0
            f = "n * code size * 2 (exhaustive scan of codes)"
        total = per_q * Q
        search["flops_per_query"] = _fig(per_q, "FLOP", f)
        search["total_flops"] = _fig(total, "FLOP", "flops per query * queries")
        search["seconds"] = _fig(None if thr is None else total / thr, "s", "total flops / throughput",
                                 "ESTIMATE" if search_on == "gpu" else None)
        itemsize = np.dtype(cfg.embedding_dtype).itemsize
        search["rescore_reads"] = _fig(Q * k_query * dim * itemsize, "bytes",
                                       f"queries * k * d * {itemsize}: exact float32 re-scoring of every retrieved id "
                                       "reads its stored embedding (random access; the embeddings file must be "
                                       "on fast local storage)")
        if p["kind"] == "ivf":
            nlist = p["nlist"]
            train_n = min(N, cfg.index_train_size, nlist * 256)
            build = train_n * nlist * dd * 2.0 * KMEANS_NITER + N * nlist * dd * 2.0
            index["build_flops"] = _fig(build, "FLOP",
                                        f"k-means: train_n * nlist * d * 2 * {KMEANS_NITER} iterations + "
                                        "assignment of every vector: n * nlist * d * 2 (PQ training not counted)")
            index["build_seconds"] = _fig(None if thr is None else build / thr, "s", "build flops / throughput",
                                          "ESTIMATE")

    # --- output ---
    from .indexed import token_dtype_for_vocab

    tbytes = token_dtype_for_vocab(sample["vocab_size"]).itemsize
    per_token = tbytes + 1 + (4 if cfg.emit_labels else 0)
    n_sets = 3 if cfg.emit_labels else 2
    idx_bytes = n_sets * (34 + 12 * S + 8 * (S + 1))
    rows = S * (2 + 2 * per_sample_chunks - 1)
    span_bytes = rows * SPAN_ROW_BYTES
    data_bytes = float(S) * cfg.target_length * per_token
    output = {
        "token_bytes": _fig(tbytes, "bytes", f"vocabulary {sample['vocab_size']:,}: uint16 below 65,500, else int32"),
        "datasets": _fig(data_bytes, "bytes",
                         f"samples * target_length * ({tbytes} token + 1 mask" + (" + 4 label" if cfg.emit_labels
                                                                                  else "") + ") bytes"),
        "idx": _fig(float(idx_bytes), "bytes", f"{n_sets} * (34 + 12*samples + 8*(samples+1))"),
        "span_rows": _fig(rows, "rows", "samples * (BOS + EOS + 2 * chunks per sample - 1): every chunk and "
                                        "separator is a row"),
        "spans": _fig(span_bytes, "bytes", f"rows * {SPAN_ROW_BYTES:g} bytes (zstd Parquet; 9.6-11.6 measured)",
                      "assumed bytes per row"),
        "total": _fig(data_bytes + idx_bytes + span_bytes, "bytes", "datasets + idx + spans"),
        "tokens": _fig(float(S) * cfg.target_length, "tokens", "samples * target_length"),
    }
    work = {
        "tokens_npy": _fig(pool_tokens * 4, "bytes", "pool tokens * 4 (int32)"),
        "embeddings_npy": emb["storage"],
        "index_faiss": index["memory"],
        "chunks_parquet": _fig(N * chars_per_chunk * 0.4, "bytes", "pool chars * 0.4",
                               "assumed zstd ratio of English text (~2.5x)"),
    }
    known = [w["value"] for w in work.values() if w.get("value") is not None]
    work["total_known"] = _fig(float(sum(known)), "bytes", "sum of the known figures above")

    config = {k: getattr(cfg, k) for k in ("inputs", "tokenizer", "embedder", "granularity", "target_length",
                                           "index_factory", "nprobe", "candidates", "index_train_size",
                                           "embedding_dtype", "emit_labels", "max_samples", "tasks")}
    return {"config": config, "gpus": gpus, "gpu": gpu, "mfu": mfu, "sample": sample, "measured": measured,
            "corpus": corpus, "synthesis": synth, "embedding": emb, "index": index, "search": search,
            "output": output, "work_dir": work, "assumptions": assumptions, "warnings": warnings}


def estimate(cfg, *, documents: int | None = None, chunks: int | None = None, samples: int | None = None,
             sample_docs: int = 2000, gpus: int | None = None, gpu: str = "H100", mfu: float = 0.4,
             embedder_params: int | None = None, count_inputs: bool = True, measure_throughput: bool = True,
             **model) -> dict:
    """Cost of running ``cfg`` on a corpus of ``documents`` documents and/or ``chunks`` chunks (default: the
    number of records in the whole input), measured on the first ``sample_docs`` documents.

    ``gpus``/``gpu``/``mfu``: GPUs used for embedding (and FAISS search; default: the GPUs present here,
    0 = estimate for this CPU, where a sentence-transformers embedder is run on a few sample chunks), their
    type (bf16 dense peak from :data:`GPU_BF16_TFLOPS`, or ``gpu_tflops=``) and the model FLOP utilization
    assumed. ``embedder_params``: parameter count of a sentence-transformers embedder. Further keywords go to
    :func:`estimate_from_sample` (``embedder_dim``, ``embedder_max_tokens``, ``embedder_layers``,
    ``embedder_hidden``, ``embedder_embedding_params``, ``search_on``, ``search_efficiency``,
    ``cpu_gflops``, ``gpu_tflops``, ``synth_tokens_per_second``). When ``cfg.embedder`` is a local model
    directory, the values not given are read from it (:func:`describe_local_model`).
    """
    t0 = time.perf_counter()
    if cfg.embedder != "hashing":
        found = describe_local_model(cfg.embedder)
        if embedder_params is None and "embedder_params" in found:
            embedder_params = found.pop("embedder_params")
        for key, value in found.items():
            if key != "embedder_params" and model.get(key) is None:
                model[key] = value
    if gpus is None:
        gpus = detect_gpus()
    sample = measure_sample(cfg, sample_docs, measure_throughput, max_tokens=model.get("embedder_max_tokens"),
                            embed_on_cpu=gpus == 0)
    records = None
    if documents is None and chunks is None and count_inputs:
        records = count_input_records(cfg)
    est = estimate_from_sample(cfg, sample, documents=documents, chunks=chunks, samples=samples,
                               input_records=records, gpus=gpus, gpu=gpu, mfu=mfu, embedder_params=embedder_params,
                               **model)
    est["seconds"] = round(time.perf_counter() - t0, 2)
    return est


# ------------------------------------------------------------------------------------------ format


def _human(value, unit: str) -> str:
    if value is None:
        return "unknown"
    if unit == "bytes":
        for u, f in (("TiB", 1024.0**4), ("GiB", GiB), ("MiB", 1024.0**2), ("KiB", 1024.0)):
            if abs(value) >= f:
                return f"{value / f:,.2f} {u}"
        return f"{value:,.0f} B"
    if unit in ("FLOP", "FLOP/s"):
        for u, f in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
            if abs(value) >= f:
                return f"{value / f:,.2f} {u}{unit}"
        return f"{value:,.0f} {unit}"
    if unit == "s" and value >= 3600:
        return f"{value:,.0f} s ({value / 3600:,.2f} h)"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:,.2f} {unit}"
    return f"{value:,.0f} {unit}"


def _line(name: str, fig: dict) -> str:
    s = f"  {name:<26}{_human(fig.get('value'), fig.get('unit', '')):>24}   = {fig.get('formula', '')}"
    if fig.get("note"):
        s += f"  [{fig['note']}]"
    return s


def format_estimate(est: dict) -> str:
    """The estimate as text: one line per figure with its value, formula and notes, then the assumptions."""
    c = est["config"]
    out = [f"NExtLong dry run (ESTIMATE): embedder {c['embedder']}, index {c['index_factory']} (nprobe {c['nprobe']}), "
           f"granularity {c['granularity']} chars, target {c['target_length']:,} tokens, tokenizer {c['tokenizer']}"]
    m = est["measured"]
    out.append(f"measured on the first {m['documents']:,} documents ({m['chunks']:,} chunks, {m['tokens']:,} tokens) "
               "of the inputs:")
    for k in ("chars_per_document", "chunks_per_document", "chars_per_token", "tokens_per_chunk"):
        out.append(_line(k, m[k]))
    sections = [("corpus", "corpus"), ("synthesis", "samples and retrieval queries"),
                ("embedding", f"embedding ({est['embedding'].get('embedder')})"),
                ("index", f"index {est['index'].get('factory')} ({est['index'].get('kind')})"),
                ("search", f"search on {est['search'].get('device')}"), ("output", "output files"),
                ("work_dir", "work directory")]
    for key, title in sections:
        out.append(f"{title}:")
        for name, fig in est[key].items():
            if isinstance(fig, dict) and "formula" in fig:
                out.append(_line(name, fig))
    if est["assumptions"]:
        out.append("assumptions:")
        out.extend(f"  - {a}" for a in est["assumptions"])
    if est["warnings"]:
        out.append("warnings:")
        out.extend(f"  ! {w}" for w in est["warnings"])
    return "\n".join(out)
