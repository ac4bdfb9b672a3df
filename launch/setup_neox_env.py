#!/usr/bin/env python3
"""Build a Python environment that runs GPT-NeoX with this project's plugin, from the user's checkouts.

    python launch/setup_neox_env.py --gpt-neox ~/gpt-neox --deeperspeed ~/DeeperSpeed --venv ~/neoxenv [--cpu]

Steps (each printed before it runs; ``--dry-run`` prints them only):

1. check the checkouts (GPT-NeoX: ``deepy.py`` + ``megatron/``; DeeperSpeed: ``setup.py`` + ``deepspeed/``) and
   warn when DeeperSpeed is not at the commit GPT-NeoX pins in ``requirements/requirements.txt``;
2. create the venv with ``--system-site-packages`` (a torch installed in the base interpreter is reused);
3. torch first: if the new environment cannot import ``torch==--torch``, install it there. This is the case when
   this script runs from a venv that holds torch: ``--system-site-packages`` exposes the *base* interpreter's
   site-packages, never another venv's;
4. GPT-NeoX's Python dependencies with the pins that work with it (:data:`PINNED`: numpy<2, setuptools<81,
   transformers 4.38, tokenizers 0.15, psutil, ...);
5. DeeperSpeed from its checkout with ``--no-deps`` and ``DS_BUILD_OPS=0`` (ops are built just in time);
6. this project with ``--no-deps`` (its own pins are for the data-synthesis environment), editable, and the
   ``.pth`` import hook (``python -m neox_plugin.install_hook``);
7. a check in a fresh interpreter of the new environment: versions, hook active, GPT-NeoX's argument class carries
   the plugin keys; with ``--cpu`` also the CPU support (``NEXTLONG_NEOX_CPU=1``) and DeepSpeed's CPU accelerator.

``--cpu`` builds the CPU smoke/test environment (``launch/neox_cpu_smoke.py``, ``tests/test_neox_integration.py``);
without it the check also reports whether CUDA is visible (on a login node it may not be; that is a warning).
Exit code 0 when the check passes, 1 when a step fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("setup_neox_env")

REPO = Path(__file__).resolve().parents[1]
#: torch version the project is tested with (GPT-NeoX ea7aefd8 + DeeperSpeed 91d1c55b ran with it on CPU).
DEFAULT_TORCH = "2.13.0"
#: GPT-NeoX's run-time dependencies, pinned where newer releases break it (installed after torch).
PINNED = [
    "setuptools<81",  # DeepSpeed's op builder imports pkg_resources, which setuptools 81 removed
    "wheel",
    "numpy<2",  # GPT-NeoX's data helpers and DeeperSpeed are built against the numpy 1 ABI
    "transformers==4.38.0",  # GPT-NeoX's pin
    "tokenizers>=0.15,<0.16",  # what transformers 4.38 accepts
    "huggingface_hub<1",  # transformers 4.38 imports names removed in huggingface_hub 1.x
    "psutil",  # DeepSpeed needs it; --no-deps below means nothing else pulls it in
    "packaging",
    "tqdm",
    "pyyaml",
    "requests",
    "ninja",
    "hjson",
    "einops",
    "msgpack",
    "py-cpuinfo",
    "pydantic>=2",
    "pybind11",
    "ftfy",
    "jinja2==3.1.4",
    "regex",
    "sentencepiece",
    "six",
    "tiktoken",
]
#: flash attention for the recipes (GPU clusters; GPT-NeoX's requirements-flashattention.txt pin).
FLASH_ATTN = "flash-attn==2.5.6"


class SetupError(Exception):
    """A step failed; the message names it."""


def _git_head(path: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def pinned_deeperspeed_commit(neox: Path) -> str | None:
    """The DeeperSpeed commit GPT-NeoX's requirements.txt pins (``deepspeed@git+...@<sha>``), if any."""
    req = neox / "requirements" / "requirements.txt"
    if not req.is_file():
        return None
    m = re.search(r"DeeperSpeed(?:\.git)?@([0-9a-f]{7,40})", req.read_text(encoding="utf-8"))
    return m.group(1) if m else None


