"""Real GPT-NeoX on CPU with the plugin: a tiny model on NExtLong data, both training paths.

Skipped unless ``GPT_NEOX_DIR`` points at a GPT-NeoX checkout. See docs/neox_plugin.md for the
environment (``NEOX_PYTHON``: the interpreter with GPT-NeoX's dependencies and this project
installed, hook active; ``NEOX_CPU_SHIM_DIR``: the CPU shim, default ``../shared/tools/neox_cpu``
next to the repository, used when it exists).

What is checked, for ``pipe_parallel_size: 0`` (forward_step + cross_entropy) and ``1``
(DeepSpeed PipelineModule ``loss_fn``), with validation and test evaluation enabled:

* training runs 4 steps, validates twice and tests once, every logged loss finite;
* the loss logged at step 1 equals an independent recomputation: the text and mask samples are
  cut from the .bin files with GPT-NeoX's saved index maps by code here, the labels must equal the
  ones the model was trained on, the weights (mask shifted by one, 1 -> 1.0, 0 -> 0.5, divided by
  their sum) must equal the plugin's, and the weighted cross-entropy of the dumped logits
  (torch.nn.functional.cross_entropy) averaged over the step's two micro-batches must equal the
  logged lm_loss;
* with the plugin on and every weight 1.0, the logged training losses equal stock GPT-NeoX's;
* ``nextlong_compact_attention_mask: true`` with the tiny config's non-flash layers is refused before step 1,
  and GPT-NeoX's own ``get_ltor_masks_and_position_ids`` returns the placeholder only with the key on.
"""

from __future__ import annotations

import glob
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
pytestmark = [
    pytest.mark.neox,
    pytest.mark.skipif(not NEOX_DIR, reason="GPT_NEOX_DIR is not set (path to a GPT-NeoX checkout)"),
]

NEOX_PYTHON = os.environ.get("NEOX_PYTHON", sys.executable)
SHIM_DIR = Path(os.environ.get("NEOX_CPU_SHIM_DIR", REPO.parent / "shared" / "tools" / "neox_cpu"))
RUN_TIMEOUT = int(os.environ.get("NEOX_RUN_TIMEOUT", "1800"))
SEQ = 128
NEG_WEIGHT = 0.5
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm_loss: ([0-9.eE+-]+|nan)")
VALID_RE = re.compile(r"validation results at (?:iteration \d+|the end of training for val data) \| lm_loss value: "
                      r"([0-9.eE+-]+|nan)")
TEST_RE = re.compile(r"test results at the end of training for test data \| lm_loss value: ([0-9.eE+-]+|nan)")

TOKENIZER_SCRIPT = """
import sys
from nextlong.corpora import builtin_documents
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
docs = [d.text for _, d in zip(range(300), builtin_documents("python-docs", "python-docs"))]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save(sys.argv[1])
"""


