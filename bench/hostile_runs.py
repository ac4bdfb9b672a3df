#!/usr/bin/env python
"""Hostile runs of the pipeline: kills at named moments, a full disk, concurrent runs, damaged work files.

Every case runs ``make_nextlong_bin.py`` as a user would (a subprocess) and checks, after the case:
what is under the final names (nothing, or one complete dataset, never a mix), that a plain rerun ends
with the bytes of a fresh run, and that no temporary file is left. Prints one Markdown table row per case.

    python bench/hostile_runs.py --corpus ../shared/data/openstax_textbooks.jsonl.gz --docs 300 --out /tmp/hostile

``--tmpfs`` also runs the full-disk case on a real, small tmpfs (needs root to mount one).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "preprocessing" / "make_nextlong_bin.py"
NAMES = [f"{n}_document.{e}" for n in ("text", "lossweight", "label") for e in ("bin", "idx")] + ["spans.parquet"]


def digest(prefix: Path) -> str | None:
    """One hash over the dataset's files; None when no file resolves; "MIXED/PARTIAL" when only some do."""
    files = [Path(f"{prefix}_{n}") for n in NAMES + ["manifest.json"]]
    there = [f.exists() for f in files]
    if not any(there):
        return None
    if not all(there):
        return "PARTIAL"
    man = json.loads(files[-1].read_text())
    h = hashlib.blake2b(digest_size=8)
    for f in files[:-1]:
        h.update(f.read_bytes())
    # a mix shows as files of one version next to a manifest of another
    version = man["files"].get("version")
    resolved = {os.path.realpath(f).split(os.sep)[-2] for f in files}
    if len(resolved) != 1 or (version and resolved != {version}):
        return "MIXED"
    return h.hexdigest()


