"""The .bin/.idx writer against megatron-core's own builder and reader (independent implementations)."""

from __future__ import annotations

import numpy as np
import pytest
from nextlong.indexed import IndexedDatasetWriter, IndexedFormatError, read_indexed


@pytest.fixture
def mc():
    """megatron-core's indexed_dataset module; only the tests that compare with it skip without it."""
    pytest.importorskip("torch")
    return pytest.importorskip("megatron.core.datasets.indexed_dataset",
                               reason='megatron-core is not installed: pip install -e ".[megatron]"')


def _docs(seed: int, n: int, hi: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, hi, size=int(rng.integers(1, 300))) for _ in range(n)]


@pytest.mark.parametrize("dtype,hi", [(np.uint16, 65000), (np.int32, 128256), (np.uint8, 2)])
def test_bytes_equal_megatron_core_builder(tmp_path, dtype, hi, mc):
    import torch  # megatron-core's builder takes tensors; the mc fixture checked it imports

    docs = _docs(0, 37, hi)
    with IndexedDatasetWriter(tmp_path / "ours", dtype) as w:
        for d in docs:
            w.add_document(d)
    b = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for d in docs:
        b.add_item(torch.from_numpy(d.astype(np.int64)))
        b.end_document()
    b.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_megatron_core_reads_what_we_write(tmp_path, mc):
    docs = _docs(1, 20, 100000)
    with IndexedDatasetWriter(tmp_path / "d", np.int32) as w:
        for d in docs:
            w.add_document(d)
    ds = mc.IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 20
    assert list(ds.document_indices) == list(range(21))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(read_indexed(tmp_path / "d")[i], d)
    i = next(i for i, d in enumerate(docs) if len(d) >= 12)
    np.testing.assert_array_equal(ds.get(i, offset=5, length=7), docs[i][5:12])


def test_abort_leaves_nothing_and_floats_are_refused(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        w.add_document(np.arange(10))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="cannot be stored"):
        IndexedDatasetWriter(tmp_path / "f", np.float32)
    w = IndexedDatasetWriter(tmp_path / "r", np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        w.add_document(np.array([70000]))
    w.abort()


def test_reader_rejects_corruption(tmp_path):
    with IndexedDatasetWriter(tmp_path / "c", np.int32) as w:
        w.add_document(np.arange(100))
    idx = tmp_path / "c.idx"
    raw = bytearray(idx.read_bytes())
    raw[17] = 6
    idx.write_bytes(bytes(raw))
    with pytest.raises(IndexedFormatError, match="differs between GPT-NeoX and megatron-core"):
        read_indexed(tmp_path / "c")
    raw[17] = 4
    idx.write_bytes(bytes(raw))
    binp = tmp_path / "c.bin"
    binp.write_bytes(binp.read_bytes()[:-4])
    with pytest.raises(IndexedFormatError, match="truncated"):
        read_indexed(tmp_path / "c")
