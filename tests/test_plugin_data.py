"""Mask datasets: start-up validation, and lock-step slicing with the text in every packing mode,
checked against megatron-core's reader on files written by the project's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from nextlong.indexed import IndexedDatasetWriter, read_indexed, write_index  # noqa: E402

from neox_plugin.config import MASK_PADDING  # noqa: E402
from neox_plugin.data import (  # noqa: E402
    NExtLongDataError,
    make_mask_view,
    mask_sample,
    validate_lossweight_dataset,
    validate_splits,
)

VOCAB = 1000


def mask_of(tokens: np.ndarray) -> np.ndarray:
    """The fixture's mask is a function of the token, so any misalignment shows."""
    return (np.asarray(tokens) % 2).astype(np.uint8)


def write_pair(tmp: Path, name: str, lengths: list[int], seed: int = 0) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    text, mask = str(tmp / f"{name}_text_document"), str(tmp / f"{name}_lossweight_document")
    with IndexedDatasetWriter(text, np.uint16) as wt, IndexedDatasetWriter(mask, np.uint8) as wm:
        for n in lengths:
            toks = rng.integers(1, VOCAB, size=n)
            wt.add_document(toks)
            wm.add_document(mask_of(toks))
    return text, mask


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    return write_pair(tmp_path, "ds", [40, 7, 130, 1, 64, 300, 9, 55])


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------

def test_valid_pair_passes_and_counts(pair: tuple[str, str]) -> None:
    stats = validate_lossweight_dataset(*pair)
    assert stats["sequences"] == 8 and stats["tokens"] == stats["ones"] + stats["zeros"] == 606


def test_missing_mask_names_both_files(pair: tuple[str, str]) -> None:
    text, mask = pair
    Path(mask + ".bin").unlink()
    with pytest.raises(NExtLongDataError) as e:
        validate_lossweight_dataset(text, mask)
    assert f"{mask}.bin is missing" in str(e.value) and text in str(e.value)


def test_size_mismatch(tmp_path: Path) -> None:
    text, _ = write_pair(tmp_path, "a", [10, 20, 30])
    _, mask = write_pair(tmp_path, "b", [10, 21, 30])
    with pytest.raises(NExtLongDataError, match=r"sequence 1 has 21 mask values but 20 tokens") as e:
        validate_lossweight_dataset(text, mask)
    assert text in str(e.value) and mask in str(e.value)


def test_sequence_count_mismatch(tmp_path: Path) -> None:
    text, _ = write_pair(tmp_path, "a", [10, 20, 30])
    _, mask = write_pair(tmp_path, "b", [10, 20])
    with pytest.raises(NExtLongDataError, match="mask has 2 sequences, text has 3"):
        validate_lossweight_dataset(text, mask)


def test_document_index_mismatch(pair: tuple[str, str]) -> None:
    text, mask = pair
    m = read_indexed(mask)
    doc = np.asarray([0, 2, 4, 6, 8], dtype=np.int64)  # same sequences, grouped into other documents
    write_index(Path(mask + ".idx"), np.uint8, np.array(m.lengths), np.array(m.pointers), doc)
    with pytest.raises(NExtLongDataError, match="document index differs"):
        validate_lossweight_dataset(text, mask)


def test_non_uint8_mask(tmp_path: Path) -> None:
    text, _ = write_pair(tmp_path, "a", [5, 6])
    bad = str(tmp_path / "a_lossweight_document")
    with IndexedDatasetWriter(bad, np.int32) as w:
        w.add_document(np.ones(5))
        w.add_document(np.ones(6))
    with pytest.raises(NExtLongDataError, match="dtype int32 .*expected uint8"):
        validate_lossweight_dataset(text, bad)


def test_reserved_value_is_rejected_with_position(tmp_path: Path) -> None:
    text, _ = write_pair(tmp_path, "a", [5, 6])
    bad = str(tmp_path / "a_lossweight_document")
    with IndexedDatasetWriter(bad, np.uint8) as w:
        w.add_document(np.ones(5))
        w.add_document(np.array([1, 0, 1, 2, 1, 1]))
    with pytest.raises(NExtLongDataError, match=r"mask value 2 at token 8 \(sequence 1\)"):
        validate_lossweight_dataset(text, bad)
    validate_lossweight_dataset(text, bad, scan_values=False)  # structure alone is fine


