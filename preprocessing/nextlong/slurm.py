"""Run the stages on Slurm: one job per stage, array jobs for the sharded ones, chained with ``afterok``.

    chunk (array: --tasks) -> embed (array: --tasks, GPU partition) -> gather (1 task) -> index (1 task)
      -> synth (array: --tasks) -> merge + publish + verify (1 task)

Every array task runs the same command as the local run, plus ``--stage S --task-index $SLURM_ARRAY_TASK_ID``:
it does the units ``j`` with ``j mod --tasks == i`` that are not done and intact, and exits. Only the tasks
that own an unfinished unit at submission are in the array (every task when the units are not known yet: the
synthesis units exist once the pool does); a stage whose units are all complete gets no job. A preempted or
failed task is simply rerun (``--requeue``); the chain can also be resubmitted as a whole and only the missing
units run. The submitted scripts, the job ids and the per-task logs stay under ``<work>/slurm/``; ``--status``
lists what is done.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class SlurmOptions:
    """Resources of the submitted jobs (flags ``--slurm-*``)."""

    partition: str | None = None
    """``--partition``: partition of every job (default: the cluster's default)."""
    gpu_partition: str | None = None
    """``--gpu-partition``: partition of the embed array (default: ``--partition``)."""
    gpus_per_task: int = 0
    """``--slurm-gpus``: GPUs per embed task (a sentence-transformers embedder uses one GPU per task)."""
    cpus_per_task: int = 8
    """``--slurm-cpus``: CPU cores per task."""
    mem: str = "64G"
    """``--slurm-mem``: memory per task (Slurm syntax)."""
    time: str = "24:00:00"
    """``--slurm-time``: time limit per task (Slurm syntax)."""
    account: str | None = None
    """``--slurm-account``: account to charge."""
    extra: list[str] = field(default_factory=list)
    """``--slurm-extra``: further ``#SBATCH`` lines, e.g. ``--qos=high`` (repeatable)."""
    sbatch: str = "sbatch"
    """The sbatch executable (``NEXTLONG_SBATCH`` overrides it, e.g. for a wrapper)."""


STAGE_CHAIN = (
    ("chunk", True),
    ("embed", True),
    ("gather", False),
    ("index", False),
    ("synth", True),
    ("merge", False),  # runs --stage merge, then --stage publish (which verifies)
)


def pending_tasks(cfg) -> dict[str, list[int] | None]:
    """Per stage before the merge: the array task indices (``j mod --tasks``; 0 for a one-task stage) that own
    at least one unit not done now (markers and sizes checked), or None when the units cannot be known yet
    (the synthesis plan needs the pool): then every task. An empty list: the stage is complete and gets no job."""
    from .pipeline import load_tok
    from .stages.base import Ctx
    from .stages.registry import ORDER
    from .stages.runner import plan_stage

    names = ORDER[: ORDER.index("merge")]
    work = Path(cfg.resolved_work_dir)
    if not work.is_dir():
        return dict.fromkeys(names)
    tok = load_tok(cfg)
    ctx = Ctx(cfg, work, tok)
    ctx.shared["tokenizer_sha256"] = tok.sha256
    arrays = {s for s, is_array in STAGE_CHAIN if is_array}
    out: dict[str, list[int] | None] = {}
    for name in names:
        try:
            rows = plan_stage(ctx, name, verify_files=False)
        except (OSError, ValueError, RuntimeError, KeyError):
            rows = None  # an earlier stage's output is missing: its units are not known yet
        if rows is None:
            out[name] = None
        else:
            out[name] = sorted({r["index"] % cfg.tasks if name in arrays else 0 for r in rows if r["marker"] is None})
    return out


def complete_at_submit(cfg) -> set[str]:
    """Stages whose units are all complete now (sizes checked): they get no job."""
    return {name for name, tasks in pending_tasks(cfg).items() if tasks == []}


def array_spec(tasks: list[int]) -> str:
    """Slurm's ``--array`` syntax for task indices: ``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8``."""
    parts, i = [], 0
    while i < len(tasks):
        j = i
        while j + 1 < len(tasks) and tasks[j + 1] == tasks[j] + 1:
            j += 1
        parts.append(str(tasks[i]) if i == j else f"{tasks[i]}-{tasks[j]}")
        i = j + 1
    return ",".join(parts)


def _script(stage: str, array: list[int] | None, command: list[list[str]], opts: SlurmOptions, log_dir: Path,
            job_name: str) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}-{stage}",
             f"#SBATCH --output={log_dir}/%x-%A_%a.out" if array else f"#SBATCH --output={log_dir}/%x-%j.out",
             f"#SBATCH --time={opts.time}", f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
             f"#SBATCH --mem={opts.mem}", "#SBATCH --ntasks=1", "#SBATCH --requeue",
             f"#SBATCH --chdir={Path.cwd()}"]  # relative --input/--output-prefix resolve as they did here
    partition = opts.gpu_partition if stage == "embed" and opts.gpu_partition else opts.partition
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if stage == "embed" and opts.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={opts.gpus_per_task}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    if array:
        lines.append(f"#SBATCH --array={array_spec(array)}")
    lines += [f"#SBATCH {x}" for x in opts.extra]
    lines += ["", "set -euo pipefail", 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"', ""]
    for cmd in command:
        lines.append(" ".join(shlex.quote(c) for c in cmd))
    return "\n".join(lines) + "\n"


def submit(cfg, base_argv: list[str], opts: SlurmOptions, job_name: str = "nextlong") -> dict[str, str]:
    """Write one sbatch script per stage under ``<work>/slurm`` and submit the chain; returns job ids."""
    work = Path(cfg.resolved_work_dir).resolve()
    sdir = work / "slurm"
    log_dir = sdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    script = str(Path(__file__).resolve().parents[1] / "make_nextlong_bin.py")
    py = sys.executable
    sbatch = os.environ.get("NEXTLONG_SBATCH", opts.sbatch)
    ids: dict[str, str] = {}
    prev: str | None = None
    pending = pending_tasks(cfg)
    for stage, is_array in STAGE_CHAIN:
        tasks = pending.get(stage)
        if tasks == []:
            log.info("%s: every unit is complete; no job", stage)
            continue
        if is_array and tasks is not None and len(tasks) < cfg.tasks:
            log.info("%s: array tasks %s of %d own unfinished units", stage, array_spec(tasks), cfg.tasks)
        if stage == "merge":
            cmds = [[py, script, *base_argv, "--stage", "merge", "--no-progress"],
                    [py, script, *base_argv, "--stage", "publish", "--no-progress"]]
        elif is_array:
            cmds = [[py, script, *base_argv, "--stage", stage, "--task-index", "${SLURM_ARRAY_TASK_ID}",
                     "--no-progress"]]
        else:
            cmds = [[py, script, *base_argv, "--stage", stage, "--no-progress"]]
        array = (tasks if tasks is not None else list(range(cfg.tasks))) if is_array else None
        text = _script(stage, array, cmds, opts, log_dir, job_name)
        # ${SLURM_ARRAY_TASK_ID} must reach bash unquoted
        text = text.replace("'${SLURM_ARRAY_TASK_ID}'", '"${SLURM_ARRAY_TASK_ID}"')
        path = sdir / f"{stage}.sbatch"
        path.write_text(text)
        args = [sbatch, "--parsable"]
        if prev:
            args.append(f"--dependency=afterok:{prev}")
        args.append(str(path))
        res = subprocess.run(args, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip() or res.stdout}")
        job = res.stdout.strip().split(";")[0].splitlines()[-1]
        ids[stage] = job
        prev = job
        log.info("submitted %s: job %s (%s)", stage, job, path)
    (sdir / "jobs.json").write_text(json.dumps(ids, indent=1))
    return ids
