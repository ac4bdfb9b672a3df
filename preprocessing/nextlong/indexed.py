"""Megatron indexed datasets (``.bin`` / ``.idx``), written atomically, read with numpy.

The byte layout is documented in ``docs/format.md``. It is the layout read by GPT-NeoX's
``MMapIndexedDataset`` and megatron-core's ``IndexedDataset``; the tests check the bytes written
here against megatron-core's own ``IndexedDatasetBuilder`` and read them back with its reader.

Only integer dtypes are allowed: GPT-NeoX and megatron-core disagree on float codes 6 and 7.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

#: dtype code <-> numpy dtype, for the integer dtypes on which GPT-NeoX and megatron-core agree.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
#: Codes whose meaning differs between GPT-NeoX (6=float32, 7=float64) and megatron-core (6=float64, 7=float32).
AMBIGUOUS_FLOAT_CODES = (6, 7)


class IndexedFormatError(ValueError):
    """A ``.bin``/``.idx`` pair does not follow the documented layout."""


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies below 65,500 (megatron-core's ``optimal_dtype``), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def index_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class IndexedDatasetWriter:
    """Streams sequences into ``<prefix>.bin`` and writes ``<prefix>.idx`` on :meth:`finalize`.

    Both files are written under temporary names and renamed into place by :meth:`finalize`,
    the ``.bin`` first and the ``.idx`` last, so a reader never sees a half-written dataset.
    Every :meth:`add_document` call writes one sequence that forms one document.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(
                f"{prefix}: dtype {self.dtype} cannot be stored; use one of "
                f"{sorted(str(d) for d in CODE_OF)} (floats are ambiguous between GPT-NeoX and megatron-core)"
            )
        self.prefix = Path(prefix)
        self.bin_path = data_file_path(prefix)
        self.idx_path = index_file_path(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _tmp(self.bin_path)
        self._fh = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._lengths: list[int] = []
        self._doc_index: list[int] = [0]
        self._finalized = False

    def add_document(self, values: np.ndarray) -> None:
        """Append one sequence as one document. ``values`` is cast to the dataset dtype after a range check."""
        arr = np.asarray(values)
        if arr.ndim != 1:
            raise ValueError(f"{self.bin_path}: expected a 1-D array, got shape {arr.shape}")
        if arr.dtype != self.dtype:
            if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
                raise ValueError(
                    f"{self.bin_path}: values in [{arr.min()}, {arr.max()}] do not fit dtype {self.dtype}"
                )
            arr = arr.astype(self.dtype)
        self._fh.write(np.ascontiguousarray(arr).tobytes())
        self._lengths.append(int(arr.size))
        self._doc_index.append(len(self._lengths))

    def __len__(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Flush the ``.bin``, write the ``.idx`` and move both into place (``.idx`` last)."""
        if self._finalized:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        write_index(self.idx_path, self.dtype, lengths, pointers, np.asarray(self._doc_index, dtype=np.int64),
                    before_rename=lambda: os.replace(self._bin_tmp, self.bin_path))
        self._finalized = True

    def abort(self) -> None:
        """Close and delete the temporary file; nothing is left at the final paths."""
        if not self._fh.closed:
            self._fh.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_index(
    idx_path: Path,
    dtype: np.dtype,
    lengths: np.ndarray,
    pointers: np.ndarray,
    doc_index: np.ndarray,
    before_rename=None,
) -> None:
    """Write an ``.idx`` atomically. ``before_rename`` runs after the temp file is complete (used to
    move the ``.bin`` into place first)."""
    tmp = _tmp(idx_path)
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_index)))
        f.write(np.asarray(lengths, dtype="<i4").tobytes())
        f.write(np.asarray(pointers, dtype="<i8").tobytes())
        f.write(np.asarray(doc_index, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, idx_path)


@dataclass
class IndexedDataset:
    """A read-only, memory-mapped view of one ``.bin``/``.idx`` pair (validated on open)."""

    prefix: Path
    dtype: np.dtype
    dtype_code: int
    lengths: np.ndarray
    pointers: np.ndarray
    doc_index: np.ndarray
    data: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self.lengths):
            raise IndexError(f"{self.prefix}: sequence {i} out of range [0, {len(self.lengths)})")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.data[start : start + int(self.lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        seq = self[i]
        end = len(seq) if length is None else offset + length
        return seq[offset:end]


def read_indexed(prefix: str | os.PathLike) -> IndexedDataset:
    """Open ``<prefix>.bin/.idx``; raise :class:`IndexedFormatError` naming the file on any inconsistency."""
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    for p in (idx_path, bin_path):
        if not p.exists():
            raise IndexedFormatError(f"{p}: missing")
    raw = idx_path.read_bytes()
    if len(raw) < HEADER_SIZE or raw[: len(MAGIC)] != MAGIC:
        raise IndexedFormatError(f"{idx_path}: not a Megatron indexed dataset (bad magic header)")
    (version,) = struct.unpack_from("<Q", raw, 9)
    if version != VERSION:
        raise IndexedFormatError(f"{idx_path}: unsupported version {version} (expected {VERSION})")
    (code,) = struct.unpack_from("<B", raw, 17)
    if code in AMBIGUOUS_FLOAT_CODES:
        raise IndexedFormatError(
            f"{idx_path}: dtype code {code} is a float whose meaning differs between GPT-NeoX and megatron-core"
        )
    if code not in DTYPE_CODES:
        raise IndexedFormatError(f"{idx_path}: unknown dtype code {code}")
    dtype = DTYPE_CODES[code]
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    expected = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if len(raw) != expected:
        raise IndexedFormatError(f"{idx_path}: {len(raw)} bytes, header promises {expected}")
    off = HEADER_SIZE
    lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=off)
    off += 4 * n_seq
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=off)
    off += 8 * n_seq
    doc_index = np.frombuffer(raw, dtype="<i8", count=n_doc, offset=off)
    bin_size = bin_path.stat().st_size
    total = int(lengths.astype(np.int64).sum()) * dtype.itemsize
    if bin_size != total:
        raise IndexedFormatError(f"{bin_path}: {bin_size} bytes, index promises {total} (truncated or wrong dtype?)")
    if n_seq:
        exp_ptr = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize)])
        if not np.array_equal(exp_ptr, pointers):
            raise IndexedFormatError(f"{idx_path}: sequence pointers are not contiguous")
    data = np.memmap(bin_path, dtype=dtype, mode="r") if bin_size else np.zeros(0, dtype=dtype)
    return IndexedDataset(Path(prefix), dtype, code, lengths, pointers, doc_index, data)
