"""Sharded synthesis: byte-identical output for any task count, and a killed run resumes to the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nextlong.cli import main

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("text", "lossweight", "label")


def _args(corpus, tok, prefix, *extra):
    return ["--input", str(corpus), "--input-name", "pydocs", "--tokenizer", str(tok), "--output-prefix", str(prefix),
            "--target-length",
            "2048", "--seed", "3", "--emit-labels", "--no-progress", "--block-docs", "16", *extra]


def _bytes(prefix) -> dict[str, bytes]:
    out = {f"{n}.{e}": Path(f"{prefix}_{n}_document.{e}").read_bytes() for n in NAMES for e in ("bin", "idx")}
    import pyarrow.parquet as pq

    out["spans"] = pq.read_table(f"{prefix}_spans.parquet").to_pandas().to_csv().encode()
    return out


@pytest.fixture(scope="module")
def sharded_corpus(tmp_path_factory, docs_corpus) -> Path:
    """The corpus as 3 JSONL files: 3 shards for the chunk/embed stages."""
    d = tmp_path_factory.mktemp("sharded")
    lines = docs_corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    for i in range(3):
        (d / f"part-{i}.jsonl").write_text("".join(lines[i::3]), encoding="utf-8")
    return d / "part-*.jsonl"


@pytest.fixture(scope="module")
def one_task(tmp_path_factory, sharded_corpus, cl100k_json):
    prefix = tmp_path_factory.mktemp("one") / "nl"
    assert main(_args(sharded_corpus, cl100k_json, prefix, "--tasks", "1")) == 0
    return prefix


def test_three_tasks_equal_one(tmp_path, sharded_corpus, cl100k_json, one_task):
    prefix = tmp_path / "nl"
    assert main(_args(sharded_corpus, cl100k_json, prefix, "--tasks", "3")) == 0
    parts = sorted((tmp_path / "nl.work" / "synth").glob("part-*.json"))
    assert len(parts) == 3
    assert len(list((tmp_path / "nl.work" / "pool").glob("shard-*/embed.done.json"))) == 3
    assert _bytes(prefix) == _bytes(one_task)


def test_killed_run_resumes_to_identical_bytes(tmp_path, sharded_corpus, cl100k_json, one_task):
    prefix = tmp_path / "nl"
    synth = tmp_path / "nl.work" / "synth"
    cmd = [sys.executable, str(ROOT / "preprocessing" / "make_nextlong_bin.py"),
           *_args(sharded_corpus, cl100k_json, prefix, "--tasks", "3", "--block-docs", "2")]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # kill the whole process group (the run and its task processes) while parts are being written
        if synth.exists() and any(p.name.startswith(".") for p in synth.iterdir()):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-synthesis"
    assert not Path(f"{prefix}_text_document.idx").exists()
    done_before = len(list(synth.glob("part-*.json")))
    assert done_before < 3
    assert main(_args(sharded_corpus, cl100k_json, prefix, "--tasks", "3", "--block-docs", "2")) == 0
    assert _bytes(prefix) == _bytes(one_task)


FAKE_SBATCH = """#!/usr/bin/env python3
# Stands in for Slurm's sbatch: runs every array task of the script here, in order, then prints a job id.
import os, re, subprocess, sys
args = sys.argv[1:]
script = args[-1]
text = open(script).read()
m = re.search(r"^#SBATCH --array=(\\d+)-(\\d+)", text, re.M)
tasks = range(int(m[1]), int(m[2]) + 1) if m else [None]
with open(os.environ["FAKE_SBATCH_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
for i in tasks:
    env = dict(os.environ)
    if i is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(i)
    if subprocess.run(["bash", script], env=env).returncode:
        sys.exit(1)
counter = os.environ["FAKE_SBATCH_LOG"] + ".id"
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1000
open(counter, "w").write(str(n))
print(n)
"""


def test_slurm_executor_chain_gives_identical_bytes(tmp_path, sharded_corpus, cl100k_json, one_task, monkeypatch):
    fake = tmp_path / "sbatch"
    fake.write_text(FAKE_SBATCH)
    fake.chmod(0o755)
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("NEXTLONG_SBATCH", str(fake))
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
    prefix = tmp_path / "nl"
    argv = _args(sharded_corpus, cl100k_json, prefix, "--tasks", "2", "--executor", "slurm", "--partition", "cpu",
                 "--slurm-time", "01:00:00")
    assert main(argv) == 0
    calls = log.read_text().splitlines()
    assert len(calls) == 5
    assert all("--dependency=afterok:" in c for c in calls[1:])
    scripts = sorted((tmp_path / "nl.work" / "slurm").glob("*.sbatch"))
    assert [s.stem for s in scripts] == ["chunk", "embed", "index", "merge", "synth"]
    for s in scripts:
        text = s.read_text()
        assert "--executor" not in text and "#SBATCH --partition=cpu" in text
        assert subprocess.run(["bash", "-n", str(s)]).returncode == 0
    assert "#SBATCH --array=0-1" in (tmp_path / "nl.work" / "slurm" / "synth.sbatch").read_text()
    assert _bytes(prefix) == _bytes(one_task)