def test_all_splits_reported_together(tmp_path: Path) -> None:
    text, mask = write_pair(tmp_path, "a", [5, 6])
    missing = str(tmp_path / "nope_lossweight_document")
    with pytest.raises(NExtLongDataError) as e:
        validate_splits([("train", text, mask), ("valid", text, missing), ("test", text, missing)])
    msg = str(e.value)
    assert "[valid]" in msg and "[test]" in msg and "[train]" not in msg


# ------------------------------------------------------------------------------------------
# lock-step slicing
# ------------------------------------------------------------------------------------------

class NeoXStyleDataset:
    """GPT-NeoX's ``GPT2Dataset.__getitem__`` (megatron/data/gpt2_dataset.py, text and label
    datasets, no reward), transcribed; the readers are megatron-core ``IndexedDataset`` objects."""

    def __init__(self, indexed_dataset, doc_idx, sample_idx, shuffle_idx, seq_length, label_dataset=None):
        self.indexed_dataset, self.label_dataset = indexed_dataset, label_dataset
        self.reward_dataset = self.ref_dataset = None
        self.doc_idx, self.sample_idx, self.shuffle_idx = doc_idx, sample_idx, shuffle_idx
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> dict:
        try:
            return self._get(idx)
        except IndexError:  # GPT-NeoX: "taking modulo of index instead" (of the shuffled index)
            return self[self.shuffle_idx[idx] % len(self)]

    def _get(self, idx: int) -> dict:
        idx = self.shuffle_idx[idx]
        doc_f, off_f = self.sample_idx[idx]
        doc_l, off_l = self.sample_idx[idx + 1]
        datasets = [self.indexed_dataset] + ([self.label_dataset] if self.label_dataset is not None else [])
        samples = []
        for dataset in datasets:
            if doc_f == doc_l:
                samples.append(dataset.get(self.doc_idx[doc_f], offset=int(off_f), length=int(off_l - off_f + 1)))
            else:
                parts = [dataset.get(self.doc_idx[doc_f], offset=int(off_f))]
                parts += [dataset.get(self.doc_idx[i]) for i in range(doc_f + 1, doc_l)]
                parts.append(dataset.get(self.doc_idx[doc_l], length=int(off_l + 1)))
                samples.append(np.concatenate(parts))
        for i in range(len(samples)):
            pad_label = self.label_dataset is not None and i == 1
            if len(samples[i]) < self.seq_length + 1:
                samples[i] = np.pad(samples[i], (0, self.seq_length + 1 - len(samples[i])), mode="constant",
                                    constant_values=-100 if pad_label else 0)
            elif len(samples[i]) > self.seq_length + 1:
                samples[i] = samples[i][: self.seq_length + 1]
        ret = {"text": np.array(samples[0], dtype=np.int64)}
        if self.label_dataset is not None:
            ret["label"] = np.array(samples[1], dtype=np.int64)
        return ret


def packed_index(sizes: np.ndarray, seq_length: int, rng: np.random.Generator, epochs: int = 2):
    """GPT-NeoX's ``packed`` mode: shuffled doc_idx, ``_build_sample_idx``, shuffled samples."""
    doc_idx = np.concatenate([rng.permutation(len(sizes)) for _ in range(epochs)]).astype(np.int32)
    tokens = int(sizes.sum()) * epochs
    num_samples = (tokens - 1) // seq_length
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    di, off = 0, 0
    for s in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_len = sizes[doc_idx[di]] - off
            remaining -= doc_len
            if remaining <= 0:
                off += remaining + doc_len - 1
                remaining = 0
            else:
                di += 1
                off = 0
        sample_idx[s] = (di, off)
    return doc_idx, sample_idx, rng.permutation(num_samples)