def check_checkouts(neox: Path, ds: Path) -> list[str]:
    """Validate both checkouts; returns warnings. Raises SetupError naming the flag on a wrong directory."""
    if not (neox / "deepy.py").is_file() or not (neox / "megatron").is_dir():
        raise SetupError(f"--gpt-neox {neox}: not a GPT-NeoX checkout (no deepy.py and megatron/)")
    if not (ds / "setup.py").is_file() or not (ds / "deepspeed").is_dir():
        raise SetupError(f"--deeperspeed {ds}: not a DeepSpeed/DeeperSpeed checkout (no setup.py and deepspeed/)")
    warnings = []
    pin, head = pinned_deeperspeed_commit(neox), _git_head(ds)
    if pin and head and not head.startswith(pin):
        warnings.append(f"DeeperSpeed checkout is at {head[:12]}, GPT-NeoX pins {pin[:12]} "
                        f"(git -C {ds} checkout {pin})")
    return warnings


def venv_python(venv: Path) -> Path:
    """Interpreter of a venv (POSIX layout)."""
    return venv / "bin" / "python"


def _run(cmd: list[str], dry_run: bool, env: dict[str, str] | None = None, what: str = "") -> None:
    extra = ""
    if env is not None:
        extra = " ".join(f"{k}={v}" for k, v in env.items() if os.environ.get(k) != v) + " "
    print(f"+ {extra}{shlex.join(cmd)}", flush=True)
    if dry_run:
        return
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SetupError(f"{what or cmd[0]} failed (exit {proc.returncode}): {shlex.join(cmd)}")


def torch_version_in(python: Path) -> str | None:
    """``torch.__version__`` as seen by ``python`` (None when it cannot import torch)."""
    proc = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _same_release(version: str | None, wanted: str) -> bool:
    return version is not None and version.split("+")[0] == wanted.split("+")[0]


CHECK_SCRIPT = r"""
import json, os, sys
out = {"python": sys.executable}
import torch, numpy, transformers, tokenizers, deepspeed
out.update(torch=torch.__version__, numpy=numpy.__version__, transformers=transformers.__version__,
           tokenizers=tokenizers.__version__, deepspeed=deepspeed.__version__)
from neox_plugin import _hook
out["hook_active"] = _hook.installed()
sys.path.insert(0, sys.argv[1])
from megatron.neox_arguments import NeoXArgs
import dataclasses
out["plugin_keys"] = sorted(f.name for f in dataclasses.fields(NeoXArgs) if f.name.startswith("nextlong_"))
if os.environ.get("NEXTLONG_NEOX_CPU") == "1":
    from deepspeed.accelerator import get_accelerator
    from neox_plugin import cpu
    out["cpu_support"] = cpu.patched() and torch.cuda.is_available() and torch.cuda.current_device() == "cpu"
    out["ds_accelerator"] = get_accelerator().device_name()
else:
    out["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("CHECK " + json.dumps(out))
"""


