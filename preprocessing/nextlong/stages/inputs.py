"""Input files identified by content: size and BLAKE2b of their bytes, never by the spelling of their path.

Hashing is cached in ``<work>/inputs.json`` under the file's resolved path, size, mtime and inode, so an
unchanged file is hashed once; a touched file is hashed again and, its bytes unchanged, keeps its identity.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

from .base import file_checksum, tmp_name

log = logging.getLogger(__name__)


def input_identity(work: Path, pattern: str, memo: dict) -> dict:
    """``{"name", "size", "blake2b"}`` of one input file (``builtin:`` corpora: name and Python version)."""
    if pattern.startswith("builtin:"):
        # the built-in corpus is read from this Python's standard library
        return {"builtin": pattern, "python": platform.python_version()}
    cache = memo.get("_inputs_cache")
    cache_path = work / "inputs.json"
    if cache is None:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        memo["_inputs_cache"] = cache
    p = Path(pattern)
    st = p.stat()
    real = str(p.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = cache.get(real)
    if hit is None or hit.get("stamp") != stamp:
        if st.st_size > 1 << 30:
            log.info("hashing %s (%.1f GB) to identify it by content", p.name, st.st_size / 1e9)
        hit = {"stamp": stamp, "blake2b": file_checksum(p)}
        cache[real] = hit
        if not work.is_dir():  # e.g. --status before any run: hash, but write nothing
            return {"name": p.name, "size": st.st_size, "blake2b": hit["blake2b"]}
        tmp = tmp_name(cache_path)
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, cache_path)
    # the file's name is part of the identity: documents without an id are named <file name>:<line>
    return {"name": p.name, "size": st.st_size, "blake2b": hit["blake2b"]}
