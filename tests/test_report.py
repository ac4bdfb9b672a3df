"""The stats report: numbers match the fixture's construction and, on real pipeline output, what the files
themselves say; comparisons separate the methods, and the page is self-contained."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _inspect_fixtures import REPO, build_dataset

pytest.importorskip("matplotlib")

import pyarrow.parquet as pq  # noqa: E402
from nextlong.indexed import read_indexed  # noqa: E402
from nextlong.report import collect, summarize, write_report  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    return {
        "nextlong": build_dataset(d, "nl"),
        "tailk": build_dataset(d, "tail", selection="tailk"),
        "standard": build_dataset(d, "std", method="standard"),
    }


def test_summarize() -> None:
    s = summarize(np.array([1.0, 2.0, np.nan, 3.0]))
    assert s["n"] == 3 and s["mean"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0
    assert summarize(np.zeros(0))["mean"] is None


def test_collect_numbers(runs: dict[str, Path]) -> None:
    st = collect(runs["nextlong"])
    n = st.numbers
    assert st.label == "nl (nextlong, s=160)"
    assert n["samples"] == 4 and n["tokens"] == 1200
    assert n["sample_length"]["min"] == n["sample_length"]["max"] == 300
    assert n["documents_per_sample"]["max"] == 1  # one meta-document per sample
    assert n["negatives"] > 0 and n["negatives_without_meta"] == 0
    assert abs(sum(n["token_share"].values()) - 1) < 1e-9
    assert n["dropped"] == {"meta_document_longer_than_target": 1, "input: empty_document": 1}
    # the fixture states the same inner products the report recomputes from embeddings.npy
    np.testing.assert_allclose(np.sort(st.dist["similarity_stated"]), np.sort(st.dist["similarity_meta_negative"]),
                               atol=1e-5)
    assert n["dependency_distance"]["min"] > 0  # negatives sit between the meta-chunks
    assert n["meta_position_in_extended_chunk"]["max"] == 0  # head order: meta-chunk first
    assert n["leak_indicators"]["negative_from_same_document"] == 0
    assert n["leak_indicators"]["negative_is_its_meta_chunk"] == 0
    assert set(n["corpus_tokens"]["meta"]) <= {"books", "web"}


def test_methods_differ(runs: dict[str, Path]) -> None:
    nl, tail, std = (collect(runs[k]).numbers for k in ("nextlong", "tailk", "standard"))
    assert nl["similarity_meta_negative"]["p50"] > nl["similarity_random_pairs"]["p50"]
    assert tail["similarity_meta_negative"]["p50"] < nl["similarity_meta_negative"]["p50"]
    assert tail["negative_rank"]["p50"] > nl["negative_rank"]["p50"]
    assert std["negatives"] == 0 and std["token_share"].get("negative", 0) == 0
    assert std["documents_per_sample"]["mean"] > 1
    assert std["dependency_distance"]["p95"] < nl["dependency_distance"]["p50"]


def test_write_report_compare(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report(runs["nextlong"], [runs["tailk"], runs["standard"]], output=tmp_path / "cmp")
    assert out.html == tmp_path / "cmp.html" and out.json == tmp_path / "cmp.json"
    assert len(out.pngs) >= 12 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.pngs)
    page = out.html.read_text()
    assert "<script" not in page and 'src="http' not in page  # self-contained
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == len(out.pngs)
    assert base64.b64decode(imgs[0])[:4] == b"\x89PNG"
    for label in ("nl (nextlong, s=160)", "tail (nextlong, tailk, s=160)", "std (standard, s=160)"):
        assert label in page
    assert "all checks pass" in page
    doc = json.loads(out.json.read_text())
    assert [r["name"] for r in doc["runs"]] == ["nl", "tail", "std"]
    assert doc["runs"][0]["verify"]["ok"] is True
    assert doc["runs"][2]["config"]["method"] == "standard"


def test_default_output_beside_dataset_and_missing_work_dir(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    for f in runs["nextlong"].parent.iterdir():
        if f.name.startswith("nl"):
            (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
    prefix = tmp_path / "nl"
    shutil.rmtree(f"{prefix}.work")
    out = write_report(prefix, verify=False)
    assert out.html == Path(f"{prefix}_report.html") and Path(f"{prefix}_report.json").exists()
    assert Path(f"{prefix}_report_similarity.png").exists()
    st = out.runs[0]
    assert "similarity_meta_negative" not in st.dist and len(st.dist["similarity_stated"])
    assert any("embeddings.npy not present" in n for n in st.notes)


def test_names_must_match_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one name per run"):
        write_report(runs["nextlong"], [runs["tailk"]], names=["a"], output=tmp_path / "x")


def test_cli(runs: dict[str, Path], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "preprocessing/report_nextlong_bin.py", str(runs["nextlong"]), "--compare",
                        str(runs["standard"]), "--name", "NExtLong", "--name", "Standard", "--output",
                        str(tmp_path / "cli")], cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "cli.html") in r.stdout
    doc = json.loads((tmp_path / "cli.json").read_text())
    assert [x["label"] for x in doc["runs"]] == ["NExtLong", "Standard"]


# ------------------------------------------------------------------------------------ real pipeline output


def test_numbers_on_pipeline_output(pipeline_run: Path) -> None:
    """Every number checked here is recomputed from the run's own files, not from the report's code."""
    man = json.loads(Path(f"{pipeline_run}_manifest.json").read_text())
    n_samples, t = man["counts"]["samples_out"], man["config"]["target_length"]
    spans = pq.read_table(f"{pipeline_run}_spans.parquet").to_pandas()
    mask = read_indexed(f"{pipeline_run}_lossweight_document")
    st = collect(pipeline_run)
    n = st.numbers
    assert n["samples"] == n_samples == len(mask) and n["tokens"] == n_samples * t
    assert n["sample_length"]["min"] == n["sample_length"]["max"] == t
    assert n["documents_per_sample"]["max"] == 1
    assert n["negatives"] == int((spans["role"] == "negative").sum()) > 0
    assert n["negatives_without_meta"] == 0
    neg_share = float(np.mean([(mask[i] == 0).mean() for i in range(len(mask))]))
    assert abs(n["token_share"]["negative"] - neg_share) < 1e-9
    assert abs(sum(n["token_share"].values()) - 1) < 1e-9
    # the blank record of the input, and the records whose normalized text repeats an earlier one (--duplicates)
    from nextlong.readers import normalized_hash

    texts = [json.loads(x)["text"] for x in
             (pipeline_run.parent.parent / "input" / "prose.jsonl").read_text(encoding="utf-8").splitlines()]
    nonempty = [normalized_hash(x) for x in texts if x.strip()]
    repeats = len(nonempty) - len(set(nonempty))
    assert man["counts"]["inputs_rejected"] == {"empty_document": 1, **({"duplicate_text": repeats} if repeats else {})}
    assert n["dropped"] == {**man["counts"]["dropped"],
                            **{f"input: {k}": v for k, v in man["counts"]["inputs_rejected"].items()}}
    # the similarities the pipeline states equal the inner products of the pool's embeddings
    np.testing.assert_allclose(np.sort(st.dist["similarity_stated"]), np.sort(st.dist["similarity_meta_negative"]),
                               atol=2e-3)
    assert n["similarity_meta_negative"]["p50"] > n["similarity_random_pairs"]["p50"]  # hard negatives
    assert n["meta_position_in_extended_chunk"]["max"] == 0  # head order
    assert n["leak_indicators"]["negative_from_same_document"] == 0
    assert n["leak_indicators"]["negative_is_its_meta_chunk"] == 0
    assert set(n["stage_seconds"]) == set(man["stage_seconds"])


def test_report_page_on_pipeline_output(pipeline_run: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report(pipeline_run, [runs["standard"]], names=["pipeline", "fixture-standard"],
                       output=tmp_path / "real")
    page = out.html.read_text()
    assert "all checks pass" in page and "<script" not in page
    doc = json.loads(out.json.read_text())
    assert doc["runs"][0]["verify"]["ok"] is True, doc["runs"][0]["verify"]["failures"]
    assert doc["runs"][0]["config"]["method"] == "nextlong"


def _key_paths(d: dict, prefix: str = "") -> set[str]:
    """Key paths of nested dicts; dicts keyed by data (input names, reasons) count as leaves."""
    out = set()
    for k, v in d.items():
        path = f"{prefix}{k}"
        out.add(path)
        if isinstance(v, dict) and k not in ("documents_per_input", "inputs_rejected", "dropped", "stage_seconds"):
            out |= _key_paths(v, path + ".")
    return out


def test_fixture_writes_only_what_the_pipeline_writes(pipeline_run: Path, runs: dict[str, Path]) -> None:
    real = json.loads(Path(f"{pipeline_run}_manifest.json").read_text())
    for prefix in runs.values():
        fake = json.loads(Path(f"{prefix}_manifest.json").read_text())
        assert _key_paths(fake) <= _key_paths(real), _key_paths(fake) - _key_paths(real)
        assert set(fake["stage_seconds"]) <= set(real["stage_seconds"])
        fake_rej = [json.loads(x) for x in Path(f"{prefix}_rejects.jsonl").read_text().splitlines()]
        real_rej = [json.loads(x) for x in Path(f"{pipeline_run}_rejects.jsonl").read_text().splitlines()]
        assert {r["reason"] for r in fake_rej} <= {r["reason"] for r in real_rej}
        assert all(set(r) == set(real_rej[0]) for r in fake_rej)
        spans = pq.read_table(f"{prefix}_spans.parquet")
        assert spans.schema.names == pq.read_schema(f"{pipeline_run}_spans.parquet").names
        sp = spans.to_pandas()
        for _, g in sp[sp["role"].isin(["meta", "negative"])].groupby("sample"):
            if (g["role"] == "negative").any():  # no chunk twice in a sample, as in the pipeline
                assert g["chunk_id"].is_unique
