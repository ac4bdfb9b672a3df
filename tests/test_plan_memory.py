"""launch/plan_memory.py pinned against hand-computed figures for a small config, and the two recipes' fit."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "neox"


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
OPTS = pm.Options(vocab_size=1000, overhead_gib=0.0)


def test_small_config_by_hand() -> None:
    # MLP: int(96 * 2/3) = 64 -> multiple of 32 -> 64 (gate+up); 64 // 2 = 32 -> multiple of 16 -> 32 (down input)
    assert pm.mlp_sizes(SMALL) == (64, 32)
    # vocab 1000 padded to a multiple of 8 x TP 2 = 16 -> 1008
    assert pm.padded_vocab(1000, SMALL) == 1008
    pc = pm.count_parameters(SMALL, 1000)
    # attention: q,k,v = 64 x (64 + 2 x 2 x 16) = 8192, o = 64 x 64 = 4096; MLP 64 x 64 + 32 x 64 = 6144
    assert pc.layer_tp == 8192 + 4096 + 6144
    assert pc.layer_replicated == 128
    # 2 x 1008 x 64 (embedding + head) + 64 (final norm) + 2 x (18432 + 128)
    assert pc.total == 166208

    batch, stages = pm.plan(SMALL, OPTS)
    assert (batch.data_parallel, batch.num_gpus, batch.tokens_per_step) == (2, 4, 2048)
    (st,) = stages
    # params per GPU: 2 x (18432 / 2 + 128) + 64512 / 2 + 64512 / 2 + 64
    assert st.params == 83264
    terms = {t.name: t.nbytes for t in st.persistent + st.checkpoints + st.logits_phase + st.layer_phase + st.fixed}
    assert terms["weights"] == 2 * 83264
    assert terms["gradients"] == 4 * 83264
    assert terms["optimizer states"] == 12 * 83264 / 2
    assert terms["ZeRO buckets"] == 2 * (1000 + 1000)
    # 2 B x s 256 x b 2 x h 64 x 2 layers / TP 2
    assert terms["activation checkpoints"] == 65536
    # 2 x (2 B x 256 x 2 x [(64 + 64 + 64 + 96) / 2 + 256 / 2])
    assert terms["recompute working set"] == 557056
    # 256 x 2 x 32 x 8 + 256 x 2 x 2 x 4
    assert terms["flash-attention workspace"] == 135168
    assert terms["LM-head input (gathered)"] == 65536
    # (2 + 2) B x 256 x 2 x 504 ; 12 B x 64 x 2 x 504 ; 16 B x 256 x 2
    assert terms["logits bf16 + their grad"] == 1032192
    assert terms["loss chunk fp32 buffers"] == 774144
    assert terms["labels, loss mask, loss weights"] == 8192
    assert terms["rotary cos/sin cache"] == 32768
    # no nextlong_compact_attention_mask: stock GPT-NeoX's dense mask, 9 B x 256^2
    assert terms["stock [s, s] attention mask"] == 589824
    assert st.peak_phase == 1880064
    assert st.total == 2981536 + 589824

    total, dense, attn = pm.step_flops(SMALL, batch, 1000)
    assert dense == 6 * (64512 + 2 * 18432) * 2048
    assert attn == 6 * 2 * 64 * 256**2 * 8
    assert total == 1648361472


def test_compact_attention_mask_counts_the_placeholder() -> None:
    cfg = dict(SMALL, nextlong_compact_attention_mask=True)
    _, (st,) = pm.plan(cfg, OPTS)
    fixed = {t.name: t.nbytes for t in st.fixed}
    assert "stock [s, s] attention mask" not in fixed
    assert fixed["attention mask placeholder"] == 1  # (1, 1, 1, 1) bool
    assert st.total == 2981536 + 1
    # --stock-attention-mask shows what the key saves
    _, (stock,) = pm.plan(cfg, pm.Options(vocab_size=1000, overhead_gib=0.0, stock_attention_mask=True))
    assert {t.name: t.nbytes for t in stock.fixed}["stock [s, s] attention mask"] == 9 * 256**2
    assert stock.total == 2981536 + 589824


def test_unchunked_loss_uses_stock_buffers() -> None:
    cfg = dict(SMALL, nextlong_loss_chunk_size=0)
    _, (st,) = pm.plan(cfg, OPTS)
    terms = {t.name: t.nbytes for t in st.logits_phase}
    assert terms["logits + stock cross-entropy"] == 12 * 256 * 2 * 504


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
    cfg = tmp_path / "small.yml"
    cfg.write_text(yaml.safe_dump(SMALL))
    assert pm.main([str(cfg), "--vocab-size", "1000", "--overhead-gib", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"total per GPU: {(2981536 + 589824) / 2**30:.2f} GiB"
    assert any("= 2 B x P_gpu" in line for line in out)
    assert any(line.startswith("batch:") and "2,048" in line for line in out)


@pytest.mark.parametrize(
    ("recipe", "gpus"),
    [("llama3_128k.yml", 64), ("llama3_512k.yml", 128)],
)
def test_recipes_fit_80gb_with_margin(recipe: str, gpus: int, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(CONFIGS / "llama3_8b.yml"), str(CONFIGS / recipe)]
    assert pm.main(paths) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"total per GPU: ([0-9.]+) GiB", last)
    assert m, last
    assert float(m.group(1)) < 79.6 - 15.0  # at least 15 GiB of headroom
    cfg = pm.load_configs(paths)
    batch, _ = pm.plan(cfg, pm.Options())
    assert batch.num_gpus == gpus
    assert batch.tokens_per_step == 4_194_304
    assert cfg["nextlong_compact_attention_mask"] is True


@pytest.mark.parametrize("recipe", ["llama3_128k.yml", "llama3_512k.yml"])
def test_recipes_cannot_start_with_the_stock_mask(recipe: str) -> None:
    cfg = pm.load_configs([CONFIGS / "llama3_8b.yml", CONFIGS / recipe])
    _, stages = pm.plan(cfg, pm.Options())
    assert all(t.nbytes == 1 for st in stages for t in st.fixed if "attention mask" in t.name)
    for variant, opts in ((dict(cfg, nextlong_compact_attention_mask=False), pm.Options()),
                          (cfg, pm.Options(stock_attention_mask=True))):
        _, stock = pm.plan(variant, opts)
        assert min(st.total for st in stock) / 2**30 > 79.6 + 60  # 144 GiB (128K) / 2.25 TiB (512K) mask alone


def test_512k_needs_chunked_loss() -> None:
    cfg = pm.load_configs([CONFIGS / "llama3_8b.yml", CONFIGS / "llama3_512k.yml"])
    _, stages = pm.plan(dict(cfg, nextlong_loss_chunk_size=0), pm.Options())
    assert max(st.total for st in stages) / 2**30 > 79.6
