"""Chunking (paper 3.1.1 / Algorithm 1): the bound holds, chunks are exact substrings, packing is greedy."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from nextlong.chunking import chunk_spans, chunk_text


def test_greedy_packing_matches_algorithm_1_on_short_paragraphs():
    paras = ["a" * 30, "b" * 30, "c" * 30, "d" * 5]
    text = "\n".join(paras)
    # with the joiner counted: 30+1+30 = 61 <= 64 < 61+1+30
    assert chunk_text(text, 64) == ["a" * 30 + "\n" + "b" * 30, "c" * 30 + "\n" + "d" * 5]


def test_long_paragraph_splits_at_sentences_then_words():
    text = "First sentence here. Second one is longer than that! Third? " + "word " * 40
    chunks = chunk_text(text, 60)
    assert all(len(c) <= 60 for c in chunks)
    assert chunks[0] == "First sentence here. Second one is longer than that! Third?"
    assert all(not c.startswith(" ") and not c.endswith(" ") for c in chunks)
    assert chunk_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_blank_and_empty():
    assert chunk_text("", 100) == []
    assert chunk_text(" \n\n\t\n", 100) == []
    assert chunk_text("one\n\n\ntwo", 100) == ["one\n\n\ntwo"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab .!?\n\t"), max_size=600), st.integers(16, 200))
def test_bound_and_exact_substrings(text, granularity):
    spans = chunk_spans(text, granularity)
    prev_end = 0
    for a, b in spans:
        assert 0 < b - a <= granularity
        assert a >= prev_end
        assert not text[a].isspace() and not text[b - 1].isspace()
        # nothing but whitespace is lost between chunks
        assert text[prev_end:a].strip() == ""
        prev_end = b
    assert text[prev_end:].strip() == ""
    assert re.sub(r"\s", "", "".join(text[a:b] for a, b in spans)) == re.sub(r"\s", "", text)
