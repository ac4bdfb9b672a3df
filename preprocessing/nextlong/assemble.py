"""Assemble one synthesized sample of exactly ``target_length`` tokens from pre-tokenized chunks.

Layout (paper Eq. 4-5): ``BOS, l_1, l_2, ..., l_p, EOS`` where the extended chunk ``l_i`` is the
meta-chunk ``m_i`` followed by its hard negatives ``n_i1 ... n_ik`` (``--negative-order head``; ``tail``
puts the meta-chunk last, ``random`` anywhere), and consecutive chunks are joined by the separator.

Allocation (``--negative-allocation``): no negative is used twice in a sample (paper Appendix C.1: "we
ensure that the same hard negative is not repeatedly used across different meta-chunks"), so when the
candidate lists of two meta-chunks overlap, someone gets the shared chunk and the other goes deeper.
  * ``even`` (default): the meta-chunks take turns, each taking its next-best unused candidate, until
    each reaches its budget; every meta-chunk gets the top of its own list ("each meta-chunk retrieves the
    top-k similar texts as hard negatives", Appendix C.1; Algorithm 1 mines each m_i alone).
  * ``sequential``: meta-chunk 1 fills its budget first, then meta-chunk 2, ...; later meta-chunks get
    deeper, less similar candidates where lists overlap (the order of earlier releases, kept as an option).

Budgets:
  * ``exact`` (default): the tokens left after BOS, EOS, the meta-chunks and their separators are split
    evenly over the p meta-chunks; each meta-chunk takes its ranked negatives, whole, while they fit its
    budget (a shortfall is handed on to the next); the last meta-chunk fills the sample to the exact
    length, cutting only its last negative. A document whose candidates run out is dropped.
  * ``paper``: Appendix C.1, k = (T*E*w - S) / (p*s) negatives per meta-chunk, then truncation to T;
    documents that fall short are dropped (the report counts both cases).

Nothing is ever padded. Mask value 1 = meta-chunk, BOS, EOS, separator; 0 = hard negative. The baselines
(``standard``, ``knn``) have no hard negatives: every token of their samples has mask 1.
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
    """Chunks (by id and by text hash) already in the sample; with ``allowed_doc`` (held-out splits), also
    refuses chunks of documents outside the run's split."""

    def __init__(self, pool, chunk_ids, allowed_doc: np.ndarray | None = None) -> None:
        self.ids = {int(c) for c in chunk_ids}
        self.hashes = {int(pool.chunk_hash[c]) for c in chunk_ids}
        self.allowed_doc = allowed_doc

    def ok(self, cid: int, h: int, d: int, doc: int) -> bool:
        return (cid not in self.ids and h not in self.hashes and d != doc
                and (self.allowed_doc is None or bool(self.allowed_doc[d])))

    def add(self, cid: int, h: int) -> None:
        self.ids.add(cid)
        self.hashes.add(h)


def build_nextlong(pool, cfg, specials: Specials, doc: int, cands: list, rng: np.random.Generator,
                   chars_per_token: float, allowed_doc: np.ndarray | None = None) -> Sample:
    """One NExtLong sample for meta-document ``doc`` (``cands[i]``: :class:`Candidates` of meta-chunk i);
    ``allowed_doc`` (bool per document) keeps every negative inside the run's split."""
    T = cfg.target_length
    first, p = int(pool.doc_first[doc]), int(pool.doc_nchunks[doc])
    metas = list(range(first, first + p))
    sep = len(specials.sep)
    meta_tokens = sum(pool.chunk_len(c) for c in metas)
    fixed = len(specials.bos) + len(specials.eos) + meta_tokens + sep * (p - 1)
    if fixed > T:
        raise Dropped("meta_document_longer_than_target")
    R = T - fixed
    k = None
    if cfg.budget == "paper":
        S = int(pool.doc_chars[doc])
        k = max(0, math.ceil((T * chars_per_token * cfg.paper_w - S) / (p * cfg.granularity)))
    streams = [_candidate_stream(pool, cands[i] if cands else None, m, cfg.negative_selection, rng, i)
               for i, m in enumerate(metas)]
    allocate = _allocate_even if getattr(cfg, "negative_allocation", "even") == "even" else _allocate_sequential
    groups_negs, cum, exhausted = allocate(pool, cfg, metas, streams, _Used(pool, metas, allowed_doc), doc, R, sep,
                                           k)
    if exhausted and cands and any(c.truncated for c in cands):
        raise Dropped(RETRY_MORE_CANDIDATES)  # a shortened candidate list ran out: not the full result
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


