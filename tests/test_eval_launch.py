"""launch/eval.sbatch --dry-run and launch/eval_results.py (HELMET / RULER / needle results -> paper-style table)."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "eval.sbatch"
sys.path.insert(0, str(ROOT / "launch"))

import eval_results  # noqa: E402


def _dry(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_MODEL", "NEOX_CKPT", "RULER", "HELMET",
                                                                      "NEXTLONG_CKPT", "EVAL_OUT"))}
    full.update(env)
    return subprocess.run(["bash", str(SBATCH), *args], env=full, capture_output=True, text=True, cwd=ROOT)


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def test_dry_run_from_neox_checkpoint(tmp_path):
    p = _dry({"NEOX_CKPT_DIR": "/ckpt/llama3_8b_nextlong_128k/global_step1000", "HELMET_DIR": "/opt/HELMET",
              "EVAL_OUT": str(tmp_path / "ev"), "PYTHON": "py3"}, "--dry-run")
    assert p.returncode == 0, p.stderr
    cmds = _commands(p.stdout)
    print(p.stdout)
    assert not (tmp_path / "ev").exists(), "a dry run creates nothing"
    hf = str(tmp_path / "ev" / "hf")
    conv = cmds[1]
    assert conv[0] == "env" and "MODE=to-hf" in conv and "RECIPE=128k" in conv and f"HF_OUT={hf}" in conv
    assert "NEOX_CKPT_DIR=/ckpt/llama3_8b_nextlong_128k/global_step1000" in conv
    assert conv[-1] == str(ROOT / "launch" / "convert.sbatch")
    helmet = [c for c in cmds if "eval.py" in c]
    configs = [c[c.index("--config") + 1] for c in helmet]
    assert configs == [f"configs/{t}{s}.yaml" for t in ("recall", "rag", "icl", "rerank", "longqa", "ruler")
                       for s in ("", "_short")]
    for c in helmet:
        assert c[:3] == ["(cd", "/opt/HELMET", "&&"] and c[3] == "py3"
        assert c[c.index("--model_name_or_path") + 1] == hf
        assert c[c.index("--use_chat_template") + 1] == "False)"
    needle = next(c for c in cmds if c[1].endswith("launch/needle.py"))
    assert needle[needle.index("--model") + 1] == hf
    assert needle[needle.index("--lengths") + 1 : needle.index("--depths")] == ["8192", "16384", "32768", "65536",
                                                                                  "131072"]
    collect = cmds[-1]
    assert collect[1].endswith("launch/eval_results.py") and "--ruler-dir" not in collect
    assert collect[collect.index("--recipe") + 1] == "128k"
    assert collect[collect.index("--model-name") + 1] == "llama3_8b_nextlong_128k_global_step1000"


def test_dry_run_hf_model_with_nvidia_ruler(tmp_path):
    p = _dry({"HF_MODEL": "/models/Llama-3-8B-NExtLong-512K-Base", "HELMET_DIR": "/opt/HELMET", "RECIPE": "512k",
              "RULER_DIR": "/opt/RULER", "RULER_MODEL_NAME": "nextlong", "HELMET_LENGTHS": "long",
              "EVAL_OUT": str(tmp_path / "ev")}, "--dry-run")
    assert p.returncode == 0, p.stderr
    cmds = _commands(p.stdout)
    assert not any("convert.sbatch" in " ".join(c) for c in cmds), "an HF model is not converted"
    assert not any("configs/ruler" in " ".join(c) for c in cmds)
    assert ["(cd", "/opt/RULER/scripts", "&&", "bash", "run.sh", "nextlong", "synthetic)"] in cmds
    assert len([c for c in cmds if "eval.py" in c]) == 5  # 128K configs only
    collect = cmds[-1]
    assert collect[collect.index("--ruler-dir") + 1] == "/opt/RULER/scripts/benchmark_root/nextlong"
    assert collect[collect.index("--recipe") + 1] == "512k"


@pytest.mark.parametrize("env, message", [
    ({"HELMET_DIR": "/opt/HELMET"}, "set HF_MODEL"),
    ({"HF_MODEL": "/m"}, "HELMET_DIR"),
    ({"HF_MODEL": "/m", "HELMET_DIR": "/opt/HELMET", "RECIPE": "64k"}, "RECIPE must be 128k or 512k"),
])
def test_dry_run_refuses_missing_settings(env, message):
    p = _dry(env, "--dry-run")
    assert p.returncode != 0 and message in p.stderr


def test_unknown_argument_exit_2():
    p = _dry({"HF_MODEL": "/m", "HELMET_DIR": "/opt/HELMET"}, "--dryrun")
    assert p.returncode == 2 and "unknown argument --dryrun" in p.stderr


def _score(d: Path, dataset: str, length: int, scores: dict) -> None:
    name = (f"{dataset}_v1_test_in{length}_size100_shots2_sampFalsemax20min0t0.0p1.0_chatFalse_42.json.score")
    (d / name).write_text(json.dumps(scores))


def test_collect_table(tmp_path):
    h = tmp_path / "helmet"
    h.mkdir()
    for n, base in ((8192, 80.0), (131072, 40.0)):
        _score(h, "json_kv", n, {"substring_exact_match": base})
        for t in ("ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv"):
            _score(h, t, n, {"ruler_recall": base + 10})
        for t in ("kilt_nq", "kilt_triviaqa", "kilt_hotpotqa", "kilt_popqa"):
            _score(h, t, n, {"substring_exact_match": base / 2})
        for t in ("icl_trec_coarse", "icl_trec_fine", "icl_banking77", "icl_clinic150", "icl_nlu"):
            _score(h, t, n, {"exact_match": base - 10})
        _score(h, "msmarco_rerank_psg", n, {"NDCG@10": 20.0})
        _score(h, "narrativeqa", n, {"rougeL_f1": 30.0})
        _score(h, "infbench_qa_eng", n, {"rougeL_f1": 30.0})
        _score(h, "infbench_choice_eng", n, {"exact_match": 60.0})
        for t in eval_results.RULER_TASKS:  # recall.yaml's three RULER tasks are the same runs (same file)
            if t not in ("ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv"):
                _score(h, t, n, {"ruler_recall": base, "substring_exact_match": base})
    needle = tmp_path / "needle.csv"
    needle.write_text("length,depth,accuracy,key_logprob,trials\n8192,0.0,1.0,-0.1,5\n8192,1.0,0.5,-1,5\n")
    out = tmp_path / "res"
    assert eval_results.main(["--helmet-dir", str(h), "--needle", str(needle), "--model-name", "mine",
                              "--recipe", "128k", "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        mine, paper = list(csv.DictReader(f))
    # Recall per length: (base + 3 (base + 10)) / 4 -> 87.5 and 47.5 -> mean 67.5
    expect = {"Recall": 67.5, "RAG": 30.0, "ICL": 50.0, "Re-rank": 20.0, "LongQA": 40.0, "RULER": 60.0 + 30 / 13}
    for k, v in expect.items():
        assert float(mine[k]) == pytest.approx(v, abs=0.005)  # written with 2 decimals
    assert float(mine["Avg."]) == pytest.approx(sum(expect.values()) / 6, abs=0.005)
    assert float(mine["needle"]) == pytest.approx(75.0)
    assert paper["model"].startswith("Llama-3-8B-NExtLong-128K") and float(paper["Avg."]) == 62.58
    md = (out / "results.md").read_text()
    assert "narrativeqa: rougeL_f1 instead of gpt-4-score" in md and "| mine |" in md


def test_collect_partial_and_nvidia_ruler(tmp_path):
    h = tmp_path / "helmet"
    h.mkdir()
    _score(h, "json_kv", 131072, {"substring_exact_match": 50.0})
    r = tmp_path / "ruler" / "synthetic"
    for n, s in ((4096, "90,80"), (8192, "70,60")):
        (r / str(n) / "pred").mkdir(parents=True)
        (r / str(n) / "pred" / "summary.csv").write_text(f"Tasks,niah_single_1,vt\nScore,{s}\nNulls,0/500,0/500\n")
    out = tmp_path / "res"
    assert eval_results.main(["--helmet-dir", str(h), "--ruler-dir", str(tmp_path / "ruler"), "--model-name", "m",
                              "--recipe", "512k", "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        mine, paper = list(csv.DictReader(f))
    assert float(mine["RULER"]) == pytest.approx(75.0) and float(mine["Recall"]) == 50.0
    assert mine["Avg."] == "n/a" and mine["RAG"] == "n/a"
    assert float(paper["Avg."]) == 65.76


def test_collect_bad_score_file_exit_2(tmp_path, capsys):
    h = tmp_path / "helmet"
    h.mkdir()
    _score(h, "json_kv", 8192, {"wrong_metric": 1.0})
    assert eval_results.main(["--helmet-dir", str(h), "--model-name", "m", "--out", str(tmp_path / "o")]) == 2
    assert "no 'substring_exact_match' in the scores" in capsys.readouterr().err
