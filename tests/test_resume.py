"""Stages, reuse and resume: byte-identical output for any task count, a changed setting redoes only the
units whose key holds it, damaged work files are caught and redone, a killed run resumes to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from nextlong.cli import main

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("text", "lossweight", "label")


def _args(corpus: Path, tok, prefix, *extra):
    return ["--input", str(corpus / "part-0.jsonl"), "--input", str(corpus / "part-[12].jsonl"),
            "--input-name", "a", "--input-name", "b", "--tokenizer", str(tok), "--output-prefix", str(prefix),
            "--target-length", "1024", "--seed", "3", "--emit-labels", "--no-progress", "--block-docs", "8", *extra]


def _bytes(prefix) -> dict[str, bytes]:
    out = {f"{n}.{e}": Path(f"{prefix}_{n}_document.{e}").read_bytes() for n in NAMES for e in ("bin", "idx")}
    out["spans"] = Path(f"{prefix}_spans.parquet").read_bytes()
    return out


def _last_run(prefix) -> dict:
    lines = Path(f"{prefix}.work/runs.jsonl").read_text().splitlines()
    return {k: v["ran"] for k, v in json.loads(lines[-1])["stages"].items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs_corpus) -> Path:
    """90 documents as 3 JSONL files, given as two inputs (a: 1 file, b: 2 files): 3 shards."""
    d = tmp_path_factory.mktemp("sharded")
    lines = docs_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:90]
    for i in range(3):
        (d / f"part-{i}.jsonl").write_text("".join(lines[i::3]), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def one_task(tmp_path_factory, corpus, cl100k_json):
    prefix = tmp_path_factory.mktemp("one") / "nl"
    assert main(_args(corpus, cl100k_json, prefix, "--tasks", "1")) == 0
    return prefix


@pytest.fixture(scope="module")
def seed4(tmp_path_factory, corpus, cl100k_json):
    prefix = tmp_path_factory.mktemp("seed4") / "nl"
    assert main(_args(corpus, cl100k_json, prefix, "--seed", "4", "--no-verify")) == 0
    return prefix


def test_units_are_fixed_by_the_data_and_tasks_change_no_byte(tmp_path, corpus, cl100k_json, one_task):
    prefix = tmp_path / "nl"
    assert main(_args(corpus, cl100k_json, prefix, "--tasks", "2")) == 0
    work = tmp_path / "nl.work"
    n_blocks = len(list((work / "synth" / "done").glob("block-*.json")))
    assert n_blocks == len(list((one_task.parent / "nl.work" / "synth" / "done").glob("block-*.json"))) > 3
    assert len(list((work / "embed" / "done").glob("shard-*.json"))) == 3
    assert _bytes(prefix) == _bytes(one_task)
    # published files are copies: no inode shared with the work directory
    work_inodes = {os.stat(p).st_ino for p in work.rglob("*") if p.is_file()}
    for p in tmp_path.glob("nl_*"):
        assert p.is_symlink() and os.stat(p).st_ino not in work_inodes
    # --tasks changes nothing: a rerun with another task count runs no unit but publish
    assert main(_args(corpus, cl100k_json, prefix, "--tasks", "3")) == 0
    assert _last_run(prefix) == {"chunk": 0, "embed": 0, "gather": 0, "index": 0, "synth": 0, "merge": 0,
                                 "publish": 1}
    runs = json.loads(Path(f"{prefix}_manifest.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0]["stages"]["chunk"]["ran"] == 3  # the first run's times are kept


@pytest.mark.parametrize("change", [("--seed", "4"), ("--mix", "1", "--mix", "2")])
def test_changed_synthesis_setting_reuses_the_pool(tmp_path, corpus, cl100k_json, one_task, seed4, change):
    import shutil

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    t0 = time.time()
    assert main(_args(corpus, cl100k_json, prefix, *change)) == 0
    wall = time.time() - t0
    ran = _last_run(prefix)
    assert ran["chunk"] == ran["embed"] == ran["gather"] == ran["index"] == 0, ran
    assert ran["synth"] > 0 and ran["merge"] == 1
    fresh = seed4
    if change[0] != "--seed":
        fresh = tmp_path / "fresh" / "nl"
        assert main(_args(corpus, cl100k_json, fresh, *change, "--no-verify")) == 0
    assert _bytes(prefix) == _bytes(fresh)
    print(f"{change}: units redone {ran}, {wall:.1f} s")


def test_max_samples_and_input_paths_reuse_everything_they_can(tmp_path, corpus, cl100k_json, one_task):
    import shutil

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    # the same files through another spelling of their paths, and fewer samples
    other = corpus.parent / "." / corpus.name
    assert main(_args(Path(os.path.relpath(other)), cl100k_json, prefix, "--max-samples", "5")) == 0
    ran = _last_run(prefix)
    assert ran == {"chunk": 0, "embed": 0, "gather": 0, "index": 0, "synth": 0, "merge": 1, "publish": 1}
    m = json.loads(Path(f"{prefix}_manifest.json").read_text())["counts"]
    assert m["samples_out"] == 5
    assert m["meta_documents_processed"] == m["samples_out"] + sum(m["dropped"].values())
    ref = _bytes(one_task)
    got = _bytes(prefix)
    n = 5
    ref_idx = np.frombuffer(ref["text.bin"], dtype=np.int32)
    assert got["text.bin"] == ref_idx[: n * 1024].tobytes()


def test_zeroed_work_file_is_caught_and_redone(tmp_path, corpus, cl100k_json, one_task, caplog):
    import shutil

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    for rel in ("tokens.npy", "pool/shard-00001/embeddings.npy"):
        p = Path(f"{prefix}.work") / rel
        size = p.stat().st_size
        with open(p, "r+b") as f:  # zero the data, keep the size and the .npy header
            f.seek(128)
            f.write(b"\0" * (size - 128))
    # temporary files a killed run would leave, in the work directory and beside the outputs
    stale = [Path(f"{prefix}.work/synth/.block-00000_text_document.bin.tmp-999999"),
             Path(f"{prefix}.work/.tokens.npy.tmp-999999.npy"), tmp_path / ".nl_spans.parquet.tmp-999999"]
    for f in stale:
        f.write_bytes(b"partial")
    assert main(_args(corpus, cl100k_json, prefix)) == 0
    assert not any(f.exists() for f in stale)
    assert "does not match its recorded checksum; redoing it" in caplog.text
    ran = _last_run(prefix)
    assert ran["chunk"] == 0 and ran["embed"] == 1 and ran["gather"] == 1
    assert _bytes(prefix) == _bytes(one_task)


def _cmd(corpus, tok, prefix, *extra):
    return [sys.executable, str(ROOT / "preprocessing" / "make_nextlong_bin.py"), *_args(corpus, tok, prefix, *extra)]


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "preprocessing")]))
    env.update(kw)
    return env


@pytest.mark.parametrize("moment", ["merge:between_files", "publish:before_switch"])
def test_kill_keeps_the_previous_dataset_and_resumes(tmp_path, corpus, cl100k_json, one_task, seed4, moment):
    import shutil

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    assert main(_args(corpus, cl100k_json, prefix, "--no-verify")) == 0  # seed 3 published
    before = _bytes(prefix)
    res = subprocess.run(_cmd(corpus, cl100k_json, prefix, "--seed", "4", "--no-verify"), capture_output=True,
                         env=_env(NEXTLONG_FAILPOINT=moment), timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()[-2000:]
    assert _bytes(prefix) == before  # the previous complete dataset, nothing mixed in
    assert main(_args(corpus, cl100k_json, prefix, "--seed", "4")) == 0
    assert _bytes(prefix) == _bytes(seed4)
    assert not list(tmp_path.rglob("*.tmp-*"))  # temporary files of the killed run are gone
    assert len([d for d in (tmp_path / "nl.data").iterdir() if not d.is_symlink()]) == 1


def test_disk_full_during_merge_is_one_line_and_publishes_nothing_partial(tmp_path, corpus, cl100k_json, one_task):
    import shutil

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    res = subprocess.run(_cmd(corpus, cl100k_json, prefix), capture_output=True, timeout=300,
                         env=_env(NEXTLONG_FAILPOINT="merge:between_files=enospc"))
    err = res.stderr.decode()
    assert res.returncode == 2 and "Traceback" not in err
    assert "no space left on the device" in err.splitlines()[-1]
    assert not any(p.exists() for p in tmp_path.glob("nl_*"))  # nothing under the final names resolves
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_second_run_on_the_same_prefix_is_refused(tmp_path, corpus, cl100k_json, one_task):
    import shutil

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    shutil.rmtree(f"{prefix}.work/synth/logs")
    proc = subprocess.Popen(_cmd(corpus, cl100k_json, prefix, "--seed", "5"), stderr=subprocess.PIPE,
                            env=_env(NEXTLONG_FAILPOINT="synth:start=stall"), start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(Path(f"{prefix}.work/synth/logs").glob("*.log")):
            time.sleep(0.2)
        other = tmp_path / "other.work"
        res = subprocess.run(_cmd(corpus, cl100k_json, prefix, "--work-dir", str(other)), capture_output=True,
                             env=_env(), timeout=300)
        assert res.returncode == 2 and b"is in use by another run" in res.stderr
        assert b"Traceback" not in res.stderr
        assert not other.exists()  # the refused run left no work directory
        status = subprocess.run(_cmd(corpus, cl100k_json, prefix, "--seed", "5", "--status"), capture_output=True,
                                env=_env(), timeout=300, text=True)
        assert status.returncode == 0
        assert "chunk         3 done      0 to do" in status.stdout
        assert "block-00000: changed" in status.stdout and "merge    waits for the stages before it" in status.stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pids: list[int]) -> list[str]:
    """Command lines of the processes still running (zombies waiting for a reaper do not count)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
        if state != "Z":
            out.append(cmd)
    return out


