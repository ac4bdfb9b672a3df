"""Statistics report of one or more synthesis runs: a self-contained HTML page, PNG plots and a JSON of
the numbers, written beside the dataset.

The numbers come from the spans sidecar (roles, provenance, ranks, similarities), the ``.idx`` of the
text dataset (sample lengths), the manifest (configuration, dropped documents, stage times) and, when
the work directory is still there, ``embeddings.npy`` (similarities recomputed from the vectors, random
chunk pairs as the reference). Every run is read the same way whatever its ``--method``, so runs of
NExtLong, the Standard and KNN baselines and the ablations can be overlaid with ``compare``.

Plotting needs matplotlib (``pip install "nextlong-neox[report]"``); it is imported only when a report
is drawn, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .indexed import IndexedFormatError, read_indexed
from .verify import DatasetPaths, read_spans, resolve_paths, verify_dataset

log = logging.getLogger(__name__)

#: Most vectors gathered for one similarity distribution (a uniform random subset beyond that).
MAX_PAIRS = 200_000
#: Random chunk pairs drawn as the reference similarity distribution.
RANDOM_PAIRS = 20_000


def _plt():
    """matplotlib.pyplot with the Agg backend, or an ImportError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "the stats report draws its plots with matplotlib: pip install \"nextlong-neox[report]\" "
            "(or pip install matplotlib)") from e
    return plt


def summarize(x: np.ndarray) -> dict[str, float | int | None]:
    """n, mean, min, p5, p50, p95, max of ``x`` (NaNs ignored); ``None`` entries when empty."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not len(x):
        return {"n": 0, "mean": None, "min": None, "p5": None, "p50": None, "p95": None, "max": None}
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"n": len(x), "mean": float(x.mean()), "min": float(x.min()), "p5": float(p5), "p50": float(p50),
            "p95": float(p95), "max": float(x.max())}


@dataclass
class RunStats:
    """Everything the report shows about one run: ``numbers`` go to the JSON, ``dist`` are the raw
    distributions that are plotted (their summaries are in ``numbers`` as well)."""

    name: str
    prefix: str
    label: str
    numbers: dict[str, Any] = field(default_factory=dict)
    dist: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_label(paths: DatasetPaths) -> str:
    """``name (method, selection, order)``, naming only the settings that differ from NExtLong's defaults."""
    method = paths.config("method")
    parts = [method] if method else []
    if method in (None, "nextlong"):
        sel, order = paths.config("negative_selection"), paths.config("negative_order")
        if sel and sel != "topk":
            parts.append(sel)
        if order and order != "head":
            parts.append(f"order={order}")
    gran = paths.config("granularity")
    if gran is not None and gran != 2048:
        parts.append(f"s={gran}")
    return f"{paths.name} ({', '.join(parts)})" if parts else paths.name


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(values.astype(str), return_inverse=True)
    return uniq, inv.astype(np.int64)


