"""Assemble one synthesized sample of exactly ``target_length`` tokens from pre-tokenized chunks.

Layout (paper Eq. 4-5): ``BOS, l_1, l_2, ..., l_p, EOS`` where the extended chunk ``l_i`` is the
meta-chunk ``m_i`` followed by its hard negatives ``n_i1 ... n_ik`` (``--negative-order head``; ``tail``
puts the meta-chunk last, ``random`` anywhere), and consecutive chunks are joined by the separator.

Budgets:
  * ``exact`` (default): the tokens left after BOS, EOS, the meta-chunks and their separators are split
    evenly over the p meta-chunks as cumulative goals; each meta-chunk takes its ranked negatives, whole,
    while they fit its goal (a shortfall carries over to the next); the last meta-chunk fills the sample
    to the exact length, cutting only its last negative. A document whose candidates run out is dropped.
  * ``paper``: Appendix C.1, k = (T*E*w - S) / (p*s) negatives per meta-chunk, then truncation to T;
    documents that fall short are dropped (the report counts both cases).

Nothing is ever padded. Mask value 1 = meta-chunk, BOS, EOS, separator; 0 = hard negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ROLE_BOS, ROLE_META, ROLE_NEG, ROLE_SEP, ROLE_EOS = "bos", "meta", "negative", "separator", "eos"
MASK_OF_ROLE = {ROLE_BOS: 1, ROLE_META: 1, ROLE_NEG: 0, ROLE_SEP: 1, ROLE_EOS: 1}


class Dropped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The meta-document cannot give a sample; ``reason`` is counted in the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Item:
    role: str
    chunk_id: int
    meta_index: int
    rank: int = -1
    sim: float = float("nan")
    keep: int | None = None  # tokens kept when truncated


@dataclass
class Sample:
    tokens: np.ndarray
    mask: np.ndarray
    spans: list[tuple]  # (start, length, role, meta_index, chunk_id, rank, sim, truncated)
    stats: dict = field(default_factory=dict)


@dataclass
class Specials:
    bos: np.ndarray  # int32, 0 or 1 token
    eos: np.ndarray
    sep: np.ndarray


def layout(pool, groups: list[list[Item]], specials: Specials, target: int) -> Sample:
    """Flatten extended chunks into tokens, mask and spans; checks the exact length."""
    tok_parts: list[np.ndarray] = []
    spans: list[tuple] = []
    pos = 0

    def put(arr: np.ndarray, role: str, meta_index: int, chunk_id: int = -1, rank: int = -1,
            sim: float = float("nan"), truncated: bool = False) -> None:
        nonlocal pos
        if len(arr) == 0:
            return
        tok_parts.append(arr)
        spans.append((pos, len(arr), role, meta_index, chunk_id, rank, sim, truncated))
        pos += len(arr)

    put(specials.bos, ROLE_BOS, -1)
    first = True
    sep = specials.sep
    for group in groups:
        for it in group:
            toks = pool.chunk_tokens(it.chunk_id)
            if it.keep is not None:
                # a cut item occupies ``keep`` tokens counted as if a separator preceded it
                n = it.keep
                if first:
                    n -= len(sep)  # no separator before the first item: the next one carries it
                    if n < 1:
                        raise Dropped("cannot_fit_exactly")
                elif n > len(sep):
                    put(sep, ROLE_SEP, it.meta_index)
                    n -= len(sep)
                put(np.asarray(toks[:n]), it.role, it.meta_index, it.chunk_id, it.rank, it.sim, n < len(toks))
            else:
                if not first:
                    put(sep, ROLE_SEP, it.meta_index)
                put(np.asarray(toks), it.role, it.meta_index, it.chunk_id, it.rank, it.sim)
            first = False
    put(specials.eos, ROLE_EOS, -1)
    tokens = np.concatenate(tok_parts).astype(np.int32, copy=False)
    if len(tokens) != target:
        raise AssertionError(f"assembled {len(tokens)} tokens, expected {target}")  # a bug, never data
    mask = np.ones(target, dtype=np.uint8)
    for start, length, role, *_ in spans:
        if role == ROLE_NEG:
            mask[start : start + length] = 0
    return Sample(tokens, mask, spans)


def _order(meta: Item, negs: list[Item], order: str, rng: np.random.Generator) -> list[Item]:
    if order == "head":
        return [meta, *negs]
    if order == "tail":
        return [*negs, meta]
    at = int(rng.integers(0, len(negs) + 1))
    return [*negs[:at], meta, *negs[at:]]


def _candidate_stream(pool, cand, meta_chunk: int, selection: str, rng: np.random.Generator, meta_index: int):
    """Yields negatives of one meta-chunk in the order the selection strategy takes them."""
    if selection == "self-repeat":
        while True:
            yield Item(ROLE_NEG, meta_chunk, meta_index, -1, 1.0)
    if selection == "random-doc":
        n = pool.n_chunks
        q = np.asarray(pool.embeddings[meta_chunk], dtype=np.float32)
        while True:
            cid = int(rng.integers(0, n))
            yield Item(ROLE_NEG, cid, meta_index, -1, float(np.asarray(pool.embeddings[cid], np.float32) @ q))
    idx = np.arange(len(cand.ids))
    if selection == "tailk":
        idx = idx[::-1]
    elif selection == "random-retrieved":
        idx = rng.permutation(len(cand.ids))
    for j in idx:
        yield Item(ROLE_NEG, int(cand.ids[j]), meta_index, int(cand.ranks[j]), float(cand.sims[j]))


class _Used:
    def __init__(self, pool, chunk_ids) -> None:
        self.pool = pool
        self.ids = set(int(c) for c in chunk_ids)
        self.hashes = set(int(pool.chunk_hash[c]) for c in chunk_ids)

    def ok(self, cid: int, doc: int) -> bool:
        return (cid not in self.ids and int(self.pool.chunk_hash[cid]) not in self.hashes
                and int(self.pool.chunk_doc[cid]) != doc)

    def add(self, cid: int) -> None:
        self.ids.add(cid)
        self.hashes.add(int(self.pool.chunk_hash[cid]))


def build_nextlong(pool, cfg, specials: Specials, doc: int, cands: list, rng: np.random.Generator,
                   chars_per_token: float) -> Sample:
    """One NExtLong sample for meta-document ``doc`` (``cands[i]``: :class:`Candidates` of meta-chunk i)."""
    T = cfg.target_length
    first, p = int(pool.doc_first[doc]), int(pool.doc_nchunks[doc])
    metas = list(range(first, first + p))
    sep = len(specials.sep)
    meta_tokens = sum(pool.chunk_len(c) for c in metas)
    fixed = len(specials.bos) + len(specials.eos) + meta_tokens + sep * (p - 1)
    if fixed > T:
        raise Dropped("meta_document_longer_than_target")
    R = T - fixed
    used = _Used(pool, metas)
    self_repeat = cfg.negative_selection == "self-repeat"
    groups_negs: list[list[Item]] = [[] for _ in range(p)]
    cum = 0
    max_tries = 50 * (1 + T // 16)  # random-doc draws before giving up
    if cfg.budget == "paper":
        S = int(pool.doc_chars[doc])
        k = max(0, math.ceil((T * chars_per_token * cfg.paper_w - S) / (p * cfg.granularity)))
    exhausted = False
    for i, m in enumerate(metas):
        goal = R if i == p - 1 else (R * (i + 1)) // p
        tries = 0
        stopped = False
        for it in _candidate_stream(pool, cands[i] if cands else None, m, cfg.negative_selection, rng, i):
            if (cfg.budget == "paper" and len(groups_negs[i]) >= k) or (cfg.budget == "exact" and cum >= goal):
                stopped = True
                break
            tries += 1
            if tries > max_tries and cfg.negative_selection in ("random-doc", "self-repeat"):
                break
            if not self_repeat and not used.ok(it.chunk_id, doc):
                continue
            cost = pool.chunk_len(it.chunk_id) + sep
            if cfg.budget == "exact":
                if i < p - 1 and cum + cost > goal:
                    stopped = True
                    break  # the next negative would overshoot this meta-chunk's share
                if i == p - 1 and cum + cost > R:
                    it.keep = R - cum  # the one cut in the whole sample
            groups_negs[i].append(it)
            if not self_repeat:
                used.add(it.chunk_id)
            cum += cost if it.keep is None else it.keep
        exhausted |= not stopped
    if exhausted and cands and any(c.truncated for c in cands):
        raise Dropped("retry_with_all_candidates")  # a shortened candidate list ran out: not the full result
    stats: dict = {}
    if cfg.budget == "paper":
        total = fixed + cum
        if total < T:
            raise Dropped("paper_budget_underfill")
        stats["overfill_tokens"] = total - T
    elif cum < R:
        raise Dropped("insufficient_negatives")
    groups = [_order(Item(ROLE_META, m, i), groups_negs[i], cfg.negative_order, rng) for i, m in enumerate(metas)]
    if cfg.budget == "paper":
        groups = _cut_layout(pool, groups, T - len(specials.bos) - len(specials.eos), sep)
    sample = layout(pool, groups, specials, T)
    sample.stats = stats
    return sample


def _cut_layout(pool, groups: list[list[Item]], body: int, sep: int) -> list[list[Item]]:
    """Keep the first ``body`` tokens of the flattened items (separators included); the paper's truncation."""
    out: list[list[Item]] = []
    cum = 0
    first = True
    for group in groups:
        kept: list[Item] = []
        for it in group:
            cost = pool.chunk_len(it.chunk_id) + (0 if first else sep)
            if cum + cost <= body:
                kept.append(it)
                cum += cost
            elif cum < body:
                it.keep = body - cum + (sep if first else 0)  # counted as if a separator preceded it
                kept.append(it)
                cum = body
            first = False
        if kept:
            out.append(kept)
        if cum >= body:
            break
    return out


