"""Shared fixtures: tokenizers built offline, small corpora, and the optional real corpus."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREPROCESSING = ROOT / "preprocessing"
for _p in (ROOT, PREPROCESSING):  # `import neox_plugin` and `import nextlong` without an install too
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

#: real corpora: the folder NEXTLONG_TEST_DATA names, else ../shared/data beside the clone (where CI keeps them);
#: absent on a user's fresh machine, and the tests that need them skip
SHARED_DATA = Path(os.environ.get("NEXTLONG_TEST_DATA") or ROOT.parent / "shared" / "data")
OPENSTAX = SHARED_DATA / "openstax_textbooks.jsonl.gz"


@pytest.fixture(scope="session")
def openstax_path() -> Path:
    if not OPENSTAX.exists():
        pytest.skip(f"real corpus not present: {OPENSTAX.name} (set NEXTLONG_TEST_DATA to its folder)")
    return OPENSTAX


@pytest.fixture(scope="session")
def cl100k_json(tmp_path_factory) -> Path:
    """cl100k_base (100k+ vocabulary: the int32 path) as a tokenizer.json, converted offline once."""
    from nextlong.tokenization import load_tokenizer

    tok = load_tokenizer("builtin:cl100k_base")
    path = tmp_path_factory.mktemp("tok_cl100k") / "tokenizer.json"
    tok.tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def docs_corpus(tmp_path_factory) -> Path:
    """~430 documents of real human-written prose (Python's documentation, split in halves), as JSONL."""
    from nextlong.corpora import builtin_documents

    out = tmp_path_factory.mktemp("corpus") / "pydocs.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for d in builtin_documents("python-docs", "pydocs"):
            paras = d.text.split("\n\n")
            half = max(1, len(paras) // 2)
            for i, part in enumerate(("\n\n".join(paras[:half]), "\n\n".join(paras[half:]))):
                if part.strip():
                    f.write(json.dumps({"id": f"{d.doc_id}#{i}", "text": part}) + "\n")
    return out


@pytest.fixture(scope="session")
def small_tokenizer_json(tmp_path_factory, docs_corpus) -> Path:
    """A byte-level BPE with a 4,000-token vocabulary (< 65,500: the uint16 path), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for line in docs_corpus.read_text(encoding="utf-8").splitlines()]
    tok.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("tok_small") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, docs_corpus, small_tokenizer_json) -> Path:
    """Real pipeline output, made once per session: ~100 documents of real prose plus one empty record (rejected
    while reading), the 4,000-token BPE, 8 samples of 1,024 tokens with labels. Returns the output prefix; the
    run's folder holds nothing else. Tests copy it before changing anything."""
    from nextlong.cli import main

    root = tmp_path_factory.mktemp("pipeline_run")
    corpus = root / "input" / "prose.jsonl"
    corpus.parent.mkdir()
    lines = docs_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:100]
    corpus.write_text("".join(lines[:50]) + json.dumps({"id": "blank", "text": ""}) + "\n" + "".join(lines[50:]),
                      encoding="utf-8")
    prefix = root / "run" / "nl"
    rc = main(["--input", str(corpus), "--tokenizer", str(small_tokenizer_json), "--bos-token", "<s>",
               "--eos-token", "</s>", "--output-prefix", str(prefix), "--target-length", "1024", "--granularity",
               "400", "--max-samples", "8", "--seed", "5", "--emit-labels", "--no-verify", "--no-progress"])
    assert rc == 0
    return prefix
