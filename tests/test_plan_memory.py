"""launch/plan_memory.py against figures derived here, independently of the program's output.

* A small config: every term is recomputed from the config values with the term's own arithmetic (the sizes of the
  tensors GPT-NeoX allocates), and the totals are sums of those recomputed terms, never numbers read off the
  program's printout.
* Llama-3-8B: the parameter count from the architecture of Meta's config.json (8,030,261,248, the "8.03B" Meta
  publishes); the model-state memory against the figures the ZeRO paper publishes for a 7.5B-parameter model on 64
  data-parallel GPUs with mixed-precision Adam (Rajbhandari et al., 2020, Figure 1: 120 GB baseline, 31.4 GB with
  optimizer-state partitioning, 16.6 GB with gradients partitioned too), scaled by parameters; and the activation
  checkpoints against the full-recomputation formula of Korthikanti et al., 2022 (Table 2: 2sbhL bytes, divided by
  the tensor-parallel size t with sequence parallelism).
* The two one-file recipes: fit with margin, and the stock attention mask alone (9 s^2 bytes) would not.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "neox"
GIB = 2**30


def _load_plan_memory():
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "launch" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_memory"] = module
    spec.loader.exec_module(module)
    return module


pm = _load_plan_memory()

SMALL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 96,
    "mlp_multiple_of": 16,
    "activation": "swiglu",
    "norm": "rmsnorm",
    "use_bias_in_norms": False,
    "use_bias_in_attn_linear": False,
    "use_bias_in_mlp": False,
    "no_weight_tying": True,
    "make_vocab_size_divisible_by": 8,
    "attention_config": [[["flash"], 2]],
    "seq_length": 256,
    "model_parallel_size": 2,
    "pipe_parallel_size": 0,
    "sequence_parallel": True,
    "checkpoint_activations": True,
    "checkpoint_num_layers": 1,
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "precision": "bfloat16",
    "data_types": {"grad_accum_dtype": "fp32"},
    "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000, "allgather_bucket_size": 1000},
    "nextlong_loss_chunk_size": 64,
    "train_iters": 10,
}
VOCAB = 1000
OPTS = pm.Options(vocab_size=VOCAB, overhead_gib=0.0)


def small_expected() -> dict:
    """Every term of SMALL's single stage, derived from the config values (GPT-NeoX's tensor sizes)."""
    c = SMALL
    h, heads, kv, L = c["hidden_size"], c["num_attention_heads"], c["num_kv_heads"], c["num_layers"]
    d = h // heads
    s, b, tp = c["seq_length"], c["train_micro_batch_size_per_gpu"], c["model_parallel_size"]
    gpus = c["train_batch_size"] // (b * c["gradient_accumulation_steps"]) * tp
    dp = gpus // tp
    # GPT-NeoX ParallelMLP with a gated activation: ffn = int(I * 2/3) rounded up to 2 x multiple (fused gate+up),
    # ffn // 2 rounded up to the multiple (down-projection input)
    m = c["mlp_multiple_of"]
    ffn = -(-int(c["intermediate_size"] * 2 / 3) // (2 * m)) * (2 * m)
    ffn_in = -(-(ffn // 2) // m) * m
    # vocabulary padded to a multiple of make_vocab_size_divisible_by x TP
    q = c["make_vocab_size_divisible_by"] * tp
    v = -(-VOCAB // q) * q
    layer_tp = h * (h + 2 * kv * d) + h * h + h * ffn + ffn_in * h  # qkv, dense, linear1, linear2 (no biases)
    layer_rep = 2 * h  # two RMSNorm scales
    params_gpu = L * (layer_tp // tp + layer_rep) + v * h // tp + v * h // tp + h  # + embedding, head, final norm
    chunk = c["nextlong_loss_chunk_size"]
    e = {
        "ffn": ffn, "ffn_in": ffn_in, "vocab": v, "layer_tp": layer_tp, "layer_rep": layer_rep,
        "total_params": 2 * v * h + h + L * (layer_tp + layer_rep), "params_gpu": params_gpu, "dp": dp,
        "gpus": gpus, "tokens_per_step": c["train_batch_size"] * s,
        # persistent: bf16 weights, fp32 gradients (grad_accum_dtype), 12 B/param fp32 master + Adam sharded (ZeRO-1)
        "weights": 2 * params_gpu,
        "gradients": 4 * params_gpu,
        "optimizer states": 12 * params_gpu / dp,
        "ZeRO buckets": 2 * (1000 + 1000),
        # one bf16 [s, b, h] input per layer, split over TP by sequence parallelism
        "activation checkpoints": 2 * s * b * h * L / tp,
        # one layer's activations + their grads: q,k,v + attention out + 3 f_in MLP (split), 4 h norms (SP-split)
        "recompute working set": 2 * 2 * s * b * ((h + 2 * kv * d + h + 3 * ffn_in) / tp + 4 * h / tp),
        # fp32 dq + expanded bf16 dk, dv (GQA) per (h / TP) channels, fp32 log-sum-exp per head
        "flash-attention workspace": s * b * (h // tp) * (4 + 4) + s * b * (heads // tp) * 4,
        "LM-head input (gathered)": 2 * s * b * h,
        "logits bf16 + their grad": (2 + 2) * s * b * (v // tp),
        "loss chunk fp32 buffers": 12 * chunk * b * (v // tp),
        "labels, loss mask, loss weights": (8 + 4 + 4) * s * b,
        "rotary cos/sin cache": 2 * 4 * s * d,
        # GPT-NeoX get_attn_mask: fp32 ones [s, s], fp32 tril, bool result
        "stock [s, s] attention mask": (4 + 4 + 1) * s * s,
        "CUDA context, NCCL, allocator reserve": 0,  # OPTS.overhead_gib = 0
    }
    logits = e["LM-head input (gathered)"] + e["logits bf16 + their grad"] + e["loss chunk fp32 buffers"] + e[
        "labels, loss mask, loss weights"]
    layer = e["recompute working set"] + e["flash-attention workspace"]
    e["peak"] = max(logits, layer)
    e["persistent"] = e["weights"] + e["gradients"] + e["optimizer states"] + e["ZeRO buckets"]
    e["without mask"] = e["persistent"] + e["activation checkpoints"] + e["peak"] + e["rotary cos/sin cache"]
    return e


def _terms(st) -> dict:
    return {t.name: t.nbytes for t in st.persistent + st.checkpoints + st.logits_phase + st.layer_phase + st.fixed}


def test_small_config_term_by_term() -> None:
    e = small_expected()
    assert pm.mlp_sizes(SMALL) == (e["ffn"], e["ffn_in"])
    assert pm.padded_vocab(VOCAB, SMALL) == e["vocab"]
    pc = pm.count_parameters(SMALL, VOCAB)
    assert (pc.layer_tp, pc.layer_replicated, pc.total) == (e["layer_tp"], e["layer_rep"], e["total_params"])

    batch, stages = pm.plan(SMALL, OPTS)
    assert (batch.data_parallel, batch.num_gpus, batch.tokens_per_step) == (e["dp"], e["gpus"], e["tokens_per_step"])
    (st,) = stages
    assert st.params == e["params_gpu"]
    terms = _terms(st)
    assert len(terms) == 14  # every term of the stage is checked below
    for name, nbytes in terms.items():
        assert nbytes == pytest.approx(e[name], rel=1e-12), name
    assert st.peak_phase == pytest.approx(e["peak"], rel=1e-12)
    assert st.total == pytest.approx(e["without mask"] + e["stock [s, s] attention mask"], rel=1e-12)

    total, dense, attn = pm.step_flops(SMALL, batch, VOCAB)
    # 6 FLOPs per matmul parameter per token (forward 2 + backward 4); attention 6 L h s^2 per sequence (causal)
    matmul = SMALL["num_layers"] * e["layer_tp"] + e["vocab"] * SMALL["hidden_size"]  # layers + LM head
    assert dense == 6 * matmul * e["tokens_per_step"]
    assert attn == 6 * SMALL["num_layers"] * SMALL["hidden_size"] * SMALL["seq_length"] ** 2 * SMALL["train_batch_size"]
    assert total == dense + attn


def test_compact_attention_mask_counts_the_placeholder() -> None:
    e = small_expected()
    cfg = dict(SMALL, nextlong_compact_attention_mask=True)
    _, (st,) = pm.plan(cfg, OPTS)
    fixed = {t.name: t.nbytes for t in st.fixed}
    assert "stock [s, s] attention mask" not in fixed
    assert fixed["attention mask placeholder"] == 1  # (1, 1, 1, 1) bool
    assert st.total == pytest.approx(e["without mask"] + 1, rel=1e-12)
    # --stock-attention-mask shows what the key saves
    _, (stock,) = pm.plan(cfg, pm.Options(vocab_size=VOCAB, overhead_gib=0.0, stock_attention_mask=True))
    assert {t.name: t.nbytes for t in stock.fixed}["stock [s, s] attention mask"] == 9 * 256**2
    assert stock.total == pytest.approx(e["without mask"] + 9 * 256**2, rel=1e-12)


def test_document_attention_terms() -> None:
    """int64 ids [b, s+1], bool starts [b, s], int32 cu_seqlens + int64 nonzero index (<= b s + 1 documents);
    global layers add the bool block-diagonal mask [b, s, s] and an int32 cumulative sum [b, s]."""
    e = small_expected()
    s, b = SMALL["seq_length"], SMALL["train_micro_batch_size_per_gpu"]
    ids = 8 * b * (s + 1) + 1 * b * s + (4 + 8) * (b * s + 1)
    cfg = dict(SMALL, nextlong_compact_attention_mask=True, nextlong_document_attention=True)
    _, (st,) = pm.plan(cfg, OPTS)
    fixed = {t.name: t.nbytes for t in st.fixed}
    assert fixed["document attention ids, starts, cu_seqlens"] == ids
    assert "block-diagonal mask (global layers)" not in fixed
    assert st.total == pytest.approx(e["without mask"] + 1 + ids, rel=1e-12)
    glob = dict(SMALL, attention_config=[[["global"], 2]], nextlong_document_attention=True)
    _, (sg,) = pm.plan(glob, OPTS)
    assert {t.name: t.nbytes for t in sg.fixed}["block-diagonal mask (global layers)"] == b * s * s + 4 * b * s
    # with pipeline stages the starts also travel as an fp16 buffer per in-flight micro-batch
    pipe = dict(cfg, pipe_parallel_size=2, train_batch_size=4)
    _, stages = pm.plan(pipe, OPTS)
    in_flight = min(2, SMALL["gradient_accumulation_steps"])
    got = {t.name: t.nbytes for t in stages[0].fixed}["document attention ids, starts, cu_seqlens"]
    assert got == 8 * b * (s + 1) + (1 + 2) * b * s * in_flight + 12 * (b * s + 1)


def test_unchunked_loss_uses_stock_buffers() -> None:
    e = small_expected()
    cfg = dict(SMALL, nextlong_loss_chunk_size=0)
    _, (st,) = pm.plan(cfg, OPTS)
    terms = {t.name: t.nbytes for t in st.logits_phase}
    # bf16 logits, fp32 copy, fp32 softmax, bf16 grad per [s, b, V/TP]
    assert terms["logits + stock cross-entropy"] == (2 + 4 + 4 + 2) * 256 * 2 * (e["vocab"] // 2)


def test_batch_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="batch mismatch"):
        pm.batch_layout(SMALL, num_gpus=8)


def test_duplicate_keys_rejected(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    a.write_text("seq_length: 8\n")
    b.write_text("seq-length: 8\n")
    with pytest.raises(ValueError, match="already set"):
        pm.load_configs([a, b])


def test_main_prints_formulas_and_total(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e = small_expected()
    cfg = tmp_path / "small.yml"
    cfg.write_text(yaml.safe_dump(SMALL))
    assert pm.main([str(cfg), "--vocab-size", str(VOCAB), "--overhead-gib", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"total per GPU: {(e['without mask'] + e['stock [s, s] attention mask']) / GIB:.2f} GiB"
    assert any("= 2 B x P_gpu" in line for line in out)
    assert any(line.startswith("batch:") and f"{e['tokens_per_step']:,}" in line for line in out)


# ---- Llama-3-8B against published figures ----

#: Meta-Llama-3-8B config.json
HF = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
      "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def _hf_parameter_count() -> int:
    h, f, L, v = HF["hidden_size"], HF["intermediate_size"], HF["num_hidden_layers"], HF["vocab_size"]
    kv_dim = HF["num_key_value_heads"] * h // HF["num_attention_heads"]
    layer = h * h + 2 * h * kv_dim + h * h + 3 * h * f + 2 * h  # q, k, v, o, gate/up/down, two RMSNorms
    return v * h + L * layer + h + v * h  # embed_tokens, layers, final norm, lm_head


def _llama(**changes) -> dict:
    cfg = pm.load_configs([CONFIGS / "llama3_8b.yml"])
    cfg.update({"seq_length": 8192, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "precision": "bfloat16", "checkpoint_activations": True, "checkpoint_num_layers": 1})
    cfg.update(changes)
    return cfg


def test_llama3_8b_parameter_count_is_metas() -> None:
    assert _hf_parameter_count() == 8_030_261_248
    assert pm.count_parameters(_llama()).total == _hf_parameter_count()


@pytest.mark.parametrize(("zero", "published_gb"), [(0, 120.0), (1, 31.4), (2, 16.6)])
def test_model_states_match_the_zero_paper(zero: int, published_gb: float) -> None:
    """ZeRO (Rajbhandari et al., 2020), Figure 1: Psi = 7.5B, N_d = 64, mixed-precision Adam (K = 12):
    (2 + 2 + K) Psi = 120 GB; P_os: 2 Psi + 2 Psi + K Psi / N_d = 31.4 GB; P_os+g: 2 Psi + (2 + K) Psi / N_d = 16.6 GB.
    Llama-3-8B at TP 1, DP 64, bf16 gradients must take the same bytes per parameter."""
    cfg = _llama(model_parallel_size=1, pipe_parallel_size=0, sequence_parallel=False, train_batch_size=64,
                 zero_optimization={"stage": zero, "reduce_bucket_size": 0, "allgather_bucket_size": 0})
    cfg.pop("data_types", None)
    _, (st,) = pm.plan(cfg, pm.Options(num_gpus=64))
    states = sum(t.nbytes for t in st.persistent if t.name in {"weights", "gradients", "optimizer states"})
    psi = pm.count_parameters(cfg).total
    assert states / 1e9 == pytest.approx(published_gb * psi / 7.5e9, rel=0.005)


@pytest.mark.parametrize("recipe", ["llama3_128k.yml", "llama3_512k.yml"])
def test_checkpoints_match_full_recomputation_formula(recipe: str) -> None:
    """Korthikanti et al., 2022, Table 2: with full activation recomputation a layer keeps its input, 2sbh bytes,
    and sequence parallelism divides it by t; the first pipeline stage holds PP in-flight micro-batches at most."""
    cfg = pm.load_configs([CONFIGS / recipe])
    batch, stages = pm.plan(cfg, pm.Options())
    s, b, h, t = batch.seq_length, batch.micro_batch, cfg["hidden_size"], cfg["model_parallel_size"]
    pp = max(1, cfg["pipe_parallel_size"])
    layers_per_stage = cfg["num_layers"] // pp
    for i, st in enumerate(stages):
        in_flight = min(pp - i, batch.grad_accum) if pp > 1 else 1
        got = {x.name: x.nbytes for x in st.checkpoints}["activation checkpoints"]
        assert got == 2 * s * b * h * layers_per_stage * in_flight / t


# ---- the recipes: one file each ----


@pytest.mark.parametrize(
    ("recipe", "gpus"),
    [("llama3_128k.yml", 64), ("llama3_512k.yml", 128)],
)
def test_recipes_fit_80gb_with_margin(recipe: str, gpus: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert pm.main([str(CONFIGS / recipe)]) == 0  # the same single file deepy.py takes
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"total per GPU: ([0-9.]+) GiB", last)
    assert m, last
    assert float(m.group(1)) < 79.6 - 15.0  # at least 15 GiB of headroom on an 80 GB H100
    cfg = pm.load_configs([CONFIGS / recipe])
    batch, stages = pm.plan(cfg, pm.Options())
    assert batch.num_gpus == gpus
    assert batch.tokens_per_step == 4_194_304
    assert cfg["nextlong_compact_attention_mask"] is True
    assert all("document attention ids, starts, cu_seqlens" in {t.name for t in st.fixed} for st in stages)


@pytest.mark.parametrize("recipe", ["llama3_128k.yml", "llama3_512k.yml"])
def test_recipes_cannot_start_with_the_stock_mask(recipe: str) -> None:
    cfg = pm.load_configs([CONFIGS / recipe])
    s = cfg["seq_length"]
    _, stages = pm.plan(cfg, pm.Options())
    assert all(t.nbytes == 1 for st in stages for t in st.fixed if "attention mask" in t.name)
    for variant, opts in ((dict(cfg, nextlong_compact_attention_mask=False), pm.Options()),
                          (cfg, pm.Options(stock_attention_mask=True))):
        _, stock = pm.plan(variant, opts)
        assert min(st.total for st in stock) > 9 * s * s  # the dense mask alone: 144 GiB (128K), 2.25 TiB (512K)
        assert 9 * s * s > 80e9


def test_512k_needs_chunked_loss() -> None:
    cfg = pm.load_configs([CONFIGS / "llama3_512k.yml"])
    _, stages = pm.plan(dict(cfg, nextlong_loss_chunk_size=0), pm.Options())
    assert max(st.total for st in stages) / GIB > 79.6
