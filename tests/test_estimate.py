"""The dry-run cost model: arithmetic pinned on a hand-computed case, index-memory formulas, factory parsing,
and a measured run on a tiny corpus checked against the real pipeline's output sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from nextlong.chunking import chunk_spans
from nextlong.config import SynthesisConfig
from nextlong.estimate import (
    SPAN_ROW_BYTES,
    estimate,
    estimate_from_sample,
    format_estimate,
    index_memory,
    parse_factory,
)

# 10 documents, 40 chunks of 400 chars and 100 tokens each; 50,000-token vocabulary (uint16)
SAMPLE = {"documents": 10, "document_chars": 20000, "chunks": 40, "chunk_chars": 16000, "tokens": 4000,
          "tokens_per_chunk_p50": 100.0, "tokens_per_chunk_p95": 150.0, "tokens_per_chunk_max": 200,
          "vocab_size": 50000, "special_tokens": 2, "separator_tokens": 1, "rejected": 0}


def _cfg(**kw) -> SynthesisConfig:
    base = dict(inputs=["unused.jsonl"], output_prefix="unused/out", tokenizer="unused", target_length=1024,
                index_factory="IVF1024,PQ32", nprobe=16, candidates=512, emit_labels=True)
    base.update(kw)
    return SynthesisConfig(**base)


def test_hand_computed_case():
    est = estimate_from_sample(_cfg(), SAMPLE, documents=1000, samples=100, search_on="cpu", cpu_gflops=100.0)
    corpus = est["corpus"]
    assert corpus["documents"]["value"] == 1000
    assert corpus["chunks"]["value"] == 4000  # 1000 documents * 4 chunks per document
    assert corpus["pool_tokens"]["value"] == pytest.approx(400_000)  # 4000 chunks * 100 tokens
    assert corpus["pool_chars"]["value"] == pytest.approx(1_600_000)
    syn = est["synthesis"]
    assert syn["queries"]["value"] == pytest.approx(400)  # 100 samples * 4 meta-chunks
    assert syn["k_per_query"]["value"] == 516
    assert syn["chunks_per_sample"]["value"] == pytest.approx((1024 - 2) / 101)
    # hashing embedder, dim 256, float16
    assert est["embedding"]["storage"]["value"] == 4000 * 256 * 2
    # IVF1024,PQ32: codes + ids + centroids + codebooks
    assert est["index"]["memory"]["value"] == 4000 * (32 + 8) + 1024 * 256 * 4 + 256 * 256 * 4
    per_q = 1024 * 256 * 2 + 4000 * 16 / 1024 * 32 * 2 + 16 * 256 * 256 * 2
    assert est["search"]["flops_per_query"]["value"] == pytest.approx(per_q)
    assert est["search"]["seconds"]["value"] == pytest.approx(per_q * 400 / 100e9)
    out = est["output"]
    assert out["token_bytes"]["value"] == 2
    assert out["datasets"]["value"] == 100 * 1024 * (2 + 1 + 4)  # uint16 tokens, uint8 mask, int32 labels
    assert out["idx"]["value"] == 3 * (34 + 12 * 100 + 8 * 101)
    rows = 100 * (2 + 2 * (1022 / 101) - 1)
    assert out["span_rows"]["value"] == pytest.approx(rows)
    assert out["total"]["value"] == pytest.approx(100 * 1024 * 7 + 3 * 2042 + rows * SPAN_ROW_BYTES)
    # every figure says how it was computed
    for section in ("corpus", "synthesis", "index", "search", "output", "work_dir"):
        for fig in est[section].values():
            if isinstance(fig, dict) and "value" in fig:
                assert fig["formula"]
    assert any("index-train-size" in w for w in est["warnings"]) is False  # 262144 >= 39 * 1024


def test_gpu_embedding_arithmetic():
    cfg = _cfg(embedder="/models/some-embedder", index_factory="Flat")
    est = estimate_from_sample(cfg, SAMPLE, chunks=4000, samples=10, gpus=8, gpu="H100", mfu=0.5,
                               gpu_tflops=1000.0, embedder_params=500_000_000, embedder_dim=1024,
                               embedder_embedding_params=100_000_000)
    emb = est["embedding"]
    assert emb["flops_per_chunk"]["value"] == pytest.approx(2 * 500e6 * 100)
    assert emb["total_flops"]["value"] == pytest.approx(4e14)
    assert emb["gpu_hours"]["value"] == pytest.approx(4e14 / 5e14 / 3600)
    assert emb["wall_hours"]["value"] == pytest.approx(4e14 / 5e14 / 3600 / 8)
    assert emb["gpu_hours_non_embedding"]["value"] == pytest.approx(4e14 / 5e14 / 3600 * 0.8)
    assert "ESTIMATE" in emb["gpu_hours"]["note"]
    assert est["corpus"]["documents"]["value"] == 1000  # 4000 chunks / 4 chunks per document
    assert est["index"]["memory"]["value"] == 4000 * 1024 * 4
    # brute force: n * d * 2 per query, 40 queries, on 8 GPUs at half the fp32 peak
    assert est["search"]["flops_per_query"]["value"] == 4000 * 1024 * 2
    assert est["search"]["seconds"]["value"] == pytest.approx(40 * 4000 * 1024 * 2 / (8 * 67e12 * 0.5))
    text = format_estimate(est)
    assert "ESTIMATE" in text and "2 * params * tokens per chunk" in text
    # attention term when the shape is known: 4 * layers * t^2 * hidden
    est2 = estimate_from_sample(cfg, SAMPLE, chunks=4000, gpu_tflops=1000.0, embedder_params=500_000_000,
                                embedder_dim=1024, embedder_layers=24, embedder_hidden=1024)
    assert est2["embedding"]["flops_per_chunk"]["value"] == pytest.approx(1e11 + 4 * 24 * 100**2 * 1024)


def test_sizes_default_to_samples_and_max_samples():
    est = estimate_from_sample(_cfg(max_samples=7), SAMPLE, input_records=50, cpu_gflops=1.0)
    assert est["corpus"]["documents"]["value"] == 50
    assert est["corpus"]["documents"]["formula"].startswith("counted")
    assert est["synthesis"]["samples"]["value"] == 7
    est = estimate_from_sample(_cfg(), SAMPLE, documents=123, cpu_gflops=1.0)
    assert est["synthesis"]["samples"]["value"] == 123  # one per meta-document


def test_index_memory_formulas():
    n, d = 1000, 128
    assert index_memory("Flat", n, d)["value"] == n * d * 4
    assert index_memory("IVF100,Flat", n, d)["value"] == n * (d * 4 + 8) + 100 * d * 4
    paper = index_memory("IVF65536,PQ64", 644_000_000, 1024)
    assert paper["value"] == 644_000_000 * (64 + 8) + 65536 * 1024 * 4 + 256 * 1024 * 4
    assert index_memory("IVF256,PQ16x4fs", n, d)["value"] == n * (8 + 8) + 256 * d * 4 + 16 * d * 4
    assert index_memory("IVF64,SQ8", n, d)["value"] == n * (d + 8) + 64 * d * 4
    assert index_memory("OPQ16_64,IVF64,PQ16", n, d)["value"] == n * (16 + 8) + 64 * 64 * 4 + 256 * 64 * 4 + d * 64 * 4
    assert index_memory("PQ16", n, d)["value"] == n * 16 + 256 * d * 4
    hnsw = index_memory("HNSW32", n, d)
    assert hnsw["value"] == pytest.approx(n * d * 4 + n * 64 * 4 * 1.05 + n * 8) and "approximate" in hnsw["note"]
    unknown = index_memory("LSH", n, d)
    assert unknown["value"] is None and unknown["formula"] == "unknown"


@pytest.mark.parametrize("factory,kind,nlist", [
    ("Flat", "flat", None), ("IVF4096,Flat", "ivf", 4096), (" IVF65536 , PQ64 ", "ivf", 65536),
    ("IVF1024_HNSW32,PQ32", "ivf", 1024), ("HNSW32,Flat", "hnsw", None), ("IVF4096,Flat,RFlat", "ivf", 4096),
    ("IVF12,Foo", "unknown", None), ("", "unknown", None), ("IVFx,Flat", "unknown", None),
])
def test_parse_factory(factory, kind, nlist):
    p = parse_factory(factory)
    assert p["kind"] == kind and p["nlist"] == nlist


def test_warns_on_small_ivf_training_sample():
    est = estimate_from_sample(_cfg(index_factory="IVF65536,PQ64"), SAMPLE, chunks=10_000_000, cpu_gflops=1.0)
    assert any("--index-train-size" in w for w in est["warnings"])


def test_tiny_corpus_measured_and_matches_pipeline(tmp_path, docs_corpus, small_tokenizer_json):
    """Measured on a real (tiny) corpus: counts equal a direct chunking; the output size formula equals the
    bytes the pipeline writes."""
    from nextlong.pipeline import run
    from nextlong.tokenization import load_tokenizer

    docs = [json.loads(line) for line in docs_corpus.read_text(encoding="utf-8").splitlines()][:40]
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs) + "{broken\n", encoding="utf-8")
    cfg = SynthesisConfig(inputs=[str(corpus)], output_prefix=str(tmp_path / "out" / "tiny"),
                          tokenizer=str(small_tokenizer_json), target_length=1024, granularity=512, max_samples=3,
                          index_factory="Flat", verify=False)
    est = estimate(cfg, sample_docs=1000, gpus=0, cpu_gflops=10.0)
    texts = [d["text"][a:b] for d in docs for a, b in chunk_spans(d["text"], 512)]
    tok = load_tokenizer(str(small_tokenizer_json))
    n_tokens = sum(len(e) for e in tok.encode_batch(texts))
    assert est["measured"]["documents"] == 40
    assert est["measured"]["chunks"] == len(texts)
    assert est["measured"]["tokens"] == n_tokens
    assert est["corpus"]["documents"]["value"] == 41  # records counted in the input, the malformed line too
    assert est["corpus"]["chunks"]["value"] == round(41 * len(texts) / 40)
    assert est["embedding"]["cpu_hours"]["value"] > 0
    assert est["synthesis"]["samples"]["value"] == 3
    text = format_estimate(est)
    assert "n * d * 2" in text and "assumptions:" in text

    manifest = run(cfg, progress=False)
    prefix = Path(cfg.output_prefix)
    written = sum(Path(f"{prefix}_{n}_document.{e}").stat().st_size for n in ("text", "lossweight")
                  for e in ("bin", "idx"))
    assert manifest["counts"]["samples_out"] == 3
    assert written == est["output"]["datasets"]["value"] + est["output"]["idx"]["value"]
    assert math.isclose(manifest["counts"]["chunks"], len(texts))


def test_local_model_shape_read_from_directory(tmp_path, docs_corpus, small_tokenizer_json):
    """A local embedder directory: parameters from the safetensors headers, shape from config.json."""
    import struct

    from nextlong.estimate import describe_local_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000,
                                                   "max_position_embeddings": 514}))
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "emb": {"dtype": "F32", "shape": [1000, 64], "data_offsets": [0, 256000]},
                         "w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [256000, 272384]}}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(272384))
    found = describe_local_model(str(model))
    assert found == {"embedder_hidden": 64, "embedder_layers": 2, "embedder_max_tokens": 514, "embedder_dim": 64,
                     "embedder_embedding_params": 64000, "embedder_params": 64000 + 4096}
    assert describe_local_model(str(tmp_path / "absent")) == {}

    cfg = SynthesisConfig(inputs=[str(docs_corpus)], output_prefix=str(tmp_path / "o"), embedder=str(model),
                          tokenizer=str(small_tokenizer_json), target_length=2048, index_factory="Flat")
    est = estimate(cfg, sample_docs=50, chunks=10_000, gpus=1, gpu="A100", mfu=0.5, measure_throughput=False)
    e = est["embedding"]
    assert e["tokens_per_chunk"]["value"] <= min(est["measured"]["tokens_per_chunk"]["value"], 514)
    waste = e["padding_waste"]["value"]  # measured: the sample's chunks packed into --embed-batch-tokens batches
    assert 0.0 <= waste < 0.5 and e["padding_waste"]["note"] == "measured on the sample"
    t = e["tokens_per_chunk"]["value"] / (1 - waste)
    assert e["flops_per_chunk"]["value"] == pytest.approx(2 * 68096 * t + 4 * 2 * t**2 * 64)
    assert est["embedding"]["storage"]["value"] == 10_000 * 64 * 2
    assert est["embedding"]["gpu_hours"]["value"] == pytest.approx(
        est["embedding"]["total_flops"]["value"] / (312e12 * 0.5) / 3600)


def test_neural_embedder_padding_precision_and_gpu_count():
    """Padded tokens are paid for; fp32 uses the fp32 peak; --gpus 0 estimates for the CPU without dividing
    by zero, from a measured CPU rate when there is one."""
    sample = dict(SAMPLE, embed_tokens_per_chunk=100.0, embed_padding_waste=0.2, embed_truncated_share=0.0)
    cfg = _cfg(embedder="/models/some-embedder", index_factory="Flat")
    kw = dict(chunks=4000, samples=10, gpu="H100", mfu=0.5, embedder_params=500_000_000, embedder_dim=1024)
    est = estimate_from_sample(cfg, sample, gpus=8, **kw)
    emb = est["embedding"]
    assert emb["flops_per_chunk"]["value"] == pytest.approx(2 * 500e6 * 100 / 0.8)
    assert emb["gpu_hours"]["value"] == pytest.approx(4000 * 2 * 500e6 * 125 / (989e12 * 0.5) / 3600)
    assert emb["batches"]["value"] == pytest.approx(4000 * 125 / 16384)
    assert "bf16" in emb["embedder"] and "8 x H100" in emb["embedder"]
    fp32 = estimate_from_sample(_cfg(embedder="/m", index_factory="Flat", embed_precision="fp32"), sample, gpus=8,
                                **kw)
    assert fp32["embedding"]["gpu_hours"]["value"] == pytest.approx(emb["gpu_hours"]["value"] * 989 / 67)
    cpu = estimate_from_sample(cfg, sample, gpus=0, cpu_gflops=100.0, **kw)
    assert "gpu_hours" not in cpu["embedding"] and cpu["search"]["device"] == "cpu"
    assert cpu["embedding"]["cpu_hours"]["value"] == pytest.approx(4000 * 2 * 500e6 * 125 / 50e9 / 3600)
    # --embed-batch-tokens 0 (the default) is 16,384 on a GPU and 4,096 on a CPU; a value given is kept
    assert cpu["embedding"]["batches"]["value"] == pytest.approx(4000 * 125 / 4096)
    fixed = estimate_from_sample(_cfg(embedder="/m", index_factory="Flat", embed_batch_tokens=1000), sample,
                                 gpus=0, cpu_gflops=100.0, **kw)
    assert fixed["embedding"]["batches"]["value"] == pytest.approx(4000 * 125 / 1000)
    measured = dict(sample, embedder_cpu_chunks_per_second=8.0, embedder_cpu_chunks=64,
                    embedder_cpu_precision="bf16", embedder_cpu_threads=2)
    cpu2 = estimate_from_sample(cfg, measured, gpus=0, **kw)
    assert cpu2["embedding"]["cpu_hours"]["value"] == pytest.approx(4000 / 8.0 / 3600)
    assert "CPU, bf16" in cpu2["embedding"]["embedder"]
    format_estimate(cpu2)
    from nextlong.config import ConfigError

    with pytest.raises(ConfigError, match="--gpus"):
        estimate_from_sample(cfg, sample, gpus=-1, **kw)


def test_real_max_length_and_dimension_of_a_sentence_transformers_directory(tmp_path):
    """sentence-transformers truncates at sentence_bert_config.json's max_seq_length (e.g. 256 for
    all-MiniLM-L6-v2), not at config.json's max_position_embeddings (512); the output dimension is the pooling's."""
    from nextlong.estimate import describe_local_model

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 384, "num_hidden_layers": 6,
                                                      "max_position_embeddings": 512}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384}))
    found = describe_local_model(str(tmp_path))
    assert found["embedder_max_tokens"] == 256 and found["embedder_dim"] == 384


def test_dry_run_cli_takes_gpus_zero(tmp_path, docs_corpus, small_tokenizer_json, capsys):
    from nextlong.cli import main

    base = ["--input", str(docs_corpus), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
            str(small_tokenizer_json), "--dry-run", "--sample-docs", "30", "--estimate-chunks", "1000"]
    assert main(base + ["--gpus", "0"]) == 0
    out = capsys.readouterr().out
    assert "search on cpu" in out and "ZeroDivision" not in out
    assert main(base + ["--gpus", "-1"]) == 2
    assert not (tmp_path / "o.work").exists()
