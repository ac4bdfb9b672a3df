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
ROLES = (ROLE_BOS, ROLE_META, ROLE_NEG, ROLE_SEP, ROLE_EOS)  #: role codes in :class:`Sample` spans
ROLE_CODE = {r: i for i, r in enumerate(ROLES)}
MASK_OF_ROLE = {ROLE_BOS: 1, ROLE_META: 1, ROLE_NEG: 0, ROLE_SEP: 1, ROLE_EOS: 1}
_MASK_OF_CODE = np.array([MASK_OF_ROLE[r] for r in ROLES], dtype=np.uint8)
_IS_CHUNK_CODE = np.array([r in (ROLE_META, ROLE_NEG) for r in ROLES])


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
    length: int = 0  # tokens of the chunk
    keep: int | None = None  # tokens kept when truncated


@dataclass
class Sample:
    tokens: np.ndarray  # int32 [target]
    mask: np.ndarray  # uint8 [target]
    spans: dict[str, np.ndarray]  # start, length, role (code into ROLES), meta_index, chunk_id, rank, sim, truncated
    stats: dict = field(default_factory=dict)


@dataclass
class Specials:
    bos: np.ndarray  # int32, 0 or 1 token
    eos: np.ndarray
    sep: np.ndarray


def layout(pool, groups: list[list[Item]], specials: Specials, target: int) -> Sample:
    """Flatten extended chunks into tokens, mask and spans (vectorized gather); checks the exact length."""
    nb, ne, ns = len(specials.bos), len(specials.eos), len(specials.sep)
    special_src = np.concatenate([specials.bos, specials.eos, specials.sep]).astype(np.int32)
    offsets = pool.offsets
    c_bos, c_sep, c_eos = ROLE_CODE[ROLE_BOS], ROLE_CODE[ROLE_SEP], ROLE_CODE[ROLE_EOS]
    nan = float("nan")
    sep_row = (c_sep, nb + ne, ns, -1, -1, -1, nan, False)
    # one row per span: (role code, source index, tokens, meta_index, chunk_id, rank, similarity, truncated)
    rows: list[tuple] = [(c_bos, 0, nb, -1, -1, -1, nan, False)] if nb else []
    add = rows.append
    first = True
    for group in groups:
        for it in group:
            start = int(offsets[it.chunk_id])
            if it.keep is not None:
                # a cut item occupies ``keep`` tokens counted as if a separator preceded it
                n = it.keep
                if first:
                    n -= ns  # no separator before the first item: the next one carries it
                    if n < 1:
                        raise Dropped("cannot_fit_exactly")
                elif n > ns:
                    if ns:
                        add((c_sep, nb + ne, ns, it.meta_index, -1, -1, nan, False))
                    n -= ns
                add((ROLE_CODE[it.role], start, n, it.meta_index, it.chunk_id, it.rank, it.sim, n < it.length))
            else:
                if not first and ns:
                    add(sep_row[:3] + (it.meta_index,) + sep_row[4:])
                add((ROLE_CODE[it.role], start, it.length, it.meta_index, it.chunk_id, it.rank, it.sim, False))
            first = False
    if ne:
        add((c_eos, nb, ne, -1, -1, -1, nan, False))
    roles, src, lens, metas, cids, ranks, sims, truncs = zip(*rows, strict=True)
    length = np.asarray(lens, dtype=np.int64)
    total = int(length.sum())
    if total != target:
        raise AssertionError(f"assembled {total} tokens, expected {target}")  # a bug, never data
    starts = np.zeros(len(length), dtype=np.int64)
    np.cumsum(length[:-1], out=starts[1:])
    role = np.asarray(roles, dtype=np.int8)
    # position p of span j reads source index src[j] + (p - starts[j]): one ragged gather per sample
    pos_src = np.repeat(np.asarray(src, dtype=np.int64) - starts, length) + np.arange(total, dtype=np.int64)
    from_chunk = np.repeat(_IS_CHUNK_CODE[role], length)
    tokens = np.empty(total, dtype=np.int32)
    tokens[from_chunk] = pool.tokens[pos_src[from_chunk]]
    tokens[~from_chunk] = special_src[pos_src[~from_chunk]]
    mask = np.repeat(_MASK_OF_CODE[role], length)
    spans = {"start": starts, "length": length, "role": role, "meta_index": np.asarray(metas, dtype=np.int32),
             "chunk_id": np.asarray(cids, dtype=np.int64), "rank": np.asarray(ranks, dtype=np.int32),
             "similarity": np.asarray(sims, dtype=np.float32), "truncated": np.asarray(truncs, dtype=bool)}
    return Sample(tokens, mask, spans)


