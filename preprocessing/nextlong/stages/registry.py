"""The stages in their order, by name."""

from __future__ import annotations

from . import chunk, embed, gather, index, merge, publish, synth

ORDER = ("chunk", "embed", "gather", "index", "synth", "merge", "publish")
MODULES = {m.NAME: m for m in (chunk, embed, gather, index, synth, merge, publish)}
