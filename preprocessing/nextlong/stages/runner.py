"""One runner for every stage: skip what is done and intact, run the rest locally or as one array task.

For each unit of a stage (:mod:`nextlong.stages.base`): if its marker matches the unit's key and every
output still has its recorded size and checksum, it is reused; otherwise (no marker, changed key, damaged
output, said in the log) it runs: temporary files of killed writers are removed, the unit's log goes to
``<work>/<stage>/logs/<unit>.log``, its outputs are renamed into place, and its marker is written last.

``--tasks N`` runs the units of a stage in N spawned processes; ``--stage S --task-index i`` runs the
units ``j`` with ``j mod N == i`` (a Slurm array task, or any other engine). The bytes never depend on N.

A run holds locks: a full run or a whole stage locks the work directory exclusively, an array task shares
it with the other array tasks; runs that write the dataset also lock the output prefix. A second run gets
a one-line error. SIGTERM and SIGINT stop every worker process; finished units are kept.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..failpoints import failpoint
from ..tokenization import save_tokenizer_json
from .base import (
    Ctx,
    SynthesisError,
    Unit,
    check_unit,
    log_path,
    marker_path,
    read_marker,
    sweep_all_tmp,
    sweep_tmp,
    tmp_name,
    write_marker,
)
from .registry import MODULES, ORDER

log = logging.getLogger("nextlong.runner")


class Interrupted(SynthesisError):  # noqa: N818 - a signal, reported as such
    """SIGTERM or SIGINT arrived; every worker was stopped."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: every worker process was stopped; finished "
                         "units are kept, rerun the same command to resume")


class LockedError(SynthesisError):
    """Another run holds the work directory or the output prefix."""


# ------------------------------------------------------------------------------------------ locks


@contextmanager
def _lock(path: Path, exclusive: bool, what: str, remove: bool):
    """flock ``path`` without waiting; ``remove``: delete the lock file when done (inode-checked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            try:
                holder = path.read_text().strip()
            except OSError:
                pass
            raise LockedError(f"{what} is in use by another run{f' ({holder})' if holder else ''}; wait for it "
                              f"to finish or stop it (lock: {path})") from None
        try:  # the file may have been removed by the run that held it: lock the file that is there now
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if exclusive:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
    try:
        yield
    finally:
        if remove and exclusive:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(fd)


def prefix_lock_path(cfg) -> Path:
    p = Path(cfg.output_prefix)
    return p.parent / f".{p.name}.lock"


# ------------------------------------------------------------------------------------------ signals


@contextmanager
def _stop_on_signals():
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main process (the caller stops the workers)."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------ one unit


def execute_unit(ctx: Ctx, name: str, unit: Unit, key: dict) -> dict:
    """Run one unit and write its marker; returns the marker."""
    mod = MODULES[name]
    outs = mod.outputs(ctx, unit)
    sweep_tmp(outs)
    lp = log_path(ctx.work, name, unit.name)
    lp.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(lp, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("nextlong")
    pkg.addHandler(handler)
    try:
        t0, c0 = time.time(), time.process_time()
        failpoint(f"{name}:start")
        stats = mod.run(ctx, unit)
        failpoint(f"{name}:before_marker")
        return write_marker(ctx.work, name, unit.name, key, stats, time.time() - t0, time.process_time() - c0, outs)
    except OSError as e:
        sweep_tmp(outs)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SynthesisError(f"stage {name}, unit {unit.name}: no space left on the device "
                                 f"({e.filename or 'writing its outputs'}); free some space and rerun: finished "
                                 "units are kept, nothing partial is published") from None
        raise
    except BaseException:
        sweep_tmp(outs)
        raise
    finally:
        pkg.removeHandler(handler)
        handler.close()


# --- worker processes (module-level functions so that a spawned process can import them) ---
_WORKER: dict = {}


def _set_parent_death_signal() -> None:
    """Linux: this worker gets SIGTERM when the main process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(cfg_dict: dict, work: str, shared: dict, slots) -> None:
    from ..config import SynthesisConfig

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides; it stops us with SIGTERM
    _set_parent_death_signal()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nextlong").setLevel(logging.INFO)  # into the unit's log file; the console shows warnings
    ctx = Ctx(SynthesisConfig(**cfg_dict), Path(work), shared=shared)
    ctx.memo["slot"] = slots.get() if slots is not None else 0
    _WORKER.clear()
    _WORKER["ctx"] = ctx


def _run_in_worker(name: str, unit: Unit, key: dict) -> dict:
    return execute_unit(_WORKER["ctx"], name, unit, key)


def _stop_pool(ex: ProcessPoolExecutor) -> None:
    """Terminate every worker now (a plain shutdown would wait for the running units)."""
    procs = list(getattr(ex, "_processes", {}).values())  # the executor offers no public terminate()
    for p in procs:
        if p.is_alive():
            p.terminate()
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


