"""Tokenizers: the offline cl100k_base build, tokenizer.json files, model directories, special tokens."""

from __future__ import annotations

import json

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