def _order(meta: Item, negs: list[Item], order: str, rng: np.random.Generator) -> list[Item]:
    if order == "head":
        return [meta, *negs]
    if order == "tail":
        return [*negs, meta]
    at = int(rng.integers(0, len(negs) + 1))
    return [*negs[:at], meta, *negs[at:]]


def _candidate_stream(pool, cand, meta_chunk: int, selection: str, rng: np.random.Generator, meta_index: int):
    """Yields (negative, text hash, source document) for one meta-chunk, in the order the selection takes them."""
    offsets = pool.offsets
    if selection == "self-repeat":
        n = int(offsets[meta_chunk + 1] - offsets[meta_chunk])
        h, d = int(pool.chunk_hash[meta_chunk]), int(pool.chunk_doc[meta_chunk])
        while True:
            yield Item(ROLE_NEG, meta_chunk, meta_index, -1, 1.0, n), h, d
    if selection == "random-doc":
        n_chunks = pool.n_chunks
        q = np.asarray(pool.embeddings[meta_chunk], dtype=np.float32)
        while True:
            cid = int(rng.integers(0, n_chunks))
            sim = float(np.asarray(pool.embeddings[cid], np.float32) @ q)
            yield (Item(ROLE_NEG, cid, meta_index, -1, sim, int(offsets[cid + 1] - offsets[cid])),
                   int(pool.chunk_hash[cid]), int(pool.chunk_doc[cid]))
    ids = cand.ids
    order = np.arange(len(ids))
    if selection == "tailk":
        order = order[::-1]
    elif selection == "random-retrieved":
        order = rng.permutation(len(ids))
    ids = ids[order]
    lens = (offsets[ids + 1] - offsets[ids]).tolist()
    hashes = pool.chunk_hash[ids].tolist()
    docs = pool.chunk_doc[ids].tolist()
    ranks = cand.ranks[order].tolist()
    sims = cand.sims[order].tolist()
    for j, cid in enumerate(ids.tolist()):
        yield Item(ROLE_NEG, cid, meta_index, ranks[j], sims[j], lens[j]), hashes[j], docs[j]


class _Used:
    """Chunks (by id and by text hash) already in the sample."""

    def __init__(self, pool, chunk_ids) -> None:
        self.ids = {int(c) for c in chunk_ids}
        self.hashes = {int(pool.chunk_hash[c]) for c in chunk_ids}

    def ok(self, cid: int, h: int, d: int, doc: int) -> bool:
        return cid not in self.ids and h not in self.hashes and d != doc

    def add(self, cid: int, h: int) -> None:
        self.ids.add(cid)
        self.hashes.add(h)


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
        for it, h, d in _candidate_stream(pool, cands[i] if cands else None, m, cfg.negative_selection, rng, i):
            if (cfg.budget == "paper" and len(groups_negs[i]) >= k) or (cfg.budget == "exact" and cum >= goal):
                stopped = True
                break
            tries += 1
            if tries > max_tries and cfg.negative_selection in ("random-doc", "self-repeat"):
                break
            if not self_repeat and not used.ok(it.chunk_id, h, d, doc):
                continue
            cost = it.length + sep
            if cfg.budget == "exact":
                if i < p - 1 and cum + cost > goal:
                    stopped = True
                    break  # the next negative would overshoot this meta-chunk's share
                if i == p - 1 and cum + cost > R:
                    it.keep = R - cum  # the one cut in the whole sample
            groups_negs[i].append(it)
            if not self_repeat:
                used.add(it.chunk_id, h)
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
    groups = [_order(Item(ROLE_META, m, i, length=pool.chunk_len(m)), groups_negs[i], cfg.negative_order, rng)
              for i, m in enumerate(metas)]
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
            cost = it.length + (0 if first else sep)
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
            n_tok = pool.chunk_len(c)
            cost = n_tok + sep  # the first item's separator is given back in layout()
            meta_index = len(items) if role == ROLE_META else last_meta
            it = Item(role, c, meta_index, rank, sim, n_tok)
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
