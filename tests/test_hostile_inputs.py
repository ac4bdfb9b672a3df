"""Hostile inputs and flags: damaged archives, bad records, policies, and the cheap checks before any work.

The full table (50+ cases, each through the command line in its own process) is bench/hostile_inputs.py;
these are the important cases, run in-process and fast.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from nextlong.cli import build_parser, main
from nextlong.config import ConfigError, SynthesisConfig
from nextlong.preflight import preflight
from nextlong.readers import (
    InputError,
    InputPolicy,
    Rejects,
    iter_documents,
    iter_lines,
    merge_audits,
    parse_input_specs,
    repeated_across_inputs,
)


def _lines(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _docs(path: Path, policy: InputPolicy | None = None, rejects: Rejects | None = None):
    rej = rejects if rejects is not None else Rejects()
    [spec] = parse_input_specs([str(path)], None, None)
    return list(iter_documents(spec, "text", "id", rej, policy)), rej


RECORDS = [{"id": f"d{i}", "text": f"Document number {i}. " * 20} for i in range(2000)]


# ------------------------------------------------------------------------------------------ archives


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_archive_names_file_and_last_line(tmp_path, suffix):
    raw = _lines(RECORDS)
    data = gzip.compress(raw) if suffix.endswith("gz") else zstandard.ZstdCompressor().compress(raw)
    p = tmp_path / f"in{suffix}"
    p.write_bytes(data[: len(data) * 57 // 100])
    with pytest.raises(InputError) as e:
        _docs(p)
    msg = str(e.value)
    assert str(p) in msg and "truncated" in msg and "\n" not in msg
    line = int(msg.split("after line ")[1].split(" ")[0].replace(",", ""))
    assert 0 < line < len(RECORDS)  # how far it got: some lines were read whole, not all


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_corrupt_archive_is_an_error(tmp_path, suffix):
    raw = _lines(RECORDS)
    data = gzip.compress(raw) if suffix.endswith("gz") else zstandard.ZstdCompressor().compress(raw)
    mid = len(data) // 2
    p = tmp_path / f"in{suffix}"
    p.write_bytes(data[:mid] + bytes(range(256)) * 4 + data[mid + 1024:])
    with pytest.raises(InputError, match=f"{p.name}.*corrupt"):
        _docs(p)


def test_multi_member_gzip_and_multi_frame_zstd_read_whole(tmp_path):
    a, b = _lines(RECORDS[:10]), _lines(RECORDS[10:25])
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(a) + gzip.compress(b))
    c = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(c.compress(a) + c.compress(b))
    assert sum(1 for _ in iter_lines(tmp_path / "m.jsonl.gz")) == 25
    assert sum(1 for _ in iter_lines(tmp_path / "m.jsonl.zst")) == 25


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_parquet_is_an_error(tmp_path, damage):
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in RECORDS], "text": [r["text"] for r in RECORDS]}), p,
                   row_group_size=100, compression="zstd")
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    else:
        mid = len(data) // 2
        p.write_bytes(data[:mid] + b"\x00\xff" * 2048 + data[mid + 4096:])
    with pytest.raises(InputError, match="in.parquet") as e:
        _docs(p)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ records


def test_bad_records_counted_and_balanced(tmp_path):
    good = RECORDS[:5]
    raw = (b"\xef\xbb\xbf" + _lines(good[:2]) + b"\n  \n"
           + b'{"id": "s", "text": "lone \\ud800 surrogate"}\n'
           + b'{"id": "\\udfff", "text": "fine text, bad id"}\n'
           + b"[" * 50000 + b"]" * 50000 + b"\n"
           + _lines([{"id": "dup-text", "text": "  " + good[0]["text"].upper() + "\n"},
                     {"id": "d1", "text": "a different text under a reused id"},
                     {"id": "ctl", "text": "\x1b[31mred\x1b[0m and a NUL\x00 here"},
                     {"id": "only-ctl", "text": "\x00\x07\x1b[0m"}])
           + _lines(good[2:]).rstrip(b"\n"))
    p = tmp_path / "in.jsonl"
    p.write_bytes(raw)
    docs, rej = _docs(p)
    ids = [d.doc_id for d in docs]
    assert ids == ["d0", "d1", "d1", "ctl", "d2", "d3", "d4"]
    assert dict(rej.counts) == {"invalid_unicode": 2, "malformed_json": 1, "duplicate_text": 1,
                                "empty_document": 1}
    assert rej.noted["blank_line"] == 2 and rej.noted["utf8_bom"] == 1 and rej.noted["duplicate_id"] == 1
    assert rej.noted["control_characters"] == 2
    assert docs[3].text == "red and a NUL here"
    audit = merge_audits([rej.audit(len(docs))])
    assert audit["balanced"] and audit["read"] == 12
    assert audit["rejected"] == {"invalid_unicode": 2, "malformed_json": 1}
    assert audit["dropped"] == {"duplicate_text": 1, "empty_document": 1}
    for r in rej.records:  # every reject names its line
        assert r["where"].startswith(f"{p}:")


def test_keep_policies(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(_lines([{"id": "a", "text": "Same text."}, {"id": "b", "text": "same   TEXT."},
                          {"id": "c", "text": "bell\x07 and \x1b[1mbold\x1b[0m"}]))
    docs, rej = _docs(p, InputPolicy(duplicates="keep", control_chars="keep"))
    assert [d.doc_id for d in docs] == ["a", "b", "c"]
    assert docs[2].text == "bell\x07 and \x1b[1mbold\x1b[0m"
    assert rej.noted["duplicate_text"] == 1 and rej.noted["control_characters"] == 1
    assert not rej.counts
    with pytest.raises(InputError, match="--duplicates"):
        InputPolicy(duplicates="maybe")


def test_repeats_across_inputs_counted():
    assert repeated_across_inputs([[1, 2, 3], [3, 4], [1, 4, 5, 5]]) == 3


# ------------------------------------------------------------------------------------------ preflight


@pytest.fixture()
def cfg_for(tmp_path, docs_corpus, small_tokenizer_json):
    def make(**kw) -> SynthesisConfig:
        base = dict(inputs=[str(docs_corpus)], output_prefix=str(tmp_path / "out" / "ds"),
                    tokenizer=str(small_tokenizer_json), target_length=4096)
        return SynthesisConfig(**{**base, **kw})

    return make


def _no_work_left(cfg: SynthesisConfig) -> bool:
    return not Path(cfg.resolved_work_dir).exists() and not Path(cfg.output_prefix).parent.exists()


def test_preflight_passes_a_sound_run(cfg_for):
    cfg = cfg_for()
    est = preflight(cfg)
    assert 300 < est["estimated_documents"] < 600  # the corpus has ~430 documents
    assert _no_work_left(cfg)


@pytest.mark.parametrize("kw, needle", [
    (dict(index_factory="IVFx,Flatt"), "--index-factory 'IVFx,Flatt': FAISS cannot build it"),
    (dict(index_factory="PQ7", embedding_dim=64), "--index-factory 'PQ7'"),
    (dict(index_factory="IVF65536,Flat"), "inverted lists but the pool holds only about"),
    (dict(index_factory="IVF16,Flat", index_train_size=8), "--index-train-size 8"),
    (dict(target_length=10**9), "lower --target-length"),
    (dict(embedder="/nonexistent/model-dir"), "--embedder /nonexistent/model-dir: no such model directory"),
    (dict(max_samples=2 * 10**9), "free but the run needs about"),
])
def test_preflight_failures_name_the_flag(cfg_for, kw, needle):
    cfg = cfg_for(**kw)
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert _no_work_left(cfg)


def test_preflight_target_length_advice_points_up(cfg_for, tmp_path, caplog):
    p = tmp_path / "normal.jsonl"
    p.write_bytes(_lines(RECORDS[:50]))  # every document is ~120 tokens
    cfg = cfg_for(inputs=[str(p)], target_length=64)
    with pytest.raises(ConfigError, match=r"--target-length 64: none of the 50 sampled documents fits.*raise "
                                          r"--target-length"):
        preflight(cfg)
    with caplog.at_level(logging.WARNING):  # some documents fit: a warning, pointing the same way
        preflight(cfg_for(target_length=64))
    assert any("A larger --target-length keeps them" in r.getMessage() for r in caplog.records)


def test_preflight_reads_every_parquet_footer(cfg_for, tmp_path, docs_corpus):
    recs = [json.loads(x) for x in docs_corpus.read_text(encoding="utf-8").splitlines()[:100]]
    table = pa.table({"id": [r["id"] for r in recs], "text": [r["text"] for r in recs]})
    for name in ("a", "b", "c"):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    b = tmp_path / "b.parquet"
    b.write_bytes(b.read_bytes()[:-100])  # the footer of a later file is cut: caught before any work
    with pytest.raises(InputError, match="b.parquet: not a readable Parquet file"):
        preflight(cfg_for(inputs=[str(tmp_path / "*.parquet")]))


def test_preflight_output_under_a_file(cfg_for, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = cfg_for(output_prefix=str(tmp_path / "afile" / "out" / "ds"))
    with pytest.raises(ConfigError, match="--output-prefix: .*afile is a file"):
        preflight(cfg)


def test_preflight_read_only_output(cfg_for, tmp_path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits: use a place the kernel refuses
            ro = Path("/sys")
            if os.access(ro, os.W_OK) and Path("/sys/kernel").is_dir():
                try:
                    (ro / ".probe").touch()
                except OSError:
                    pass
                else:
                    pytest.skip("no read-only directory available")
        cfg = cfg_for(output_prefix=str(ro / "sub" / "ds"))
        with pytest.raises(ConfigError, match="--output-prefix: cannot write in"):
            preflight(cfg)
    finally:
        (tmp_path / "ro").chmod(0o755)


# ------------------------------------------------------------------------------------------ command line


def test_cli_user_error_is_one_line_exit_2(tmp_path, docs_corpus, small_tokenizer_json, caplog):
    argv = ["--input", str(docs_corpus), "--tokenizer", str(small_tokenizer_json), "--output-prefix",
            str(tmp_path / "o" / "ds"), "--index-factory", "IVF65536,Flat", "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info
    assert errors[0].getMessage().startswith("--index-factory 'IVF65536,Flat'")
    assert not (tmp_path / "o").exists()  # nothing written, no work directory
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--debug"]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # --debug shows the traceback


def test_cli_truncated_input_exit_2(tmp_path, small_tokenizer_json, caplog):
    data = gzip.compress(_lines(RECORDS))
    p = tmp_path / "in.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.INFO):
        rc = main(["--input", str(p), "--tokenizer", str(small_tokenizer_json), "--output-prefix",
                   str(tmp_path / "o" / "ds"), "--no-progress", "--target-length", "1024"])
    assert rc == 2
    [err] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(p) in err.getMessage() and "after line" in err.getMessage()


def test_help_shows_true_defaults_once():
    text = build_parser().format_help()
    flat = " ".join(text.split())
    assert "(default: True)" not in flat and "(default: None)" not in flat and "(default: False)" not in flat
    assert flat.count("(default:") == sum(1 for ln in flat.split("(default:")[1:] if ln)  # no empty default
    assert "(default: '\\n\\n')" in flat  # --separator, shown with its escapes
    options = " ".join(text.split("options:", 1)[1].split())
    for flag in ("--input PATH_OR_GLOB", "--output-prefix OUTPUT_PREFIX", "--tokenizer TOKENIZER"):
        i = options.index(flag)
        assert options[i + len(flag):].lstrip().startswith("required unless --demo")
    import re

    assert not re.search(r"\(default: [^)]*\) \(default:", flat)


def test_disk_full_during_the_run_is_one_line(tmp_path, docs_corpus, small_tokenizer_json, caplog, monkeypatch):
    # a full disk cannot be produced safely on a shared machine: the run raises what the kernel would
    import errno

    import nextlong.pipeline

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "ds.work" / "tokens.npy"))

    monkeypatch.setattr(nextlong.pipeline, "run", full)
    with caplog.at_level(logging.INFO):
        rc = main(["--input", str(docs_corpus), "--tokenizer", str(small_tokenizer_json), "--output-prefix",
                   str(tmp_path / "o" / "ds"), "--no-progress", "--target-length", "2048"])
    assert rc == 2
    [err] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not err.exc_info and "tokens.npy: no space left on the device" in err.getMessage()


def test_source_check_on_a_real_run_catches_zeroed_tokens(tmp_path, docs_corpus, small_tokenizer_json):
    import numpy as np
    from nextlong.verify import read_spans, verify_dataset

    # the corpus with a few hostile records: the manifest accounts for every one
    bad = tmp_path / "in.jsonl"
    some = b"".join(docs_corpus.read_bytes().splitlines(keepends=True)[:60])
    bad.write_bytes(some + b"\n{broken\n" + b'{"id": "s", "text": "\\ud800"}\n' + some.splitlines(keepends=True)[0])
    prefix = tmp_path / "o" / "ds"
    assert main(["--input", str(bad), "--tokenizer", str(small_tokenizer_json), "--output-prefix", str(prefix),
                 "--target-length", "2048", "--max-samples", "4", "--no-progress"]) == 0
    m = json.loads(Path(f"{prefix}_manifest.json").read_text())
    inputs = m["counts"]["inputs"]
    assert inputs["balanced"] and inputs["rejected"]["malformed_json"] == 1
    assert inputs["rejected"]["invalid_unicode"] == 1 and inputs["dropped"]["duplicate_text"] >= 1
    assert inputs["noted"]["blank_line"] == 1 and inputs["used"] == m["counts"]["documents_in"]
    src = m["verify"]["source_check"]
    assert src["spans_checked"] >= 1 and src["seconds"] > 0 and "share_of_run" in src

    res = verify_dataset(prefix, source=16)
    assert res.checks["source_text"] == "ok", res.failures
    # zero the tokens of every meta-chunk span in place (same file size), as a corrupted work file would
    spans = read_spans(Path(f"{prefix}_spans.parquet"))
    meta = np.flatnonzero(spans["role"] == "meta")
    T = 2048
    binp = Path(f"{prefix}_text_document.bin")
    dtype = np.uint16
    data = np.memmap(binp, dtype=dtype, mode="r+")
    for r in meta.tolist():
        a = int(spans["sample"][r]) * T + int(spans["start"][r])
        data[a : a + int(spans["length"][r])] = 0
    data.flush()
    del data
    res = verify_dataset(prefix, source=16)
    assert res.checks["source_text"].startswith("FAILED")
    assert any("tokens differ from the source text" in f for f in res.failures)


def test_pipeline_without_preflight_advises_the_right_way(tmp_path, small_tokenizer_json):
    # the same situation reaching the synthesis (e.g. a --stage run that skips the preflight)
    from nextlong.pipeline import SynthesisError, run

    p = tmp_path / "normal.jsonl"
    p.write_bytes(_lines(RECORDS[:40]))
    cfg = SynthesisConfig(inputs=[str(p)], output_prefix=str(tmp_path / "o" / "ds"),
                          tokenizer=str(small_tokenizer_json), target_length=64)
    with pytest.raises(SynthesisError, match=r"Raise --target-length \(documents are longer than one sample\)"):
        run(cfg, progress=False)