def _neox_env(dump_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(NEOX_PYTHON).parent) + os.pathsep + env.get("PATH", "")  # helpers build with python3
    if SHIM_DIR.is_dir():
        env["NEOX_CPU_SHIM"] = "1"
        env["DS_ACCELERATOR"] = env.get("DS_ACCELERATOR", "cpu")
        env["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NEXTLONG_DEBUG_DUMP_DIR", None)
    if dump_dir is not None:
        env["NEXTLONG_DEBUG_DUMP_DIR"] = str(dump_dir)
        env["NEXTLONG_DEBUG_DUMP_CALLS"] = "2"
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    """Tokenizer, NExtLong data from the synthesis CLI, and the paths config."""
    check = subprocess.run([NEOX_PYTHON, "-m", "neox_plugin.install_hook", "--check"], capture_output=True, text=True,
                           env=_neox_env(None))
    assert check.returncode == 0, (
        f"the neox_plugin import hook is not active in {NEOX_PYTHON}: install this project there and run "
        f"`{NEOX_PYTHON} -m neox_plugin.install_hook` (docs/neox_plugin.md)\n{check.stdout}{check.stderr}"
    )
    root = tmp_path_factory.mktemp("neox")
    tok = root / "tokenizer.json"
    subprocess.run([NEOX_PYTHON, "-c", TOKENIZER_SCRIPT, str(tok)], check=True, env=_neox_env(None))
    prefix = root / "data" / "nl"
    subprocess.run(
        [sys.executable, str(REPO / "preprocessing" / "make_nextlong_bin.py"), "--input", "builtin:python-docs",
         "--tokenizer", str(tok), "--output-prefix", str(prefix), "--target-length", "512", "--granularity", "256",
         "--candidates", "16", "--max-samples", "24", "--no-progress"],
        check=True, cwd=root,
    )
    text = f"{prefix}_text_document"
    commit = subprocess.run(["git", "-C", NEOX_DIR, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"root": root, "tok": tok, "text": text, "mask": f"{prefix}_lossweight_document", "commit": commit}


def _paths_yml(w: dict, name: str) -> Path:
    import yaml

    run = w["root"] / name
    run.mkdir()
    paths = {
        "train_data_paths": [w["text"]], "valid_data_paths": [w["text"]], "test_data_paths": [w["text"]],
        "train_data_weights": [1.0], "valid_data_weights": [1.0], "test_data_weights": [1.0],
        "vocab_file": str(w["tok"]), "save": str(run / "checkpoints"), "log_dir": str(run / "logs"),
    }
    f = run / "paths.yml"
    f.write_text(yaml.safe_dump(paths))
    return f


def _variant(w: dict, name: str, **changes) -> Path:
    """tiny_cpu.yml with some keys changed (GPT-NeoX refuses a key set in two files)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "neox" / "tiny_cpu.yml").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f = w["root"] / f"{name}.yml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _train(w: dict, name: str, config: Path, dump: bool = True) -> dict:
    paths = _paths_yml(w, name)
    dump_dir = w["root"] / name / "dump" if dump else None
    proc = subprocess.run([NEOX_PYTHON, "deepy.py", "train.py", str(config), str(paths)], cwd=NEOX_DIR,
                          env=_neox_env(dump_dir), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    (w["root"] / name / "run.log").write_text(log)
    assert proc.returncode == 0, f"GPT-NeoX run {name} failed (log: {w['root'] / name / 'run.log'}):\n{log[-4000:]}"
    train = {int(i): float(v) for i, v in LOSS_RE.findall(log)}
    return {"train": train, "valid": [float(v) for v in VALID_RE.findall(log)],
            "test": [float(v) for v in TEST_RE.findall(log)], "dump": dump_dir, "log": log}


def _neox_sample(ds, maps: tuple, i: int) -> np.ndarray:
    """Sample i of GPT-NeoX's packed dataset, cut here from the saved index maps."""
    doc_idx, sample_idx, shuffle_idx = maps
    j = shuffle_idx[i]
    (df, of), (dl, ol) = sample_idx[j], sample_idx[j + 1]
    if df == dl:
        return np.asarray(ds[int(doc_idx[df])][of : ol + 1])
    parts = [ds[int(doc_idx[df])][of:]] + [ds[int(doc_idx[k])] for k in range(df + 1, dl)]
    parts.append(ds[int(doc_idx[dl])][: ol + 1])
    return np.concatenate(parts)


def _recompute_step1(w: dict, dump_dir: Path) -> tuple[float, list[str]]:
    """Independent loss of training step 1 (two micro-batches of two samples)."""
    import torch
    from nextlong.indexed import read_indexed

    text, mask = read_indexed(w["text"]), read_indexed(w["mask"])
    base = glob.glob(f"{w['text']}_train_0_indexmap_*_doc_idx.npy")
    assert len(base) == 1, base
    stem = base[0][: -len("_doc_idx.npy")]
    maps = tuple(np.load(f"{stem}_{k}_idx.npy", allow_pickle=True) for k in ("doc", "sample", "shuffle"))
    losses, notes = [], []
    for call in range(2):
        d = torch.load(dump_dir / f"loss_call_{call:03d}.pt")
        assert d["grad_enabled"], "the first loss calls must be training calls"
        labels, logits = d["labels"], d["logits"]
        rows = []
        for r in range(labels.shape[0]):
            sample = 2 * call + r
            t = _neox_sample(text, maps, sample).astype(np.int64)
            m = _neox_sample(mask, maps, sample)
            assert t.shape == (SEQ + 1,)
            np.testing.assert_array_equal(labels[r].numpy(), t[1:], err_msg=f"labels of sample {sample}")
            rows.append(np.where(m[1:] == 1, 1.0, NEG_WEIGHT))
            notes.append(f"sample {sample}: {int((m[1:] == 0).sum())} hard-negative targets of {SEQ}")
        wts = torch.tensor(np.stack(rows), dtype=torch.float32)
        torch.testing.assert_close(d["weights"], wts / wts.sum(), rtol=1e-6, atol=1e-8)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                                               reduction="none").view(labels.shape)
        losses.append(float((ce.double() * wts.double()).sum() / wts.double().sum()))
    return float(np.mean(losses)), notes