# ------------------------------------------------------------------------------------------ one stage


def plan_stage(ctx: Ctx, name: str, task_index: int | None = None, verify_files: bool = True) -> list[dict]:
    """Every unit of the stage (or of one array task's share) with its key and state."""
    mod = MODULES[name]
    units = mod.units(ctx)
    out = []
    for i, u in enumerate(units):
        if task_index is not None and i % ctx.cfg.tasks != task_index:
            continue
        k = mod.key(ctx, u)
        state, marker = check_unit(ctx.work, name, u.name, k, verify_files=verify_files)
        out.append({"index": i, "unit": u, "key": k, "state": state, "marker": marker})
    return out


def require_complete(ctx: Ctx, name: str) -> None:
    """Raise a one-line error when a stage this one reads is not complete (checksums included)."""
    mod = MODULES[name]
    rows = plan_stage(ctx, name)
    markers = [r["marker"] for r in rows]
    if all(m is not None for m in markers) or getattr(mod, "enough", lambda c, m: False)(ctx, markers):
        return
    missing = [f"{r['unit'].name} ({r['state']})" for r in rows if r["marker"] is None]
    raise SynthesisError(f"stage {name!r} is not complete: {len(missing)} unit(s) to do, e.g. {missing[:3]}; "
                         f"run --stage {name} first (or the whole pipeline)")


def run_stage(ctx: Ctx, name: str, task_index: int | None = None) -> dict:
    """Run the stage's units that are not done (all of them, or one array task's share). Returns counts."""
    mod = MODULES[name]
    t0 = time.time()
    rows = plan_stage(ctx, name, task_index)
    always = getattr(mod, "ALWAYS", False)
    markers: list[dict | None] = [r["marker"] for r in rows]
    todo = [r for r in rows if r["marker"] is None or always]
    damaged = [r for r in todo if r["state"].startswith("damaged")]
    changed = sum(1 for r in todo if r["state"] == "changed")
    if changed and not always:
        log.info("%s: %d unit(s) made under other settings are redone", name, changed)
    for r in damaged:
        log.warning("%s %s: %s; redoing it", name, r["unit"].name, r["state"])
    enough = getattr(mod, "enough", None)
    reused = len(rows) - len(todo)
    if reused:
        log.info("%s: %d of %d unit(s) already done and intact", name, reused, len(rows))
    if hasattr(mod, "shared"):
        ctx.shared.update(mod.shared(ctx))
    ran = _execute(ctx, name, rows, todo, markers, enough, local_pool=task_index is None)
    return {"units": len(rows), "reused": reused, "ran": ran, "redone_damaged": len(damaged),
            "wall_seconds": round(time.time() - t0, 3)}


def _execute(ctx: Ctx, name: str, rows: list[dict], todo: list[dict], markers: list, enough,
             local_pool: bool = True) -> int:
    """Run ``todo`` in index order; with ``enough``, stop once the done units suffice. Returns units run."""
    mod = MODULES[name]
    pos = {r["index"]: i for i, r in enumerate(rows)}
    if not todo or (enough is not None and enough(ctx, markers)):
        return 0
    bar = ctx.progress(total=len(todo), desc=name, unit="unit") if ctx.progress and len(todo) > 1 else None
    ran = 0
    parallel = local_pool and getattr(mod, "PARALLEL", False) and ctx.cfg.tasks > 1 and len(todo) > 1
    try:
        if not parallel:
            for r in todo:
                if enough is not None and enough(ctx, markers):
                    break
                markers[pos[r["index"]]] = execute_unit(ctx, name, r["unit"], r["key"])
                ran += 1
                if bar is not None:
                    bar.update(1)
            return ran
        n = min(ctx.cfg.tasks, len(todo))
        mpctx = mp.get_context("spawn")
        manager = mpctx.Manager()
        slots = manager.Queue()
        for i in range(n):
            slots.put(i)
        ex = ProcessPoolExecutor(max_workers=n, mp_context=mpctx, initializer=_init_worker,
                                 initargs=(ctx.cfg.to_dict(), str(ctx.work), ctx.shared, slots))
        try:
            queue = list(todo)
            running: dict[Future, dict] = {}
            while queue or running:
                while queue and len(running) < n and not (enough is not None and enough(ctx, markers)):
                    r = queue.pop(0)
                    running[ex.submit(_run_in_worker, name, r["unit"], r["key"])] = r
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    r = running.pop(f)
                    markers[pos[r["index"]]] = f.result()
                    ran += 1
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            _stop_pool(ex)
            raise
        else:
            ex.shutdown(wait=True)
        finally:
            manager.shutdown()
        return ran
    finally:
        if bar is not None:
            if bar.n != bar.total:  # stopped early (--max-samples reached): the bar ends at what was done
                bar.total = bar.n
                bar.refresh()
            bar.close()