def build_concat(pool, cfg, specials: Specials, doc: int, neighbours, rng: np.random.Generator) -> Sample:
    """Baselines: ``standard`` (the document, then random whole documents) and ``knn`` (the document, then
    its most similar documents). Every chunk of a document is used in order; the last one is cut."""
    T = cfg.target_length
    sep = len(specials.sep)
    body = T - len(specials.bos) - len(specials.eos) + sep  # every item is charged a separator
    items: list[Item] = []
    cum = 0
    used_docs = {doc}

    def add_doc(d: int, role: str, rank: int, sim: float) -> bool:
        nonlocal cum
        first_c, n = int(pool.doc_first[d]), int(pool.doc_nchunks[d])
        for c in range(first_c, first_c + n):
            cost = pool.chunk_len(c) + sep  # the first item's separator is given back in layout()
            meta_index = len(items) if role == ROLE_META else last_meta
            it = Item(role, c, meta_index, rank, sim)
            if cum + cost >= body:
                it.keep = body - cum
                items.append(it)
                cum = body
                return True
            items.append(it)
            cum += cost
        return False

    last_meta = int(pool.doc_nchunks[doc]) - 1  # knn neighbours extend the document's last chunk
    if add_doc(doc, ROLE_META, -1, float("nan")):
        return layout(pool, [items], specials, T)
    if cfg.method == "standard":
        tries = 0
        while tries < 100 * (1 + T // 64):
            tries += 1
            d = int(rng.integers(0, pool.n_docs))
            if d in used_docs:
                continue
            used_docs.add(d)
            if add_doc(d, ROLE_META, -1, float("nan")):
                return layout(pool, [items], specials, T)
        raise Dropped("insufficient_documents")
    ids, sims = neighbours
    for r, (d, s) in enumerate(zip(ids, sims, strict=True)):
        d = int(d)
        if d < 0 or d in used_docs:
            continue
        used_docs.add(d)
        if add_doc(d, ROLE_NEG, r, float(s)):
            return layout(pool, [items], specials, T)
    raise Dropped("insufficient_documents")
