"""Read corpora: JSONL (plain, .gz, .zst) and Parquet, several inputs, globs, a configurable text field.

A bad record never stops a run: it is reported (file, line, reason) through a ``Rejects`` sink and
counted by reason. A damaged file does stop it: a truncated or corrupt ``.gz``, ``.zst`` or Parquet file
is an :class:`InputError` naming the file and how far it was read, because silently using the part
before the damage would lose documents without a word. FineWeb-Edu's and Cosmopedia v2's Parquet
layouts (``text`` and ``id`` columns) read as they are.

Every record read is accounted for (``Rejects.read`` = documents used + dropped + rejected):

=========================== ========= ================================================================
case                        outcome   policy
=========================== ========= ================================================================
blank line (JSONL)          noted     not a record; counted as ``blank_line``
UTF-8 byte order mark       noted     removed from the first line; counted as ``utf8_bom``
not UTF-8, lone surrogate   rejected  ``invalid_utf8`` / ``invalid_unicode`` (e.g. ``"\\ud800"``)
malformed JSON, not object  rejected  ``malformed_json`` / ``not_an_object``
no or non-string text       rejected  ``missing_text_field`` / ``text_not_a_string``
empty or blank text         dropped   ``empty_document``
same normalized text as an  dropped   ``duplicate_text`` with ``--duplicates drop`` (default); counted as
earlier record of the file  or noted  ``duplicate_text`` in the notes with ``--duplicates keep``
same id as an earlier       noted     ``duplicate_id``; kept (ids are provenance, not identity)
record of the file
repeated across inputs      noted     ``repeated_across_inputs`` (same normalized text in an earlier
                                      input file); kept: inputs are read in parallel, and the
                                      retrieval never pairs a chunk with an identical one
control characters          noted     ``control_characters`` (documents) and ``control_characters_removed``
(NUL, ESC/ANSI, C1, ...)              (characters): removed with ``--control-chars strip`` (default),
                                      kept with ``keep``; tab, newline, CR, FF and VT are text
=========================== ========= ================================================================

Normalized text: whitespace runs collapsed to one space, trimmed, lower-cased (the same rule the
retrieval uses for exact duplicate chunks).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .documents import Document, InputError

__all__ = ["Document", "InputError", "InputPolicy", "InputSpec", "Rejects", "iter_documents", "iter_lines",
           "merge_audits", "parse_input_specs", "repeated_across_inputs"]

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd")
PARQUET_SUFFIXES = (".parquet", ".pq")
DUPLICATE_POLICIES = ("drop", "keep")
CONTROL_CHAR_POLICIES = ("strip", "keep")
#: reasons a record is skipped by policy rather than for being unreadable (``Rejects.counts`` holds both)
DROP_REASONS = ("empty_document", "duplicate_text")

_SURROGATE = re.compile(r"[\ud800-\udfff]")
#: ANSI escape sequences (CSI ``ESC [ ... final``, OSC ``ESC ] ... BEL/ST``, two-byte ``ESC x``), then any other
#: C0 control except tab, newline, VT, FF, CR; DEL; C1 controls
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?"
                      r"|[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class InputPolicy:
    """What to do with records that are readable but questionable (module docstring's table)."""

    duplicates: str = "drop"
    """``--duplicates``: ``drop`` or ``keep`` a record whose normalized text repeats an earlier one of its file."""
    control_chars: str = "strip"
    """``--control-chars``: ``strip`` or ``keep`` control characters and ANSI escape sequences in the text."""

    def __post_init__(self) -> None:
        if self.duplicates not in DUPLICATE_POLICIES:
            raise InputError(f"--duplicates: {self.duplicates!r}; choose from {DUPLICATE_POLICIES}")
        if self.control_chars not in CONTROL_CHAR_POLICIES:
            raise InputError(f"--control-chars: {self.control_chars!r}; choose from {CONTROL_CHAR_POLICIES}")


def normalized_hash(text: str) -> int:
    """Signed 64-bit hash of the text with whitespace collapsed and case folded to lower."""
    norm = " ".join(text.split()).lower()
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class Rejects:
    """Collects skipped inputs: counted by reason, and appended to a JSONL file when one is given."""

    def __init__(self, path: str | os.PathLike | None = None, max_logged: int = 20) -> None:
        self.counts: Counter[str] = Counter()  #: skipped records by reason (rejected and dropped)
        self.noted: Counter[str] = Counter()  #: counted, not skipped: blank lines, duplicate ids, ...
        self.read = 0  #: records read (blank lines excluded): used + sum(counts)
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

    def note(self, what: str, n: int = 1) -> None:
        """Count an event that skips nothing (a blank line, a duplicate id, control characters)."""
        self.noted[what] += n

    def audit(self, used: int) -> dict:
        """The input accounting of what was read: ``read == used + sum(dropped) + sum(rejected)``."""
        dropped = {r: n for r, n in sorted(self.counts.items()) if r in DROP_REASONS}
        rejected = {r: n for r, n in sorted(self.counts.items()) if r not in DROP_REASONS}
        return {"read": self.read, "used": used, "dropped": dropped, "rejected": rejected,
                "noted": dict(sorted(self.noted.items()))}

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


def format_of(path: Path) -> str | None:
    """``jsonl``, ``parquet`` or None, from the file name."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


_format_of = format_of


def _open_text_bytes(path: Path) -> io.BufferedIOBase:
    """The decompressed bytes of a JSONL file (no integrity check: :func:`iter_lines` does that)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        fh = open(path, "rb")  # noqa: SIM115 - owned by the returned reader
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
    return open(path, "rb")  # noqa: SIM115


class _Progress:
    """How far a compressed file was read, for the error that names the damage."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.line = 0

    def describe(self, path: Path) -> str:
        try:
            at = self.raw.tell()
        except (OSError, ValueError):
            at = -1
        size = path.stat().st_size
        where = f"{at:,} of {size:,} compressed bytes" if at >= 0 else f"{size:,} compressed bytes"
        return f"after line {self.line:,} ({where} read)"


def _gzip_chunks(raw: io.BufferedIOBase, block: int = 1 << 15) -> Iterator[bytes]:
    """Decompressed data of every gzip member, as far as it is sound; raises at the damage."""
    dobj = zlib.decompressobj(wbits=31)
    in_member = False
    while data := raw.read(block):
        while data:
            in_member = True
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:
                data = dobj.unused_data.lstrip(b"\x00")  # members may be followed by zero padding
                dobj = zlib.decompressobj(wbits=31)
                in_member = False
            else:
                data = b""
    if in_member:
        raise EOFError("the gzip stream ends inside a member (the file is truncated)")


def _zstd_chunks(raw: io.BufferedIOBase, block: int = 1 << 14) -> Iterator[bytes]:
    """Decompressed data of every zstd frame; raises when the last frame is cut short."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False
    while data := raw.read(block):
        while data:
            in_frame = True
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:
                data = dobj.unused_data
                dobj = dctx.decompressobj()
                in_frame = False
            else:
                data = b""
    if in_frame:
        raise EOFError("the zstd stream ends inside a frame (the file is truncated)")


def _lines_of(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for c in chunks:
        parts = (rest + c).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def count_lines(path: Path, max_bytes: int) -> tuple[int, float]:
    """Lines in the first ``max_bytes`` decompressed bytes of a JSONL file, and the share of the file
    (in stored bytes) they came from (1.0 when the file was read to its end). Damage raises like
    :func:`iter_lines`."""
    got = 0
    size = max(1, path.stat().st_size)
    last = b"\n"
    with open(path, "rb") as raw:
        prog = _Progress(raw)
        gen = _blocks(path, raw, prog)
        for block in gen:
            prog.line += block.count(b"\n")
            got += len(block)
            last = block[-1:]
            if got >= max_bytes:
                gen.close()
                return prog.line, min(1.0, raw.tell() / size)
        return prog.line + (last != b"\n"), 1.0


def _blocks(path: Path, raw: io.BufferedIOBase, prog: _Progress) -> Iterator[bytes]:
    """Decompressed blocks of a plain, gzip or zstd file; damage raises :class:`InputError`."""
    name = path.name.lower()
    kind = "gzip" if name.endswith(".gz") else "zstd" if name.endswith((".zst", ".zstd")) else None
    if kind is None:
        yield from iter(lambda: raw.read(1 << 20), b"")
        return
    try:
        yield from _gzip_chunks(raw) if kind == "gzip" else _zstd_chunks(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(f"{path}: truncated or corrupt {kind} file {prog.describe(path)}: {e}") from e
    except Exception as e:
        if type(e).__name__ != "ZstdError":
            raise
        raise InputError(f"{path}: corrupt zstd file {prog.describe(path)}: {e}") from e


def iter_lines(path: Path) -> Iterator[bytes]:
    """The lines of a plain, gzip or zstd JSONL file (without the newline). A truncated or corrupt
    archive raises :class:`InputError` naming the file and the last line read whole."""
    with open(path, "rb") as raw:
        prog = _Progress(raw)
        for line in _lines_of(_blocks(path, raw, prog)):
            prog.line += 1
            yield line


def read_jsonl(path: Path, corpus: str, text_field: str, id_field: str, rejects: Rejects,
               policy: InputPolicy | None = None) -> Iterator[Document]:
    """The documents of one JSONL file; bad records go to ``rejects`` (module docstring's table)."""
    filt = _Filter(policy or InputPolicy(), rejects)
    for lineno, raw in enumerate(iter_lines(path), start=1):
        where = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
            rejects.note("utf8_bom")
        if not raw.strip():
            rejects.note("blank_line")
            continue
        rejects.read += 1
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
        except RecursionError:
            rejects.add("malformed_json", where, "nested too deeply")
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
        doc_id = rec.get(id_field)
        doc_id = str(doc_id) if doc_id is not None else f"{path.name}:{lineno}"
        if _SURROGATE.search(text) or _SURROGATE.search(doc_id):
            rejects.add("invalid_unicode", where, "lone surrogate escape (e.g. \\ud800), not encodable as UTF-8")
            continue
        doc = filt(corpus, doc_id, text, where)
        if doc is not None:
            yield doc


class _Filter:
    """The per-file policies: control characters, empty text, duplicate texts and ids."""

    def __init__(self, policy: InputPolicy, rejects: Rejects) -> None:
        self.policy, self.rejects = policy, rejects
        self.texts: set[int] = set()
        self.ids: set[str] = set()

    def __call__(self, corpus: str, doc_id: str, text: str, where: str) -> Document | None:
        if _CONTROL.search(text):
            self.rejects.note("control_characters")
            if self.policy.control_chars == "strip":
                stripped = _CONTROL.sub("", text)
                self.rejects.note("control_characters_removed", len(text) - len(stripped))
                text = stripped
        if not text.strip():
            self.rejects.add("empty_document", where)
            return None
        h = normalized_hash(text)
        if h in self.texts:
            if self.policy.duplicates == "drop":
                self.rejects.add("duplicate_text", where, "same normalized text as an earlier record (--duplicates)")
                return None
            self.rejects.note("duplicate_text")
        self.texts.add(h)
        if doc_id in self.ids:
            self.rejects.note("duplicate_id")
        self.ids.add(doc_id)
        return Document(corpus, doc_id, text, where, h)


def read_parquet(
    path: Path, corpus: str, text_field: str, id_field: str, rejects: Rejects, batch_size: int = 4096,
    policy: InputPolicy | None = None,
) -> Iterator[Document]:
    """The documents of one Parquet file; a file that cannot be read to its end raises :class:`InputError`."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise InputError(f"{path}: not a readable Parquet file ({_one_line(e)})") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {names}); set --text-field")
    columns = [text_field] + ([id_field] if id_field in names else [])
    filt = _Filter(policy or InputPolicy(), rejects)
    row = 0
    total = pf.metadata.num_rows
    groups = pf.num_row_groups

    def batches() -> Iterator:
        for g in range(groups):  # one row group at a time, so that damage is placed to its row group
            try:
                yield from pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=[g])
            except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ... for damaged pages
                raise InputError(f"{path}: corrupt Parquet data in row group {g + 1} of {groups}, after row {row:,} "
                                 f"of {total:,} ({_one_line(e)})") from e

    for batch in batches():
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            where = f"{path}:row {row}"
            rejects.read += 1
            row += 1
            if not isinstance(text, str):
                rejects.add("text_not_a_string", where, type(text).__name__)
                continue
            doc = filt(corpus, str(doc_id) if doc_id is not None else f"{path.name}:{row - 1}", text, where)
            if doc is not None:
                yield doc
    if row != total:
        raise InputError(f"{path}: the footer promises {total:,} rows but {row:,} were read")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def iter_documents(spec: InputSpec, text_field: str, id_field: str, rejects: Rejects,
                   policy: InputPolicy | None = None) -> Iterator[Document]:
    """All valid documents of one input, files in sorted order, records in file order. Duplicates are
    looked for within each file (see the module docstring)."""
    if spec.pattern.startswith("builtin:"):
        from .corpora import BUILTIN_CORPORA, builtin_records

        name = spec.pattern[len("builtin:"):]
        if name not in BUILTIN_CORPORA:
            raise InputError(f"--input builtin:{name}: unknown built-in corpus; choose from {BUILTIN_CORPORA}")
        filt = _Filter(policy or InputPolicy(), rejects)
        for doc_id, text, where in builtin_records(name):
            rejects.read += 1
            kept = filt(spec.name, doc_id, text, where)
            if kept is not None:
                yield kept
        return
    for path in spec.files():
        if _format_of(path) == "parquet":
            yield from read_parquet(path, spec.name, text_field, id_field, rejects, policy=policy)
        else:
            yield from read_jsonl(path, spec.name, text_field, id_field, rejects, policy)


def repeated_across_inputs(hashes_per_file: Iterable[Iterable[int]]) -> int:
    """Documents whose normalized-text hash already occurred in an earlier file (files in shard order)."""
    seen: set[int] = set()
    repeated = 0
    for hashes in hashes_per_file:
        mine = set()
        for h in hashes:
            h = int(h)
            if h in seen:
                repeated += 1
            mine.add(h)
        seen |= mine
    return repeated


def merge_audits(audits: Iterable[dict]) -> dict:
    """Sum per-file :meth:`Rejects.audit` records; ``balanced`` says whether read = used + dropped + rejected."""
    out: dict = {"read": 0, "used": 0, "dropped": Counter(), "rejected": Counter(), "noted": Counter()}
    for a in audits:
        out["read"] += a["read"]
        out["used"] += a["used"]
        for k in ("dropped", "rejected", "noted"):
            out[k].update(a[k])
    for k in ("dropped", "rejected", "noted"):
        out[k] = dict(sorted(out[k].items()))
    out["balanced"] = out["read"] == out["used"] + sum(out["dropped"].values()) + sum(out["rejected"].values())
    return out


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
