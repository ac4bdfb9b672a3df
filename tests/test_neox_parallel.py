"""Model parallelism on real GPT-NeoX (CPU, gloo, 2 ranks) with the plugin's weighted loss.

Skipped unless ``GPT_NEOX_DIR`` is set (environment: docs/neox_plugin.md; ``NEOX_PYTHON``). Data: NExtLong
samples made by ``make_nextlong_bin.py`` from the built-in corpus with the portable ``builtin:cl100k_base``
tokenizer (``launch/neox_cpu_smoke.py``'s ``make_data``). Every run trains ``configs/neox/tiny_cpu.yml`` with
``use_cpu_initialization: true`` (GPT-NeoX then builds each weight whole from the seed and gives every
tensor-parallel rank its slice, so the TP 2 model equals the TP 1 model) for 2 steps.

* **TP 2** (``model_parallel_size: 2``): the step-1 loss equals the single-rank run's. Both runs use
  ``activation: gelu`` instead of the tiny config's SwiGLU: GPT-NeoX's gated MLP chunks *each rank's slice* of
  ``linear1`` into value and gate halves, so under TP 2 the same master weights pair other rows than under TP 1
  and the two models are different functions (a property of GPT-NeoX's layout, not of the loss). On each of the two
  ranks the labels and weights the loss received equal the ones cut here from the ``.bin`` files (mask shifted
  like the labels), and the two vocabulary halves of the logits, put together, recompute the logged loss.
* **PP 2** (``pipe_parallel_size: 2``, one transformer layer per stage): the loss, labels and mask exist only on
  the last stage (rank 1). There the labels and weights equal the data and the logits recompute the logged step-1
  loss; stage 0 computes no loss. Equality with a single-rank run cannot be established with GPT-NeoX ea7aefd8 +
  DeeperSpeed 91d1c55b on CPU, for two reasons seen here: (1) DeepSpeed's ``PipelineModule`` builds only its
  stage's layers and GPT-NeoX passes ``seed_layers=False``, so stage 1's initial weights come from another part
  of the random stream than in a single process; (2) starting both runs from one checkpoint with weights only
  (``finetune: true``) stopped in ``deepspeed/runtime/engine.py`` with ``AttributeError: 'FusedAdam' object has
  no attribute 'refresh_fp32_params'`` (fp32 without ZeRO, the set-up that runs on CPU here; ``no_load_optim``
  takes the same ``load_module_only`` path in ``megatron/checkpointing.py``). The single-rank
  ``pipe_parallel_size: 1`` run is printed beside it.
* TP 2 x PP 2 needs 4 processes, more than this CPU test runs; the recipes' TP 4 / TP 8 x PP 2 need GPUs.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NEOX_DIR = os.environ.get("GPT_NEOX_DIR")
NEOX_PYTHON = os.environ.get("NEOX_PYTHON", sys.executable)
RUN_TIMEOUT = int(os.environ.get("NEOX_RUN_TIMEOUT", "2400"))
pytestmark = [
    pytest.mark.neox,
    pytest.mark.skipif(not NEOX_DIR, reason="GPT_NEOX_DIR is not set (path to a GPT-NeoX checkout)"),
]
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm_loss: ([0-9.eE+-]+|nan)")
REL = 2e-6  # GPT-NeoX logs 7 significant digits
PARALLEL_REL = 1e-5  # a reduction over 2 ranks sums in another order than 1 rank


def _smoke():
    spec = importlib.util.spec_from_file_location("neox_cpu_smoke", REPO / "launch" / "neox_cpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    smoke = _smoke()
    root = tmp_path_factory.mktemp("neox_parallel")
    tok, text, mask = smoke.make_data(root, 512, 24)
    return {"root": root, "tok": tok, "text": text, "mask": mask, "smoke": smoke}


def _train(d: dict, name: str, ranks: int, **changes) -> dict:
    import yaml

    run = d["root"] / name
    run.mkdir()
    cfg = yaml.safe_load((REPO / "configs" / "neox" / "tiny_cpu.yml").read_text())
    cfg.update(train_iters=2, lr_decay_iters=2, eval_interval=1000, checkpoint_factor=1000,
               use_cpu_initialization=True, global_num_gpus=ranks, num_gpus=ranks)
    cfg.update(changes)
    cfg.update({"train_data_paths": [d["text"]], "valid_data_paths": [d["text"]], "test_data_paths": [d["text"]],
                "train_data_weights": [1.0], "valid_data_weights": [1.0], "test_data_weights": [1.0],
                "vocab_file": str(d["tok"]), "log_dir": str(run / "logs"), "master_port": d["smoke"].free_port()})
    cfg.setdefault("save", str(run / "checkpoints"))
    (run / "config.yml").write_text(yaml.safe_dump(cfg))
    env = d["smoke"].neox_env(NEOX_PYTHON, run / "dump")
    env["NEXTLONG_DEBUG_DUMP_ALL_RANKS"] = "1"
    proc = subprocess.run([NEOX_PYTHON, "deepy.py", "train.py", str(run / "config.yml")], cwd=NEOX_DIR, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    (run / "run.log").write_text(log)
    assert proc.returncode == 0, f"{name} failed (log {run / 'run.log'}):\n{log[-4000:]}"
    losses = {int(i): float(v) for i, v in LOSS_RE.findall(log)}
    steps = list(range(1, cfg["train_iters"] + 1))
    assert sorted(losses) == steps and "NExtLong loss weights on" in log, log[-3000:]
    return {"losses": losses, "dump": run / "dump", "cfg": cfg, "run": run}


def _check_rank_dumps(d: dict, r: dict, loss_ranks: list[int]) -> float:
    """Labels and weights on every loss rank equal the data; the recombined logits recompute the logged loss."""
    import torch
    from nextlong.indexed import read_indexed

    text, mask = read_indexed(d["text"]), read_indexed(d["mask"])
    smoke = d["smoke"]
    stem = glob.glob(f"{d['text']}_train_0_indexmap_*_doc_idx.npy")
    assert stem, "GPT-NeoX saved no train index map"
    stem = sorted(stem)[-1][: -len("_doc_idx.npy")]
    maps = tuple(np.load(f"{stem}_{k}_idx.npy", allow_pickle=True) for k in ("doc", "sample", "shuffle"))
    cfg = r["cfg"]
    micro, neg = cfg["train_micro_batch_size_per_gpu"], cfg["nextlong_negative_loss_weight"]
    losses = []
    for call in range(cfg["gradient_accumulation_steps"]):
        parts = []
        for rank in loss_ranks:
            f = r["dump"] / (f"loss_call_{call:03d}.pt" if rank == 0 else f"loss_call_{call:03d}_rank{rank}.pt")
            parts.append(torch.load(f))
        rows, labels_ref = [], []
        for i in range(micro):
            s = micro * call + i
            t, m = smoke._sample(text, maps, s).astype(np.int64), smoke._sample(mask, maps, s)
            labels_ref.append(t[1:])
            rows.append(np.where(m[1:] == 1, 1.0, neg))
        w = torch.tensor(np.stack(rows), dtype=torch.float64)
        for p in parts:  # the mask reached every loss rank aligned with its tokens
            assert p["grad_enabled"]
            np.testing.assert_array_equal(p["labels"].numpy(), np.stack(labels_ref), err_msg=f"rank {p['rank']}")
            torch.testing.assert_close(p["weights"].double(), w / w.sum(), rtol=1e-6, atol=1e-8)
        parts.sort(key=lambda p: p["vocab_start"])
        assert [p["vocab_start"] for p in parts] == [sum(q["logits"].shape[-1] for q in parts[:k])
                                                     for k in range(len(parts))]
        logits = torch.cat([p["logits"] for p in parts], dim=-1).double()
        labels = parts[0]["labels"].long()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               reduction="none").view(labels.shape)
        losses.append(float((ce * w).sum() / w.sum()))
    return float(np.mean(losses))


def test_tensor_parallel_2_equals_single_rank(data: dict, capsys) -> None:
    one = _train(data, "tp1", 1, activation="gelu")
    two = _train(data, "tp2", 2, model_parallel_size=2, activation="gelu")
    again = _check_rank_dumps(data, two, [0, 1])
    with capsys.disabled():
        print(f"\n[neox parallel] TP1 losses {one['losses']} | TP2 losses {two['losses']} | "
              f"TP2 step 1 recomputed from both ranks' logits {again:.7g}")
    assert two["losses"][1] == pytest.approx(again, rel=REL)
    assert two["losses"][1] == pytest.approx(one["losses"][1], rel=PARALLEL_REL)


def test_pipeline_parallel_2_last_stage(data: dict, capsys) -> None:
    one = _train(data, "pp1", 1, pipe_parallel_size=1)
    two = _train(data, "pp2", 2, pipe_parallel_size=2)
    assert not list(two["dump"].glob("loss_call_000.pt")), "stage 0 (rank 0) must not compute the loss"
    again = _check_rank_dumps(data, two, [1])
    summary = {"pp1": one["losses"], "pp2": two["losses"], "pp2_step1_recomputed": again}
    (data["root"] / "pp_summary.json").write_text(json.dumps(summary))
    with capsys.disabled():
        print(f"\n[neox parallel] PP1 losses {one['losses']} | PP2 losses {two['losses']} (other initial weights "
              f"on stage 1) | PP2 step 1 recomputed on the last stage {again:.7g}")
    assert two["losses"][1] == pytest.approx(again, rel=REL)
    assert abs(two["losses"][1] - one["losses"][1]) < 0.05 * one["losses"][1]  # same data, same model family