#: reason a sample is redone with longer candidate lists (never counted as a drop)
RETRY_MORE_CANDIDATES = "retry_with_more_candidates"


def _max_tries(cfg) -> int:
    """Draws of a retrieval-free selection (random-doc, self-repeat) per meta-chunk before giving up."""
    return 50 * (1 + cfg.target_length // 16)


def _allocate_sequential(pool, cfg, metas, streams, used: _Used, doc: int, R: int, sep: int, k: int | None):
    """``--negative-allocation sequential``: meta-chunk 1 takes its ranked negatives up to its cumulative goal,
    then meta-chunk 2, ...; all share one "used" set, so later meta-chunks get deeper candidates where their
    lists overlap. Returns (negatives per meta-chunk, tokens taken, whether some list ran out)."""
    p = len(metas)
    self_repeat = cfg.negative_selection == "self-repeat"
    groups_negs: list[list[Item]] = [[] for _ in range(p)]
    cum = 0
    exhausted = False
    for i in range(p):
        goal = R if i == p - 1 else (R * (i + 1)) // p
        tries = 0
        stopped = False
        for it, h, d in streams[i]:
            if (k is not None and len(groups_negs[i]) >= k) or (k is None and cum >= goal):
                stopped = True
                break
            tries += 1
            if tries > _max_tries(cfg) and cfg.negative_selection in ("random-doc", "self-repeat"):
                break
            if not self_repeat and not used.ok(it.chunk_id, h, d, doc):
                continue
            cost = it.length + sep
            if k is None:
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
    return groups_negs, cum, exhausted


def _allocate_even(pool, cfg, metas, streams, used: _Used, doc: int, R: int, sep: int, k: int | None):
    """``--negative-allocation even`` (default): the meta-chunks take turns, each taking its next-best unused
    candidate, until each reaches its budget; so every meta-chunk gets the top of its own list and a
    candidate that two lists share goes to whichever reaches it first.

    Budgets: with ``--budget paper``, k negatives each. With ``exact``, the R free tokens are split evenly
    (meta-chunk i gets R*(i+1)//p - R*i//p). A meta-chunk whose next negative would overshoot its budget
    stops and hands what it has left to the next open meta-chunk (as in ``sequential``, leftovers move
    forward); the last one waits until every other has stopped, then fills the sample to the exact length,
    cutting only its last negative. A meta-chunk whose list runs out hands its budget on the same way."""
    p = len(metas)
    self_repeat = cfg.negative_selection == "self-repeat"
    groups_negs: list[list[Item]] = [[] for _ in range(p)]
    budget = [(R * (i + 1)) // p - (R * i) // p for i in range(p)]
    taken = [0] * p
    active = [True] * p
    dry = [False] * p  # the list ran out
    tries = [0] * p
    peek: list[tuple | None] = [None] * p
    exhausted = False
    capped = cfg.negative_selection in ("random-doc", "self-repeat")

    def next_usable(i: int):
        if peek[i] is not None:
            it, h, d = peek[i]
            if self_repeat or used.ok(it.chunk_id, h, d, doc):
                return peek[i]
            peek[i] = None  # another meta-chunk took it since
        for it, h, d in streams[i]:
            tries[i] += 1
            if capped and tries[i] > _max_tries(cfg):
                return None
            if self_repeat or used.ok(it.chunk_id, h, d, doc):
                peek[i] = (it, h, d)
                return peek[i]
        return None

    def hand_on(i: int) -> None:
        """Meta-chunk i stops: its unused budget goes to the next meta-chunk whose list has not run out."""
        left = budget[i] - taken[i]
        budget[i] = taken[i]
        j = i + 1
        while j < p and dry[j]:
            j += 1
        if j < p and left > 0:
            budget[j] += left
            active[j] = True  # a larger budget may fit its next negative now

    while any(active):
        others_open = any(active[:p - 1])
        for i in range(p):
            if not active[i]:
                continue
            if k is not None and len(groups_negs[i]) >= k:
                active[i] = False
                continue
            nxt = next_usable(i)
            if nxt is None:
                exhausted = True
                dry[i] = True
                active[i] = False
                if k is None:
                    hand_on(i)
                continue
            it, h, _ = nxt
            cost = it.length + sep
            if k is None and taken[i] + cost > budget[i]:
                if i < p - 1:
                    active[i] = False
                    hand_on(i)
                    continue
                if others_open:
                    continue  # the last meta-chunk waits for the leftovers of the others
                it.keep = budget[i] - taken[i]  # the one cut in the whole sample
                active[i] = False
                if it.keep <= 0:
                    continue
            peek[i] = None
            groups_negs[i].append(it)
            if not self_repeat:
                used.add(it.chunk_id, h)
            taken[i] += cost if it.keep is None else it.keep
            if k is None and i == p - 1 and taken[i] >= budget[i] and not others_open:
                active[i] = False
            others_open = any(active[:p - 1])
    return groups_negs, sum(taken), exhausted


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


def build_concat(pool, cfg, specials: Specials, doc: int, neighbours, rng: np.random.Generator,
                 allowed_doc: np.ndarray | None = None) -> Sample:
    """Baselines: ``standard`` (the document, then random whole documents) and ``knn`` (the document, then
    its most similar documents). Every chunk of a document is used in order; the last one is cut.

    Every document of a baseline sample is text to learn from: all its spans have role ``meta`` and mask 1
    (a KNN neighbour is not a hard negative; its retrieval rank is implied by its order in the sample).
    ``allowed_doc`` (bool per document) keeps the documents inside the run's split."""
    T = cfg.target_length
    sep = len(specials.sep)
    body = T - len(specials.bos) - len(specials.eos) + sep  # every item is charged a separator
    items: list[Item] = []
    cum = 0
    used_docs = {doc}

    def add_doc(d: int) -> bool:
        nonlocal cum
        first_c, n = int(pool.doc_first[d]), int(pool.doc_nchunks[d])
        for c in range(first_c, first_c + n):
            n_tok = pool.chunk_len(c)
            cost = n_tok + sep  # the first item's separator is given back in layout()
            it = Item(ROLE_META, c, len(items), -1, float("nan"), n_tok)
            if cum + cost >= body:
                it.keep = body - cum
                items.append(it)
                cum = body
                return True
            items.append(it)
            cum += cost
        return False

    if add_doc(doc):
        return layout(pool, [items], specials, T)
    if cfg.method == "standard":
        tries = 0
        while tries < 100 * (1 + T // 64):
            tries += 1
            d = int(rng.integers(0, pool.n_docs))
            if d in used_docs or (allowed_doc is not None and not allowed_doc[d]):
                continue
            used_docs.add(d)
            if add_doc(d):
                return layout(pool, [items], specials, T)
        raise Dropped("insufficient_documents")
    ids, _sims = neighbours
    for d in ids:
        d = int(d)
        if d < 0 or d in used_docs or (allowed_doc is not None and not allowed_doc[d]):
            continue
        used_docs.add(d)
        if add_doc(d):
            return layout(pool, [items], specials, T)
    raise Dropped("insufficient_documents")


#: meta-chunk positions reported one by one; later positions are pooled into the last bucket
POSITION_BUCKETS = 16


def _length_bucket(p: int) -> str:
    """Chunks-per-document bucket of the drop-rate table: 1..8 exactly, then 9-16, 17-32, ..."""
    if p <= 8:
        return str(p)
    hi = 1 << (p - 1).bit_length()
    return f"{hi // 2 + 1}-{hi}"


class Tally:
    """Per-part statistics of the synthesis that the manifest and the report show: outcome of every
    meta-document by its length in chunks, and rank/similarity of the negatives by meta-chunk position."""

    def __init__(self) -> None:
        self.by_length: dict[str, dict] = {}
        self.pos = np.zeros((POSITION_BUCKETS + 2, 4), dtype=np.float64)  # negatives, ranked, sum rank, sum sim

    def _row(self, p: int) -> dict:
        return self.by_length.setdefault(_length_bucket(p), {"meta_documents": 0, "samples": 0, "dropped": {}})

    def dropped(self, p: int, reason: str) -> None:
        row = self._row(p)
        row["meta_documents"] += 1
        row["dropped"][reason] = row["dropped"].get(reason, 0) + 1

    def sample(self, p: int, sample: Sample) -> None:
        self.spans(p, sample.spans)

    def spans(self, p: int, sp) -> None:
        """One sample of a ``p``-chunk meta-document, from its span columns (role, meta_index, rank,
        similarity: arrays of a :class:`Sample`'s spans or columns of its rows in spans.parquet)."""
        row = self._row(p)
        row["meta_documents"] += 1
        row["samples"] += 1
        neg = np.asarray(sp["role"]) == ROLE_CODE[ROLE_NEG]
        if not neg.any():
            return
        mi = np.asarray(sp["meta_index"])[neg].astype(np.int64)
        rank = np.asarray(sp["rank"])[neg].astype(np.int64)
        sim = np.asarray(sp["similarity"])[neg].astype(np.float64)
        ok = rank >= 0
        b = np.minimum(mi, POSITION_BUCKETS - 1)
        np.add.at(self.pos[:, 0], b, 1)
        np.add.at(self.pos[:, 1], b[ok], 1)
        np.add.at(self.pos[:, 2], b[ok], rank[ok])
        np.add.at(self.pos[:, 3], b, np.nan_to_num(sim))
        if p >= 2:  # first and last meta-chunk of documents with at least two
            for b, sel in ((POSITION_BUCKETS, mi == 0), (POSITION_BUCKETS + 1, mi == p - 1)):
                self.pos[b] += (sel.sum(), (sel & ok).sum(), rank[sel & ok].sum(), np.nan_to_num(sim[sel]).sum())

    def to_dict(self) -> dict:
        return {"by_length": self.by_length, "by_position": self.pos.tolist()}


def _position_table(pos: np.ndarray) -> dict:
    names = [str(i) for i in range(POSITION_BUCKETS - 1)] + [f"{POSITION_BUCKETS - 1}+", "first", "last"]
    out = {}
    for name, (n, n_ranked, s_rank, s_sim) in zip(names, pos.tolist(), strict=True):
        if n:
            out[name] = {"negatives": int(n), "mean_rank": s_rank / n_ranked if n_ranked else None,
                         "mean_similarity": s_sim / n}
    return out


def merge_tallies(parts: list[dict | None]) -> dict:
    """The manifest's ``synthesis_balance`` section from the parts' :meth:`Tally.to_dict`:
    ``drop_rate_by_chunks_per_document`` (meta-documents tried, samples, drops by reason, drop rate) and
    ``negatives_by_meta_chunk_position`` (negatives, mean rank, mean similarity at meta-chunk index 0, 1, ...,
    and at the first and last meta-chunk of documents with two or more)."""
    by_length: dict[str, dict] = {}
    pos = np.zeros((POSITION_BUCKETS + 2, 4), dtype=np.float64)
    for t in parts:
        if not t:
            continue
        pos += np.asarray(t["by_position"], dtype=np.float64)
        for b, row in t["by_length"].items():
            acc = by_length.setdefault(b, {"meta_documents": 0, "samples": 0, "dropped": {}})
            acc["meta_documents"] += row["meta_documents"]
            acc["samples"] += row["samples"]
            for r, n in row["dropped"].items():
                acc["dropped"][r] = acc["dropped"].get(r, 0) + n

    def order(b: str) -> int:
        return int(b.split("-")[0])

    rate = {}
    for b in sorted(by_length, key=order):
        row = by_length[b]
        n_drop = sum(row["dropped"].values())
        rate[b] = {**row, "dropped": dict(sorted(row["dropped"].items())),
                   "drop_rate": n_drop / row["meta_documents"] if row["meta_documents"] else None}
    return {"drop_rate_by_chunks_per_document": rate, "negatives_by_meta_chunk_position": _position_table(pos)}
