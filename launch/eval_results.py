#!/usr/bin/env python3
"""Collect HELMET, RULER and needle results into one table laid out like the paper's Tables 1 and 2.

Columns: Avg., Recall, RAG, ICL, Re-rank, LongQA, RULER (each averaged over the evaluated lengths, the paper
averages 8K, 16K, 32K, 64K and 128K), plus needle accuracy. Rows: the evaluated model, then the paper's
Llama-3-8B-NExtLong numbers for reference (Table 1: the 128K model; Table 2: the 512K model). Writes
``results.csv``, ``results.md`` and ``per_length.csv`` under ``--out``.

HELMET scores are read from its ``*.json.score`` files (``--helmet-dir``: the ``--output_dir`` given to HELMET's
eval.py); each dataset's metric and the category it counts for follow HELMET's own ``scripts/collect_results.py``.
RULER comes from HELMET's RULER datasets or, with ``--ruler-dir``, from NVIDIA RULER's
``<length>/pred/summary.csv`` files. NarrativeQA uses its GPT-4o score when HELMET's model-based evaluation was
run, else ROUGE-L F1 (marked in the table).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from pathlib import Path

LOG = logging.getLogger("eval_results")

# dataset (as HELMET names it in its output files) -> (category, metric, fallback metric or None)
HELMET_DATASETS: dict[str, tuple[str, str, str | None]] = {
    "json_kv": ("Recall", "substring_exact_match", None),
    "ruler_niah_mk_2": ("Recall", "ruler_recall", None),
    "ruler_niah_mk_3": ("Recall", "ruler_recall", None),
    "ruler_niah_mv": ("Recall", "ruler_recall", None),
    "kilt_nq": ("RAG", "substring_exact_match", None),
    "kilt_triviaqa": ("RAG", "substring_exact_match", None),
    "kilt_hotpotqa": ("RAG", "substring_exact_match", None),
    "kilt_popqa": ("RAG", "substring_exact_match", None),
    "icl_trec_coarse": ("ICL", "exact_match", None),
    "icl_trec_fine": ("ICL", "exact_match", None),
    "icl_banking77": ("ICL", "exact_match", None),
    "icl_clinic150": ("ICL", "exact_match", None),
    "icl_nlu": ("ICL", "exact_match", None),
    "msmarco_rerank_psg": ("Re-rank", "NDCG@10", None),
    "narrativeqa": ("LongQA", "gpt-4-score", "rougeL_f1"),
    "infbench_qa_eng": ("LongQA", "rougeL_f1", None),
    "infbench_choice_eng": ("LongQA", "exact_match", None),
}
RULER_TASKS = ("ruler_niah_s_1", "ruler_niah_s_2", "ruler_niah_s_3", "ruler_niah_mk_1", "ruler_niah_mk_2",
               "ruler_niah_mk_3", "ruler_niah_mq", "ruler_niah_mv", "ruler_cwe", "ruler_fwe", "ruler_vt", "ruler_qa_1",
               "ruler_qa_2")
RULER_METRIC = {"ruler_qa_1": "substring_exact_match", "ruler_qa_2": "substring_exact_match"}
CATEGORIES = ("Recall", "RAG", "ICL", "Re-rank", "LongQA", "RULER")

#: the paper's numbers (HELMET + RULER, averaged over 8K-128K)
PAPER = {
    "128k": ("Llama-3-8B-NExtLong-128K (paper, Table 1)", {"Avg.": 62.58, "Recall": 82.56, "RAG": 60.91,
                                                           "ICL": 81.76, "Re-rank": 31.47, "LongQA": 37.30,
                                                           "RULER": 81.50}),
    "512k": ("Llama-3-8B-NExtLong-512K-Base (paper, Table 2)", {"Avg.": 65.76, "Recall": 91.58, "RAG": 63.68,
                                                                "ICL": 84.08, "Re-rank": 31.27, "LongQA": 38.42,
                                                                "RULER": 85.52}),
}
SCORE_RE = re.compile(r"^(?P<dataset>.+?)_.*_in(?P<length>\d+)_size\d+_shots\d+_.*\.json\.score$")


def helmet_dataset(name: str) -> str | None:
    """The HELMET dataset a score file belongs to (longest known prefix)."""
    best = None
    for d in (*HELMET_DATASETS, *RULER_TASKS):
        if name.startswith(d + "_") and (best is None or len(d) > len(best)):
            best = d
    return best


def read_helmet(directory: Path) -> tuple[dict[tuple[str, int], float], set[str]]:
    """(dataset, input length) -> score (0-100) from HELMET's .json.score files; and the fallbacks used."""
    out: dict[tuple[str, int], float] = {}
    fallbacks: set[str] = set()
    for f in sorted(directory.rglob("*.json.score")):
        m = SCORE_RE.match(f.name)
        d = helmet_dataset(f.name)
        if m is None or d is None:
            LOG.debug("not a HELMET score file of a table dataset: %s", f)
            continue
        try:
            scores = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        if d in HELMET_DATASETS:
            _, metric, fallback = HELMET_DATASETS[d]
        else:
            metric, fallback = RULER_METRIC.get(d, "ruler_recall"), None
        gpt4 = f.with_name(f.name.replace(".json.score", "-gpt4eval_o.json"))
        if metric == "gpt-4-score" and gpt4.exists():
            value = json.loads(gpt4.read_text())["averaged_metrics"][metric] * 100 / 3
        elif metric in scores:
            value = float(scores[metric])
        elif fallback is not None and fallback in scores:
            value = float(scores[fallback])
            fallbacks.add(f"{d}: {fallback} instead of {metric}")
        else:
            raise ValueError(f"{f}: no {metric!r} in the scores")
        out[(d, int(m.group("length")))] = value
    return out, fallbacks


