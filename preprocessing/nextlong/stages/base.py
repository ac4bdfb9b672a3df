"""What every stage shares: the run context, units, cache keys, completion markers with checksums.

A stage module (``chunk.py`` ... ``publish.py`` beside this file) declares

* ``NAME``: its folder under the work directory, its marker folder and its ``--stage`` value;
* ``AFTER``: the stages whose units must all be complete before it runs;
* ``PARALLEL``: whether its units may run in separate processes (``--tasks``);
* ``units(ctx)``: its units of work, fixed by the data and the settings, never by the worker count;
* ``key(ctx, unit)``: exactly the settings and input identities that change the unit's bytes, plus the key
  hashes of what it reads;
* ``outputs(ctx, unit)``: the files the unit writes (sized and checksummed into its marker);
* ``run(ctx, unit)``: does one unit, writing under temporary names renamed into place; returns its stats.

The runner (:mod:`nextlong.stages.runner`) writes the marker ``<work>/<stage>/done/<unit>.json`` after the
unit's outputs are in place; a reused unit is checked against its marker (key, then each output's size and
checksum) and redone when anything differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKSUM = "blake2b-128"
_TMP_RE = re.compile(r"\.tmp-\d+")


class SynthesisError(RuntimeError):
    """The run cannot go on (a stage it needs is incomplete, the corpus cannot fill a sample, ...); the
    message says what to do. Reported as one line, exit code 2."""


@dataclass(frozen=True)
class Unit:
    """One unit of work: its name (``shard-00003``, ``block-00012``, ``dataset``) and what ``run`` needs."""

    name: str
    data: Any = None


@dataclass
class Ctx:
    """What a stage sees: the configuration, the work directory, the tokenizer and a per-process memo.
    Worker processes build their own (the tokenizer then loads lazily from ``<work>/tokenizer.json``)."""

    cfg: Any
    work: Path
    tok: Any = None
    progress: Any = None
    shared: dict = field(default_factory=dict)  #: set by the main process, passed to worker processes
    memo: dict = field(default_factory=dict)  #: per-process cache (shards, keys, loaded models)

    def tokenizer(self):
        if self.tok is None:
            from ..tokenization import load_tokenizer

            self.tok = load_tokenizer(str(self.work / "tokenizer.json"), "none", "none")
        return self.tok


def key_hash(key: Any) -> str:
    """Short stable hash of a JSON-able key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_checksum(path: Path, bufsize: int = 8 << 20) -> str:
    """BLAKE2b-128 of the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tmp_name(path: Path, suffix: str = "") -> Path:
    """The temporary name a writer uses before renaming into ``path``: ``.<name>.tmp-<pid><suffix>``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def marker_path(work: Path, stage: str, unit: str) -> Path:
    return work / stage / "done" / f"{unit}.json"


def log_path(work: Path, stage: str, unit: str) -> Path:
    return work / stage / "logs" / f"{unit}.log"


def describe_outputs(work: Path, paths: list[Path]) -> dict[str, dict]:
    """Size and checksum of every output, keyed by its path relative to the work directory."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[os.path.relpath(p, work)] = {"size": st.st_size, CHECKSUM: file_checksum(p)}
    return out


def write_marker(work: Path, stage: str, unit: str, key: dict, stats: dict, seconds: float, cpu_seconds: float,
                 outputs: list[Path]) -> dict:
    """Record a finished unit (written last, atomically: a killed unit leaves no marker)."""
    import time

    path = marker_path(work, stage, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = {"stage": stage, "unit": unit, "key_hash": key_hash(key), "key": key, "stats": stats,
              "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "outputs": describe_outputs(work, outputs)}
    tmp = tmp_name(path)
    with open(tmp, "w") as f:
        f.write(json.dumps(marker, indent=1, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return marker


def read_marker(work: Path, stage: str, unit: str) -> dict | None:
    path = marker_path(work, stage, unit)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("%s: unreadable marker; the unit is redone", path)
        return None


def check_unit(work: Path, stage: str, unit: str, key: dict, verify_files: bool = True) -> tuple[str, dict | None]:
    """``("done", marker)`` when the marker matches ``key`` and every output still has its recorded size and
    checksum; else ``("missing" | "changed" | "damaged: <why>", None)``."""
    m = read_marker(work, stage, unit)
    if m is None:
        return "missing", None
    if m.get("key_hash") != key_hash(key):
        return "changed", None
    for rel, want in (m.get("outputs") or {}).items():
        p = work / rel
        try:
            size = os.stat(p).st_size
        except OSError:
            return f"damaged: {rel} is missing", None
        if size != want["size"]:
            return f"damaged: {rel} has {size} bytes, {want['size']} recorded", None
        if verify_files and file_checksum(p) != want[CHECKSUM]:
            return f"damaged: {rel} does not match its recorded checksum", None
    return "done", m


def sweep_tmp(paths: list[Path]) -> int:
    """Remove the temporary files that killed writers of ``paths`` left (``.<name>.tmp-<pid>*`` and
    ``<name>.tmp-<pid>*``). Returns how many were removed."""
    n = 0
    seen: set[Path] = set()
    for p in paths:
        d = p.parent
        if d in seen or not d.is_dir():
            continue
        seen.add(d)
        names = {q.name for q in paths if q.parent == d}
        for q in d.iterdir():
            m = _TMP_RE.search(q.name)
            if m is None:
                continue
            base = q.name[: m.start()].lstrip(".")
            if base in names and q.is_file():
                q.unlink(missing_ok=True)
                n += 1
    return n


def sweep_all_tmp(root: Path) -> int:
    """Remove every ``*.tmp-<pid>*`` file under ``root`` (only when no other run can be using it)."""
    n = 0
    if not root.is_dir():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if _TMP_RE.search(f):
                Path(dirpath, f).unlink(missing_ok=True)
                n += 1
    return n
