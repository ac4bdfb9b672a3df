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
* **PP 2** (``pipe_parallel_size: 2``, one transformer layer per stage): the step-1 loss equals the single-rank
  run's (``pipe_parallel_size: 1``, a one-stage ``PipelineModule``) when both start from the same weights. A fresh
  PP 2 run cannot: DeepSpeed's ``PipelineModule`` builds only its stage's layers and GPT-NeoX passes
  ``seed_layers=False``, so stage 1's initial weights come from another part of the random stream than in one
  process (a fresh PP 2 run logged step-1 lm_loss 11.70776 against the single-rank 11.67664). So the single-rank run
  saves its initial weights before it trains (``extra_save_iters: [0]``; per-layer files
  ``layer_XX-model_00-model_states.pt``, the same for any PP degree), and the PP 2 run loads them with weights only
  (``finetune: true``: iteration 0, so the same batches; a fresh optimizer and schedule, as in the single-rank run);
  a PP 1 run loading them too is the control that loading changes nothing. With fp32 and ZeRO 0 that load stopped in
  ``deepspeed/runtime/engine.py`` with ``AttributeError: 'FusedAdam' object has no attribute 'refresh_fp32_params'``
  (DeepSpeed's ``load_module_only`` path; DeepSpeed issue #7132, not CPU-specific: fp32 without ZeRO fails the same
  way on a GPU, while bf16/fp16/ZeRO, as in the recipes, wrap the optimizer in a class that has the method).
  ``neox_plugin.cpu`` gives a plain optimizer whose parameters are the module's a no-op ``refresh_fp32_params`` (the
  load overwrote those parameters in place); ``test_deepspeed_fp32_weights_only_load`` shows the error without it
  and the restored weights with it on real DeepSpeed. Checked: every stage loaded the step-0 weights through that
  patch; the loss is computed only on the last stage (rank 1) and never on stage 0 (rank 0, where the one-stage run
  computes it); there the labels and weights equal the ones cut from the ``.bin`` files (the mask reaches stage 1
  aligned with the tokens) and the logits recompute the logged loss; the step-1 labels, weights and logits equal the
  single-rank run's; the logged step-1 loss equals it within 2e-6 relative (GPT-NeoX logs 7 significant digits) and
  step 2 within 1e-5 (a backward pass through both stages and a clip by the gradient norm summed over both).
  Tolerance: both layouts run the same fp32 kernels on the same batch, and stage 0's output reaches stage 1 as an
  exact fp32 copy (gloo send/receive), so the expected difference is 0; the logits may differ by 1e-5 (a few ulps)
  for a BLAS that splits a product differently. Measured (2 CPU cores, GPT-NeoX ea7aefd8, DeeperSpeed 91d1c55b):
  lm_loss by step PP 1 {1: 11.67664, 2: 11.70846}, PP 1 from its step-0 weights the same, PP 2 from them the same;
  step 1 recomputed from the last stage's logits 11.676638 in both layouts; the step-1 logits of PP 2 and PP 1 are
  bitwise equal (max difference 0.0).
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
LOGIT_ABS = 1e-5  # fp32 logits (|x| < 20) of the same model and batch: a few ulps for another GEMM split
REFRESH_NOTE = "fp32 optimizer: refresh_fp32_params is a no-op"  # neox_plugin.cpu.REFRESH_NOTE


DS_LOAD_PROBE = """
import json, os, tempfile
import torch
import deepspeed

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
cfg = {"train_batch_size": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 0}}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
out = {"optimizer": type(engine.optimizer).__name__}
ckpt = tempfile.mkdtemp()
engine.save_checkpoint(ckpt, tag="t0")
saved = [p.detach().clone() for p in engine.module.parameters()]
with torch.no_grad():
    for p in engine.module.parameters():
        p.add_(1.0)
try:
    engine.load_checkpoint(ckpt, tag="t0", load_optimizer_states=False, load_lr_scheduler_states=False,
                           load_module_only=True)
    out["restored"] = all(torch.equal(a, b) for a, b in zip(saved, engine.module.parameters()))
except AttributeError as e:
    out["error"] = str(e)
print("PROBE " + json.dumps(out))
"""


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


@pytest.mark.parametrize("cpu", ["0", "1"])
def test_deepspeed_fp32_weights_only_load(cpu: str) -> None:
    """Real DeepSpeed on its CPU accelerator, fp32, ZeRO 0: ``load_module_only`` fails without the CPU patch
    (DeepSpeed's bug, not the CPU's) and restores the saved weights with it."""
    smoke = _smoke()
    env = smoke.neox_env(NEOX_PYTHON, None)  # as the GPT-NeoX runs: this checkout first, the environment's PATH
    env.update(NEXTLONG_NEOX_CPU=cpu, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(smoke.free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([NEOX_PYTHON, "-c", DS_LOAD_PROBE], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))[6:])
    if cpu == "1":
        assert out == {"optimizer": "FusedAdam", "restored": True}
        assert REFRESH_NOTE in proc.stderr
    else:
        assert out == {"optimizer": "FusedAdam", "error": "'FusedAdam' object has no attribute 'refresh_fp32_params'"}


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