# ------------------------------------------------------------------------------------------ whole runs


def prepare(ctx: Ctx) -> None:
    """The work directory's tokenizer.json (what worker processes load) and the tokenizer's hash."""
    tokenizer_path = ctx.work / "tokenizer.json"
    # tokenizer.json.source: "<sha256 of the run's tokenizer> <bytes of tokenizer.json>": the file is current
    stamp = ctx.work / "tokenizer.json.source"
    try:
        current = stamp.read_text().split() == [ctx.tok.sha256, str(tokenizer_path.stat().st_size)]
    except OSError:
        current = False
    if not current:  # the portable export of a 100k-token vocabulary takes seconds: done once per tokenizer
        tmp = tmp_name(tokenizer_path)
        save_tokenizer_json(ctx.tok.tokenizer, tmp)  # readable by GPT-NeoX's tokenizers 0.15 too
        if tokenizer_path.exists() and tokenizer_path.read_bytes() == tmp.read_bytes():
            tmp.unlink()
        else:
            os.replace(tmp, tokenizer_path)
        tmp = tmp_name(stamp)
        tmp.write_text(f"{ctx.tok.sha256} {tokenizer_path.stat().st_size}\n")
        os.replace(tmp, stamp)
    ctx.shared["tokenizer_sha256"] = ctx.tok.sha256


def _load_runs(work: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _append_run(work: Path, record: dict) -> None:
    with open(work / "runs.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024.0, 1)  # Linux reports KiB


def _has_markers(work: Path) -> bool:
    return any(work.glob("*/done/*.json"))


def _sweep_prefix_tmp(cfg) -> int:
    """Temporary files of killed runs next to the outputs and in the staged versions."""
    p = Path(cfg.output_prefix)
    n = 0
    if p.parent.is_dir():
        for q in p.parent.glob(f".{p.name}_*.tmp-*"):
            q.unlink(missing_ok=True)
            n += 1
    return n + sweep_all_tmp(p.parent / f"{p.name}.data")


def _remove_if_failed(work: Path, created_work: bool, out_dir: Path, created_out: bool) -> None:
    """A failed invocation that finished no unit leaves no directory it created."""
    if created_work and work.is_dir() and not _has_markers(work):
        shutil.rmtree(work, ignore_errors=True)
    if created_out and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def run(cfg, tok_loader, progress=None, stage: str = "all", task_index: int | None = None,
        verify=None, preflight=None) -> dict | None:
    """Run every stage (``stage="all"``), one stage, or one array task of one stage.

    ``tok_loader()`` loads the tokenizer; ``verify(cfg, run_seconds) -> bool`` checks the published dataset;
    ``preflight(cfg, tok)`` runs cheap checks before anything is written. Returns the manifest when the
    dataset was published (with ``"verified"``), else None."""
    work = Path(cfg.resolved_work_dir)
    out_dir = Path(cfg.output_prefix).parent
    created_work, created_out = not work.exists(), not out_dir.exists()
    t_start = time.time()
    try:
        tok = tok_loader()
        if preflight is not None:
            preflight(cfg, tok)
        out_dir.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        whole = stage == "all" or task_index is None
        writes_prefix = stage in ("all", "merge", "publish")
        with ExitStack() as stack:
            stack.enter_context(_lock(work / ".lock", whole, f"work directory {work}", remove=False))
            if writes_prefix:
                stack.enter_context(_lock(prefix_lock_path(cfg), True, f"output prefix {cfg.output_prefix}",
                                          remove=True))
            stack.enter_context(_stop_on_signals())
            if whole:
                n = sweep_all_tmp(work) + (_sweep_prefix_tmp(cfg) if writes_prefix else 0)
                if n:
                    log.info("removed %d temporary file(s) left by killed runs", n)
            ctx = Ctx(cfg, work, tok, progress)
            prepare(ctx)
            record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)), "stage": stage,
                      "task_index": task_index, "tasks": cfg.tasks, "stages": {}}
            ctx.shared["runs"] = _load_runs(work) + [record]
            try:
                result = _run_stages(ctx, stage, task_index, record, t_start, verify)
            finally:
                record["wall_seconds"] = round(time.time() - t_start, 3)
                record["peak_rss_mib"] = _peak_rss_mib()
                if record["stages"]:
                    _append_run(work, record)
            return result
    except BaseException:
        _remove_if_failed(work, created_work, out_dir, created_out)
        raise


