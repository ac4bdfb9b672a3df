"""Shared fixtures: tokenizers built offline, small corpora, and the optional real corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREPROCESSING = ROOT / "preprocessing"
for _p in (ROOT, PREPROCESSING):  # `import neox_plugin` and `import nextlong` without an install too
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

#: real corpora, present in CI beside the project, absent on a user's fresh machine
SHARED_DATA = ROOT.parent / "shared" / "data"
OPENSTAX = SHARED_DATA / "openstax_textbooks.jsonl.gz"


@pytest.fixture(scope="session")
def openstax_path() -> Path:
    if not OPENSTAX.exists():
        pytest.skip(f"real corpus not present ({OPENSTAX.name}); this test needs ../shared/data")
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
