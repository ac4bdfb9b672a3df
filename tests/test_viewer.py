"""The sample viewer (HTML structure, escaping, fallbacks), its rendering in a real headless Chromium, and an
end-to-end run of the synthesis pipeline that is verified, reported and viewed."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _inspect_fixtures import REPO, build_dataset, make_documents
from nextlong.viewer import ROLE_COLOURS, load_sample, render_sample, write_sample_html


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("viewer"), "run")


def test_page_structure(run: Path) -> None:
    page = render_sample(run, 1, expand_negatives=0)
    assert page.startswith("<!DOCTYPE html>")
    assert 'class="span meta"' in page and 'class="span negative"' in page
    assert '<details class="negrun"><summary>' in page  # every negative run folded at K=0
    assert re.search(r"rank \d+ · sim 0\.\d{3}", page)
    assert 'id="documents"' in page and 'class="chunk used"' in page
    # every meta span links to its chunk in the reassembled document, which exists on the page
    for cid in re.findall(r'href="#doc-chunk-(\d+)"', page):
        assert f'id="doc-chunk-{cid}"' in page
    assert page.count('<div class="strip"') == 1
    v = load_sample(run, 1)
    assert len(re.findall(r'<a href="#span-\d+" title=', page)) == len(v.spans["sample"])


def test_text_is_escaped(run: Path) -> None:
    pages = [render_sample(run, i, expand_negatives=100) for i in range(4)]
    page = "".join(pages)
    assert "<b>&amp</b>" not in page  # fixture documents hold raw markup
    assert "&lt;b&gt;&amp;amp&lt;/b&gt;" in page


def test_expanded_runs_and_long_spans(run: Path) -> None:
    page = render_sample(run, 0, expand_negatives=1000, max_span_chars=20)
    assert '<details class="negrun">' not in page
    assert "show all" in page


def test_decoded_text_matches_chunks(run: Path) -> None:
    v = load_sample(run, 2)
    role = v.spans["role"].astype(str)
    r = int(np.flatnonzero((role == "meta") & ~v.spans["truncated"])[0])
    doc = v.documents[str(v.spans["doc_id"][r])]
    chunk = next(c for c in doc if c["chunk_id"] == int(v.spans["chunk_id"][r]))
    assert v.texts[r] == chunk["text"]
    assert [c["chunk_in_doc"] for c in doc] == sorted(c["chunk_in_doc"] for c in doc)


def test_without_tokenizer_or_work_dir(run: Path, tmp_path: Path) -> None:
    for f in run.parent.iterdir():
        if f.name.startswith("run"):
            (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
    prefix = tmp_path / "run"
    Path(f"{prefix}_tokenizer.json").unlink()
    v = load_sample(prefix, 0)
    assert any("tokenizer" in n and "not loadable" in n for n in v.notes)
    meta = int(np.flatnonzero(v.spans["role"].astype(str) == "meta")[0])
    assert v.texts[meta].startswith("Section")  # chunk text from chunks.parquet
    shutil.rmtree(f"{prefix}.work")
    page = render_sample(prefix, 0)
    assert "original documents not shown" in page and "No source document available" in page


def test_cli(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.html"
    r = subprocess.run([sys.executable, "preprocessing/view_nextlong_sample.py", str(run), "--sample", "3",
                        "--output", str(out)], cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "sample 3 of 4" in out.read_text()
    r = subprocess.run([sys.executable, "preprocessing/view_nextlong_sample.py", str(run), "--sample", "7"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "sample 7 out of range" in r.stderr
    assert write_sample_html(run, 0) == Path(f"{run}_sample0.html")


# --------------------------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium_run(html_path: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, html_path.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def _pixels(png: Path) -> np.ndarray:
    try:
        from PIL import Image

        return np.asarray(Image.open(png).convert("RGB")).astype(int)
    except ImportError:
        import matplotlib.image

        return (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(int)


def _has_colour(img: np.ndarray, hex_colour: str, min_pixels: int = 50) -> bool:
    close = np.abs(img - _rgb(hex_colour)).max(axis=-1) <= 6
    return int(close.sum()) >= min_pixels


def test_rendered_in_chromium(run: Path, tmp_path: Path) -> None:
    html_path = write_sample_html(run, 1, tmp_path / "sample.html", expand_negatives=1)
    shot = tmp_path / "sample.png"
    r = _chromium_run(html_path, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    img = _pixels(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1200
    assert img.std() > 10  # not blank
    assert _has_colour(img, ROLE_COLOURS["meta"]), "no meta-chunk colour in the rendered page"
    assert _has_colour(img, ROLE_COLOURS["negative"]), "no hard-negative colour in the rendered page"
    assert _has_colour(img, "#dbeafe", 2000)  # the meta-chunk text background
    r = _chromium_run(html_path, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert "<details" in dom and 'class="span meta"' in dom and 'id="documents"' in dom
    assert "&lt;b&gt;" in dom and "<b>&amp;amp</b>" not in dom  # markup in documents stayed text


# --------------------------------------------------------------------------------------------- end to end


def _pipeline(argv: list[str]) -> int:
    from nextlong.cli import main

    return main(argv)


def test_end_to_end_fixture_corpus(tmp_path: Path) -> None:
    """The synthesis pipeline on a small corpus: its output verifies (with decoding), reports and views."""
    from _inspect_fixtures import train_tokenizer

    docs = make_documents(n_docs=40, seed=3)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d["doc_id"], "text": d["text"]}) + "\n" for d in docs))
    tok = train_tokenizer([d["text"] for d in docs], tmp_path / "tokenizer.json")
    prefix = tmp_path / "out" / "nl"
    rc = _pipeline(["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", str(tok),
                    "--bos-token", "<s>", "--eos-token", "</s>", "--target-length", "256", "--granularity", "200",
                    "--max-samples", "5", "--emit-labels", "--no-progress"])
    assert rc == 0
    from nextlong.report import write_report
    from nextlong.verify import verify_dataset

    res = verify_dataset(prefix, decode=3, tokenizer=str(tok))
    assert res.ok, res.summary()
    assert res.checks["decode"] == "ok" and res.checks["chunks"] == "ok" and res.checks["labels"] == "ok"
    out = write_report(prefix)
    n = out.runs[0].numbers
    assert n["samples"] == 5 and n["sample_length"]["min"] == n["sample_length"]["max"] == 256
    assert n["negatives"] > 0 and n["leak_indicators"]["negative_from_same_document"] == 0
    page = render_sample(prefix, 0, tokenizer=str(tok))
    assert 'class="span meta"' in page and 'class="span negative"' in page


@pytest.mark.slow
def test_end_to_end_real_text_methods(tmp_path: Path, openstax_path: Path) -> None:
    """NExtLong vs Standard vs KNN on real text: all verify, and the report tells them apart."""
    pytest.importorskip("tiktoken_ext")
    corpus = tmp_path / "openstax.jsonl"
    with gzip.open(openstax_path, "rt", encoding="utf-8") as f:
        corpus.write_text("".join(itertools.islice(f, 150)), encoding="utf-8")
    prefixes = []
    for method in ("nextlong", "standard", "knn"):
        prefix = tmp_path / method
        rc = _pipeline(["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", "builtin:cl100k_base",
                        "--target-length", "2048", "--max-samples", "6", "--method", method, "--no-progress",
                        "--no-verify"])
        assert rc == 0
        prefixes.append(prefix)
    from nextlong.report import write_report

    out = write_report(prefixes[0], prefixes[1:], output=tmp_path / "compare")
    nl, std, knn = (r.numbers for r in out.runs)
    for r in json.loads(out.json.read_text())["runs"]:
        assert r["verify"]["ok"], r["verify"]["failures"]
    assert std["negatives"] == 0 and nl["negatives"] > 0
    assert nl["documents_per_sample"]["max"] == 1 and std["documents_per_sample"]["mean"] > 1
    assert nl["dependency_distance"]["mean"] > 10 * std["dependency_distance"]["mean"]
    assert knn["similarity_adjacent_other_doc"]["p50"] > std["similarity_adjacent_other_doc"]["p50"]
    assert nl["similarity_meta_negative"]["p50"] > nl["similarity_random_pairs"]["p50"]
    page = render_sample(prefixes[0], 0)
    assert 'class="span negative"' in page and "openstax" in page