def test_sigterm_stops_every_worker(tmp_path, corpus, cl100k_json, one_task):
    import shutil

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    shutil.rmtree(f"{prefix}.work/synth/logs")
    proc = subprocess.Popen(_cmd(corpus, cl100k_json, prefix, "--seed", "6", "--tasks", "2"), stderr=subprocess.PIPE,
                            env=_env(NEXTLONG_FAILPOINT="synth:start=stall"))
    logs = Path(f"{prefix}.work/synth/logs")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(logs.glob("*.log"))) < 2:
        time.sleep(0.2)
    children = _children(proc.pid)
    assert len(children) >= 2  # two workers (and the queue's manager process)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert b"stopped by SIGTERM" in err and b"Traceback" not in err
    deadline = time.time() + 10
    while time.time() < deadline and _alive(children):
        time.sleep(0.2)
    assert _alive(children) == []


def test_failed_invocation_leaves_no_work_directory(tmp_path, cl100k_json):
    prefix = tmp_path / "out" / "nl"
    assert main(["--input", str(tmp_path / "nothing-*.jsonl"), "--tokenizer", str(cl100k_json), "--output-prefix",
                 str(prefix), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()


FAKE_SBATCH = """#!/usr/bin/env python3
# Stands in for Slurm's sbatch: runs every array task of the script here, in order, then prints a job id.
import os, re, subprocess, sys
args = sys.argv[1:]
script = args[-1]
text = open(script).read()
m = re.search(r"^#SBATCH --array=(\\S+)", text, re.M)
tasks = [None]
if m:  # Slurm's syntax: 0-2,5,7-8
    tasks = [i for part in m[1].split(",") for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
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


def test_slurm_executor_chain_gives_identical_bytes(tmp_path, corpus, cl100k_json, one_task, monkeypatch):
    fake = tmp_path / "sbatch"
    fake.write_text(FAKE_SBATCH)
    fake.chmod(0o755)
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("NEXTLONG_SBATCH", str(fake))
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "preprocessing")]))
    prefix = tmp_path / "nl"
    argv = _args(corpus, cl100k_json, prefix, "--tasks", "2", "--executor", "slurm", "--partition", "cpu",
                 "--slurm-time", "01:00:00")
    assert main(argv) == 0
    calls = log.read_text().splitlines()
    scripts = sorted((tmp_path / "nl.work" / "slurm").glob("*.sbatch"))
    assert [s.stem for s in scripts] == ["chunk", "embed", "gather", "index", "merge", "synth"]
    assert len(calls) == 6 and all("--dependency=afterok:" in c for c in calls[1:])
    for s in scripts:
        text = s.read_text()
        assert "--executor" not in text and "#SBATCH --partition=cpu" in text
        assert subprocess.run(["bash", "-n", str(s)]).returncode == 0
    assert "#SBATCH --array=0-1" in (tmp_path / "nl.work" / "slurm" / "synth.sbatch").read_text()
    assert _bytes(prefix) == _bytes(one_task)
    # resubmitting the finished chain would submit no job for the complete pool stages
    from nextlong.cli import build_parser, config_from_args
    from nextlong.slurm import array_spec, complete_at_submit, pending_tasks

    cfg = config_from_args(build_parser().parse_args(argv))
    assert complete_at_submit(cfg) == {"chunk", "embed", "gather", "index", "synth"}
    # a lost unit: only the array task that owns it is submitted again
    markers = sorted((tmp_path / "nl.work" / "synth" / "done").glob("block-*.json"))
    assert len(markers) >= 2
    markers[-1].unlink()
    owner = (len(markers) - 1) % 2
    assert pending_tasks(cfg) == {"chunk": [], "embed": [], "gather": [], "index": [], "synth": [owner]}
    log.write_text("")
    assert main(argv) == 0
    assert [c.rsplit("/", 1)[-1] for c in log.read_text().splitlines()] == ["synth.sbatch", "merge.sbatch"]
    assert f"#SBATCH --array={owner}\n" in (tmp_path / "nl.work" / "slurm" / "synth.sbatch").read_text()
    assert _bytes(prefix) == _bytes(one_task)
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and array_spec([3]) == "3"


def test_failed_verification_puts_the_previous_dataset_back(tmp_path, corpus, cl100k_json, one_task, monkeypatch):
    import shutil

    from nextlong import pipeline

    prefix = tmp_path / "nl"
    shutil.copytree(f"{one_task}.work", f"{prefix}.work")
    assert main(_args(corpus, cl100k_json, prefix, "--no-verify")) == 0
    before = _bytes(prefix)
    # the verifier is replaced by one that rejects everything: what is under test is what publish does then
    monkeypatch.setattr(pipeline, "verify_outputs", lambda cfg, manifest=None: False)
    assert main(_args(corpus, cl100k_json, prefix, "--max-samples", "3")) == 1
    assert _bytes(prefix) == before
    versions = [d for d in (tmp_path / "nl.data").iterdir() if not d.is_symlink()]
    assert len(versions) == 2  # the rejected version is kept for inspection