def _cos(emb: np.ndarray, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inner products of embedding rows ``a[i]`` and ``b[i]`` (a random subset of MAX_PAIRS at most)."""
    if len(a) > MAX_PAIRS:
        keep = np.sort(rng.choice(len(a), MAX_PAIRS, replace=False))
        a, b = a[keep], b[keep]
    out = np.empty(len(a), dtype=np.float32)
    step = 8192
    for i in range(0, len(a), step):
        ea = np.asarray(emb[a[i:i + step]], dtype=np.float32)
        eb = np.asarray(emb[b[i:i + step]], dtype=np.float32)
        out[i:i + step] = np.einsum("ij,ij->i", ea, eb)
    return out


def collect(prefix: str | os.PathLike, *, name: str | None = None, seed: int = 0) -> RunStats:
    """Read one run and compute its statistics; missing optional inputs become notes, not errors."""
    paths = resolve_paths(prefix)
    st = RunStats(name=name or paths.name, prefix=str(paths.prefix), label=name or run_label(paths))
    num, dist = st.numbers, st.dist
    rng = np.random.default_rng(seed)
    if paths.manifest_error:
        st.notes.append(paths.manifest_error)
    num["config"] = {k: paths.config(k) for k in (
        "method", "negative_selection", "negative_order", "granularity", "target_length", "budget", "embedder",
        "candidates", "near_duplicate_threshold", "seed") if paths.config(k) is not None}
    counts = paths.section("counts")
    num["documents_in"] = counts.get("documents_in")
    dropped = dict(counts.get("dropped") or {})
    for reason, n in (counts.get("inputs_rejected") or {}).items():
        dropped[f"input: {reason}"] = n
    num["dropped"] = dropped
    num["stage_seconds"] = paths.section("stage_seconds")

    try:
        text = read_indexed(paths.text)
        lengths = text.lengths.astype(np.int64)
    except IndexedFormatError as e:
        st.notes.append(f"sample lengths unavailable: {e}")
        lengths = np.zeros(0, dtype=np.int64)
    n_samples = len(lengths)
    dist["sample_length"] = lengths
    num["samples"] = n_samples
    num["tokens"] = int(lengths.sum())
    num["sample_length"] = summarize(lengths)

    if not paths.spans.exists():
        st.notes.append(f"{paths.spans}: missing; provenance statistics unavailable")
        return st
    sp = read_spans(paths.spans, ["sample", "span", "start", "length", "role", "meta_index", "corpus", "doc_id",
                                  "chunk_id", "rank", "similarity"])
    s = sp["sample"].astype(np.int64)
    n_samples = max(n_samples, int(s.max()) + 1 if len(s) else 0)
    role = sp["role"].astype(str)
    length = sp["length"].astype(np.int64)
    start = sp["start"].astype(np.int64)
    mi = sp["meta_index"].astype(np.int64)
    cid = sp["chunk_id"].astype(np.int64)
    docs, doc = _factorize(sp["doc_id"])
    meta, neg = role == "meta", role == "negative"
    num["spans"] = len(s)

    # ---- composition
    tok_by_role = {r: int(length[role == r].sum()) for r in np.unique(role).tolist()}
    total = max(sum(tok_by_role.values()), 1)
    num["token_share"] = {r: v / total for r, v in sorted(tok_by_role.items())}
    per_sample_meta = np.bincount(s[meta], weights=length[meta], minlength=n_samples)
    per_sample_len = np.bincount(s, weights=length, minlength=n_samples)
    dist["meta_token_share"] = per_sample_meta / np.maximum(per_sample_len, 1)
    dist["meta_per_sample"] = np.bincount(s[meta], minlength=n_samples)
    pairs = np.unique(s[meta] * (len(docs) + 1) + doc[meta])
    dist["documents_per_sample"] = np.bincount(pairs // (len(docs) + 1), minlength=n_samples)
    for k in ("meta_token_share", "meta_per_sample", "documents_per_sample"):
        num[k] = summarize(dist[k])

    # ---- extended chunks: meta-chunk and its negatives share (sample, meta_index)
    width = int(mi.max()) + 2 if len(mi) else 1
    key = s * width + (mi + 1)
    mkeys, mfirst = np.unique(key[meta], return_index=True)
    mrows = np.flatnonzero(meta)[mfirst]
    nrows = np.flatnonzero(neg)
    pos = np.searchsorted(mkeys, key[nrows])
    pos_c = np.minimum(pos, max(len(mkeys) - 1, 0))
    has_meta = (pos < len(mkeys)) & (mkeys[pos_c] == key[nrows]) if len(mkeys) else np.zeros(len(nrows), bool)
    dist["negatives_per_meta"] = np.bincount(pos[has_meta], minlength=len(mkeys)) if len(mkeys) else np.zeros(0)
    num["negatives_per_meta"] = summarize(dist["negatives_per_meta"])
    num["meta_chunks_without_negatives_share"] = (
        float((dist["negatives_per_meta"] == 0).mean()) if len(dist["negatives_per_meta"]) else None)
    num["negatives"] = len(nrows)
    num["negatives_without_meta"] = int((~has_meta).sum())
    meta_row_of_neg = mrows[pos_c[has_meta]]
    nrows_m = nrows[has_meta]

    # ---- similarities
    sim = sp["similarity"].astype(np.float64)[nrows]
    dist["similarity_stated"] = sim[~np.isnan(sim)]
    num["similarity_stated"] = summarize(dist["similarity_stated"])
    rank = sp["rank"].astype(np.int64)[nrows]
    dist["negative_rank"] = rank[rank >= 0]
    num["negative_rank"] = summarize(dist["negative_rank"])
    num["negatives_by_meta_chunk_position"] = by_meta_chunk_position(s[nrows], mi[nrows], rank, sim, s[meta], mi[meta])
    num["drop_rate_by_chunks_per_document"] = (paths.section("synthesis_balance") or {}).get(
        "drop_rate_by_chunks_per_document")
    if num["drop_rate_by_chunks_per_document"] is None:
        st.notes.append("manifest has no drop rate by document length (written since --negative-allocation)")
    emb = None
    if paths.embeddings.exists():
        emb = np.load(paths.embeddings, mmap_mode="r")
        if emb.ndim != 2 or (len(cid) and cid.max() >= len(emb)):
            st.notes.append(f"{paths.embeddings}: shape {emb.shape} does not match the chunk ids; ignored")
            emb = None
    else:
        st.notes.append(f"{paths.embeddings} not present: similarities from the spans sidecar only")
    if emb is not None:
        dist["similarity_meta_negative"] = _cos(emb, cid[meta_row_of_neg], cid[nrows_m], rng)
        n = len(emb)
        if n > 1:
            a = rng.integers(0, n, RANDOM_PAIRS)
            b = (a + rng.integers(1, n, RANDOM_PAIRS)) % n
            dist["similarity_random_pairs"] = _cos(emb, a, b, rng)
        content = np.flatnonzero((meta | neg) & (cid >= 0))
        same_sample = s[content[1:]] == s[content[:-1]]
        other_doc = doc[content[1:]] != doc[content[:-1]]
        adj = np.flatnonzero(same_sample & other_doc)
        dist["similarity_adjacent_other_doc"] = _cos(emb, cid[content[adj]], cid[content[adj + 1]], rng)
        for k in ("similarity_meta_negative", "similarity_random_pairs", "similarity_adjacent_other_doc"):
            if k in dist:
                num[k] = summarize(dist[k])

    # ---- where the meta-chunks sit
    mr = np.flatnonzero(meta)
    order = mr[np.lexsort((start[mr], doc[mr], s[mr]))]
    same = (s[order[1:]] == s[order[:-1]]) & (doc[order[1:]] == doc[order[:-1]])
    dist["dependency_distance"] = (start[order[1:]] - (start[order[:-1]] + length[order[:-1]]))[same]
    num["dependency_distance"] = summarize(dist["dependency_distance"])
    slen = np.maximum(per_sample_len, 1)
    dist["meta_position"] = (start[mr] + length[mr] / 2) / slen[s[mr]]
    num["meta_position"] = summarize(dist["meta_position"])
    content = np.flatnonzero(meta | neg)
    g = content[np.lexsort((sp["span"][content], key[content]))]
    first = np.ones(len(g), dtype=bool)
    first[1:] = key[g[1:]] != key[g[:-1]]
    gstart = np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))
    rank_in_group = np.arange(len(g)) - gstart
    gid = np.cumsum(first) - 1
    gsize = np.bincount(gid)[gid] if len(g) else np.zeros(0, dtype=np.int64)
    sel = (role[g] == "meta") & (gsize > 1)
    dist["meta_position_in_extended_chunk"] = rank_in_group[sel] / (gsize[sel] - 1)
    num["meta_position_in_extended_chunk"] = summarize(dist["meta_position_in_extended_chunk"])

    # ---- corpora, reuse, leaks
    corpus = sp["corpus"].astype(str)
    mix: dict[str, dict[str, int]] = {}
    for r in ("meta", "negative"):
        rows = role == r
        cs, inv = np.unique(corpus[rows], return_inverse=True)
        tok = np.bincount(inv, weights=length[rows], minlength=len(cs))
        mix[r] = {c: int(t) for c, t in zip(cs.tolist(), tok.tolist(), strict=True)}
    num["corpus_tokens"] = mix
    if len(nrows):
        _, uses = np.unique(cid[nrows], return_counts=True)
    else:
        uses = np.zeros(0, dtype=np.int64)
    dist["negative_reuse"] = uses
    num["negative_reuse"] = {**summarize(uses), "distinct_chunks": len(uses),
                             "share_used_once": float((uses == 1).mean()) if len(uses) else None}
    meta_uses = np.unique(cid[meta & (cid >= 0)], return_counts=True)[1]
    num["meta_chunk_reuse_max"] = int(meta_uses.max()) if len(meta_uses) else 0
    leaks = {
        "negative_from_same_document": int((doc[nrows_m] == doc[meta_row_of_neg]).sum()),
        "negative_is_its_meta_chunk": int((cid[nrows_m] == cid[meta_row_of_neg]).sum()),
    }
    if "similarity_meta_negative" in dist and len(dist["similarity_meta_negative"]):
        thr = float(paths.config("near_duplicate_threshold", 0.95) or 0.95)
        frac = float((dist["similarity_meta_negative"] >= thr).mean())
        leaks[f"negative_near_duplicate_share(sim>={thr:g})"] = frac
    num["leak_indicators"] = leaks
    return st


def by_meta_chunk_position(neg_sample: np.ndarray, neg_meta: np.ndarray, rank: np.ndarray, sim: np.ndarray,
                           meta_sample: np.ndarray, meta_index: np.ndarray) -> dict[str, dict]:
    """Negatives, mean rank and mean similarity by the index of their meta-chunk (0, 1, ..., the last bucket
    pooling the rest), and at the first and the last meta-chunk of samples with two or more; the same
    table as the manifest's ``negatives_by_meta_chunk_position``, recomputed from the spans."""
    from .assemble import POSITION_BUCKETS

    out: dict[str, dict] = {}
    n_meta = np.zeros(int(meta_sample.max()) + 1 if len(meta_sample) else 0, dtype=np.int64)
    if len(meta_sample):
        np.maximum.at(n_meta, meta_sample, meta_index + 1)
    p = n_meta[neg_sample] if len(neg_sample) else np.zeros(0, np.int64)
    b = np.minimum(neg_meta, POSITION_BUCKETS - 1)
    groups = [(str(i) if i < POSITION_BUCKETS - 1 else f"{i}+", b == i) for i in range(POSITION_BUCKETS)]
    groups += [("first", (p >= 2) & (neg_meta == 0)), ("last", (p >= 2) & (neg_meta == p - 1))]
    for name, sel in groups:
        if not sel.any():
            continue
        r = rank[sel]
        r = r[r >= 0]
        out[name] = {"negatives": int(sel.sum()), "mean_rank": float(r.mean()) if len(r) else None,
                     "mean_similarity": float(np.nanmean(sim[sel])) if np.any(~np.isnan(sim[sel])) else None}
    return out


def _position_table(runs: list[RunStats]) -> str:
    e = html.escape
    keys: list[str] = []
    for r in runs:
        keys += [k for k in (r.numbers.get("negatives_by_meta_chunk_position") or {}) if k not in keys]
    head = "".join(f"<th colspan=3>{e(r.label)}</th>" for r in runs)
    sub = "<th>negatives</th><th>mean rank</th><th>mean similarity</th>" * len(runs)
    rows = []
    for k in keys:
        cells = []
        for r in runs:
            v = (r.numbers.get("negatives_by_meta_chunk_position") or {}).get(k) or {}
            cells += [f"<td>{e(_fmt(v.get(c)))}</td>" for c in ("negatives", "mean_rank", "mean_similarity")]
        rows.append(f"<tr><td>{e(k)}</td>{''.join(cells)}</tr>")
    return (f'<table id="position"><tr><th rowspan=2>meta-chunk</th>{head}</tr><tr>{sub}</tr>{"".join(rows)}'
            "</table>")


def _drop_table(runs: list[RunStats]) -> str:
    e = html.escape
    keys: list[str] = []
    for r in runs:
        keys += [k for k in (r.numbers.get("drop_rate_by_chunks_per_document") or {}) if k not in keys]
    head = "".join(f"<th colspan=3>{e(r.label)}</th>" for r in runs)
    sub = "<th>meta-documents</th><th>dropped</th><th>drop rate</th>" * len(runs)
    rows = []
    for k in keys:
        cells = []
        for r in runs:
            v = (r.numbers.get("drop_rate_by_chunks_per_document") or {}).get(k) or {}
            dropped = v.get("dropped") or {}
            why = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
            n_dropped = sum(dropped.values()) if v else None
            cells += [f"<td>{e(_fmt(v.get('meta_documents')))}</td>",
                      f'<td title="{e(why)}">{e(_fmt(n_dropped))}</td>', f"<td>{e(_fmt(v.get('drop_rate')))}</td>"]
        rows.append(f"<tr><td>{e(k)}</td>{''.join(cells)}</tr>")
    return (f'<table id="droprate"><tr><th rowspan=2>chunks per document</th>{head}</tr><tr>{sub}</tr>'
            f'{"".join(rows)}</table>')


# --------------------------------------------------------------------------------------------- plotting

#: (key, title, x label, what to look for) of every histogram panel, in page order.
PANELS = [
    ("sample_length", "Sample length", "tokens per sample",
     "Every sample should have exactly the target length: one bar."),
    ("meta_per_sample", "Meta-chunks per sample", "meta-chunks",
     "NExtLong: the chunks of one meta-document. Standard/KNN: the chunks of every document used."),
    ("documents_per_sample", "Source documents of the meta-chunks per sample", "documents",
     "NExtLong extends one document per sample; Standard concatenates many."),
    ("negatives_per_meta", "Hard negatives per meta-chunk", "negatives",
     "k of the paper (Appendix C.1): grows with the target length, shrinks with the meta-document length."),
    ("meta_token_share", "Share of tokens carrying loss-relevant document text (meta)", "share of the sample",
     "Low shares mean most of the sample is distractor text (mask 0)."),
    ("similarity", "Similarity: meta-chunk to its negatives vs random chunk pairs", "cosine similarity",
     "Hard negatives should sit clearly right of random pairs, but below the near-duplicate threshold."),
    ("similarity_adjacent_other_doc", "Similarity of neighbouring chunks from different documents",
     "cosine similarity", "Standard: random neighbours (low). KNN and NExtLong: similar neighbours (high)."),
    ("dependency_distance", "Dependency distance", "tokens between consecutive meta-chunks of one document",
     "The long-range dependencies NExtLong creates; Standard/KNN keep document chunks adjacent (near 0)."),
    ("meta_position", "Position of meta-chunks in the sample", "relative position (0 = start, 1 = end)",
     "Meta-chunks of the extended document should spread over the whole sample."),
    ("meta_position_in_extended_chunk", "Meta-chunk position inside its extended chunk",
     "0 = before its negatives (head), 1 = after (tail)", "Paper Table 5: head (default), tail or random."),
    ("negative_rank", "Rank of the negatives in the retrieved list", "rank (0 = most similar)",
     "topk: small ranks; tailk: the end of the candidate list; random-*: spread."),
    ("negative_reuse", "Negative reuse across the dataset", "times one chunk is used as a negative",
     "Mostly 1: the same distractor is rarely repeated."),
]


def _hist(ax, runs: list[RunStats], key: str, xlabel: str, log_x: bool = False) -> bool:
    series = [(r.label, np.asarray(r.dist.get(key, []), dtype=np.float64)) for r in runs]
    series = [(lab, x[~np.isnan(x)]) for lab, x in series]
    allx = np.concatenate([x for _, x in series]) if series else np.zeros(0)
    if not len(allx):
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlabel(xlabel)
        return False
    lo, hi = float(allx.min()), float(allx.max())
    integer = np.all(np.equal(np.mod(allx, 1), 0)) and hi - lo <= 60
    if integer:
        bins = np.arange(lo - 0.5, hi + 1.5, 1.0)
    elif log_x and lo >= 0:
        bins = np.unique(np.concatenate([[0], np.geomspace(1, max(hi, 1) + 1, 40)]))
        ax.set_xscale("symlog", linthresh=1)
    else:
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
    for i, (lab, x) in enumerate(series):
        if not len(x):
            continue
        w = np.full(len(x), 1.0 / len(x))
        if len(series) == 1:
            ax.hist(x, bins=bins, weights=w, color=f"C{i}", alpha=0.8, label=lab)
        elif integer:  # side-by-side bars, so identical runs stay visible
            h, _ = np.histogram(x, bins=bins, weights=w)
            bw = 0.8 / len(series)
            centers = bins[:-1] + 0.5
            ax.bar(centers - 0.4 + bw * (i + 0.5), h, width=bw, color=f"C{i}", label=lab)
        else:
            ax.hist(x, bins=bins, weights=w, histtype="step", linewidth=2, color=f"C{i}", label=lab)
    if integer:
        ax.xaxis.get_major_locator().set_params(integer=True)
        fmt = ax.xaxis.get_major_formatter()
        if hasattr(fmt, "set_useOffset"):
            fmt.set_useOffset(False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction")
    if len(series) > 1:
        ax.legend(fontsize=8)
    return True


def _similarity(ax, runs: list[RunStats]) -> None:
    data = []
    for i, r in enumerate(runs):
        neg = r.dist.get("similarity_meta_negative")
        if neg is None:
            neg = r.dist.get("similarity_stated")
        if neg is not None and len(neg):
            data.append((f"{r.label}: meta→negative", neg, f"C{i}", "-"))
    if runs and runs[0].dist.get("similarity_random_pairs") is not None:
        # one reference per distinct embedding space; runs over the same pool give the same curve
        seen = set()
        for i, r in enumerate(runs):
            x = r.dist.get("similarity_random_pairs")
            if x is None or not len(x):
                continue
            sig = (len(x), round(float(np.mean(x)), 3))
            if sig in seen:
                continue
            seen.add(sig)
            data.append((f"{r.label}: random pairs", x, f"C{i}", ":"))
    if not data:
        ax.text(0.5, 0.5, "no negatives", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    allx = np.concatenate([d[1] for d in data])
    bins = np.linspace(min(float(allx.min()), 0.0), max(float(allx.max()), 1e-3), 51)
    for lab, x, col, ls in data:
        ax.hist(x, bins=bins, weights=np.full(len(x), 1 / len(x)), histtype="step", linewidth=2, color=col,
                linestyle=ls, label=lab)
    ax.set_xlabel("cosine similarity (inner product of unit embeddings)")
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8)


def _bars(ax, runs: list[RunStats], getter, xlabel: str) -> bool:
    cats: list[str] = []
    for r in runs:
        for c in getter(r):
            if c not in cats:
                cats.append(c)
    if not cats:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes, color="grey")
        return False
    width = 0.8 / max(len(runs), 1)
    y = np.arange(len(cats))
    for i, r in enumerate(runs):
        vals = getter(r)
        ax.barh(y + i * width, [vals.get(c, 0) for c in cats], height=width, color=f"C{i}", label=r.label)
    ax.set_yticks(y + width * (len(runs) - 1) / 2)
    ax.set_yticklabels(cats, fontsize=8)
    ax.set_xlabel(xlabel)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return True


def _corpus_share(r: RunStats) -> dict[str, float]:
    mix = r.numbers.get("corpus_tokens") or {}
    total = sum(sum(v.values()) for v in mix.values()) or 1
    return {f"{c} ({role})": t / total for role, v in mix.items() for c, t in v.items()}


BAR_PANELS = [
    ("token_share", "Token share by span role", "share of all tokens",
     lambda r: r.numbers.get("token_share") or {}, "meta and separators carry loss; negatives have mask 0."),
    ("corpus_mix", "Source-corpus mix", "share of content tokens", _corpus_share,
     "Which input the meta-chunks and the negatives come from (--mix)."),
    ("dropped", "Dropped documents by reason", "documents", lambda r: r.numbers.get("dropped") or {},
     "Documents and input lines that produced no sample; details in P_rejects.jsonl."),
]


def _figure_png(draw, width: float = 7.5, height: float = 3.6) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.bad{background:#fbd5d5}.ok{background:#d9f2dc}.note{color:#8a5a00}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:8px 20px}
figure{margin:12px 0}figure h2{font-size:15px}
figcaption{font-size:13px;color:#444}img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:0 3px}
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


#: Rows of the comparison table: (label, getter).
TABLE_ROWS: list[tuple[str, Any]] = [
    ("samples", lambda n: n.get("samples")),
    ("tokens", lambda n: n.get("tokens")),
    ("documents in", lambda n: n.get("documents_in")),
    ("sample length min / max", lambda n: f"{_fmt(n['sample_length']['min'])} / {_fmt(n['sample_length']['max'])}"),
    ("meta-chunks per sample (mean)", lambda n: (n.get("meta_per_sample") or {}).get("mean")),
    ("source documents per sample (mean)", lambda n: (n.get("documents_per_sample") or {}).get("mean")),
    ("negatives per meta-chunk (mean)", lambda n: (n.get("negatives_per_meta") or {}).get("mean")),
    ("meta-chunks without negatives (share)", lambda n: n.get("meta_chunks_without_negatives_share")),
    ("meta token share", lambda n: (n.get("token_share") or {}).get("meta")),
    ("negative token share (mask 0)", lambda n: (n.get("token_share") or {}).get("negative")),
    ("sim meta→negative (median)", lambda n: (n.get("similarity_meta_negative") or n.get("similarity_stated")
                                              or {}).get("p50")),
    ("sim random pairs (median)", lambda n: (n.get("similarity_random_pairs") or {}).get("p50")),
    ("sim neighbours, other doc (median)", lambda n: (n.get("similarity_adjacent_other_doc") or {}).get("p50")),
    ("dependency distance (mean tokens)", lambda n: (n.get("dependency_distance") or {}).get("mean")),
    ("dependency distance (median tokens)", lambda n: (n.get("dependency_distance") or {}).get("p50")),
    ("dependency distance (p95 tokens)", lambda n: (n.get("dependency_distance") or {}).get("p95")),
    ("negative rank (median)", lambda n: (n.get("negative_rank") or {}).get("p50")),
    ("distinct negative chunks", lambda n: (n.get("negative_reuse") or {}).get("distinct_chunks")),
    ("max uses of one negative", lambda n: (n.get("negative_reuse") or {}).get("max")),
    ("dropped documents", lambda n: sum((n.get("dropped") or {}).values())),
]


def _leak_rows(runs: list[RunStats]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.numbers.get("leak_indicators", {}) if k not in keys]
    out = []
    for k in keys:
        cells = []
        for r in runs:
            v = r.numbers.get("leak_indicators", {}).get(k)
            cls = "ok" if not v else "bad"
            cells.append(f'<td class="{cls}">{html.escape(_fmt(v))}</td>')
        out.append(f"<tr><td>{html.escape(k)}</td>{''.join(cells)}</tr>")
    return out


@dataclass
class ReportOutput:
    """Files written by :func:`write_report`."""

    html: Path
    json: Path
    pngs: list[Path]
    runs: list[RunStats]


def write_report(
    prefix: str | os.PathLike,
    compare: list[str | os.PathLike] | tuple = (),
    *,
    output: str | os.PathLike | None = None,
    names: list[str] | None = None,
    verify: bool = True,
    seed: int = 0,
) -> ReportOutput:
    """Compute the statistics of ``prefix`` (and of every run in ``compare``), draw the plots and write
    ``<output>.html``, ``<output>.json`` and ``<output>_<plot>.png``. ``output`` defaults to
    ``<prefix>_report`` beside the dataset. ``names`` label the runs in plots and tables (default: the
    prefix name with the method and the ablation settings). ``verify`` adds the verifier's verdicts."""
    plt = _plt()  # fail early, before the statistics are computed
    del plt
    prefixes = [prefix, *compare]
    if names is not None and len(names) != len(prefixes):
        raise ValueError(f"--name: give one name per run ({len(prefixes)}), got {len(names)}")
    runs = [collect(p, name=names[i] if names else None, seed=seed) for i, p in enumerate(prefixes)]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        for i, r in enumerate(runs):
            r.label = f"{r.label} #{i + 1}"
    verdicts: list[dict | None] = []
    for p in prefixes:
        if verify:
            v = verify_dataset(p)
            verdicts.append({"ok": v.ok, "checks": v.checks, "failures": v.failures[:50]})
        else:
            verdicts.append(None)
    base = Path(output) if output is not None else Path(f"{normalize(prefix)}_report")
    base.parent.mkdir(parents=True, exist_ok=True)

    figures: list[tuple[str, str, str, bytes]] = []  # key, title, caption, png
    for key, title, xlabel, caption in PANELS:
        if key == "similarity":
            png = _figure_png(lambda ax: _similarity(ax, runs))
        else:
            log_x = key in ("dependency_distance", "negative_reuse")
            png = _figure_png(lambda ax, k=key, xl=xlabel, lx=log_x: _hist(ax, runs, k, xl, lx))
        figures.append((key, title, caption, png))
    for key, title, xlabel, getter, caption in BAR_PANELS:
        png = _figure_png(lambda ax, g=getter, xl=xlabel: _bars(ax, runs, g, xl))
        figures.append((key, title, caption, png))

    pngs = []
    for key, _title, _caption, png in figures:
        path = Path(f"{base}_{key}.png")
        path.write_bytes(png)
        pngs.append(path)

    doc = {"runs": [{"name": r.name, "label": r.label, "prefix": r.prefix, "notes": r.notes,
                     "verify": verdicts[i], **r.numbers} for i, r in enumerate(runs)]}
    json_path = Path(f"{base}.json")
    json_path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n", encoding="utf-8")
    html_path = Path(f"{base}.html")
    html_path.write_text(_page(runs, verdicts, figures), encoding="utf-8")
    log.info("report: %s (+ %d plots, %s)", html_path, len(pngs), json_path)
    return ReportOutput(html_path, json_path, pngs, runs)


def normalize(prefix: str | os.PathLike) -> Path:
    from .verify import normalize_prefix

    return normalize_prefix(prefix)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _page(runs: list[RunStats], verdicts: list[dict | None], figures) -> str:
    e = html.escape
    head = "".join(f"<th>{e(r.label)}</th>" for r in runs)
    rows = []
    for label, get in TABLE_ROWS:
        cells = []
        for r in runs:
            try:
                v = get(r.numbers)
            except (KeyError, TypeError):
                v = None
            cells.append(f"<td>{e(_fmt(v))}</td>")
        rows.append(f"<tr><td>{e(label)}</td>{''.join(cells)}</tr>")
    vrow = []
    for v in verdicts:
        if v is None:
            vrow.append("<td>not run</td>")
        else:
            bad = [k for k, s in v["checks"].items() if s.startswith("FAILED")]
            vrow.append('<td class="ok">all checks pass</td>' if v["ok"]
                        else f'<td class="bad">FAILED: {e(", ".join(bad))}</td>')
    rows.insert(0, f"<tr><td>verifier</td>{''.join(vrow)}</tr>")
    cfg_rows = []
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.numbers.get("config", {}) if k not in keys]
    for k in keys:
        cfg_rows.append(f"<tr><td>{e(k)}</td>"
                        + "".join(f"<td>{e(_fmt(r.numbers.get('config', {}).get(k)))}</td>" for r in runs) + "</tr>")
    notes = "".join(f'<li class="note">{e(r.label)}: {e(n)}</li>' for r in runs for n in r.notes)
    failures = "".join(f'<li class="note">{e(runs[i].label)}: {e(m)}</li>'
                       for i, v in enumerate(verdicts) if v for m in v["failures"])
    figs = []
    for key, title, caption, png in figures:
        b64 = base64.b64encode(png).decode("ascii")
        figs.append(f'<figure id="{e(key)}"><h2>{e(title)}</h2><img alt="{e(title)}" '
                    f'src="data:image/png;base64,{b64}"><figcaption>{e(caption)}</figcaption></figure>')
    title = "NExtLong dataset report: " + ", ".join(r.label for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<p>Prefixes: {", ".join(f"<code>{e(r.prefix)}</code>" for r in runs)}</p>
<h2>Summary</h2>
<table id="summary"><tr><th></th>{head}</tr>{"".join(rows)}</table>
<h2>Leak indicators</h2>
<p>Negatives taken from the meta-chunk's own document, identical to it, or near-duplicates of it would let
the model copy instead of looking back; they should be 0 (self-repeat runs repeat the meta-chunk on purpose).</p>
<table id="leaks"><tr><th></th>{head}</tr>{"".join(_leak_rows(runs))}</table>
<h2>Negatives by meta-chunk position</h2>
<p>Retrieval rank (0 = most similar) and similarity of the negatives by the index of their meta-chunk in the
document; "first" and "last" compare the two ends of documents with two or more meta-chunks. With
<code>--negative-allocation even</code> they should be about equal; <code>sequential</code> gives later
meta-chunks deeper, less similar negatives where candidate lists overlap.</p>
{_position_table(runs)}
<h2>Drop rate by meta-document length</h2>
<p>Meta-documents tried and dropped (hover for the reasons), by their number of chunks. A rate that depends on
the length skews the dataset towards the lengths that survive.</p>
{_drop_table(runs)}
<h2>Configuration</h2>
<table id="config"><tr><th></th>{head}</tr>{"".join(cfg_rows)}</table>
{f"<ul>{notes}{failures}</ul>" if notes or failures else ""}
<div class="figs">{"".join(figs)}</div>
</body></html>
"""
