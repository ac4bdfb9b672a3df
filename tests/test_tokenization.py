"""Tokenizers: the offline cl100k_base build, tokenizer.json files, model directories, special tokens."""

from __future__ import annotations

import json
import os

import pytest
from nextlong.tokenization import TokenizerError, load_tokenizer


def test_builtin_cl100k_matches_reference_ids(cl100k_json):
    tok = load_tokenizer(cl100k_json)
    assert tok.vocab_size > 65500
    # reference ids of cl100k_base (tiktoken): "Hello" 9906, " world" 1917, "," 11
    assert tok.encode("Hello world,") == [9906, 1917, 11]
    text = "Tabs\tand  spaces,\n\nnewlines, ünïcödé and 12345."
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.bos_id == tok.eos_id


def test_model_dir_and_special_tokens(tmp_path, small_tokenizer_json):
    d = tmp_path / "model"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(small_tokenizer_json.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(d)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.vocab_size < 65500
    assert load_tokenizer(d, bos_token="none").bos_id is None
    with pytest.raises(TokenizerError, match="--eos-token '<nope>'"):
        load_tokenizer(d, eos_token="<nope>")


def test_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(TokenizerError, match="not a HuggingFace tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="unknown"):
        load_tokenizer("builtin:nope")


# ---- tokenizer files GPT-NeoX's pinned tokenizers (0.15) reads ----------------------------------------------

SAMPLE_TEXT = ("Tabs\tand  spaces,\n\nnewlines, ünïcödé, 12345 and 3.14159; CamelCaseWords, don't, "
               "    indented code(x) -> y  # comment\r\n" + "internationalization " * 3)


def _portable(tmp_path, spec) -> tuple:
    from nextlong.tokenization import main

    out = tmp_path / "portable.json"
    assert main([str(spec), str(out)]) == 0
    return out, json.loads(out.read_text(encoding="utf-8"))


def test_portable_file_shape_and_ids(tmp_path, cl100k_json):
    """The exported file has the 0.15-readable shape (merges as "a b" strings) and current tokenizers read it
    with the ids of the original tokenizer."""
    from tokenizers import Tokenizer

    out, data = _portable(tmp_path, "builtin:cl100k_base")
    merges = data["model"]["merges"]
    assert data["model"]["type"] == "BPE" and len(merges) > 100_000
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    assert json.loads(cl100k_json.read_text(encoding="utf-8"))["model"]["merges"][0] == merges[0].split(" ")
    ref, got = Tokenizer.from_file(str(cl100k_json)), Tokenizer.from_file(str(out))
    assert got.encode(SAMPLE_TEXT).ids == ref.encode(SAMPLE_TEXT).ids
    assert got.get_vocab_size() == ref.get_vocab_size() == 100261
    assert load_tokenizer(out).sha256 == load_tokenizer("builtin:cl100k_base").sha256  # same tokenizer


def test_portable_notes_when_merges_are_not_reachable(tmp_path):
    """ignore_merges with a vocabulary entry the merges split: the file is written but says 0.15 differs."""
    from nextlong.tokenization import portable_json
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b")], ignore_merges=True))
    text, notes = portable_json(tok)  # "abc" -> a + bc by the merges, but whole "abc" is in the vocabulary
    assert json.loads(text)["model"]["merges"] == ["b c", "a b"]
    assert len(notes) == 1 and "1 vocabulary entries" in notes[0]
    assert tok.encode("abc").ids == [5]


NEOX_SCRIPT = r"""
import json, sys, tokenizers
from tokenizers import Tokenizer
t = Tokenizer.from_file(sys.argv[1])
texts = json.load(open(sys.argv[2], encoding="utf-8"))
print(json.dumps({"version": tokenizers.__version__, "ids": [t.encode(x).ids for x in texts]}))
"""


@pytest.mark.skipif(not os.environ.get("GPT_NEOX_DIR"), reason="GPT_NEOX_DIR is not set (GPT-NeoX environment)")
def test_gpt_neox_tokenizers_reads_portable_file_with_same_ids(tmp_path, capsys):
    """NEOX_PYTHON (GPT-NeoX's environment, tokenizers 0.15) reads the exported file; ids equal current
    tokenizers' on real text (the OpenStax corpus when present, else Python's documentation) and the sample."""
    import subprocess
    import sys

    import tokenizers
    from conftest import OPENSTAX
    from nextlong.corpora import builtin_documents
    from tokenizers import Tokenizer

    out, _ = _portable(tmp_path, "builtin:cl100k_base")
    if OPENSTAX.exists():
        import gzip

        with gzip.open(OPENSTAX, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for _, line in zip(range(300), f, strict=False)]
    else:
        docs = builtin_documents("python-docs", "python-docs")
        texts = [d.text for _, d in zip(range(300), docs, strict=False)]
    texts.append(SAMPLE_TEXT)
    tf = tmp_path / "texts.json"
    tf.write_text(json.dumps(texts), encoding="utf-8")
    python = os.environ.get("NEOX_PYTHON", sys.executable)
    proc = subprocess.run([python, "-c", NEOX_SCRIPT, str(out), str(tf)], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [e.ids for e in Tokenizer.from_file(str(out)).encode_batch(texts)]
    n = sum(map(len, ours))
    with capsys.disabled():
        print(f"\n[tokenizer round trip] tokenizers {tokenizers.__version__} vs {theirs['version']} "
              f"({python}): {len(texts)} texts, {n} tokens, identical: {theirs['ids'] == ours}")
    assert theirs["version"] != tokenizers.__version__, "NEOX_PYTHON must be GPT-NeoX's environment"
    assert theirs["ids"] == ours