def read_ruler(directory: Path) -> dict[int, float]:
    """NVIDIA RULER: length -> mean task score from <length>/pred/summary.csv."""
    out = {}
    for f in sorted(directory.rglob("pred/summary.csv")):
        length = int(f.parent.parent.name)
        with open(f, newline="") as fh:
            rows = list(csv.reader(fh))
        score = next((r for r in rows if r and r[0].strip().lower() == "score"), None)
        if score is None:
            raise ValueError(f"{f}: no 'Score' row")
        vals = [float(v) for v in score[1:] if v.strip()]
        out[length] = sum(vals) / len(vals)
    return out


def read_needle(path: Path) -> float:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return 100.0 * sum(float(r["accuracy"]) for r in rows) / len(rows)


def table(helmet: dict[tuple[str, int], float], ruler: dict[int, float] | None) -> tuple[dict, list[dict]]:
    """Category scores averaged over lengths, and per-length rows."""
    lengths = sorted({n for _, n in helmet} | set(ruler or {}))
    per_length = []
    for n in lengths:
        row: dict = {"length": n}
        for cat in CATEGORIES:
            if cat == "RULER":
                if ruler is not None:
                    v = [ruler[n]] if n in ruler else []
                else:
                    v = [s for (d, m), s in helmet.items() if m == n and d in RULER_TASKS]
            else:
                v = [s for (d, m), s in helmet.items() if m == n and HELMET_DATASETS.get(d, ("",))[0] == cat]
            row[cat] = sum(v) / len(v) if v else None
        per_length.append(row)
    summary: dict = {}
    for cat in CATEGORIES:
        v = [r[cat] for r in per_length if r[cat] is not None]
        summary[cat] = sum(v) / len(v) if v else None
    done = [summary[c] for c in CATEGORIES if summary[c] is not None]
    summary["Avg."] = sum(done) / len(done) if len(done) == len(CATEGORIES) else None
    return summary, per_length


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--helmet-dir", type=Path, required=True, help="HELMET --output_dir of the evaluated model")
    p.add_argument("--ruler-dir", type=Path, help="NVIDIA RULER benchmark_root/<model> (default: HELMET's RULER)")
    p.add_argument("--needle", type=Path, help="needle.csv written by launch/needle.py")
    p.add_argument("--model-name", required=True, help="row label of the evaluated model")
    p.add_argument("--recipe", choices=tuple(PAPER), default="128k", help="which paper row to show beside it")
    p.add_argument("--out", type=Path, required=True, help="output directory for results.csv / results.md")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if not a.helmet_dir.is_dir():
            raise ValueError(f"--helmet-dir {a.helmet_dir}: no such directory")
        helmet, fallbacks = read_helmet(a.helmet_dir)
        ruler = read_ruler(a.ruler_dir) if a.ruler_dir is not None else None
        needle = read_needle(a.needle) if a.needle is not None and a.needle.exists() else None
    except (ValueError, OSError) as e:
        print(f"eval_results: error: {e}", file=sys.stderr)
        return 2
    summary, per_length = table(helmet, ruler)
    paper_name, paper = PAPER[a.recipe]
    cols = ["Avg.", *CATEGORIES]
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *cols, "needle"])
        w.writerow([a.model_name, *[_fmt(summary[c]) for c in cols], _fmt(needle)])
        w.writerow([paper_name, *[f"{paper[c]:.2f}" for c in cols], "100.00"])
    with open(a.out / "per_length.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["length", *CATEGORIES])
        w.writeheader()
        for r in per_length:
            w.writerow({k: _fmt(v) if k != "length" else v for k, v in r.items()})
    lines = [f"| Model | {' | '.join(cols)} | Needle |", "|---" * (len(cols) + 2) + "|",
             f"| {a.model_name} | {' | '.join(_fmt(summary[c]) for c in cols)} | {_fmt(needle)} |",
             f"| {paper_name} | {' | '.join(f'{paper[c]:.2f}' for c in cols)} | 100 (Fig. 9) |", "",
             f"Lengths evaluated: {', '.join(str(r['length']) for r in per_length) or 'none'} (paper: 8K-128K). "
             "Avg. is shown only when every column has a score."]
    lines += [f"Note: {x}." for x in sorted(fallbacks)]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
