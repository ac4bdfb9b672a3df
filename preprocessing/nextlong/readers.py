"""Read corpora: JSONL (plain, .gz, .zst) and Parquet, several inputs, globs, a configurable text field.

Bad input never stops a run: a malformed JSON line, a missing or non-string text field, bytes that are
not UTF-8, and empty documents are each reported once (file, line, reason) through a ``Rejects`` sink
and counted by reason. FineWeb-Edu's and Cosmopedia v2's Parquet layouts (``text`` and ``id`` columns)
read as they are.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd")
PARQUET_SUFFIXES = (".parquet", ".pq")


class InputError(ValueError):
    """An input specification cannot be used (no file matched, unknown format, ...)."""


@dataclass(frozen=True)
class Document:
    """One input document."""

    corpus: str  #: name of the input it came from
    doc_id: str  #: the record's id field, or ``<file name>:<line or row>`` when it has none
    text: str
    source: str  #: ``<file>:<line>`` (JSONL) or ``<file>:row <n>`` (Parquet), for messages


class Rejects:
    """Collects skipped inputs: counted by reason, and appended to a JSONL file when one is given."""

    def __init__(self, path: str | os.PathLike | None = None, max_logged: int = 20) -> None:
        self.counts: Counter[str] = Counter()
        self.records: list[dict] = []
        self.path = Path(path) if path else None
        self._max_logged = max_logged
        self._logged = 0

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.records.append({"reason": reason, "where": where, "detail": detail})
        if self._logged < self._max_logged:
            log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
            self._logged += 1
            if self._logged == self._max_logged:
                log.warning("further skipped inputs are only counted (see the rejects file)")

    def write(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write all records as JSONL, atomically. Returns the path written, if any."""
        out = Path(path) if path else self.path
        if out is None:
            return None
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
        return out


@dataclass(frozen=True)
class InputSpec:
    """One ``--input``: a path or glob, the name it goes by, and its mixing weight."""

    pattern: str
    name: str
    weight: float = 1.0

    def files(self) -> list[Path]:
        """The matching files, sorted, so that runs are reproducible. Raises when nothing matches."""
        if any(ch in self.pattern for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(self.pattern, recursive=True))
        else:
            p = Path(self.pattern)
            if p.is_dir():
                matched = sorted(q for q in p.rglob("*") if q.is_file() and _format_of(q) is not None)
            else:
                matched = [p] if p.exists() else []
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise InputError(f"--input {self.pattern!r}: no file matches")
        for p in matched:
            if _format_of(p) is None:
                raise InputError(
                    f"--input {self.pattern!r}: {p} is neither JSONL ({', '.join(JSONL_SUFFIXES)}) "
                    f"nor Parquet ({', '.join(PARQUET_SUFFIXES)})"
                )
        return matched


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _open_text_bytes(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - zstandard is a core dependency
            raise ImportError(f"{path}: reading .zst needs the 'zstandard' package (pip install zstandard)") from e
        fh = open(path, "rb")  # noqa: SIM115 - owned by the returned reader
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
    return open(path, "rb")  # noqa: SIM115


def read_jsonl(path: Path, corpus: str, text_field: str, id_field: str, rejects: Rejects) -> Iterator[Document]:
    with _open_text_bytes(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rejects.add("invalid_utf8", where, str(e))
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rejects.add("malformed_json", where, e.msg)
                continue
            if not isinstance(rec, dict):
                rejects.add("not_an_object", where, type(rec).__name__)
                continue
            if text_field not in rec:
                rejects.add("missing_text_field", where, f"no field {text_field!r} (set --text-field)")
                continue
            text = rec[text_field]
            if not isinstance(text, str):
                rejects.add("text_not_a_string", where, type(text).__name__)
                continue
            if not text.strip():
                rejects.add("empty_document", where)
                continue
            doc_id = rec.get(id_field)
            doc_id = str(doc_id) if doc_id is not None else f"{path.name}:{lineno}"
            yield Document(corpus, doc_id, text, where)


def read_parquet(
    path: Path, corpus: str, text_field: str, id_field: str, rejects: Rejects, batch_size: int = 4096
) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {names}); set --text-field")
    columns = [text_field] + ([id_field] if id_field in names else [])
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            where = f"{path}:row {row}"
            if not isinstance(text, str):
                rejects.add("text_not_a_string", where, type(text).__name__)
            elif not text.strip():
                rejects.add("empty_document", where)
            else:
                yield Document(corpus, str(doc_id) if doc_id is not None else f"{path.name}:{row}", text, where)
            row += 1


def iter_documents(spec: InputSpec, text_field: str, id_field: str, rejects: Rejects) -> Iterator[Document]:
    """All valid documents of one input, files in sorted order, records in file order."""
    if spec.pattern.startswith("builtin:"):
        from .corpora import builtin_documents

        yield from builtin_documents(spec.pattern[len("builtin:"):], spec.name)
        return
    for path in spec.files():
        if _format_of(path) == "parquet":
            yield from read_parquet(path, spec.name, text_field, id_field, rejects)
        else:
            yield from read_jsonl(path, spec.name, text_field, id_field, rejects)


def parse_input_specs(patterns: list[str], weights: list[float] | None, names: list[str] | None) -> list[InputSpec]:
    """Pair every ``--input`` with its ``--mix`` weight and ``--input-name`` (defaults: 1.0, file stem)."""
    if not patterns:
        raise InputError("no --input given")
    if weights and len(weights) != len(patterns):
        raise InputError(f"--mix has {len(weights)} values for {len(patterns)} --input; give one per input")
    if names and len(names) != len(patterns):
        raise InputError(f"--input-name has {len(names)} values for {len(patterns)} --input; give one per input")
    specs = []
    for i, pat in enumerate(patterns):
        w = float(weights[i]) if weights else 1.0
        if not w > 0:
            raise InputError(f"--mix: weight {w} for input {pat!r} must be > 0")
        name = names[i] if names else _default_name(pat)
        specs.append(InputSpec(pat, name, w))
    if len({s.name for s in specs}) != len(specs):
        raise InputError("two inputs have the same name; set distinct --input-name values")
    return specs


def _default_name(pattern: str) -> str:
    if pattern.startswith("builtin:"):
        return pattern[len("builtin:"):]
    base = os.path.basename(pattern.rstrip("/")) or pattern
    for suf in sorted(JSONL_SUFFIXES + PARQUET_SUFFIXES, key=len, reverse=True):
        if base.lower().endswith(suf):
            return base[: -len(suf)]
    return base
