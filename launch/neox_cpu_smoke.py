#!/usr/bin/env python3
"""Smoke run: real GPT-NeoX trains ``configs/neox/tiny_cpu.yml`` on CPU on NExtLong data, with the plugin on.

    python launch/neox_cpu_smoke.py --gpt-neox ~/gpt-neox --neox-python ~/neoxenv/bin/python

Run it with this project's own interpreter (the data-synthesis environment); ``--neox-python`` is the
environment made by ``launch/setup_neox_env.py --cpu``. Steps:

1. export ``builtin:cl100k_base`` as a ``tokenizer.json`` GPT-NeoX's tokenizers 0.15 reads (the tokenizer
   ``tiny_cpu.yml`` documents);
2. synthesize NExtLong data from the built-in demo corpus (Python's documentation) with
   ``make_nextlong_bin.py --target-length 512`` (a length the corpus's documents reach; GPT-NeoX packs the
   512-token samples into ``seq_length + 1 = 129``-token training sequences);
3. ``python deepy.py train.py tiny_cpu.yml paths.yml`` in the GPT-NeoX checkout with ``NEXTLONG_NEOX_CPU=1``
   (:mod:`neox_plugin.cpu`), saving the logits, labels and weights of the first two loss calls;
4. print the logged losses and recompute the step-1 loss independently: the samples are cut from the
   ``.bin`` files here with GPT-NeoX's saved index maps, the labels must equal the trained ones, the weights
   are the mask shifted by one (1 -> 1.0, 0 -> ``nextlong_negative_loss_weight``) over their sum, and the
   cross-entropy of the dumped logits is averaged over the step's micro-batches.

Exit code 0 when the step-1 loss matches (relative 2e-6: GPT-NeoX logs 7 significant digits), 1 when it does
not or the run fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("neox_cpu_smoke")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "neox" / "tiny_cpu.yml"
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm_loss: ([0-9.eE+-]+|nan)")
REL_TOL = 2e-6
if str(REPO / "preprocessing") not in sys.path:  # nextlong from this checkout
    sys.path.insert(0, str(REPO / "preprocessing"))


def make_data(work: Path, target_length: int, max_samples: int) -> tuple[Path, str, str]:
    """Portable cl100k tokenizer + NExtLong data from the demo corpus; returns (tokenizer, text, mask) paths."""
    from nextlong.tokenization import load_tokenizer, save_tokenizer_json

    tok = work / "tokenizer.json"
    if not tok.exists():
        notes = save_tokenizer_json(load_tokenizer("builtin:cl100k_base").tokenizer, tok)
        if notes:
            raise SystemExit(f"{tok}: not portable to tokenizers 0.15: {notes}")
    prefix = work / "data" / "nl"
    text, mask = f"{prefix}_text_document", f"{prefix}_lossweight_document"
    if not Path(text + ".bin").exists():
        cmd = [sys.executable, str(REPO / "preprocessing" / "make_nextlong_bin.py"), "--input", "builtin:python-docs",
               "--tokenizer", str(tok), "--output-prefix", str(prefix), "--target-length", str(target_length),
               "--granularity", str(target_length // 2), "--candidates", "16", "--max-samples", str(max_samples),
               "--no-progress"]
        logger.info("synthesizing: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=work)
    return tok, text, mask


def neox_env(neox_python: str, dump_dir: Path | None) -> dict[str, str]:
    """Environment of the GPT-NeoX run: CPU support on, this checkout's plugin first, helpers built with the
    environment's python3."""
    env = dict(os.environ)
    env["NEXTLONG_NEOX_CPU"] = "1"
    env["PATH"] = str(Path(neox_python).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "preprocessing")]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NEXTLONG_NEOX_PLUGIN", None)
    if dump_dir is not None:
        env["NEXTLONG_DEBUG_DUMP_DIR"] = str(dump_dir)
        env["NEXTLONG_DEBUG_DUMP_CALLS"] = "2"
    return env


def _sample(ds, maps: tuple, i: int) -> np.ndarray:
    """Sample i of GPT-NeoX's packed dataset, cut from the saved index maps."""
    doc_idx, sample_idx, shuffle_idx = maps
    j = shuffle_idx[i]
    (df, of), (dl, ol) = sample_idx[j], sample_idx[j + 1]
    if df == dl:
        return np.asarray(ds[int(doc_idx[df])][of : ol + 1])
    parts = [ds[int(doc_idx[df])][of:]] + [ds[int(doc_idx[k])] for k in range(df + 1, dl)]
    parts.append(ds[int(doc_idx[dl])][: ol + 1])
    return np.concatenate(parts)


