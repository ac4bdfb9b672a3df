"""The document record and the input error, shared by the readers and the built-in corpora (which must
not import each other)."""

from __future__ import annotations

from dataclasses import dataclass


class InputError(ValueError):
    """An input cannot be used (no file matched, unknown format, a damaged archive, ...)."""


@dataclass(frozen=True)
class Document:
    """One input document."""

    corpus: str  #: name of the input it came from
    doc_id: str  #: the record's id field, or ``<file name>:<line or row>`` when it has none
    text: str
    source: str  #: ``<file>:<line>`` (JSONL) or ``<file>:row <n>`` (Parquet), for messages
    text_hash: int = 0  #: signed 64-bit hash of the normalized text (``readers.normalized_hash``)