@pytest.mark.parametrize("pipe", [0, 1])
def test_neox_trains_on_the_mask(workdir: dict, pipe: int, capsys) -> None:
    tiny = REPO / "configs" / "neox" / "tiny_cpu.yml"
    config = tiny if pipe == 0 else _variant(workdir, "pipe", pipe_parallel_size=1)
    run = _train(workdir, f"plugin_pipe{pipe}", config)
    assert "NExtLong loss weights on" in run["log"]
    assert sorted(run["train"]) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for v in run["train"].values())
    assert len(run["valid"]) == 3 and all(np.isfinite(run["valid"])), "validation at steps 2, 4 and the end"
    assert len(run["test"]) == 1 and np.isfinite(run["test"][0])
    recomputed, notes = _recompute_step1(workdir, run["dump"])
    logged = run["train"][1]
    summary = {"gpt_neox_commit": workdir["commit"], "pipe_parallel_size": pipe, "logged_step1_lm_loss": logged,
               "recomputed_step1_loss": recomputed, "train_losses": run["train"], "valid_losses": run["valid"],
               "test_loss": run["test"][0], "samples": notes}
    (workdir["root"] / f"summary_pipe{pipe}.json").write_text(json.dumps(summary, indent=1))
    with capsys.disabled():
        print(f"\n[neox integration] {json.dumps(summary)}")
    assert logged == pytest.approx(recomputed, rel=2e-6), summary  # logged with 7 significant digits


def test_all_ones_equals_stock_neox(workdir: dict, capsys) -> None:
    stock_cfg = _variant(workdir, "stock", nextlong_lossweight=None, nextlong_negative_loss_weight=None,
                         nextlong_loss_normalization=None, nextlong_loss_chunk_size=None)
    ones_cfg = _variant(workdir, "ones", nextlong_negative_loss_weight=1.0)
    stock = _train(workdir, "stock", stock_cfg, dump=False)
    ones = _train(workdir, "ones", ones_cfg, dump=False)
    assert "NExtLong loss weights on" not in stock["log"]
    with capsys.disabled():
        print(f"\n[neox integration] stock {stock['train']} | plugin, all weights 1: {ones['train']}")
    assert stock["train"][1] == pytest.approx(ones["train"][1], rel=2e-6)
    for step in (2, 3, 4):
        assert stock["train"][step] == pytest.approx(ones["train"][step], rel=1e-4)