def _run_stages(ctx: Ctx, stage: str, task_index: int | None, record: dict, t_start: float, verify) -> dict | None:
    from . import publish

    names = ORDER if stage == "all" else (stage,)
    check_requirements(ctx, names)
    if stage != "all":
        for dep in MODULES[stage].AFTER:
            require_complete(ctx, dep)
    for name in names:
        rep = run_stage(ctx, name, task_index)
        record["stages"][name] = rep
        record["wall_seconds"] = round(time.time() - t_start, 3)
        log.info("stage %s: %d unit(s) run, %d reused%s in %.1f s", name, rep["ran"], rep["reused"],
                 f" ({rep['redone_damaged']} redone: damaged)" if rep["redone_damaged"] else "", rep["wall_seconds"])
        if name == "chunk" and task_index is None:
            _log_chunk_summary(ctx)
    if "publish" not in names:
        return None
    manifest_path = MODULES["merge"].version_dir(ctx) / publish.manifest_name(ctx.cfg)
    ok = True
    if verify is not None and ctx.cfg.verify:
        t0 = time.time()
        ok = bool(verify(ctx.cfg, t0 - t_start))
        record["verify_seconds"] = round(time.time() - t0, 3)
        if not ok:
            publish.roll_back(ctx)
    manifest = json.loads(manifest_path.read_text())  # after verify, which records its source check there
    if ok:
        publish.remove_old_versions(ctx)
    manifest["verified"] = ok if ctx.cfg.verify else None
    c = manifest["counts"]
    log.info("done: %d documents in -> %d samples x %d tokens (%d tokens); meta-documents processed %d = %d samples "
             "+ %d dropped%s; this run %.1f s", c["documents_in"], c["samples_out"], ctx.cfg.target_length,
             c["tokens_out"], c["meta_documents_processed"], c["samples_out"], sum(c["dropped"].values()),
             f" {c['dropped']}" if c["dropped"] else "", time.time() - t_start)
    return manifest


def check_requirements(ctx: Ctx, names) -> None:
    """Optional packages of every stage to run, checked before the first unit runs."""
    import importlib.util

    for name in names:
        for module, pip, flag in getattr(MODULES[name], "requires", lambda c: [])(ctx):
            if importlib.util.find_spec(module) is None:
                raise SynthesisError(f"{flag}: stage {name} needs the Python package {pip!r}, which is not "
                                     f"installed (pip install {pip})")


def _log_chunk_summary(ctx: Ctx) -> None:
    rows = [read_marker(ctx.work, "chunk", u.name) for u in MODULES["chunk"].units(ctx)]
    stats = [m["stats"] for m in rows if m]
    tot = {k: sum(s[k] for s in stats) for k in ("documents", "chunks", "tokens", "chars")}
    rejected: dict[str, int] = {}
    for s in stats:
        for r, n in s["rejected"].items():
            rejected[r] = rejected.get(r, 0) + n
    log.info("chunk: %d documents -> %d chunks -> %d tokens (%.2f chars/token) in %d shard(s); rejected %s",
             tot["documents"], tot["chunks"], tot["tokens"], tot["chars"] / max(1, tot["tokens"]), len(stats),
             rejected or "none")
    if len(stats) == len(rows) and tot["chunks"] == 0:
        raise SynthesisError(f"no usable document in {ctx.cfg.inputs} (rejected: {rejected or 'none'})")


# ------------------------------------------------------------------------------------------ status


def status(cfg, tok) -> str:
    """Done and missing units per stage (sizes checked, not checksums), with each missing unit's log."""
    work = Path(cfg.resolved_work_dir)
    lines = [f"work directory {work}" + ("" if work.is_dir() else " (does not exist: nothing done)")]
    ctx = Ctx(cfg, work, tok, None)
    ctx.shared["tokenizer_sha256"] = tok.sha256
    for name in ORDER:
        try:
            rows = plan_stage(ctx, name, verify_files=False)
        except SynthesisError:
            lines.append(f"{name:8s} waits for the stages before it")
            continue
        except (OSError, ValueError) as e:
            lines.append(f"{name:8s} units not known until the stages before it are done ({type(e).__name__})")
            continue
        done = [r for r in rows if r["marker"] is not None]
        missing = [r for r in rows if r["marker"] is None]
        secs = sum(r["marker"].get("seconds", 0.0) for r in done)
        lines.append(f"{name:8s} {len(done):6d} done {len(missing):6d} to do   ({secs:.1f} task-seconds done)")
        for r in missing[:10]:
            lp = log_path(work, name, r["unit"].name)
            lines.append(f"         {r['unit'].name}: {r['state']}" + (f"  log: {lp}" if lp.exists() else ""))
        if len(missing) > 10:
            lines.append(f"         ... and {len(missing) - 10} more")
    cur = MODULES["publish"].current_version(cfg)
    lines.append(f"published: {cur or 'nothing'}")
    return "\n".join(lines)


__all__ = ["Interrupted", "LockedError", "marker_path", "run", "run_stage", "status"]
