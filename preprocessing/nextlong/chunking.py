"""Document chunking (paper Section 3.1.1, Algorithm 1 lines 2-20), with a hard bound.

A document is split into paragraphs on ``\\n``; paragraphs are packed greedily, in order, into chunks of
at most ``granularity`` characters. Unlike the official chunker the bound is never exceeded: the ``\\n``
joiners are counted, and a paragraph longer than the bound is split at sentence ends, then at
whitespace, and only as a last resort inside a word. Every chunk is an exact substring of the document
(the text between two chunks is whitespace), so decoding a chunk gives back the source text.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"')\]]*\s+")
_WHITESPACE = re.compile(r"\s+")


def _last_boundary(pattern: re.Pattern, text: str, pos: int, window_end: int) -> int:
    """The largest cut ``c`` in ``(pos, window_end]`` where a match of ``pattern`` begins its whitespace."""
    best = -1
    for m in pattern.finditer(text, pos, window_end + 1):
        cut = m.start() + len(m.group(0).rstrip())  # keep closing quotes, drop the whitespace
        if pos < cut <= window_end:
            best = cut
    return best


def _split_long(text: str, start: int, limit: int) -> list[tuple[int, int]]:
    """Split ``text`` (which starts at document offset ``start``) into spans of at most ``limit`` chars."""
    spans: list[tuple[int, int]] = []
    pos, n = 0, len(text)
    while n - pos > limit:
        window_end = pos + limit
        cut = _last_boundary(_SENTENCE_END, text, pos, window_end)
        if cut <= pos:
            cut = _last_boundary(_WHITESPACE, text, pos, window_end)
        if cut <= pos:
            cut = window_end  # no boundary at all: cut inside the word
        piece_end = cut
        spans.append((start + pos, start + piece_end))
        # skip the whitespace between pieces
        nxt = piece_end
        while nxt < n and text[nxt].isspace():
            nxt += 1
        pos = nxt
    if pos < n:
        spans.append((start + pos, start + n))
    return spans


def chunk_spans(text: str, granularity: int) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the chunks of ``text``; every span is at most ``granularity``
    long, non-empty, and neither starts nor ends with whitespace."""
    if granularity < 1:
        raise ValueError(f"--granularity must be >= 1 character, got {granularity}")
    # paragraphs as trimmed spans; blank lines disappear
    units: list[tuple[int, int]] = []
    offset = 0
    for line in text.split("\n"):
        a, b = offset, offset + len(line)
        offset = b + 1
        stripped = line.strip()
        if not stripped:
            continue
        a += len(line) - len(line.lstrip())
        b -= len(line) - len(line.rstrip())
        if b - a > granularity:
            units.extend(_split_long(text[a:b], a, granularity))
        else:
            units.append((a, b))
    chunks: list[tuple[int, int]] = []
    cur_start = cur_end = -1
    for a, b in units:
        if cur_start < 0:
            cur_start, cur_end = a, b
        elif b - cur_start <= granularity:
            # the chunk is the exact substring text[cur_start:b], joiners (and blank lines) included
            cur_end = b
        else:
            chunks.append((cur_start, cur_end))
            cur_start, cur_end = a, b
    if cur_start >= 0:
        chunks.append((cur_start, cur_end))
    return chunks


def chunk_text(text: str, granularity: int) -> list[str]:
    """The chunks of ``text`` as strings (see :func:`chunk_spans`)."""
    return [text[a:b] for a, b in chunk_spans(text, granularity)]