def test_bad_valid_mask_refused_before_step_one(workdir: dict) -> None:
    """A mask error in the validation split stops the run at start-up (not at the first evaluation)."""
    from nextlong.indexed import IndexedDatasetWriter, read_indexed

    good = read_indexed(workdir["mask"])
    bad = str(workdir["root"] / "bad" / "nl_lossweight_document")
    with IndexedDatasetWriter(bad, np.uint8) as w:
        for i in range(len(good)):
            m = np.array(good[i])
            if i == 3:
                m[5] = 2
            w.add_document(m)
    cfg = _variant(workdir, "badmask", nextlong_valid_lossweight_paths=[bad])
    paths = _paths_yml(workdir, "badmask_run")
    proc = subprocess.run([NEOX_PYTHON, "deepy.py", "train.py", str(cfg), str(paths)], cwd=NEOX_DIR,
                          env=_neox_env(None), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[valid] mask value 2 at token" in log and bad in log and workdir["text"] in log
    assert not LOSS_RE.search(log), "no training step may run"


def _start(w: dict, name: str, config: Path) -> tuple[subprocess.CompletedProcess, str]:
    paths = _paths_yml(w, name)
    proc = subprocess.run([NEOX_PYTHON, "deepy.py", "train.py", str(config), str(paths)], cwd=NEOX_DIR,
                          env=_neox_env(None), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    (w["root"] / name / "run.log").write_text(log)
    return proc, log


def test_compact_attention_mask_refused_with_mask_reading_layers(workdir: dict) -> None:
    """nextlong_compact_attention_mask with the tiny config's non-flash ("global") layers stops the run at
    argument validation, naming the key and the layers (flash attention itself cannot run on CPU)."""
    cfg = _variant(workdir, "compact_global", nextlong_compact_attention_mask=True)
    proc, log = _start(workdir, "compact_global_run", cfg)
    assert proc.returncode != 0
    assert "NExtLongConfigError: nextlong_compact_attention_mask is true" in log, log[-3000:]
    assert "'global' at layers 0-1" in log
    assert not LOSS_RE.search(log), "no training step may run"


PLACEHOLDER_SCRIPT = r'''
import json, torch
from megatron import training  # imports get_ltor_masks_and_position_ids by name, like _get_batch uses it
from neox_plugin import neox
data = torch.tensor([[5, 0, 7, 9], [0, 1, 2, 3]])
off = training.get_ltor_masks_and_position_ids(data, 0, eod_mask_loss=True)
neox.set_config({"nextlong_compact_attention_mask": True, "num_layers": 2, "attention_config": ["flash", "flash"]})
on = training.get_ltor_masks_and_position_ids(data, 0, eod_mask_loss=True)
print(json.dumps({"applied": "megatron.utils" in neox.STATE.applied, "off": list(off[0].shape),
                  "on": list(on[0].shape), "on_dtype": str(on[0].dtype),
                  "same_loss_mask_and_positions": bool(torch.equal(off[1], on[1]) and torch.equal(off[2], on[2]))}))
'''


def test_placeholder_on_gpt_neox_modules(tmp_path: Path) -> None:
    """GPT-NeoX's own get_ltor_masks_and_position_ids, as megatron.training imported it, returns the placeholder
    only with the key on; loss mask and position ids are unchanged."""
    env = _neox_env(None)
    env["PYTHONPATH"] = os.pathsep.join([p for p in [env.get("PYTHONPATH"), NEOX_DIR] if p])
    proc = subprocess.run([NEOX_PYTHON, "-c", PLACEHOLDER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"applied": True, "off": [1, 1, 4, 4], "on": [1, 1, 1, 1], "on_dtype": "torch.bool",
                   "same_loss_mask_and_positions": True}


LOCKSTEP_SCRIPT = r'''
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])  # tests/ (index-map builders of test_plugin_data)
from test_plugin_data import packed_index, overflow_index, unpacked_index
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import make_dataset
from neox_plugin.config import MASK_PADDING
from neox_plugin.neox import attach_mask

text_prefix, mask_prefix = sys.argv[2], sys.argv[3]
text = make_dataset(text_prefix, "mmap", True)
mask = make_dataset(mask_prefix, "mmap", True)
sizes = text.sizes.astype(np.int64)
seq = 64
out = {}
for mode in ("packed", "pack_until_overflow", "unpacked"):
    rng = np.random.default_rng(11)
    if mode == "packed":
        maps = packed_index(sizes, seq, rng)
    elif mode == "pack_until_overflow":
        maps = overflow_index(sizes, seq, rng, 12)
    else:
        maps = unpacked_index(sizes, rng, 12)
    ds = GPT2Dataset("train_0", text_prefix, np.arange(len(sizes), dtype=np.int32), text, None, None, seq, 1234,
                     pack_impl=mode, build_index_mappings=False)
    ds.doc_idx, ds.sample_idx, ds.shuffle_idx = maps
    ds.shuffle_idx_len, ds.sample_idx_len = len(maps[2]) - 1, len(maps[1]) - 1
    attach_mask(ds, mask)
    bad = padded = 0
    for i in range(len(ds)):
        s = ds[i]
        t, m = s["text"], s["nextlong_lossweight"]
        real = m != MASK_PADDING
        padded += int((~real).sum())
        bad += int((m[real] != t[real] % 2).sum()) + int((t[~real] != 0).sum()) + int(m.dtype != np.uint8)
    out[mode] = {"samples": len(ds), "mismatches": bad, "padded": padded}
print(json.dumps(out))
'''


def test_lockstep_with_neox_gpt2dataset_all_pack_modes(tmp_path: Path, capsys) -> None:
    """GPT-NeoX's own GPT2Dataset (patched by the hook) and reader: the mask sample is cut exactly
    like the text sample in all three pack_impl modes (the fixture's mask is token % 2)."""
    from nextlong.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(5)
    text, mask = str(tmp_path / "ls_text_document"), str(tmp_path / "ls_lossweight_document")
    with IndexedDatasetWriter(text, np.uint16) as wt, IndexedDatasetWriter(mask, np.uint8) as wm:
        for n in [40, 7, 130, 1, 64, 300, 9, 55]:
            toks = rng.integers(1, 1000, size=n)
            wt.add_document(toks)
            wm.add_document((toks % 2).astype(np.uint8))
    env = _neox_env(None)
    env["PYTHONPATH"] = os.pathsep.join([p for p in [env.get("PYTHONPATH"), NEOX_DIR] if p])
    proc = subprocess.run([NEOX_PYTHON, "-c", LOCKSTEP_SCRIPT, str(REPO / "tests"), text, mask], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\n[neox integration] lock-step with GPT-NeoX's GPT2Dataset: {json.dumps(out)}")
    assert set(out) == {"packed", "pack_until_overflow", "unpacked"}
    for mode, r in out.items():
        assert r["samples"] > 0 and r["mismatches"] == 0, (mode, r)
    assert out["packed"]["padded"] == 0 and out["unpacked"]["padded"] > 0