def tmp_files(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*") if ".tmp-" in p.name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="JSONL(.gz) corpus; its first --docs documents are used")
    ap.add_argument("--docs", type=int, default=300, help="documents used, split over 3 files")
    ap.add_argument("--out", required=True, help="scratch folder (emptied)")
    ap.add_argument("--tmpfs", action="store_true", help="also fill a real tmpfs during merge (needs root)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "corpus").mkdir(parents=True)
    opener = gzip.open if args.corpus.endswith(".gz") else open
    with opener(args.corpus, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(args.docs)]
    for i in range(3):
        (out / "corpus" / f"part-{i}.jsonl").write_text("".join(lines[i::3]), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "preprocessing")]))
    base = ["--input", str(out / "corpus" / "part-*.jsonl"), "--tokenizer", "builtin:cl100k_base",
            "--target-length", "4096", "--block-docs", "16", "--emit-labels", "--no-progress", "--no-verify"]

    def run(prefix: Path, *extra: str, fail: str | None = None, work: Path | None = None, wait=True):
        e = dict(env)
        if fail:
            e["NEXTLONG_FAILPOINT"] = fail
        cmd = [sys.executable, str(SCRIPT), *base, "--output-prefix", str(prefix), *extra]
        if work:
            cmd += ["--work-dir", str(work)]
        if not wait:
            return subprocess.Popen(cmd, env=e, stderr=subprocess.PIPE, start_new_session=True)
        t0 = time.time()
        r = subprocess.run(cmd, env=e, capture_output=True, text=True)
        return r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "", time.time() - t0

    # references: settings A (granularity 2048, seed 3) and B (granularity 1024, seed 4), fresh
    A, B = ("--granularity", "2048", "--seed", "3"), ("--granularity", "1024", "--seed", "4")
    ref = {}
    for name, s in (("A", A), ("B", B)):
        rc, last, _ = run(out / f"ref{name}" / "nl", *s)
        assert rc == 0, last
        ref[digest(out / f"ref{name}" / "nl")] = name
    label = {None: "nothing", "PARTIAL": "PARTIAL", "MIXED": "MIXED", **ref}
    rows = []

    def case(title: str, prefix: Path, rc, last: str, expect_after: str, extra_check: str = "") -> None:
        seen = label.get(digest(prefix), "OTHER")
        rc2, last2, _ = run(prefix, *B)
        final = label.get(digest(prefix), "OTHER")
        left = tmp_files(prefix.parent)
        clean_exit = rc == -signal.SIGKILL or (rc == 2 and "Error" not in last and "Traceback" not in last)
        ok = seen == expect_after and final == "B" and rc2 == 0 and not left and clean_exit
        rows.append(f"| {title} | rc {rc}: {last[-110:]} | {seen} | {final} (rc {rc2}) | {len(left)} | "
                    f"{'ok' if ok else 'FAIL'}{extra_check} |")

    # kills at named moments, a dataset A already published, the run switching to B killed
    moments = ["chunk:start", "chunk:before_marker", "embed:before_marker", "gather:before_marker",
               "index:before_marker", "synth:start", "synth:before_marker", "merge:between_files",
               "merge:before_marker", "publish:before_switch", "publish:after_switch"]
    for m in moments:
        p = out / f"kill-{m.replace(':', '-')}" / "nl"
        assert run(p, *A)[0] == 0
        rc, last, _ = run(p, *B, fail=m)
        case(f"kill -9 at `{m}` (A published, run to B)", p, rc, last or "killed",
             "B" if m == "publish:after_switch" else "A")
    # the same kill with nothing published yet
    p = out / "kill-first-merge" / "nl"
    rc, last, _ = run(p, *B, fail="merge:between_files")
    case("kill -9 at `merge:between_files`, nothing published before", p, rc, last or "killed", "nothing")
    # disk full (injected ENOSPC at a named write)
    for m in ("merge:between_files", "publish:before_switch", "synth:start"):
        p = out / f"enospc-{m.replace(':', '-')}" / "nl"
        assert run(p, *A)[0] == 0
        rc, last, _ = run(p, *B, fail=f"{m}=enospc")
        case(f"ENOSPC injected at `{m}` (A published)", p, rc, last, "A")
    if args.tmpfs:
        mnt = out / "tmpfs"
        mnt.mkdir()
        size = sum(os.path.getsize(os.path.realpath(Path(f"{out / 'refA' / 'nl'}_{n}"))) for n in NAMES)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "none", str(mnt)], check=True)
        try:
            p = mnt / "nl"
            w = out / "tmpfs-work"
            assert run(p, *A, work=w)[0] == 0
            rc, last, _ = run(p, *B, work=w)
            seen = label.get(digest(p), "OTHER")
            left = tmp_files(mnt)
            rows.append(f"| real full disk: output on a {int(size * 1.5) >> 10} KiB tmpfs, A published, run to B "
                        f"| rc {rc}: {last[-110:]} | {seen} | (no room for B: rerun not possible) | {len(left)} | "
                        f"{'ok' if seen == 'A' and rc == 2 and not left else 'FAIL'} |")
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    # concurrent runs on one prefix (other work dir) and on one work dir (other prefix)
    p = out / "concurrent" / "nl"
    first = run(p, *B, fail="synth:start=stall", wait=False)
    while not list(Path(f"{p}.work/synth/logs").glob("*.log")):
        time.sleep(0.2)
    rc, last, _ = run(p, *B, work=out / "concurrent" / "other.work")
    rc3, last3, _ = run(out / "concurrent" / "other", *B, work=Path(f"{p}.work"))
    os.killpg(first.pid, signal.SIGTERM)
    first.wait()
    rows.append(f"| second run, same prefix, while the first runs | rc {rc}: {last[-110:]} | - | - | - | "
                f"{'ok' if rc == 2 else 'FAIL'} |")
    rows.append(f"| second run, same work dir, while the first runs | rc {rc3}: {last3[-110:]} | - | - | - | "
                f"{'ok' if rc3 == 2 else 'FAIL'} |")
    rows.append(f"| SIGTERM to the first run (stalled in synth) | rc {first.returncode}: "
                f"{first.stderr.read().decode().strip().splitlines()[-1][-110:]} | - | - | - | "
                f"{'ok' if first.returncode == 143 else 'FAIL'} |")
    # damaged work files, same size
    def damage(title: str, rel: str, how: str) -> None:
        p = out / f"damage-{rel.replace('/', '-')}" / "nl"
        assert run(p, *B)[0] == 0
        f = Path(f"{p}.work") / rel
        if how == "zero":
            size = f.stat().st_size
            with open(f, "r+b") as fh:
                fh.seek(128)
                fh.write(b"\0" * (size - 128))
        elif how == "flip":
            with open(f, "r+b") as fh:
                fh.seek(f.stat().st_size // 2)
                b = fh.read(1)
                fh.seek(-1, 1)
                fh.write(bytes([b[0] ^ 0xFF]))
        elif how == "delete":
            f.unlink()
        elif how == "truncate-marker":
            f.write_text(f.read_text()[:40])
        rc, last, _ = run(p, *B)
        logs = "\\n".join(x for x in [last] if x)
        runs = json.loads(Path(f"{p}.work/runs.jsonl").read_text().splitlines()[-1])["stages"]
        redone = {k: v["ran"] for k, v in runs.items() if v["ran"] and k != "publish"}
        final = label.get(digest(p), "OTHER")
        rows.append(f"| {title} | rc {rc}: {logs[-60:]} | redone {redone} | {final} | {len(tmp_files(p.parent))} | "
                    f"{'ok' if final == 'B' and rc == 0 and redone else 'FAIL'} |")

    damage("zeroed gathered tokens (tokens.npy, same size)", "tokens.npy", "zero")
    damage("zeroed shard tokens (same size)", "pool/shard-00001/tokens.npy", "zero")
    damage("zeroed gathered embeddings (same size)", "embeddings.npy", "zero")
    damage("one byte flipped in index.faiss", "index.faiss", "flip")
    damage("one byte flipped in a synth block", "synth/block-00000_text_document.bin", "flip")
    damage("synth block deleted", "synth/block-00001_spans.parquet", "delete")
    damage("marker cut short (unreadable JSON)", "chunk/done/shard-00000.json", "truncate-marker")
    print("| case | outcome (exit code: last line) | under the final names after | after a plain rerun | "
          "temp files left | verdict |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0 if all(r.endswith("ok |") or "ok" in r.split("|")[-2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
