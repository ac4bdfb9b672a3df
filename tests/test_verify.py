"""The dataset verifier: a clean run passes, and each kind of corruption is caught by the right check
with a message naming the file and the sample. Every test runs twice: on the hand-made fixture
(_inspect_fixtures.py) and on real pipeline output (the ``pipeline_run`` fixture)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _inspect_fixtures import REPO, build_dataset
from nextlong.indexed import IndexedDatasetWriter, read_indexed
from nextlong.verify import normalize_prefix, read_spans, verify_dataset


@pytest.fixture(scope="module", params=["fixture", "pipeline"])
def clean(request, tmp_path_factory) -> Path:
    if request.param == "pipeline":
        return request.getfixturevalue("pipeline_run")
    return build_dataset(tmp_path_factory.mktemp("clean"), "run")


def shape(prefix: Path) -> tuple[int, int]:
    """(samples, tokens per sample) the run's manifest states."""
    man = json.loads(Path(f"{prefix}_manifest.json").read_text())
    return man["counts"]["samples_out"], man["config"]["target_length"]


@pytest.fixture
def ds(clean: Path, tmp_path: Path) -> Path:
    """A private copy of the clean run, free to corrupt."""
    for f in clean.parent.iterdir():
        dst = tmp_path / f.name
        if f.is_dir():
            shutil.copytree(f, dst)
        else:
            shutil.copy(f, dst)
    return tmp_path / clean.name


def failing(res, check: str) -> list[str]:
    assert res.checks[check].startswith("FAILED"), res.summary()
    return res.failures


def one_negative_token(prefix: Path, sample: int = 1) -> int:
    """Offset (within the sample) of the first token of a negative span."""
    sp = read_spans(Path(f"{prefix}_spans.parquet"))
    rows = np.flatnonzero((sp["sample"] == sample) & (sp["role"] == "negative"))
    return int(sp["start"][rows[0]])


