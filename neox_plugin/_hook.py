"""Post-import hook: patch GPT-NeoX modules as soon as GPT-NeoX imports them.

Installed at interpreter start-up by the ``nextlong_neox_plugin.pth`` file (see
:mod:`neox_plugin.install_hook`), so ``python deepy.py train.py cfg.yml`` and every rank the
DeepSpeed or Slurm launcher starts are patched without changing GPT-NeoX or the command.

The hook is a ``sys.meta_path`` finder that answers only for the GPT-NeoX module names in
:data:`TARGETS`: it lets the normal finders locate the module, then wraps its loader so the patch
runs right after the module body. Nothing is imported until such a module is imported, so the cost
for every other Python program is one small import at start-up. Set ``NEXTLONG_NEOX_PLUGIN=0`` to
disable the hook (GPT-NeoX then rejects the ``nextlong_*`` keys as unknown).

With ``NEXTLONG_NEOX_CPU=1`` the finder also answers for ``torch`` and applies
:func:`neox_plugin.cpu.patch_torch` to it (GPT-NeoX on CPU; see :mod:`neox_plugin.cpu`), and for
``deepspeed.runtime.engine`` (:func:`neox_plugin.cpu.patch_deepspeed_engine`). That switch works whether or
not ``NEXTLONG_NEOX_PLUGIN`` disables the loss-weight patches.

This module imports only the standard library and :mod:`neox_plugin._targets`; the patch modules
are imported when a target is imported, and none of them imports this module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
from types import ModuleType
from typing import Any

from neox_plugin._targets import TARGETS

logger = logging.getLogger(__name__)

__all__ = ["TARGETS", "NeoXPatchFinder", "install", "installed", "uninstall"]

#: Environment switch of the loss-weight patches ("0" disables them).
ENV_SWITCH = "NEXTLONG_NEOX_PLUGIN"
#: Environment switch of CPU support (same name as ``neox_plugin.cpu.ENV_SWITCH``; not imported from there so that
#: start-up imports nothing else).
CPU_ENV_SWITCH = "NEXTLONG_NEOX_CPU"
#: Module patched for CPU support.
CPU_TARGET = "torch"
#: All modules patched for CPU support (same as ``neox_plugin.cpu.DEEPSPEED_ENGINE`` for the second).
CPU_TARGETS = frozenset({CPU_TARGET, "deepspeed.runtime.engine"})


def _switch(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then applies the plugin's patch to the new module."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._name in CPU_TARGETS:
            from neox_plugin.cpu import apply_patch
        else:
            from neox_plugin.neox import apply_patch

        apply_patch(self._name, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


class NeoXPatchFinder(importlib.abc.MetaPathFinder):
    """``sys.meta_path`` finder that wraps the loaders of ``targets``."""

    def __init__(self, targets: frozenset[str] = TARGETS) -> None:
        self._local = threading.local()
        self.targets = targets

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.targets:
            return None
        busy = getattr(self._local, "busy", None)
        if busy is None:
            busy = self._local.busy = set()
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec


_FINDER: NeoXPatchFinder | None = None


def install() -> bool:
    """Put the finder first on ``sys.meta_path`` (idempotent). Returns False when both switches are off.

    ``NEXTLONG_NEOX_PLUGIN`` (default on) selects the GPT-NeoX patches, ``NEXTLONG_NEOX_CPU`` (default off)
    the ``torch`` patch for CPU runs.
    """
    global _FINDER
    targets: set[str] = set()
    plugin_on = _switch(ENV_SWITCH, "1")
    cpu_on = _switch(CPU_ENV_SWITCH, "0")
    if plugin_on:
        targets |= TARGETS
    if cpu_on:
        targets |= CPU_TARGETS
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not targets:
        return False
    if _FINDER is None:
        _FINDER = NeoXPatchFinder(frozenset(targets))
    else:
        _FINDER.targets = frozenset(targets)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    if cpu_on and any(name in sys.modules for name in CPU_TARGETS):
        from neox_plugin.cpu import apply_patch as cpu_patch

        for name in sorted(CPU_TARGETS & set(sys.modules)):
            cpu_patch(name, sys.modules[name])
    if plugin_on and any(name in sys.modules for name in TARGETS):
        from neox_plugin.neox import patch_loaded_modules

        patch_loaded_modules()
    return True


def uninstall() -> None:
    """Remove the finder (already patched modules stay patched)."""
    if _FINDER is not None and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def installed() -> bool:
    """True when the finder is on ``sys.meta_path``."""
    return _FINDER is not None and _FINDER in sys.meta_path
