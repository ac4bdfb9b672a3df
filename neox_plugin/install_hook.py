"""Install or remove the ``.pth`` file that activates the GPT-NeoX hook at interpreter start-up.

Usage (in the Python environment that runs GPT-NeoX)::

    python -m neox_plugin.install_hook              # write <site-packages>/nextlong_neox_plugin.pth
    python -m neox_plugin.install_hook --uninstall  # remove it
    python -m neox_plugin.install_hook --check      # exit 0 if the hook is active in a fresh interpreter
    python -m neox_plugin.install_hook --print      # print the .pth line

A ``.pth`` line that starts with ``import`` is executed by :mod:`site` when Python starts, in the
launcher process and in every rank it spawns. The line imports only :mod:`neox_plugin._hook`
(standard library only) and never raises: if ``neox_plugin`` is not importable it does nothing.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

PTH_NAME = "nextlong_neox_plugin.pth"
#: The single line of the .pth file (site.py executes lines starting with "import").
PTH_LINE = (
    "import sys; exec('try:\\n import neox_plugin._hook as h; h.install()\\nexcept ModuleNotFoundError:\\n pass\\n"
    "except Exception as e:\\n print(\"neox_plugin hook not active:\", e, file=sys.stderr)', {'sys': sys})\n"
)


def default_target() -> Path:
    """The site-packages (purelib) directory of the running interpreter (venv aware)."""
    return Path(sysconfig.get_paths()["purelib"])


def install(target: Path | None = None) -> Path:
    """Write the ``.pth`` into ``target`` (default: :func:`default_target`); returns its path."""
    path = (target or default_target()) / PTH_NAME
    path.write_text(PTH_LINE, encoding="utf-8")
    return path


def uninstall(target: Path | None = None) -> Path | None:
    """Remove the ``.pth``; returns its path if it existed."""
    path = (target or default_target()) / PTH_NAME
    if path.exists():
        path.unlink()
        return path
    return None


def check(python: str = sys.executable) -> bool:
    """True when a fresh ``python`` starts with the hook installed."""
    code = "import sys; from neox_plugin import _hook; sys.exit(0 if _hook.installed() else 1)"
    return subprocess.run([python, "-c", code], check=False).returncode == 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m neox_plugin.install_hook", description=__doc__.split("\n")[0])
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--uninstall", action="store_true", help="remove the .pth file")
    g.add_argument("--check", action="store_true", help="exit 0 if the hook is active in a new interpreter")
    g.add_argument("--print", action="store_true", help="print the .pth line and exit")
    parser.add_argument("--target", type=Path, default=None, help="directory to write to (default: site-packages)")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(PTH_LINE)
        return 0
    if args.check:
        ok = check()
        print("neox_plugin hook: " + ("active" if ok else "NOT active"))
        return 0 if ok else 1
    if args.uninstall:
        path = uninstall(args.target)
        print(f"removed {path}" if path else "nothing to remove")
        return 0
    path = install(args.target)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