def patch(prefix: str, sample: int, token: int, value: int) -> None:
    ds = read_indexed(prefix)
    mm = np.memmap(f"{prefix}.bin", dtype=ds.dtype, mode="r+")
    mm[int(ds.pointers[sample]) // ds.dtype.itemsize + token] = value
    mm.flush()


def rewrite(prefix: str, dtype=None, change=None) -> None:
    """Rewrite an indexed dataset, optionally with another dtype or a changed sample."""
    src = read_indexed(prefix)
    seqs = [np.array(src[i]) for i in range(len(src))]
    if change:
        seqs = change(seqs)
    with IndexedDatasetWriter(prefix, dtype or src.dtype) as w:
        for s in seqs:
            w.add_document(s)


def test_clean_run_passes(clean: Path) -> None:
    n, t = shape(clean)
    assert n >= 4 and t >= 300
    res = verify_dataset(clean, decode=2)
    assert res.ok, res.summary()
    assert set(res.checks.values()) == {"ok"}
    assert len(res.decoded) == 2 and res.decoded[0]["head"].startswith("<s>")
    assert all(d["chunk_spans_checked"] > 0 for d in res.decoded)
    assert res.stats["samples"] == n and res.stats["tokens"] == n * t


def test_prefix_from_any_file_name(clean: Path) -> None:
    for name in ("_manifest.json", "_text_document.bin", "_lossweight_document.idx", "_spans.parquet", ".work"):
        assert normalize_prefix(f"{clean}{name}") == clean
    assert verify_dataset(f"{clean}_manifest.json").ok


def test_truncated_bin(ds: Path) -> None:
    b = Path(f"{ds}_text_document.bin")
    b.write_bytes(b.read_bytes()[:-10])
    res = verify_dataset(ds)
    msgs = failing(res, "headers")
    assert any(m.startswith(f"{b}:") and "truncated" in m for m in msgs), msgs


def test_float_dtype_code(ds: Path) -> None:
    idx = Path(f"{ds}_text_document.idx")
    raw = bytearray(idx.read_bytes())
    raw[17] = 6
    idx.write_bytes(bytes(raw))
    msgs = failing(verify_dataset(ds), "headers")
    assert any(m.startswith(f"{idx}:") and "dtype code 6 is a float code" in m for m in msgs), msgs


def test_unknown_dtype_code_bad_magic_and_version(ds: Path) -> None:
    idx = Path(f"{ds}_lossweight_document.idx")
    raw = bytearray(idx.read_bytes())
    raw[17] = 42
    idx.write_bytes(bytes(raw))
    lab = Path(f"{ds}_label_document.idx")
    raw = bytearray(lab.read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    lab.write_bytes(bytes(raw))
    txt = Path(f"{ds}_text_document.idx")
    raw = bytearray(txt.read_bytes())
    raw[0:4] = b"XXXX"
    txt.write_bytes(bytes(raw))
    msgs = failing(verify_dataset(ds), "headers")
    assert any(m.startswith(f"{idx}:") and "unknown dtype code 42" in m for m in msgs), msgs
    assert any(m.startswith(f"{lab}:") and "version 2" in m for m in msgs), msgs
    assert any(m.startswith(f"{txt}:") and "bad magic" in m for m in msgs), msgs


def test_mask_with_wider_items(ds: Path) -> None:
    rewrite(f"{ds}_lossweight_document", dtype=np.uint16)
    msgs = failing(verify_dataset(ds), "headers")
    assert any(m.startswith(f"{ds}_lossweight_document.idx:") and "expected uint8" in m and "item size 2" in m
               for m in msgs), msgs


def test_mask_with_different_item_count(ds: Path) -> None:
    def shorten(seqs):
        seqs[2] = seqs[2][:-1]
        return seqs

    rewrite(f"{ds}_lossweight_document", change=shorten)
    res = verify_dataset(ds)
    msgs = failing(res, "document_index")
    t = shape(ds)[1]
    assert f"{ds}_lossweight_document.idx: sample 2 has {t - 1} items, the text has {t}" in msgs, msgs
    assert res.checks["labels"].startswith("skipped")


def test_label_mask_disagreement(ds: Path) -> None:
    tok = one_negative_token(ds, sample=1)
    patch(f"{ds}_lossweight_document", 1, tok, 1)  # a negative token now carries loss, its label is still -100
    res = verify_dataset(ds)
    msgs = failing(res, "labels")
    assert any(m.startswith(f"{ds}_label_document.bin: sample 1, token {tok}: label -100 where the mask is 1")
               for m in msgs), msgs
    msgs = failing(res, "spans_vs_mask")
    assert any(f"sample 1, token {tok}: mask 1 but span" in m and "role 'negative'" in m for m in msgs), msgs


def test_label_differs_from_token(ds: Path) -> None:
    patch(f"{ds}_label_document", 3, 5, 7)
    patch(f"{ds}_text_document", 3, 5, 9)
    msgs = failing(verify_dataset(ds), "labels")
    assert f"{ds}_label_document.bin: sample 3, token 5: label 7 differs from the token 9" in msgs, msgs


def test_mask_value_two(ds: Path) -> None:
    patch(f"{ds}_lossweight_document", 0, 10, 2)
    msgs = failing(verify_dataset(ds), "mask_values")
    assert any(m.startswith(f"{ds}_lossweight_document.bin: sample 0, token 10: mask value 2") for m in msgs), msgs


def test_spans_not_tiling(ds: Path) -> None:
    path = Path(f"{ds}_spans.parquet")
    t = pq.read_table(path)
    start = t.column("start").to_numpy().copy()
    rows = np.flatnonzero(t.column("sample").to_numpy() == 2)
    start[rows[3]] += 1
    t = t.set_column(t.schema.get_field_index("start"), "start", [start])
    pq.write_table(t, path)
    res = verify_dataset(ds)
    msgs = failing(res, "spans_tiling")
    assert any(m.startswith(f"{path}: sample 2, span 3: starts at") and "(gap)" in m for m in msgs), msgs
    assert any(m.startswith(f"{path}: sample 2, span 4:") and "(overlap)" in m for m in msgs), msgs
    assert res.checks["spans_vs_mask"].startswith("skipped")


def test_spans_missing_sample_and_role(ds: Path) -> None:
    path = Path(f"{ds}_spans.parquet")
    t = pq.read_table(path)
    keep = t.column("sample").to_numpy() != 3
    t = t.filter(keep)
    role = t.column("role").to_pylist()
    role[2] = "distractor"
    t = t.set_column(t.schema.get_field_index("role"), "role", [role])
    pq.write_table(t, path)
    res = verify_dataset(ds)
    assert f"{path}: sample 3 has no spans" in failing(res, "spans_tiling")
    assert any("unknown role 'distractor'" in m for m in failing(res, "spans_roles"))


def test_sample_length_and_counts(ds: Path) -> None:
    m = Path(f"{ds}_manifest.json")
    man = json.loads(m.read_text())
    man["config"]["target_length"] = 512
    man["counts"]["samples_out"] = 5
    m.write_text(json.dumps(man))
    res = verify_dataset(ds)
    n_tok = read_indexed(f"{ds}_text_document").lengths[0]
    assert f"{ds}_text_document.bin: sample 0 has {n_tok} tokens, target_length is 512" in failing(res, "sample_length")
    assert any("counts.samples_out = 5" in x for x in failing(res, "manifest_counts"))


def test_wrong_bos_and_chunk_provenance(ds: Path) -> None:
    patch(f"{ds}_text_document", 2, 0, 5)
    patch(f"{ds}_label_document", 2, 0, 5)
    path = Path(f"{ds}_spans.parquet")
    t = pq.read_table(path)
    doc = t.column("doc_id").to_pylist()
    i = next(k for k, d in enumerate(doc) if d)
    doc[i] = "elsewhere"
    pq.write_table(t.set_column(t.schema.get_field_index("doc_id"), "doc_id", [doc]), path)
    res = verify_dataset(ds)
    assert any("sample 2, token 0: bos span holds token 5" in x for x in failing(res, "special_tokens"))
    assert any("the span says" in x and "elsewhere" in x for x in failing(res, "chunks"))


def test_decode_detects_wrong_chunk_tokens(ds: Path) -> None:
    sp = read_spans(Path(f"{ds}_spans.parquet"))
    r = int(np.flatnonzero((sp["sample"] == 0) & (sp["role"] == "meta"))[0])
    tok = int(sp["start"][r]) + 1
    new = 3 if read_indexed(f"{ds}_text_document")[0][tok] != 3 else 4
    for name in ("text", "label"):
        patch(f"{ds}_{name}_document", 0, tok, new)
    res = verify_dataset(ds, decode=shape(ds)[0])  # every sample
    msgs = failing(res, "decode")
    assert any(m.startswith(f"{ds}_text_document.bin: sample 0, span {int(sp['span'][r])} (meta") for m in msgs)
    assert verify_dataset(ds).ok  # without decoding the contract itself holds


def test_missing_files(ds: Path) -> None:
    Path(f"{ds}_manifest.json").unlink()
    Path(f"{ds}_lossweight_document.bin").unlink()
    res = verify_dataset(ds)
    assert f"{ds}_manifest.json: missing" in failing(res, "manifest")
    assert f"{ds}_lossweight_document.bin: missing" in failing(res, "headers")
    assert res.checks["sample_length"].startswith("skipped")


def test_failure_cap(ds: Path) -> None:
    rewrite(f"{ds}_lossweight_document", change=lambda seqs: [np.full_like(s, 3) for s in seqs])
    res = verify_dataset(ds, max_failures=2)
    n = shape(ds)[0]  # one problem per sample
    assert res.checks["mask_values"] == f"FAILED ({n} problems)"
    assert any(f"{n - 2} more problem(s) not listed" in m for m in res.failures)


def test_cli_exit_codes(clean: Path, ds: Path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("verify_cli", REPO / "preprocessing" / "verify_nextlong_bin.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(clean), "--decode", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "--- sample" in out
    patch(f"{ds}_lossweight_document", 1, 3, 9)
    assert cli.main([str(ds), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["checks"]["mask_values"].startswith("FAILED")
    assert cli.main([str(ds), "--decode", "-1"]) == 2


def test_cli_as_script(clean: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "preprocessing/verify_nextlong_bin.py", str(clean)], cwd=REPO, check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "verify" in r.stdout and "OK" in r.stdout


def test_chunk_texts_read_by_row_group(ds: Path) -> None:
    from nextlong.verify import read_chunk_rows

    path = ds.parent / f"{ds.name}.work" / "chunks.parquet"
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups > 3
    ids = [0, 4, 5, table.num_rows - 1]
    got = read_chunk_rows(path, ids, ["text", "doc_id"])
    texts = table.column("text").to_pylist()
    assert {k: v["text"] for k, v in got.items()} == {i: texts[i] for i in ids}
    res = verify_dataset(ds, decode=shape(ds)[0])
    assert res.ok and all(d["chunk_spans_checked"] > 0 for d in res.decoded)