def overflow_index(sizes: np.ndarray, seq_length: int, rng: np.random.Generator, num_samples: int):
    """GPT-NeoX's ``pack_until_overflow`` mode (whole documents, a new sample when one overflows)."""
    order = rng.permutation(len(sizes))
    sample_idx, doc_idx, running, k = [], [], 0, 0
    while len(sample_idx) < num_samples:
        d = order[k % len(order)]
        if running == 0:
            sample_idx.append((len(doc_idx), 0))
            running = sizes[d]
        elif running + sizes[d] > seq_length + 1:
            running = sizes[d]
            sample_idx.append((len(doc_idx), 0))
        else:
            running += sizes[d]
        doc_idx.append(d)
        k += 1
    sample_idx.append((len(doc_idx), 0))
    return np.array(doc_idx), np.array(sample_idx), rng.permutation(num_samples)


def unpacked_index(sizes: np.ndarray, rng: np.random.Generator, num_samples: int):
    """GPT-NeoX's ``unpacked`` mode: one document per sample."""
    sample_idx = np.stack([np.arange(num_samples + 1), np.zeros(num_samples + 1, dtype=np.int64)], axis=1)
    doc_idx = np.array([i % len(sizes) for i in range(num_samples + 1)])
    return doc_idx, sample_idx, rng.permutation(num_samples)


@pytest.mark.parametrize("mode", ["packed", "pack_until_overflow", "unpacked"])
def test_mask_slices_in_lockstep_with_text(pair: tuple[str, str], mode: str) -> None:
    IndexedDataset = pytest.importorskip(  # GPT-NeoX's reader stand-in
        "megatron.core.datasets.indexed_dataset", reason='megatron-core is not installed: pip install -e ".[megatron]"'
    ).IndexedDataset

    text_prefix, mask_prefix = pair
    text = IndexedDataset(text_prefix, multimodal=False, mmap=True)
    mask = IndexedDataset(mask_prefix, multimodal=False, mmap=True)
    sizes = text.sequence_lengths.astype(np.int64)
    seq_length = 64
    rng = np.random.default_rng(7)
    if mode == "packed":
        maps = packed_index(sizes, seq_length, rng)
    elif mode == "pack_until_overflow":
        maps = overflow_index(sizes, seq_length, rng, num_samples=12)
    else:
        maps = unpacked_index(sizes, rng, num_samples=12)
    ds = NeoXStyleDataset(text, *maps, seq_length=seq_length)
    view = make_mask_view(ds, mask)
    padded = 0
    for i in range(len(ds)):
        tokens = ds[i]["text"]
        m = mask_sample(view, i, type(ds).__getitem__)
        assert m.dtype == np.uint8 and m.shape == tokens.shape == (seq_length + 1,)
        real = m != MASK_PADDING
        padded += int((~real).sum())
        # the mask is the function of the token it was written with, position by position
        np.testing.assert_array_equal(m[real], mask_of(tokens[real]))
        assert np.all(tokens[~real] == 0)  # padding only where the loader padded the text
        assert np.all(np.diff(real.astype(int)) <= 0)  # padding is a suffix
    assert (padded > 0) == (mode != "packed")


def test_view_shares_index_arrays_and_leaves_dataset_untouched(pair: tuple[str, str]) -> None:
    IndexedDataset = pytest.importorskip(  # GPT-NeoX's reader stand-in
        "megatron.core.datasets.indexed_dataset", reason='megatron-core is not installed: pip install -e ".[megatron]"'
    ).IndexedDataset

    text = IndexedDataset(pair[0], multimodal=False, mmap=True)
    mask = IndexedDataset(pair[1], multimodal=False, mmap=True)
    label = IndexedDataset(pair[0], multimodal=False, mmap=True)
    maps = unpacked_index(text.sequence_lengths.astype(np.int64), np.random.default_rng(0), 4)
    ds = NeoXStyleDataset(text, *maps, seq_length=32, label_dataset=label)
    view = make_mask_view(ds, mask)
    assert view.sample_idx is ds.sample_idx and view.shuffle_idx is ds.shuffle_idx
    assert view.label_dataset is None and ds.label_dataset is label and ds.indexed_dataset is text
    assert "label" in ds[0]