def recompute_step1(text_prefix: str, mask_prefix: str, dump_dir: Path, cfg: dict) -> float:
    """Step-1 loss from the dumped logits and the data read here (raises AssertionError on a mismatch)."""
    import torch
    from nextlong.indexed import read_indexed

    seq, micro = cfg["seq_length"], cfg["train_micro_batch_size_per_gpu"]
    neg = float(cfg["nextlong_negative_loss_weight"])
    text, mask = read_indexed(text_prefix), read_indexed(mask_prefix)
    found = glob.glob(f"{text_prefix}_train_0_indexmap_*_doc_idx.npy")
    assert len(found) == 1, f"expected one saved train index map, found {found}"
    stem = found[0][: -len("_doc_idx.npy")]
    maps = tuple(np.load(f"{stem}_{k}_idx.npy", allow_pickle=True) for k in ("doc", "sample", "shuffle"))
    losses = []
    for call in range(cfg["gradient_accumulation_steps"]):
        d = torch.load(dump_dir / f"loss_call_{call:03d}.pt")
        assert d["grad_enabled"], "the first loss calls must be training calls"
        labels, logits = d["labels"], d["logits"]
        rows = []
        for r in range(labels.shape[0]):
            i = micro * call + r
            t, m = _sample(text, maps, i).astype(np.int64), _sample(mask, maps, i)
            assert t.shape == (seq + 1,), t.shape
            np.testing.assert_array_equal(labels[r].numpy(), t[1:], err_msg=f"labels of sample {i}")
            rows.append(np.where(m[1:] == 1, 1.0, neg))
        w = torch.tensor(np.stack(rows), dtype=torch.float64)
        torch.testing.assert_close(d["weights"].double(), w / w.sum(), rtol=1e-6, atol=1e-8)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                               labels.reshape(-1).long(), reduction="none").view(labels.shape)
        losses.append(float((ce * w).sum() / w.sum()))
    return float(np.mean(losses))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="neox_cpu_smoke.py", description=__doc__.split("\n")[0])
    p.add_argument("--gpt-neox", type=Path, required=True, help="GPT-NeoX checkout (directory with deepy.py)")
    p.add_argument("--neox-python", default=os.environ.get("NEOX_PYTHON"),
                   help="python of the GPT-NeoX environment (default: $NEOX_PYTHON)")
    p.add_argument("--workdir", type=Path, default=Path("neox_cpu_smoke"),
                   help="directory for tokenizer, data, logs and checkpoints (default ./neox_cpu_smoke)")
    p.add_argument("--target-length", type=int, default=512,
                   help="tokens per synthesized sample (default 512; the demo corpus's documents reach it)")
    p.add_argument("--max-samples", type=int, default=24, help="synthesized samples (default 24)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed for the GPT-NeoX run (default 3600)")
    args = p.parse_args(argv)
    if not (args.gpt_neox / "deepy.py").is_file():
        print(f"neox_cpu_smoke: --gpt-neox {args.gpt_neox}: no deepy.py there", file=sys.stderr)
        return 2
    if not args.neox_python or not Path(args.neox_python).exists():
        print(f"neox_cpu_smoke: --neox-python {args.neox_python}: not found (or set NEOX_PYTHON)", file=sys.stderr)
        return 2
    import yaml

    work = args.workdir.resolve()
    run = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True)
    tok, text, mask = make_data(work, args.target_length, args.max_samples)
    paths = {"train_data_paths": [text], "valid_data_paths": [text], "test_data_paths": [text],
             "train_data_weights": [1.0], "valid_data_weights": [1.0], "test_data_weights": [1.0],
             "vocab_file": str(tok), "save": str(run / "checkpoints"), "log_dir": str(run / "logs")}
    (run / "paths.yml").write_text(yaml.safe_dump(paths), encoding="utf-8")
    cmd = [args.neox_python, "deepy.py", "train.py", str(TINY), str(run / "paths.yml")]
    logger.info("training: cd %s && NEXTLONG_NEOX_CPU=1 %s", args.gpt_neox, " ".join(cmd))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=args.gpt_neox, env=neox_env(args.neox_python, run / "dump"),
                          capture_output=True, text=True, timeout=args.timeout)
    log = proc.stdout + proc.stderr
    (run / "train.log").write_text(log, encoding="utf-8")
    if proc.returncode != 0:
        print(log[-4000:], file=sys.stderr)
        print(f"neox_cpu_smoke: GPT-NeoX failed (exit {proc.returncode}); log: {run / 'train.log'}", file=sys.stderr)
        return 1
    losses = {int(i): float(v) for i, v in LOSS_RE.findall(log)}
    print(f"GPT-NeoX trained {len(losses)} steps in {time.time() - t0:.0f} s; lm_loss by step: {losses}")
    if "NExtLong loss weights on" not in log or 1 not in losses:
        print(f"neox_cpu_smoke: plugin not active or no step logged; log: {run / 'train.log'}", file=sys.stderr)
        return 1
    cfg = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    try:
        again = recompute_step1(text, mask, run / "dump", cfg)
    except AssertionError as e:
        print(f"neox_cpu_smoke: recomputation disagrees with the run: {e}", file=sys.stderr)
        return 1
    ok = abs(losses[1] - again) <= REL_TOL * abs(again)
    print(f"step 1: logged lm_loss {losses[1]:.7g}, recomputed {again:.7g} "
          f"(rel. diff {abs(losses[1] - again) / abs(again):.1e}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
