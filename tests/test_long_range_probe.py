"""bench/long_range_probe.py: argument checks and config (fast); the --quick experiment end to end on real
GPT-NeoX only when GPT_NEOX_DIR is set (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import long_range_probe as lrp  # noqa: E402

NEOX_DIR = os.environ.get("GPT_NEOX_DIR")
NEOX_PYTHON = os.environ.get("NEOX_PYTHON", sys.executable)


def test_bad_arguments_exit_2(tmp_path, capsys):
    neox = tmp_path / "neox"
    neox.mkdir()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n')
    assert lrp.main(["--gpt-neox", str(neox), "--out", str(tmp_path / "o"), "--corpus", str(corpus)]) == 2
    assert "no deepy.py there" in capsys.readouterr().err
    (neox / "deepy.py").write_text("")
    assert lrp.main(["--gpt-neox", str(neox), "--out", str(tmp_path / "o"), "--corpus", str(tmp_path / "nope")]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert lrp.main(["--gpt-neox", str(neox), "--out", str(tmp_path / "o"), "--corpus", str(corpus),
                     "--train-iters", "0"]) == 2
    assert "--train-iters: must be >= 1" in capsys.readouterr().err


def test_out_dir_pinned_to_its_settings(tmp_path, capsys):
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "deepy.py").write_text("")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\nnot json\n')
    base = ["--gpt-neox", str(neox), "--out", str(tmp_path / "o"), "--corpus", str(corpus), "--quick"]
    assert lrp.main([*base, "--stages", "split"]) == 2  # line 3 is not JSON
    assert "c.jsonl: line 3: not a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "o" / "split" / "train.jsonl").exists(), "nothing published on error"
    corpus.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n')
    assert lrp.main([*base, "--stages", "split"]) == 0
    assert lrp.main([*base, "--stages", "split", "--threads", "2"]) == 0  # threads do not change results
    assert lrp.main([*base, "--stages", "split", "--train-iters", "7"]) == 2
    assert "made with other settings (train_iters)" in capsys.readouterr().err


def test_neox_config_llama_shapes():
    """The MLP sizing that makes GPT-NeoX build, and the converter describe, an HF Llama MLP of 4 x hidden."""
    import yaml

    s = lrp.Settings(corpus="c")
    cfg = lrp.neox_config(s, seed=3, env=lrp.Env(Path("."), "python"), port=29999)
    h, ffn, mult = cfg["hidden_size"], cfg["intermediate_size"], cfg["mlp_multiple_of"]
    # GPT-NeoX's ParallelMLP rule for gated activations (megatron/model/transformer.py)
    fused = 2 * mult * ((int(ffn * 2 / 3) + 2 * mult - 1) // (2 * mult))
    down_in = mult * ((int(ffn * 2 / 3) // 2 + mult - 1) // mult)
    assert (fused, down_in) == (2 * 4 * h, 4 * h) and ffn == 4 * h
    assert cfg["use_bias_in_mlp"] is False and cfg["seed"] == 3 and cfg["seq_length"] == 2048
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
    assert cfg["checkpoint_factor"] * s.checkpoints == s.train_iters
    assert cfg["optimizer"]["params"]["lr"] == s.lr and cfg["min_lr"] == pytest.approx(s.lr / 10)
    tiny = yaml.safe_load((ROOT / "configs" / "neox" / "tiny_cpu.yml").read_text())
    assert set(tiny) <= set(cfg), "every tiny_cpu.yml key is kept"


@pytest.mark.neox
@pytest.mark.skipif(not NEOX_DIR, reason="GPT_NEOX_DIR is not set (path to a GPT-NeoX checkout)")
def test_quick_experiment_end_to_end(tmp_path, openstax_path, capsys):
    out = tmp_path / "probe"
    cmd = [sys.executable, str(ROOT / "bench" / "long_range_probe.py"), "--gpt-neox", NEOX_DIR, "--neox-python",
           NEOX_PYTHON, "--corpus", str(openstax_path), "--out", str(out), "--quick", "--master-port", "29911"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    with capsys.disabled():
        print("\n" + (out / "results.md").read_text())
    methods = {t["method"] for t in summary["table"]}
    assert methods == {"nextlong", "standard"}
    for name, r in summary["conversion_check"].items():
        assert r["labels_equal"] and r["max_abs_diff"] <= r["tolerance"], name
    for t in summary["table"]:
        for key in ("train_loss", "openstax_heldout_loss", "pydocs_heldout_loss", "openstax_gain", "pydocs_gain"):
            assert t[key] == t[key], key  # finite numbers, not NaN
        assert 0.0 <= t["passkey_accuracy"] <= 1.0
    held = {json.loads(line)["id"] for line in (out / "split" / "heldout.jsonl").read_text().splitlines()}
    trained = {json.loads(line)["id"] for line in (out / "split" / "train.jsonl").read_text().splitlines()}
    assert held and not held & trained
    for png in ("gain_vs_distance.png", "training_and_gain_over_steps.png"):
        assert (out / png).stat().st_size > 1000
    # a rerun finds every stage done
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "train nextlong" not in again.stderr


def test_mha_qkv_resplit_per_head(tmp_path):
    """GPT-NeoX's fused QKV of a multi-head model is per head ([heads, 3, head_dim]); the converter splits it in
    blocks. After fix_mha_qkv the HF q/k/v are the per-head slices; a grouped-query config is left alone."""
    import torch
    from safetensors.torch import load_file, save_file

    heads, hd, hidden = 4, 8, 32
    fused = torch.randn(3 * heads * hd, hidden)
    blocks = fused.split(heads * hd)  # what the converter writes
    sd = {"model.layers.0.self_attn.q_proj.weight": blocks[0].clone(),
          "model.layers.0.self_attn.k_proj.weight": blocks[1].clone(),
          "model.layers.0.self_attn.v_proj.weight": blocks[2].clone(),
          "model.layers.0.mlp.up_proj.weight": torch.randn(3, 3)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert not lrp.fix_mha_qkv(tmp_path, {"num_attention_heads": heads, "num_kv_heads": 2, "hidden_size": hidden})
    assert lrp.fix_mha_qkv(tmp_path, {"num_attention_heads": heads, "hidden_size": hidden})
    out = load_file(str(tmp_path / "model.safetensors"))
    per_head = fused.view(heads, 3, hd, hidden)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(out[f"model.layers.0.self_attn.{name}.weight"],
                                   per_head[:, i].reshape(heads * hd, hidden), rtol=0, atol=0)
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])