def check_env(python: Path, neox: Path, cpu: bool) -> dict:
    """Import everything in a fresh interpreter of the new environment; returns the report (raises on failure)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # what the user gets, not what this shell has
    env.pop("NEXTLONG_NEOX_PLUGIN", None)
    if cpu:
        env["NEXTLONG_NEOX_CPU"] = "1"
    else:
        env.pop("NEXTLONG_NEOX_CPU", None)
    proc = subprocess.run([str(python), "-c", CHECK_SCRIPT, str(neox)], capture_output=True, text=True, env=env,
                          cwd=str(neox))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CHECK ")]
    if proc.returncode != 0 or not lines:
        raise SetupError(f"check of {python} failed:\n{proc.stderr[-3000:]}")
    rep = json.loads(lines[-1][len("CHECK "):])
    problems = []
    if not rep["numpy"].startswith("1."):
        problems.append(f"numpy {rep['numpy']} (GPT-NeoX needs numpy<2)")
    if not rep["transformers"].startswith("4.38"):
        problems.append(f"transformers {rep['transformers']} (GPT-NeoX pins 4.38.0)")
    if not rep["hook_active"]:
        problems.append("neox_plugin import hook not active")
    if "nextlong_lossweight" not in rep["plugin_keys"]:
        problems.append("GPT-NeoX's NeoXArgs has no nextlong_* keys (hook did not patch it)")
    if cpu and not (rep.get("cpu_support") and rep.get("ds_accelerator") == "cpu"):
        problems.append(f"CPU support not active (cpu_support={rep.get('cpu_support')}, "
                        f"DeepSpeed accelerator={rep.get('ds_accelerator')})")
    if problems:
        raise SetupError("check failed: " + "; ".join(problems))
    return rep


def build(args: argparse.Namespace) -> int:
    """Run all steps; returns the exit code."""
    neox, ds, venv = args.gpt_neox.resolve(), args.deeperspeed.resolve(), args.venv.absolute()
    for w in check_checkouts(neox, ds):
        logger.warning("%s", w)
    py = venv_python(venv)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    if py.exists():
        print(f"# reusing the existing environment {venv}", flush=True)
    else:
        _run([args.python or str(base), "-m", "venv", "--system-site-packages", str(venv)], args.dry_run,
             what="creating the venv")
    pip = [str(py), "-m", "pip", "install"]
    if args.pip_args:
        pip += shlex.split(args.pip_args)

    # torch first, so nothing below pulls a different build
    have = None if args.dry_run else torch_version_in(py)
    if _same_release(have, args.torch):
        print(f"# torch {have} is importable in the new environment", flush=True)
    else:
        if sys.prefix != sys.base_prefix and _same_release(torch_version_in(Path(sys.executable)), args.torch):
            print(f"# torch of {sys.prefix} is not visible to the new venv (--system-site-packages exposes only "
                  f"{sys.base_prefix}): installing it there", flush=True)
        cmd = pip + [f"torch=={args.torch}"]
        if args.torch_index_url:
            cmd += ["--extra-index-url", args.torch_index_url]
        _run(cmd, args.dry_run, what="installing torch")
    constraint = [f"torch=={args.torch}"]  # keep the pip resolver from replacing torch
    cfile = venv / "nextlong_torch_constraint.txt"
    if not args.dry_run:
        cfile.write_text("\n".join(constraint) + "\n", encoding="utf-8")
    pins = PINNED + (["wandb"] if args.wandb else []) + ([FLASH_ATTN] if args.flash_attn else [])
    _run(pip + ["-c", str(cfile)] + pins, args.dry_run, what="installing GPT-NeoX's dependencies")
    env = dict(os.environ, DS_BUILD_OPS="0")
    _run(pip + ["--no-deps", "--no-build-isolation", str(ds)], args.dry_run, env=env, what="installing DeeperSpeed")
    _run(pip + ["--no-deps", "--no-build-isolation", "-e", str(REPO)], args.dry_run,
         what="installing nextlong-neox")
    _run([str(py), "-m", "neox_plugin.install_hook"], args.dry_run, what="installing the import hook")
    if args.dry_run:
        return 0
    rep = check_env(py, neox, args.cpu)
    print("environment ready: " + json.dumps(rep), flush=True)
    how = "NEXTLONG_NEOX_CPU=1 " if args.cpu else ""
    print(f"run GPT-NeoX with: cd {neox} && PATH={py.parent}:$PATH {how}{py} deepy.py train.py CONFIG.yml ...")
    if args.cpu:
        print(f"smoke run: python {REPO / 'launch' / 'neox_cpu_smoke.py'} --gpt-neox {neox} --neox-python {py}")
    elif not rep.get("cuda_devices"):
        logger.warning("no CUDA device visible here (fine on a login node; the compute nodes need one)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="setup_neox_env.py", description=__doc__.split("\n")[0])
    p.add_argument("--gpt-neox", type=Path, required=True, help="GPT-NeoX checkout (directory with deepy.py)")
    p.add_argument("--deeperspeed", type=Path, required=True,
                   help="DeeperSpeed checkout (GPT-NeoX's DeepSpeed fork, at the commit its requirements.txt pins)")
    p.add_argument("--venv", type=Path, required=True, help="directory of the environment to create (or reuse)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU smoke/test environment: check CPU support (NEXTLONG_NEOX_CPU=1) instead of CUDA")
    p.add_argument("--torch", default=DEFAULT_TORCH, help=f"torch release to install first (default {DEFAULT_TORCH})")
    p.add_argument("--torch-index-url", default=None,
                   help="extra pip index for torch, e.g. https://download.pytorch.org/whl/cpu for the CPU build "
                        "(default: pip's configured indexes)")
    p.add_argument("--python", default=None,
                   help="interpreter that creates the venv (default: the base interpreter of this one)")
    p.add_argument("--wandb", action="store_true", help="also install wandb (GPT-NeoX's use_wandb)")
    p.add_argument("--flash-attn", action="store_true",
                   help=f"also install {FLASH_ATTN} (the recipes' attention; needs CUDA and a compiler)")
    p.add_argument("--pip-args", default="", help="extra arguments for every pip install, as one quoted string")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args(argv)
    try:
        return build(args)
    except SetupError as e:
        print(f"setup_neox_env: {e}", file=sys.stderr)
        return 2 if str(e).startswith("--") else 1


if __name__ == "__main__":
    sys.exit(main())
