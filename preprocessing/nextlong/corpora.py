"""Corpora that are on every machine with Python: used by the demo run and by tests.

``builtin:python-docs`` is the Python reference documentation that ships with CPython
(``pydoc_data.topics``, the text ``help()`` shows) plus the docstrings of pure-Python standard-library
modules: human-written technical prose, available offline wherever Python is installed.

:func:`builtin_records` gives ``(doc_id, text, where)`` tuples, which :func:`nextlong.readers.iter_documents`
filters like any input; :func:`builtin_documents` gives them as they are.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import sys
from collections.abc import Iterator

from .documents import Document, InputError

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("python-docs",)
_SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "venv", "antigravity", "this")


def _python_docs() -> Iterator[tuple[str, str, str]]:
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        text = topics.topics[key].strip()
        if text:
            yield f"pydoc:{key}", text, f"pydoc_data.topics[{key!r}]"
    names = sorted(
        m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and not m.name.startswith("_")
    )
    for name in names:
        if name.startswith(_SKIP_PREFIXES):
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a stdlib module may not import on this platform; it is simply absent
            log.debug("stdlib module %s does not import here; not in the corpus", name)
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    parts.append(f"{attr}\n\n{doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) > 500:
            yield f"stdlib:{name}", text, f"module {name}"


def builtin_records(name: str) -> Iterator[tuple[str, str, str]]:
    """``(doc_id, text, where)`` of every document of a built-in corpus (``name`` in :data:`BUILTIN_CORPORA`)."""
    if name == "python-docs":
        yield from _python_docs()
    else:
        raise ValueError(f"unknown built-in corpus {name!r}; choose from {BUILTIN_CORPORA}")


def builtin_documents(name: str, corpus: str) -> Iterator[Document]:
    """Every document of a built-in corpus as it is (no reader policy applied), named ``corpus``."""
    if name not in BUILTIN_CORPORA:
        raise InputError(f"--input builtin:{name}: unknown built-in corpus; choose from {BUILTIN_CORPORA}")
    for doc_id, text, where in builtin_records(name):
        yield Document(corpus, doc_id, text, where)
