#!/usr/bin/env python3
"""Needle-in-a-haystack / passkey retrieval over context lengths x needle depths on a local HF causal LM.

For every (length, depth) cell, ``--trials`` prompts each hide a random 5-digit key in distractor text and
end with a question; a trial counts as retrieved when the model's greedy continuation is the key (scored in
one teacher-forced pass: the argmax equals the key at every key position). Writes ``needle.csv`` (one row per
cell: accuracy, mean key log-probability, trials) and ``needle.png`` (depth x length heatmap) under ``--out``::

    python launch/needle.py --model /ckpt/Llama-3-8B-NExtLong-128K-hf --out results/needle \\
        --lengths 8192 32768 65536 131072 --depths 0 0.25 0.5 0.75 1 --trials 5 --batch-size 1
    python launch/needle.py --model runs/probe/runs/nextlong_seed1234/hf/step120 --out needle_tiny \\
        --lengths 512 1024 2048 --haystack heldout.jsonl

The haystack is the classic repetitive filler ("The grass is green. ...") unless ``--haystack`` names a text
file or a JSONL file with a ``text`` field. Runs on GPU (bf16) when one is visible, else on CPU (fp32).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "preprocessing"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

LOG = logging.getLogger("needle")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="local HuggingFace causal-LM directory (with tokenizer)")
    p.add_argument("--out", required=True, type=Path, help="output directory for needle.csv and needle.png")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="context lengths in tokens (prompt + key)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths as fractions of the haystack (0 = start, 1 = end)")
    p.add_argument("--trials", type=int, default=5, help="random keys per (length, depth) cell")
    p.add_argument("--haystack", type=Path, help="distractor text: a .txt file or a JSONL file with 'text' (default: "
                   "the repetitive passkey filler)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if visible, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys and haystack offsets")
    p.add_argument("--title", help="heatmap title (default: the model directory name)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def haystack_text(path: Path | None) -> str:
    from nextlong.evaluation.passkey import FILLER

    if path is None:
        return FILLER * 64
    if path.suffix in (".jsonl", ".json"):
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"--haystack {path}: line {lineno}: not a JSON object with 'text'") from None
                if sum(map(len, texts)) > 4_000_000:
                    break
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def validate(a: argparse.Namespace) -> None:
    if not (a.model / "config.json").is_file():
        raise ValueError(f"--model {a.model}: not a HuggingFace model directory (no config.json)")
    if a.haystack is not None and not a.haystack.is_file():
        raise ValueError(f"--haystack {a.haystack}: no such file")
    for name, vals in (("--lengths", a.lengths), ("--trials", [a.trials]), ("--batch-size", [a.batch_size])):
        if any(v < 1 for v in vals):
            raise ValueError(f"{name}: values must be >= 1")
    bad = [d for d in a.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"--depths: {bad[0]} is not in [0, 1]")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        validate(a)
        hay = haystack_text(a.haystack)
    except ValueError as e:
        print(f"needle: error: {e}", file=sys.stderr)
        return 2
    import numpy as np
    from nextlong.evaluation import passkey
    from nextlong.evaluation.scoring import HFScorer, load_causal_lm

    t0 = time.time()
    model, tok = load_causal_lm(a.model, a.device, a.dtype)
    if tok is None:
        print(f"needle: error: --model {a.model}: no tokenizer in the directory", file=sys.stderr)
        return 2

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    ids = np.asarray(encode(hay[: 8 * max(a.lengths) + 1000]), dtype=np.int64)
    prompts = passkey.build_prompts(encode, ids, a.lengths, a.depths, a.trials, seed=a.seed, bos=tok.bos_token_id)
    LOG.info("%d prompts (%d lengths x %d depths x %d trials) on %s", len(prompts), len(a.lengths), len(a.depths),
             a.trials, next(model.parameters()).device)
    scorer = HFScorer(model)
    rows = passkey.score_prompts(prompts, scorer.logits, batch_size=a.batch_size)
    cells = passkey.grid(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "needle.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["length", "depth", "accuracy", "key_logprob", "trials"])
        for (length, depth), c in cells.items():
            w.writerow([length, depth, f"{c['accuracy']:.4f}", f"{c['key_logprob']:.4f}", c["trials"]])
    tmp.replace(a.out / "needle.csv")
    passkey.plot_heatmap(cells, a.out / "needle.png", a.title or f"needle retrieval: {a.model.name}")
    overall = float(np.mean([r["exact"] for r in rows]))
    LOG.info("accuracy %.3f over %d prompts in %.1f s -> %s", overall, len(rows), time.time() - t0, a.out)
    print(json.dumps({"accuracy": overall, "prompts": len(rows), "csv": str(a.out / "needle.csv"),
                      "png": str(a.out / "needle.png")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
