"""Loss-weight mask datasets: start-up validation and lock-step slicing with the text.

Validation (:func:`validate_lossweight_dataset`) compares a mask ``.bin/.idx`` pair with its text
pair: both exist, the mask is uint8, item sizes and document index are identical, and every value
is 0 or 1 (``docs/format.md``). Errors name both files.

Lock-step slicing reuses the data loader's own sample construction: a shallow copy of the text
dataset object whose token reader is swapped for the mask reader (:func:`make_mask_view`). The
loader's ``__getitem__`` then runs unchanged on the copy, so the mask sample is cut from the same
document, offset and length, after the same shuffling, in every packing mode, with the same
padding and truncation. The mask reader returns ``value + 1`` so that the loader's zero padding
becomes ``-1`` and is mapped to :data:`~neox_plugin.config.MASK_PADDING` (weight 0).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from neox_plugin.config import MASK_PADDING, VALID_MASK_VALUES

logger = logging.getLogger(__name__)

#: Key of the mask in the sample dictionaries returned by the GPT-NeoX dataset.
BATCH_KEY = "nextlong_lossweight"
#: Elements read at a time by the value scan.
SCAN_CHUNK = 1 << 26


class NExtLongDataError(ValueError):
    """A mask dataset does not match its text dataset; the message names both files."""


def _files(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx/.bin"


def validate_lossweight_dataset(
    text_prefix: str | os.PathLike, mask_prefix: str | os.PathLike, *, scan_values: bool = True
) -> dict[str, Any]:
    """Check that ``mask_prefix`` is a valid loss-weight mask for ``text_prefix``.

    Checks: both pairs exist and are well-formed; the mask dtype is uint8; the number of
    sequences, every sequence length and the document index are identical; with ``scan_values``
    every mask value is in ``{0, 1}``. Returns counts (sequences, tokens, ones, zeros).

    Raises:
        NExtLongDataError: naming both the text and the mask files.
    """
    from nextlong.indexed import IndexedFormatError, read_indexed

    pair = f"text {_files(text_prefix)} / mask {_files(mask_prefix)}"
    for p in (f"{mask_prefix}.idx", f"{mask_prefix}.bin"):
        if not Path(p).exists():
            raise NExtLongDataError(f"loss-weight mask file {p} is missing ({pair})")
    try:
        text = read_indexed(text_prefix)
    except IndexedFormatError as e:
        raise NExtLongDataError(f"text dataset unreadable: {e} ({pair})") from e
    try:
        mask = read_indexed(mask_prefix)
    except IndexedFormatError as e:
        raise NExtLongDataError(f"loss-weight mask unreadable: {e} ({pair})") from e
    if mask.dtype != np.uint8:
        raise NExtLongDataError(
            f"loss-weight mask has dtype {mask.dtype} (code {mask.dtype_code}), expected uint8 ({pair})"
        )
    if len(mask) != len(text):
        raise NExtLongDataError(f"mask has {len(mask)} sequences, text has {len(text)} ({pair})")
    if not np.array_equal(mask.lengths, text.lengths):
        i = int(np.flatnonzero(mask.lengths != text.lengths)[0])
        raise NExtLongDataError(
            f"sequence {i} has {int(mask.lengths[i])} mask values but {int(text.lengths[i])} tokens ({pair})"
        )
    if not np.array_equal(mask.doc_index, text.doc_index):
        raise NExtLongDataError(f"document index differs between text and mask ({pair})")
    ones = zeros = 0
    if scan_values:
        t0 = time.perf_counter()
        data = mask.data
        for s in range(0, data.size, SCAN_CHUNK):
            chunk = np.asarray(data[s : s + SCAN_CHUNK])
            if chunk.size and int(chunk.max()) > max(VALID_MASK_VALUES):
                pos = s + int(np.flatnonzero(chunk > max(VALID_MASK_VALUES))[0])
                seq = int(np.searchsorted(np.cumsum(mask.lengths, dtype=np.int64), pos, side="right"))
                raise NExtLongDataError(
                    f"mask value {int(data[pos])} at token {pos} (sequence {seq}) is outside {{0, 1}}; "
                    f"values 2..255 are reserved ({pair})"
                )
            n1 = int(np.count_nonzero(chunk))
            ones += n1
            zeros += int(chunk.size) - n1
        logger.info("validated %s against %s (%d tokens, %.1fs)", mask_prefix, text_prefix, data.size,
                    time.perf_counter() - t0)
    return {"sequences": len(text), "tokens": int(text.lengths.sum()), "ones": ones, "zeros": zeros}


def validate_splits(pairs: Iterable[tuple[str, str, str]], *, scan_values: bool = True) -> None:
    """Validate every ``(split, text_prefix, mask_prefix)``; all failures are reported in one error."""
    errors = []
    for split, text, mask in pairs:
        try:
            validate_lossweight_dataset(text, mask, scan_values=scan_values)
        except NExtLongDataError as e:
            errors.append(f"[{split}] {e}")
    if errors:
        raise NExtLongDataError("NExtLong loss-weight masks failed validation:\n  " + "\n  ".join(errors))


class ShiftedMaskReader:
    """Wraps a reader with ``get(idx, offset=0, length=None)``; returns mask values + 1 (int16).

    Used inside a dataset view so that the loader's zero padding stays distinguishable from the
    hard-negative value 0.
    """

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.sizes = getattr(reader, "sizes", None)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return np.asarray(self.reader.get(idx, offset=offset, length=length)).astype(np.int16) + 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


def make_mask_view(dataset: Any, mask_reader: Any, *, reader_attr: str = "indexed_dataset",
                   clear_attrs: tuple[str, ...] = ("label_dataset", "reward_dataset", "ref_dataset")) -> Any:
    """A shallow copy of ``dataset`` that reads the mask instead of the tokens.

    ``reader_attr`` names the token-reader attribute (``indexed_dataset`` for GPT-NeoX's
    ``GPT2Dataset``, ``dataset`` for megatron-core's ``GPTDataset``); ``clear_attrs`` are set to
    None so the view slices one stream only. Index arrays are shared, not copied.
    """
    view = copy.copy(dataset)
    setattr(view, reader_attr, ShiftedMaskReader(mask_reader))
    for a in clear_attrs:
        if hasattr(view, a):
            setattr(view, a, None)
    return view


def unshift_mask(sample: np.ndarray) -> np.ndarray:
    """Undo :class:`ShiftedMaskReader`'s ``+1``; padding (``-1``) becomes :data:`MASK_PADDING`."""
    s = np.asarray(sample).astype(np.int64) - 1
    out = s.astype(np.uint8)
    out[s < 0] = MASK_PADDING
    return out


def mask_sample(view: Any, idx: int, getitem: Callable[[Any, int], dict], key: str = "text") -> np.ndarray:
    """The uint8 mask sample ``idx`` of a view made by :func:`make_mask_view`.

    ``getitem`` is the loader's original (unpatched) ``__getitem__``; ``key`` the token key of the
    dictionary it returns.
    """
    return unshift_mask(getitem(view, idx)[key])