def _dumps(r: dict) -> list[dict]:
    """The loss calls a run saved, in call order, each with the global rank that computed it."""
    import torch

    return [torch.load(f) for f in sorted(r["dump"].glob("loss_call_*.pt"))]


def test_pipeline_parallel_2_equals_single_rank(data: dict, capsys) -> None:
    import torch

    # The single-rank run (one pipeline stage) saves its initial weights (iteration 0) before it trains.
    one = _train(data, "pp1", 1, pipe_parallel_size=1, extra_save_iters=[0])
    step0 = one["run"] / "checkpoints" / "global_step0"
    layers = sorted(p.name for p in step0.glob("layer_*-model_00-model_states.pt"))
    assert len(layers) >= one["cfg"]["num_layers"] + 2, f"per-layer weight files in {step0}: {layers}"
    start = data["root"] / "pp_start"  # a load directory whose latest checkpoint is those initial weights
    start.mkdir()
    (start / "global_step0").symlink_to(step0, target_is_directory=True)
    (start / "latest").write_text("global_step0")
    # Two stages (and, as a control, one stage) start from those weights only, at iteration 0 (same batches).
    load = {"load": str(start), "finetune": True}
    two = _train(data, "pp2", 2, pipe_parallel_size=2, **load)
    one_loaded = _train(data, "pp1_loaded", 1, pipe_parallel_size=1, **load)
    for r in (two, one_loaded):  # every stage loaded the step-0 weights, through the CPU patch's no-op refresh
        log = (r["run"] / "run.log").read_text()
        loaded = re.findall(r"successfully loaded (\S+)", log)
        assert len(loaded) == r["cfg"]["num_gpus"] and all(
            x.startswith(str(start / "global_step0")) for x in loaded), f"{r['run']} loaded {loaded}"
        assert log.count(REFRESH_NOTE) == r["cfg"]["num_gpus"], f"{r['run']}: the load did not use the CPU patch"

    # Where the loss is computed: the only stage of the single-rank runs, only the last stage (rank 1) of PP 2.
    ref, got = _dumps(one), _dumps(two)
    assert [d["rank"] for d in ref] == [0, 0] and [d["rank"] for d in got] == [1, 1], "stage 0 computed a loss"
    assert not list(two["dump"].glob("loss_call_000.pt")), "stage 0 (rank 0) must not compute the loss"
    # On the last stage the labels and weights equal the data cut here, and the logits recompute the logged loss.
    again = _check_rank_dumps(data, two, [1])
    again_one = _check_rank_dumps(data, one, [0])
    # The same micro-batches reach the last stage with the same mask, and the two-stage model is the same function.
    logit_diff = 0.0
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["weights"], b["weights"])
        logit_diff = max(logit_diff, float((a["logits"].double() - b["logits"].double()).abs().max()))
    summary = {"pp1": one["losses"], "pp1_loaded": one_loaded["losses"], "pp2_loaded": two["losses"],
               "pp2_step1_recomputed": again, "pp1_step1_recomputed": again_one, "max_logit_diff": logit_diff}
    (data["root"] / "pp_summary.json").write_text(json.dumps(summary))
    with capsys.disabled():
        print(f"\n[neox parallel] PP1 losses {one['losses']} | PP1 from its step-0 weights {one_loaded['losses']} | "
              f"PP2 from the same weights {two['losses']} | PP2 step 1 recomputed on the last stage {again:.7g} | "
              f"max |logit PP2 - PP1| step 1 {logit_diff:.2e} | "
              f"rel. diff step 1 {abs(two['losses'][1] - one['losses'][1]) / one['losses'][1]:.1e}")
    assert two["losses"][1] == pytest.approx(again, rel=REL)
    assert one["losses"][1] == pytest.approx(again_one, rel=REL)
    assert logit_diff <= LOGIT_ABS
    assert one_loaded["losses"] == pytest.approx(one["losses"], rel=REL)
    assert two["losses"][1] == pytest.approx(one["losses"][1], rel=REL)
    # Step 2 follows a backward pass through both stages and a step clipped by the norm over both stages.
    assert two["losses"][2] == pytest.approx(one["losses"][2], rel=PARALLEL_REL)
