"""Check a synthesized dataset against the output contract of ``docs/format.md``.

:func:`verify_dataset` opens every file a synthesis run with ``--output-prefix P`` wrote and checks:

* the ``.idx`` headers (magic, version, dtype code; float codes 6/7 are rejected) and the ``.bin`` sizes;
* text, loss-weight mask and label files have the expected dtypes, identical sequence lengths and the
  one-sample-per-document index ``0, 1, ..., S``;
* every sample is exactly the manifest's ``target_length`` long and every token id is below the vocabulary size;
* mask values are 0 or 1; labels are -100 exactly where the mask is 0 and equal the token elsewhere;
* the spans sidecar tiles every sample exactly, in order, and each span's role agrees with the mask;
* BOS/EOS spans hold the manifest's special token ids; chunk spans agree with ``P.work/chunks.parquet``;
* the manifest's counts agree with the files;
* optionally, ``decode`` random samples are decoded and every chunk span is compared with a fresh
  tokenization of its chunk's text;
* optionally, ``source`` random meta-chunk spans are compared with the input files themselves: each
  span's document is read again from its ``--input`` (with the run's reader policies), re-chunked, and
  the span's tokens must equal the tokenization of that chunk of the source text. Only
  the first part of each input is read (:data:`SOURCE_READ_SHARE` of its documents, at least
  :data:`SOURCE_READ_MIN`), so the cost stays a small share of the run; it is reported in ``stats``.

Problems are collected, never raised: the result lists one message per problem naming the file and the
sample (item) number. Nothing here writes to the dataset.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .indexed import (
    AMBIGUOUS_FLOAT_CODES,
    DTYPE_CODES,
    MAGIC,
    VERSION,
    IndexedDataset,
    IndexedFormatError,
    read_indexed,
    token_dtype_for_vocab,
)

log = logging.getLogger(__name__)

#: Span roles of the spans sidecar and the mask value their tokens carry.
ROLE_MASK = {"bos": 1, "meta": 1, "negative": 0, "separator": 1, "eos": 1}
#: Columns of ``P_spans.parquet`` and the Arrow type family each must have.
SPAN_COLUMNS = {
    "sample": "integer", "span": "integer", "start": "integer", "length": "integer", "role": "string",
    "meta_index": "integer", "corpus": "string", "doc_id": "string", "chunk_id": "integer", "rank": "integer",
    "similarity": "floating", "truncated": "boolean",
}
#: Tokens compared per block when scanning the ``.bin`` files (bounds memory on large datasets).
BLOCK_TOKENS = 1 << 24
#: Label value of tokens that carry no loss.
IGNORE_INDEX = -100
#: The source check reads at most this share of each input's documents (from its start) ...
SOURCE_READ_SHARE = 0.05
#: ... but always at least this many documents.
SOURCE_READ_MIN = 2000


# --------------------------------------------------------------------------------------------- paths


@dataclass
class DatasetPaths:
    """Where the files of one synthesis run live, resolved from its output prefix and manifest."""

    prefix: Path
    manifest_path: Path
    manifest: dict | None
    manifest_error: str | None
    text: Path
    lossweight: Path
    label: Path | None
    spans: Path
    rejects: Path
    work_dir: Path

    @property
    def chunks(self) -> Path:
        return self.work_dir / "chunks.parquet"

    @property
    def chunk_tokens(self) -> Path:
        """Token ids of every chunk back to back (``tokens.npy``), sliced by ``token_offsets.npy``."""
        return self.work_dir / "tokens.npy"

    @property
    def embeddings(self) -> Path:
        return self.work_dir / "embeddings.npy"

    @property
    def name(self) -> str:
        return self.prefix.name

    def config(self, key: str, default: Any = None) -> Any:
        """``manifest["config"][key]`` or ``default``."""
        cfg = (self.manifest or {}).get("config") or {}
        return cfg.get(key, default) if isinstance(cfg, dict) else default

    def section(self, key: str) -> dict:
        """A dict-valued top-level manifest entry (``{}`` when absent)."""
        v = (self.manifest or {}).get(key)
        return v if isinstance(v, dict) else {}


_SUFFIXES = ("_manifest.json", "_spans.parquet", "_rejects.jsonl", "_report.json", "_report.html")
_DATASET_SUFFIXES = ("_text_document", "_lossweight_document", "_label_document")


def normalize_prefix(prefix: str | os.PathLike) -> Path:
    """The output prefix ``P`` from ``P`` itself or from the name of any file of the run
    (``P_manifest.json``, ``P_text_document.bin``, ``P_spans.parquet``...)."""
    s = str(prefix)
    for ext in (".bin", ".idx"):
        if s.endswith(ext) and any(s[: -len(ext)].endswith(d) for d in _DATASET_SUFFIXES):
            s = s[: -len(ext)]
    for suf in _SUFFIXES + _DATASET_SUFFIXES:
        if s.endswith(suf):
            s = s[: -len(suf)]
            break
    s = s.removesuffix(".work")
    return Path(s)


def resolve_paths(prefix: str | os.PathLike) -> DatasetPaths:
    """Locate the run's files. Paths in the manifest's ``files`` entry (relative to the manifest's folder)
    win over the default ``P_...`` names; a missing or unreadable manifest is recorded, not raised."""
    p = normalize_prefix(prefix)
    manifest_path = Path(f"{p}_manifest.json")
    manifest: dict | None = None
    error: str | None = None
    if manifest_path.exists():
        try:
            loaded = json.loads(manifest_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                manifest = loaded
            else:
                error = f"{manifest_path}: top level is a {type(loaded).__name__}, expected a JSON object"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            error = f"{manifest_path}: unreadable ({e})"
    else:
        error = f"{manifest_path}: missing"
    files = (manifest or {}).get("files") or {}
    files = files if isinstance(files, dict) else {}
    base = manifest_path.parent

    def pick(key: str, default: str | None) -> Path | None:
        v = files.get(key, default) if key in files else default
        if v is None:
            return None
        q = Path(v)
        return q if q.is_absolute() else base / q

    label_default = f"{p.name}_label_document" if Path(f"{p}_label_document.idx").exists() else None
    if "label" in files and files["label"] is None:
        label_default = None
    return DatasetPaths(
        prefix=p,
        manifest_path=manifest_path,
        manifest=manifest,
        manifest_error=error,
        text=pick("text", f"{p.name}_text_document"),
        lossweight=pick("lossweight", f"{p.name}_lossweight_document"),
        label=pick("label", label_default) if "label" in files else (base / label_default if label_default else None),
        spans=pick("spans", f"{p.name}_spans.parquet"),
        rejects=pick("rejects", f"{p.name}_rejects.jsonl"),
        work_dir=pick("work_dir", f"{p.name}.work"),
    )


def chunk_token_counts(paths: DatasetPaths, n_chunks: int | None = None) -> np.ndarray | None:
    """Tokens of every chunk: the ``n_tokens`` column of ``chunks.parquet``, else the differences of
    ``token_offsets.npy`` in the work directory; None when neither is there."""
    import pyarrow.parquet as pq

    if paths.chunks.exists() and "n_tokens" in pq.read_schema(paths.chunks).names:
        return pq.read_table(paths.chunks, columns=["n_tokens"]).column("n_tokens").to_numpy().astype(np.int64)
    off = paths.work_dir / "token_offsets.npy"
    if off.exists():
        o = np.load(off, mmap_mode="r")
        counts = np.diff(np.asarray(o, dtype=np.int64))
        if n_chunks is None or len(counts) == n_chunks:
            return counts
    return None


def read_chunk_rows(path: Path, rows: list[int] | np.ndarray, columns: list[str]) -> dict[int, dict]:
    """``columns`` of the given row numbers (= chunk ids) of ``chunks.parquet``, reading only the row groups
    that hold them (the text column of a large pool does not fit in memory)."""
    import pyarrow.parquet as pq

    want = np.unique(np.asarray(rows, dtype=np.int64))
    pf = pq.ParquetFile(path)
    out: dict[int, dict] = {}
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = np.searchsorted(want, [first, first + n])
        if hi > lo:
            table = pf.read_row_group(g, columns=columns)
            local = want[lo:hi] - first
            for rid, rec in zip(want[lo:hi].tolist(), table.take(local).to_pylist(), strict=True):
                out[rid] = rec
        first += n
    return out


def read_spans(path: Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """The spans sidecar as numpy columns (strings as object arrays), sorted by (sample, span)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    if "sample" in cols and "span" in cols and len(cols["sample"]):
        order = np.lexsort((cols["span"], cols["sample"]))
        if not np.array_equal(order, np.arange(len(order))):
            cols = {k: v[order] for k, v in cols.items()}
    return cols


# --------------------------------------------------------------------------------------------- result


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_dataset`.

    ``checks`` maps each check's name to ``"ok"``, ``"FAILED (n problems)"`` or ``"skipped: <why>"``;
    ``failures`` holds one message per problem (capped per check, the cap is stated); ``warnings`` hold
    findings that do not break the contract; ``decoded`` holds the decoded random samples."""

    prefix: str
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    decoded: list[dict] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """A human-readable multi-line report."""
        lines = [f"verify {self.prefix}: {'OK' if self.ok else 'FAILED'}"]
        width = max((len(k) for k in self.checks), default=0)
        lines += [f"  {k:<{width}}  {v}" for k, v in self.checks.items()]
        if self.failures:
            lines.append(f"{len(self.failures)} failure message(s):")
            lines += [f"  FAIL {m}" for m in self.failures]
        if self.warnings:
            lines += [f"  WARN {m}" for m in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"prefix": self.prefix, "ok": self.ok, "checks": self.checks, "failures": self.failures,
                "warnings": self.warnings, "decoded": self.decoded, "stats": self.stats}


class _Check:
    """Collects the problems of one named check, keeping at most ``limit`` messages."""

    def __init__(self, result: VerifyResult, name: str, limit: int) -> None:
        self.result, self.name, self.limit = result, name, limit
        self.count = 0
        self.skipped: str | None = None

    def fail(self, msg: str) -> None:
        self.count += 1
        if self.count <= self.limit:
            self.result.failures.append(msg)

    def more(self, n: int) -> None:
        """Count ``n`` further problems without messages (past the cap)."""
        self.count += int(n)

    def take(self, rows: np.ndarray) -> list[int]:
        """The first of ``rows`` that still get a message; the others are only counted."""
        room = max(self.limit - self.count, 0)
        self.more(max(len(rows) - room, 0))
        return np.asarray(rows)[:room].tolist()

    def skip(self, why: str) -> None:
        self.skipped = why

    def __enter__(self) -> _Check:  # noqa: PYI034 - private class, never subclassed
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, Exception):
            self.fail(f"{self.name}: could not run ({exc_type.__name__}: {exc})")
        if self.count > self.limit:
            self.result.failures.append(
                f"{self.name}: ... {self.count - self.limit} more problem(s) not listed (--max-failures)")
        if self.count:
            self.result.checks[self.name] = f"FAILED ({self.count} problem{'s' if self.count > 1 else ''})"
        elif self.skipped is not None:
            self.result.checks[self.name] = f"skipped: {self.skipped}"
        else:
            self.result.checks[self.name] = "ok"
        return True  # exceptions become failures of this check


# --------------------------------------------------------------------------------------------- helpers


def _header_problems(prefix: Path) -> list[str]:
    """Problems with the fixed header of ``prefix.idx`` (magic, version, dtype code), each naming the file."""
    idx = Path(f"{prefix}.idx")
    if not idx.exists():
        return [f"{idx}: missing"]
    if not Path(f"{prefix}.bin").exists():
        return [f"{prefix}.bin: missing"]
    with open(idx, "rb") as f:
        head = f.read(18)
    if len(head) < 18 or head[: len(MAGIC)] != MAGIC:
        return [f"{idx}: bad magic header {head[:9]!r} (expected {MAGIC!r})"]
    out = []
    (version,) = struct.unpack_from("<Q", head, 9)
    if version != VERSION:
        out.append(f"{idx}: version {version}, expected {VERSION}")
    code = head[17]
    if code in AMBIGUOUS_FLOAT_CODES:
        out.append(f"{idx}: dtype code {code} is a float code (float32/float64 to GPT-NeoX and megatron-core "
                   f"in opposite order); integer token data expected")
    elif code not in DTYPE_CODES:
        out.append(f"{idx}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    return out


def _open(prefix: Path, check: _Check) -> IndexedDataset | None:
    problems = _header_problems(prefix)
    for m in problems:
        check.fail(m)
    if problems:
        return None
    try:
        return read_indexed(prefix)
    except IndexedFormatError as e:
        check.fail(str(e))
        return None


def _bin(ds: IndexedDataset) -> str:
    return f"{ds.prefix}.bin"


def _idx(ds: IndexedDataset) -> str:
    return f"{ds.prefix}.idx"


def _sample_blocks(offsets: np.ndarray, block_tokens: int = BLOCK_TOKENS):
    """Yield ``(first_sample, end_sample)`` ranges whose tokens total about ``block_tokens``."""
    n = len(offsets) - 1
    a = 0
    while a < n:
        b = int(np.searchsorted(offsets, offsets[a] + block_tokens, side="right")) - 1
        b = min(max(b, a + 1), n)
        yield a, b
        a = b


def _locate(offsets: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample number and token-in-sample of flat token positions."""
    samples = np.searchsorted(offsets, positions, side="right") - 1
    return samples, positions - offsets[samples]


def _report_positions(check: _Check, file: str, offsets: np.ndarray, bad: np.ndarray, describe) -> None:
    """One message per sample holding bad flat positions: the first bad token and how many there are."""
    if not len(bad):
        return
    samples, tokens = _locate(offsets, bad)
    uniq, first, counts = np.unique(samples, return_index=True, return_counts=True)
    room = max(check.limit - check.count, 0)
    for s, i, c in zip(uniq[:room].tolist(), first[:room].tolist(), counts[:room].tolist(), strict=True):
        more = f" ({c} tokens in this sample)" if c > 1 else ""
        check.fail(f"{file}: sample {s}, token {int(tokens[i])}: {describe(int(bad[i]))}{more}")
    check.more(max(len(uniq) - room, 0))


# --------------------------------------------------------------------------------------------- main


def _load_tokenizer(spec: Any):
    """A tokenizer with ``encode``/``decode``: a ready object, a ``tokenizer.json`` path or a spec string."""
    if spec is None:
        return None
    if hasattr(spec, "decode") and hasattr(spec, "encode"):
        return spec
    try:
        from .tokenization import load_tokenizer

        return load_tokenizer(str(spec), bos_token="none", eos_token="none")
    except ImportError:  # pragma: no cover - tokenization ships with the package
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(spec))


def _encode(tok: Any, text: str) -> list[int]:
    enc = tok.encode(text, add_special_tokens=False) if not hasattr(tok, "tokenizer") else tok.encode(text)
    return list(getattr(enc, "ids", enc))


def _decode(tok: Any, ids: np.ndarray) -> str:
    ids = [int(i) for i in ids]
    if hasattr(tok, "tokenizer"):
        return tok.decode(ids)
    return tok.decode(ids, skip_special_tokens=False)


def verify_dataset(
    prefix: str | os.PathLike,
    *,
    decode: int = 0,
    tokenizer: Any = None,
    seed: int = 0,
    max_failures: int = 20,
    source: int = 0,
    source_seconds: float | None = None,
) -> VerifyResult:
    """Check every file of the run written with ``--output-prefix prefix``.

    ``decode``: number of random samples to decode (needs a tokenizer: ``tokenizer`` — a loaded
    tokenizer, a ``tokenizer.json`` path or a ``--tokenizer`` spec — else the manifest's
    ``tokenizer.spec``). ``seed`` picks those samples. ``max_failures``: messages kept per check.
    ``source``: number of random meta-chunk spans compared with the input files (module docstring);
    ``source_seconds``: stop reading the inputs for it after this time (at least one span is checked).
    """
    paths = resolve_paths(prefix)
    res = VerifyResult(prefix=str(paths.prefix))

    # ---- manifest
    with _Check(res, "manifest", max_failures) as c:
        if paths.manifest_error:
            c.fail(paths.manifest_error)
        else:
            for key in ("config", "tokenizer", "counts", "files"):
                if not isinstance(paths.manifest.get(key), dict):
                    res.warnings.append(f"{paths.manifest_path}: no '{key}' section")
            if paths.config("target_length") is None:
                c.fail(f"{paths.manifest_path}: config.target_length missing; sample lengths cannot be checked")
    target = paths.config("target_length")
    tok_info = paths.section("tokenizer")
    vocab = tok_info.get("vocab_size")

    # ---- headers and index files
    text = mask = label = None
    with _Check(res, "headers", max_failures) as c:
        text = _open(paths.text, c)
        mask = _open(paths.lossweight, c)
        if paths.label is not None:
            label = _open(paths.label, c)
        if text is not None:
            ok_dtypes = {np.dtype(np.uint16), np.dtype(np.int32)}
            if vocab is not None:
                ok_dtypes = {token_dtype_for_vocab(int(vocab))}
            if text.dtype not in ok_dtypes:
                c.fail(f"{_idx(text)}: token dtype {text.dtype} (code {text.dtype_code}), expected "
                       f"{' or '.join(sorted(str(d) for d in ok_dtypes))}"
                       + (f" for a vocabulary of {vocab}" if vocab is not None else ""))
        if mask is not None and mask.dtype != np.uint8:
            c.fail(f"{_idx(mask)}: loss-weight mask dtype {mask.dtype} (code {mask.dtype_code}, item size "
                   f"{mask.dtype.itemsize}), expected uint8 (code 1, item size 1)")
        if label is not None and label.dtype != np.int32:
            c.fail(f"{_idx(label)}: label dtype {label.dtype} (code {label.dtype_code}, item size "
                   f"{label.dtype.itemsize}), expected int32 (code 4, item size 4)")

    # ---- lengths and document index
    aligned = False  # text and mask have the same sequence lengths
    label_aligned = False
    with _Check(res, "document_index", max_failures) as c:
        if text is None:
            c.skip("text dataset unreadable")
        else:
            n = len(text)
            if not np.array_equal(text.doc_index, np.arange(n + 1)):
                c.fail(f"{_idx(text)}: document index is not 0, 1, ..., {n} (one document per sample)")
            for other in (mask, label):
                if other is None:
                    continue
                same = True
                if len(other) != n:
                    c.fail(f"{_idx(other)}: {len(other)} sequences, the text ({_idx(text)}) has {n}")
                    same = False
                else:
                    diff = np.flatnonzero(other.lengths != text.lengths)
                    for s in diff[: c.limit].tolist():
                        c.fail(f"{_idx(other)}: sample {s} has {int(other.lengths[s])} items, the text has "
                               f"{int(text.lengths[s])}")
                    c.more(max(len(diff) - c.limit, 0))
                    same = not len(diff)
                if not np.array_equal(other.doc_index, text.doc_index):
                    c.fail(f"{_idx(other)}: document index differs from the text's ({_idx(text)})")
                if other is mask:
                    aligned = same
                else:
                    label_aligned = same
    if text is not None:
        res.stats.update(samples=len(text), tokens=int(text.lengths.astype(np.int64).sum()))

    # ---- sample length
    with _Check(res, "sample_length", max_failures) as c:
        if text is None:
            c.skip("text dataset unreadable")
        elif target is None:
            c.skip("no target_length in the manifest")
        else:
            bad = np.flatnonzero(text.lengths != int(target))
            for s in c.take(bad):
                c.fail(f"{_bin(text)}: sample {s} has {int(text.lengths[s])} tokens, target_length is {target}")

    offsets = None
    if text is not None:
        offsets = np.zeros(len(text) + 1, dtype=np.int64)
        np.cumsum(text.lengths, out=offsets[1:])

    # ---- token ids, mask values, labels
    with _Check(res, "token_ids", max_failures) as c:
        if text is None:
            c.skip("text dataset unreadable")
        elif vocab is None:
            c.skip("no tokenizer.vocab_size in the manifest")
        else:
            for a, b in _sample_blocks(offsets):
                block = np.asarray(text.data[offsets[a]:offsets[b]])
                bad = np.flatnonzero((block < 0) | (block >= int(vocab))) + offsets[a]
                _report_positions(c, _bin(text), offsets, bad,
                                  lambda p: f"token id {int(text.data[p])} outside the vocabulary [0, {vocab})")

    with _Check(res, "mask_values", max_failures) as c:
        if mask is None:
            c.skip("mask dataset unreadable")
        else:
            mo = np.zeros(len(mask) + 1, dtype=np.int64)
            np.cumsum(mask.lengths, out=mo[1:])
            for a, b in _sample_blocks(mo):
                block = np.asarray(mask.data[mo[a]:mo[b]])
                bad = np.flatnonzero(block > 1) + mo[a]
                _report_positions(c, _bin(mask), mo, bad,
                                  lambda p: f"mask value {int(mask.data[p])} (allowed: 0, 1; 2-255 are reserved)")

    with _Check(res, "labels", max_failures) as c:
        if paths.label is None:
            c.skip("no label file (run without --emit-labels)")
        elif label is None or mask is None or not aligned or not label_aligned:
            c.skip("label, mask or text dataset unreadable or not aligned")
        else:
            for a, b in _sample_blocks(offsets):
                sl = slice(offsets[a], offsets[b])
                t = np.asarray(text.data[sl]).astype(np.int64)
                m = np.asarray(mask.data[sl])
                lab = np.asarray(label.data[sl]).astype(np.int64)
                expected = np.where(m == 0, IGNORE_INDEX, t)
                bad = np.flatnonzero(lab != expected) + offsets[a]

                def why(p: int) -> str:
                    lv, mv, tv = int(label.data[p]), int(mask.data[p]), int(text.data[p])
                    if mv == 0:
                        return f"label {lv} where the mask is 0 (expected {IGNORE_INDEX})"
                    if lv == IGNORE_INDEX:
                        return f"label {IGNORE_INDEX} where the mask is {mv} (expected the token {tv})"
                    return f"label {lv} differs from the token {tv}"

                _report_positions(c, _bin(label), offsets, bad, why)

    # ---- spans sidecar
    spans = None
    tiled = False
    with _Check(res, "spans_tiling", max_failures) as c:
        sp = str(paths.spans)
        if not paths.spans.exists():
            c.fail(f"{sp}: missing")
        else:
            import pyarrow.parquet as pq

            schema = pq.read_schema(paths.spans)
            import pyarrow.types as pat

            for col, family in SPAN_COLUMNS.items():
                if col not in schema.names:
                    c.fail(f"{sp}: column '{col}' missing")
                    continue
                typ = schema.field(col).type
                is_ok = {"integer": pat.is_integer, "string": lambda t: pat.is_string(t) or pat.is_large_string(t),
                         "floating": pat.is_floating, "boolean": pat.is_boolean}[family](typ)
                if not is_ok:
                    c.fail(f"{sp}: column '{col}' has type {typ}, expected {family}")
            if c.count == 0:
                spans = read_spans(paths.spans)
                tiled = _check_tiling(c, sp, spans, text)
    res.stats["spans"] = 0 if spans is None else len(spans["sample"])

    with _Check(res, "spans_roles", max_failures) as c:
        if spans is None:
            c.skip("spans sidecar unreadable")
        else:
            _check_roles(c, str(paths.spans), spans, res)

    with _Check(res, "spans_vs_mask", max_failures) as c:
        if not tiled or mask is None or not aligned:
            c.skip("needs a tiling spans sidecar and an aligned mask")
        else:
            _check_mask_vs_spans(c, spans, mask, offsets)

    with _Check(res, "special_tokens", max_failures) as c:
        if not tiled or text is None:
            c.skip("needs a tiling spans sidecar and the text dataset")
        else:
            _check_special(c, spans, text, offsets, tok_info, _bin(text))

    chunks = None
    with _Check(res, "chunks", max_failures) as c:
        if spans is None:
            c.skip("spans sidecar unreadable")
        elif not paths.chunks.exists():
            c.skip(f"{paths.chunks} not present (work directory removed?)")
        else:
            import pyarrow.parquet as pq

            chunks = pq.read_table(paths.chunks, columns=["corpus", "doc_id"])
            n_tokens = chunk_token_counts(paths, chunks.num_rows)
            if n_tokens is None:
                res.warnings.append(f"{paths.chunks}: no n_tokens column and no token_offsets.npy; span lengths "
                                    f"not compared with chunk lengths")
            _check_chunks(c, str(paths.spans), spans, chunks, n_tokens)

    with _Check(res, "manifest_counts", max_failures) as c:
        counts = paths.section("counts")
        if text is None or not counts:
            c.skip("no counts in the manifest" if text is not None else "text dataset unreadable")
        else:
            if "samples_out" in counts and int(counts["samples_out"]) != len(text):
                c.fail(f"{paths.manifest_path}: counts.samples_out = {counts['samples_out']}, "
                       f"{_idx(text)} holds {len(text)} samples")
            if "tokens_out" in counts and int(counts["tokens_out"]) != res.stats["tokens"]:
                c.fail(f"{paths.manifest_path}: counts.tokens_out = {counts['tokens_out']}, "
                       f"{_bin(text)} holds {res.stats['tokens']} tokens")

    # ---- decoding
    loaded: dict[int, Any] = {}  # the tokenizer, loaded once for the decode and source checks
    with _Check(res, "decode", max_failures) as c:
        if decode <= 0:
            c.skip("not requested (--decode N)")
        elif text is None or len(text) == 0:
            c.skip("no samples")
        else:
            spec = tokenizer if tokenizer is not None else tok_info.get("spec")
            if spec is None:
                c.skip("no tokenizer: pass --tokenizer (the manifest names none)")
            else:
                if isinstance(spec, str) and tokenizer is None and not spec.startswith("builtin:") \
                        and not Path(spec).is_absolute() and not Path(spec).exists():
                    cand = paths.manifest_path.parent / spec
                    spec = str(cand) if cand.exists() else spec
                tok = loaded[id(spec)] = _load_tokenizer(spec)
                want = tok_info.get("sha256")
                have = getattr(tok, "sha256", None)
                if want and have and want != have:
                    res.warnings.append(f"tokenizer {spec}: sha256 {have[:12]}... differs from the manifest's "
                                        f"{want[:12]}...; decoded text may be wrong")
                rng = np.random.default_rng(seed)
                picks = sorted(rng.choice(len(text), size=min(decode, len(text)), replace=False).tolist())
                _decode_samples(c, res, tok, picks, text, spans, paths)

    if source <= 0:
        return res
    with _Check(res, "source_text", max_failures) as c:
        if text is None or spans is None or not tiled:
            c.skip("needs the text dataset and a tiling spans sidecar")
        elif not paths.chunks.exists():
            c.skip(f"{paths.chunks} not present (work directory removed?)")
        else:
            spec = tokenizer if tokenizer is not None else tok_info.get("spec")
            if isinstance(spec, str) and tokenizer is None and not spec.startswith("builtin:") \
                    and not Path(spec).is_absolute() and not Path(spec).exists():
                cand = paths.manifest_path.parent / spec
                spec = str(cand) if cand.exists() else spec
            tok = next(iter(loaded.values())) if loaded else (_load_tokenizer(spec) if spec is not None else None)
            _check_source(c, res, paths, text, spans, tok, source, seed, source_seconds)
    return res


def _check_source(c: _Check, res: VerifyResult, paths: DatasetPaths, text: IndexedDataset,
                  spans: dict[str, np.ndarray], tok: Any, n: int, seed: int, budget: float | None = None) -> None:
    """Compare ``n`` random meta-chunk spans with the chunk of the input document they came from."""
    import time

    from .chunking import chunk_spans
    from .readers import InputPolicy, Rejects, iter_documents, parse_input_specs

    t0 = time.perf_counter()
    cfg = (paths.manifest or {}).get("config") or {}
    if tok is None or not cfg.get("inputs"):
        c.skip("the manifest names no tokenizer or inputs")
        return
    doc_index_path = paths.work_dir / "doc_corpus_index.npy"
    if not doc_index_path.exists():
        c.skip(f"{doc_index_path} not present")
        return
    meta = np.flatnonzero((spans["role"] == "meta") & (spans["chunk_id"] >= 0))
    if not len(meta):
        c.skip("no meta-chunk spans")
        return
    rows = read_chunk_rows(paths.chunks, spans["chunk_id"][meta], ["doc_ordinal", "chunk_in_doc", "corpus"])
    doc_pos = np.load(doc_index_path, mmap_mode="r")
    per_input = ((paths.manifest or {}).get("counts") or {}).get("documents_per_input") or {}
    # position of each candidate span's document within its input; only the first part of an input is read
    cand: list[tuple[int, str, int, int]] = []  # (span row, corpus, position in input, chunk in doc)
    for r in meta.tolist():
        rec = rows[int(spans["chunk_id"][r])]
        pos = int(doc_pos[int(rec["doc_ordinal"])])
        window = max(SOURCE_READ_MIN, int(SOURCE_READ_SHARE * int(per_input.get(rec["corpus"], 0))))
        if pos < window:
            cand.append((r, rec["corpus"], pos, int(rec["chunk_in_doc"])))
    if not cand:
        c.skip(f"no meta-chunk span comes from the first {SOURCE_READ_MIN} documents of an input")
        return
    rng = np.random.default_rng([seed, 0x50C])
    picks = [cand[i] for i in sorted(rng.choice(len(cand), size=min(n, len(cand)), replace=False).tolist())]
    specs = {s.name: s for s in parse_input_specs(cfg["inputs"], cfg.get("mix"), cfg.get("input_names"))}
    policy = InputPolicy(cfg.get("duplicates", "drop"), cfg.get("control_chars", "strip"))
    granularity = int(cfg.get("granularity", 2048))
    need: dict[str, dict[int, list[tuple[int, int]]]] = {}
    for r, corpus, pos, j in picks:
        need.setdefault(corpus, {}).setdefault(pos, []).append((r, j))
    checked = docs_read = 0
    over = False
    for corpus, wanted in need.items():
        if over:
            break
        if corpus not in specs:
            c.fail(f"{paths.manifest_path}: spans name input {corpus!r}, which config.inputs does not hold")
            continue
        last = max(wanted)
        pos = -1
        for doc in iter_documents(specs[corpus], cfg.get("text_field", "text"), cfg.get("id_field", "id"),
                                  Rejects(max_logged=0), policy):
            docs_read += 1
            chunks = chunk_spans(doc.text, granularity)
            if not chunks:
                continue  # the chunk stage drops it too
            pos += 1
            for r, j in wanted.get(pos, []):
                checked += 1
                st, ln = int(spans["start"][r]), int(spans["length"][r])
                sample = int(spans["sample"][r])
                got = np.asarray(text[sample][st : st + ln]).tolist()
                if str(spans["doc_id"][r]) != doc.doc_id:
                    c.fail(f"{paths.spans}: sample {sample}, span {int(spans['span'][r])}: document "
                           f"{spans['doc_id'][r]!r} is {doc.doc_id!r} at that place of input {corpus!r}")
                    continue
                if j >= len(chunks):
                    c.fail(f"{paths.spans}: sample {sample}, span {int(spans['span'][r])}: document {doc.doc_id!r}"
                           f" has {len(chunks)} chunks in {doc.source.rsplit(':', 1)[0]}, the span claims chunk {j}")
                    continue
                a, b = chunks[j]
                want = _encode(tok, doc.text[a:b])
                ok = got == want if not spans["truncated"][r] else (got == want[:ln] or got == want[len(want) - ln:])
                if not ok:
                    c.fail(f"{_bin(text)}: sample {sample}, span {int(spans['span'][r])} (meta, {doc.source}, "
                           f"chunk {j}): tokens differ from the source text "
                           f"({_first_difference(tok, got, want)})")
            if pos >= last:
                break
            if budget is not None and checked and time.perf_counter() - t0 > budget:
                over = True
                break
    seconds = time.perf_counter() - t0
    res.stats["source_check"] = {"spans_picked": len(picks), "spans_checked": checked, "documents_read": docs_read,
                                 "seconds": round(seconds, 3), "stopped_by_time_budget": over}


def _first_difference(tok: Any, got: list[int], want: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), min(len(got), len(want)))
    try:
        return (f"first at token {i}: {_decode(tok, np.asarray(got[i:i + 8]))!r} instead of "
                f"{_decode(tok, np.asarray(want[i:i + 8]))!r}")
    except Exception:  # noqa: BLE001 - tokenizers raise bare exceptions on invalid ids
        return f"first at token {i}: ids {got[i:i + 8]} instead of {want[i:i + 8]}"


def _check_tiling(c: _Check, sp: str, spans: dict[str, np.ndarray], text: IndexedDataset | None) -> bool:
    """Spans of every sample are numbered 0.., start at 0, abut, and end at the sample's length."""
    sample = spans["sample"].astype(np.int64)
    span = spans["span"].astype(np.int64)
    start = spans["start"].astype(np.int64)
    length = spans["length"].astype(np.int64)
    before = c.count
    n = len(sample)
    if n == 0:
        if text is not None and len(text):
            c.fail(f"{sp}: no spans, but the dataset holds {len(text)} samples")
        return c.count == before
    first = np.ones(n, dtype=bool)
    first[1:] = sample[1:] != sample[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    pos = np.arange(n) - group_start
    for i in c.take(np.flatnonzero(span != pos)):
        c.fail(f"{sp}: sample {sample[i]}: span numbered {span[i]} at position {pos[i]} (spans must be 0, 1, ...)")
    for i in c.take(np.flatnonzero(length <= 0)):
        c.fail(f"{sp}: sample {sample[i]}, span {span[i]}: length {length[i]} (must be >= 1)")
    for i in c.take(np.flatnonzero(first & (start != 0))):
        c.fail(f"{sp}: sample {sample[i]}: first span starts at {start[i]}, not 0")
    prev_end = np.empty(n, dtype=np.int64)
    prev_end[0] = 0
    prev_end[1:] = start[:-1] + length[:-1]
    for i in c.take(np.flatnonzero(~first & (start != prev_end))):
        kind = "gap" if start[i] > prev_end[i] else "overlap"
        c.fail(f"{sp}: sample {sample[i]}, span {span[i]}: starts at {start[i]}, previous span ends at "
               f"{prev_end[i]} ({kind})")
    if text is not None:
        nseq = len(text)
        out = np.flatnonzero((sample < 0) | (sample >= nseq))
        for s in np.unique(sample[out]).tolist():
            c.fail(f"{sp}: sample {s} does not exist (the dataset holds {nseq} samples)")
        present = np.zeros(nseq, dtype=bool)
        inside = sample[(sample >= 0) & (sample < nseq)]
        present[inside] = True
        for s in c.take(np.flatnonzero(~present)):
            c.fail(f"{sp}: sample {s} has no spans")
        last = np.ones(n, dtype=bool)
        last[:-1] = sample[1:] != sample[:-1]
        idx = np.flatnonzero(last & (sample >= 0) & (sample < nseq))
        ends = start[idx] + length[idx]
        want = text.lengths[sample[idx]].astype(np.int64)
        for j in c.take(np.flatnonzero(ends != want)):
            i = idx[j]
            c.fail(f"{sp}: sample {sample[i]}: spans end at token {ends[j]}, the sample has {want[j]} tokens")
    return c.count == before


def _check_roles(c: _Check, sp: str, spans: dict[str, np.ndarray], res: VerifyResult) -> None:
    role = spans["role"].astype(str)
    sample, span, mi = spans["sample"], spans["span"], spans["meta_index"]
    bad = ~np.isin(role, list(ROLE_MASK))
    for i in c.take(np.flatnonzero(bad)):
        c.fail(f"{sp}: sample {sample[i]}, span {span[i]}: unknown role '{role[i]}' (allowed: {', '.join(ROLE_MASK)})")
    special = np.isin(role, ["bos", "eos"])
    for i in c.take(np.flatnonzero(special & (mi != -1))):
        c.fail(f"{sp}: sample {sample[i]}, span {span[i]}: role {role[i]} has meta_index {mi[i]}, expected -1")
    content = np.isin(role, ["meta", "negative"])
    for i in c.take(np.flatnonzero(content & (mi < 0))):
        c.fail(f"{sp}: sample {sample[i]}, span {span[i]}: role {role[i]} has meta_index {mi[i]}, expected >= 0")
    for i in c.take(np.flatnonzero(content & (spans["chunk_id"] < 0))):
        c.fail(f"{sp}: sample {sample[i]}, span {span[i]}: role {role[i]} has no chunk_id")
    neg = role == "negative"
    sim = spans["similarity"].astype(np.float64)
    n_nan = int(np.count_nonzero(neg & np.isnan(sim)))
    if n_nan:
        res.warnings.append(f"{sp}: {n_nan} negative span(s) without a similarity")
    n_rank = int(np.count_nonzero(~neg & (spans["rank"] != -1)))
    if n_rank:
        res.warnings.append(f"{sp}: {n_rank} non-negative span(s) with a rank (documented: -1)")
    res.stats["roles"] = {r: int(np.count_nonzero(role == r)) for r in ROLE_MASK}


def _check_mask_vs_spans(c: _Check, spans: dict[str, np.ndarray], mask: IndexedDataset, offsets: np.ndarray) -> None:
    """The mask value of every token equals the value implied by the role of the span covering it."""
    role = spans["role"].astype(str)
    want_by_span = np.array([ROLE_MASK.get(r, 255) for r in role], dtype=np.uint8)
    sample, length = spans["sample"].astype(np.int64), spans["length"].astype(np.int64)
    # span rows are sorted and tile every sample, so row r covers flat tokens [span_off[r], span_off[r+1])
    span_off = np.zeros(len(length) + 1, dtype=np.int64)
    np.cumsum(length, out=span_off[1:])
    row_of_sample = np.searchsorted(sample, np.arange(len(offsets)), side="left")
    for a, b in _sample_blocks(offsets):
        ra, rb = row_of_sample[a], row_of_sample[b] if b < len(row_of_sample) else len(sample)
        expected = np.repeat(want_by_span[ra:rb], length[ra:rb])
        got = np.asarray(mask.data[offsets[a]:offsets[b]])
        bad = np.flatnonzero(got != expected)
        if not len(bad):
            continue
        flat = bad + offsets[a]
        rows = np.searchsorted(span_off, flat, side="right") - 1
        samples, tokens = _locate(offsets, flat)
        uniq, first_k, n_bad = np.unique(rows, return_index=True, return_counts=True)
        for r, k, nb in zip(c.take(uniq), first_k.tolist(), n_bad.tolist(), strict=False):
            c.fail(f"{mask.prefix}.bin: sample {int(samples[k])}, token {int(tokens[k])}: mask {int(got[bad[k]])} "
                   f"but span {int(spans['span'][r])} has role '{role[r]}' (expects {want_by_span[r]}; "
                   f"{nb} token(s) of this span disagree)")


def _check_special(c: _Check, spans: dict[str, np.ndarray], text: IndexedDataset, offsets: np.ndarray,
                   tok_info: dict, file: str) -> None:
    role = spans["role"].astype(str)
    for name in ("bos", "eos"):
        want = tok_info.get(f"{name}_id")
        rows = np.flatnonzero(role == name)
        for r in rows.tolist():
            s, st, ln = int(spans["sample"][r]), int(spans["start"][r]), int(spans["length"][r])
            if ln != 1:
                c.fail(f"{file}: sample {s}: {name} span is {ln} tokens long, expected 1")
                continue
            tokv = int(text.data[offsets[s] + st])
            if want is not None and tokv != int(want):
                c.fail(f"{file}: sample {s}, token {st}: {name} span holds token {tokv}, manifest {name}_id is {want}")
    # every separator should be the same tokenized string
    sep_rows = np.flatnonzero(role == "separator")
    if len(sep_rows):
        ref = None
        for r in sep_rows[:10000].tolist():
            s, st, ln = int(spans["sample"][r]), int(spans["start"][r]), int(spans["length"][r])
            ids = np.asarray(text.data[offsets[s] + st: offsets[s] + st + ln]).tolist()
            if ref is None:
                ref = ids
            elif ids != ref and not spans["truncated"][r]:
                c.fail(f"{file}: sample {s}, token {st}: separator tokens {ids[:8]} differ from the first "
                       f"separator's {ref[:8]}")


def _check_chunks(c: _Check, sp: str, spans: dict[str, np.ndarray], chunks, n_tokens: np.ndarray | None) -> None:
    """Chunk spans point at existing chunks whose corpus/doc_id they repeat, and hold all of the chunk's
    tokens unless flagged ``truncated``."""
    n_chunks = chunks.num_rows
    cid = spans["chunk_id"].astype(np.int64)
    rows = np.flatnonzero(cid >= 0)
    oob = rows[cid[rows] >= n_chunks]
    for i in c.take(oob):
        c.fail(f"{sp}: sample {spans['sample'][i]}, span {spans['span'][i]}: chunk_id {cid[i]} not in "
               f"chunks.parquet ({n_chunks} chunks)")
    rows = rows[cid[rows] < n_chunks]
    if not len(rows):
        return
    ids = cid[rows]
    c_doc = chunks.column("doc_id").to_numpy(zero_copy_only=False)[ids]
    c_corpus = chunks.column("corpus").to_numpy(zero_copy_only=False)[ids]
    s_doc = spans["doc_id"][rows]
    s_corpus = spans["corpus"][rows]
    for j in c.take(np.flatnonzero((c_doc != s_doc) | (c_corpus != s_corpus))):
        i = rows[j]
        c.fail(f"{sp}: sample {spans['sample'][i]}, span {spans['span'][i]}: chunk {cid[i]} is "
               f"{c_corpus[j]}/{c_doc[j]} in chunks.parquet, the span says {s_corpus[j]}/{s_doc[j]}")
    if n_tokens is None:
        return
    c_ntok = n_tokens[ids]
    ln = spans["length"].astype(np.int64)[rows]
    tr = spans["truncated"].astype(bool)[rows]
    for j in c.take(np.flatnonzero(~tr & (ln != c_ntok))):
        i = rows[j]
        c.fail(f"{sp}: sample {spans['sample'][i]}, span {spans['span'][i]}: {ln[j]} tokens, chunk {cid[i]} has "
               f"{c_ntok[j]} and the span is not marked truncated")
    for j in c.take(np.flatnonzero(tr & (ln >= c_ntok))):
        i = rows[j]
        c.fail(f"{sp}: sample {spans['sample'][i]}, span {spans['span'][i]}: marked truncated but holds "
               f"{ln[j]} of the chunk's {c_ntok[j]} tokens")


def _decode_samples(c: _Check, res: VerifyResult, tok: Any, picks: list[int], text: IndexedDataset,
                    spans: dict[str, np.ndarray] | None, paths: DatasetPaths) -> None:
    """Decode the picked samples; compare each chunk span's tokens with a fresh tokenization of the chunk."""
    chunk_text: dict[int, str] | None = None
    stored = stored_off = None
    if spans is not None and paths.chunks.exists():
        rows = np.isin(spans["sample"], picks) & (spans["chunk_id"] >= 0)
        recs = read_chunk_rows(paths.chunks, spans["chunk_id"][rows], ["text"])
        chunk_text = {k: v["text"] for k, v in recs.items()}
        off = paths.work_dir / "token_offsets.npy"
        if paths.chunk_tokens.exists() and off.exists():
            stored, stored_off = np.load(paths.chunk_tokens, mmap_mode="r"), np.load(off, mmap_mode="r")
    for s in picks:
        ids = np.asarray(text[s])
        try:
            decoded = _decode(tok, ids)
        except Exception as e:  # noqa: BLE001 - tokenizers raise bare exceptions
            c.fail(f"{_bin(text)}: sample {s}: cannot be decoded ({e})")
            continue
        entry = {"sample": s, "tokens": len(ids), "chars": len(decoded), "head": decoded[:300],
                 "tail": decoded[-300:] if len(decoded) > 300 else ""}
        res.decoded.append(entry)
        if spans is None or chunk_text is None:
            continue
        lo, hi = np.searchsorted(spans["sample"], [s, s + 1])
        n_checked = 0
        for r in range(lo, hi):
            cid = int(spans["chunk_id"][r])
            if cid not in chunk_text:
                continue
            st, ln = int(spans["start"][r]), int(spans["length"][r])
            got = ids[st:st + ln].tolist()
            want = _encode(tok, chunk_text[cid])
            # the ids the run assembled from must also be the tokenization of the chunk
            if stored is not None and cid + 1 < len(stored_off):
                kept = np.asarray(stored[stored_off[cid]:stored_off[cid + 1]]).tolist()
                if kept != want:
                    c.fail(f"{paths.chunk_tokens}: chunk {cid}: stored tokens differ from the tokenization of "
                           f"its text in {paths.chunks}")
            ok = got == want if not spans["truncated"][r] else (got == want[:ln] or got == want[len(want) - ln:])
            n_checked += 1
            if not ok:
                c.fail(f"{_bin(text)}: sample {s}, span {int(spans['span'][r])} ({spans['role'][r]}, chunk {cid}): "
                       f"tokens differ from the tokenization of the chunk's text in chunks.parquet")
        entry["chunk_spans_checked"] = n_checked


def format_decoded(entry: dict) -> str:
    """A short printable view of one decoded sample."""
    out = f"--- sample {entry['sample']}: {entry['tokens']} tokens, {entry['chars']} chars\n{entry['head']}"
    if entry.get("tail"):
        out += f"\n[...]\n{entry['tail']}"
    return out

