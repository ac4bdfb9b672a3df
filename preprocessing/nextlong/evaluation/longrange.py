"""The long-range gain probe.

An evaluation sample is a NExtLong sample (``make_nextlong_bin.py`` output: tokens + spans): meta-chunks
1..p of one document, each followed by hard negatives. For every meta-chunk j = 2..p the model's mean loss on
its tokens is taken

* (a) as built, and
* (b) with meta-chunks 1..j-1 of the same document replaced by unrelated text of the same token length
  (a window of another evaluation document's meta-chunk tokens), everything else unchanged.

The gain of meta-chunk j is (b) - (a) in nats per token: how much the model's prediction of the document's
continuation uses the document's earlier parts across the distractors. It is reported over all scored
meta-chunks and bucketed by the distance in tokens from the start of meta-chunk j back to the end of
meta-chunk j-1, with a 95% confidence interval over evaluation documents (Student t over per-document means).

Cost per document: one forward pass for (a) and p-1 truncated passes for (b) (a causal model's loss on
meta-chunk j does not depend on later tokens, so the (b) sequence for j ends with meta-chunk j).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .scoring import Scorer

log = logging.getLogger(__name__)

#: default distance buckets (tokens between the end of meta-chunk j-1 and the start of meta-chunk j)
DEFAULT_BUCKETS = (0, 128, 256, 512, 1024, 1 << 30)


@dataclass
class ProbeDoc:
    """One evaluation sample: its tokens and the (start, length) of its document's meta-chunks, in order."""

    key: str  # corpus name and sample number, e.g. "openstax:12"
    tokens: np.ndarray  # int64 token ids of the whole sample
    metas: list[tuple[int, int]] = field(default_factory=list)  # meta-chunk spans in token positions


def load_probe_docs(prefix: str | Path, name: str, max_docs: int | None = None, min_metas: int = 2,
                    exclude_doc_ids: set[str] | None = None) -> list[ProbeDoc]:
    """Evaluation samples of a ``make_nextlong_bin.py --method nextlong`` output prefix (``<prefix>_text_document``
    and ``<prefix>_spans.parquet``); samples with fewer than ``min_metas`` meta-chunks, or whose meta-document id
    is in ``exclude_doc_ids``, are skipped."""
    import pyarrow.parquet as pq

    from ..indexed import read_indexed

    prefix = str(prefix)
    text = read_indexed(f"{prefix}_text_document")
    columns = ["sample", "start", "length", "role", "doc_id"]
    spans = pq.read_table(f"{prefix}_spans.parquet", columns=columns).to_pandas()
    metas = spans[spans["role"] == "meta"].sort_values(["sample", "start"])
    docs: list[ProbeDoc] = []
    for sample, g in metas.groupby("sample", sort=True):
        if len(g) < min_metas or (exclude_doc_ids and str(g["doc_id"].iloc[0]) in exclude_doc_ids):
            continue
        docs.append(ProbeDoc(f"{name}:{int(sample)}", np.asarray(text[int(sample)], dtype=np.int64),
                             [(int(s), int(n)) for s, n in zip(g["start"], g["length"], strict=True)]))
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise ValueError(f"{prefix}: no sample with at least {min_metas} meta-chunks")
    return docs


def corrupted_tokens(docs: list[ProbeDoc], seed: int) -> list[np.ndarray]:
    """For each document, its tokens with every meta-chunk replaced by a window of the same length cut at a
    random place from the meta-chunk tokens of a different, randomly chosen evaluation document."""
    if len(docs) < 2:
        raise ValueError("the probe needs at least 2 evaluation documents (fillers come from other documents)")
    streams = [np.concatenate([d.tokens[s : s + n] for s, n in d.metas]) for d in docs]
    rng = np.random.default_rng(seed)
    out = []
    for i, d in enumerate(docs):
        c = d.tokens.copy()
        for s, n in d.metas:
            for _ in range(100):
                k = int(rng.integers(0, len(docs)))
                if k != i and len(streams[k]) >= n:
                    break
            else:
                k = max((j for j in range(len(docs)) if j != i), key=lambda j: len(streams[j]))
            src = streams[k]
            if len(src) >= n:
                off = int(rng.integers(0, len(src) - n + 1))
                c[s : s + n] = src[off : off + n]
            else:  # no other document is that long: repeat the longest one
                c[s : s + n] = np.resize(src, n)
        out.append(c)
    return out


def score_docs(docs: list[ProbeDoc], scorer: Scorer, seed: int = 0, batch_size: int = 8,
               intact_loss: dict[str, float] | None = None) -> list[dict]:
    """One row per scored meta-chunk (j >= 2): document, index, distance back to meta-chunk j-1, its token
    count and its mean loss (a) intact and (b) with the earlier meta-chunks replaced. ``intact_loss``, when
    given, receives each document's mean loss over all predicted tokens of the intact sequence."""
    corrupt = corrupted_tokens(docs, seed)
    jobs: list[tuple[int, int, np.ndarray]] = []  # (doc, j or -1 for intact, sequence)
    for i, d in enumerate(docs):
        last_s, last_n = d.metas[-1]
        jobs.append((i, -1, d.tokens[: last_s + last_n]))
        for j in range(1, len(d.metas)):
            s, n = d.metas[j]
            jobs.append((i, j, np.concatenate([corrupt[i][:s], d.tokens[s : s + n]])))
    losses: dict[tuple[int, int], np.ndarray] = {}
    for b in range(0, len(jobs), batch_size):
        group = jobs[b : b + batch_size]
        for (i, j, _), loss in zip(group, scorer([seq for _, _, seq in group]), strict=True):
            losses[(i, j)] = loss
    rows = []
    for i, d in enumerate(docs):
        intact = losses[(i, -1)]
        if intact_loss is not None:
            intact_loss[d.key] = float(intact.mean())
        for j in range(1, len(d.metas)):
            s, n = d.metas[j]
            ps, pn = d.metas[j - 1]
            # loss[k] predicts token k + 1: the tokens s .. s+n-1 are predicted at positions s-1 .. s+n-2
            a = float(intact[s - 1 : s + n - 1].mean())
            b = float(losses[(i, j)][s - 1 : s + n - 1].mean())
            rows.append({"doc": d.key, "meta": j + 1, "distance": s - (ps + pn), "tokens": n, "loss_intact": a,
                         "loss_replaced": b, "gain": b - a})
    return rows


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval ``(mean, low, high)``; NaN bounds for fewer than 2 values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def _per_doc(rows: list[dict], key: str) -> np.ndarray:
    """Token-weighted mean of ``key`` per document."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        a = acc.setdefault(r["doc"], [0.0, 0.0])
        a[0] += r[key] * r["tokens"]
        a[1] += r["tokens"]
    return np.array([s / n for s, n in acc.values()])


def summarize(rows: list[dict], buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> dict:
    """Overall and per-distance-bucket gain with 95% CIs over documents, and the intact/replaced losses."""
    if not rows:
        raise ValueError("no scored meta-chunks")
    gain, lo, hi = mean_ci(_per_doc(rows, "gain"))
    out = {"documents": len({r["doc"] for r in rows}), "meta_chunks": len(rows), "gain": gain, "gain_ci_low": lo,
           "gain_ci_high": hi, "loss_intact": float(_per_doc(rows, "loss_intact").mean()),
           "loss_replaced": float(_per_doc(rows, "loss_replaced").mean()), "buckets": []}
    for a, b in zip(buckets[:-1], buckets[1:], strict=True):
        sel = [r for r in rows if a <= r["distance"] < b]
        if not sel:
            continue
        m, lo, hi = mean_ci(_per_doc(sel, "gain"))
        out["buckets"].append({"low": a, "high": b, "meta_chunks": len(sel), "documents": len({r["doc"] for r in sel}),
                               "gain": m, "gain_ci_low": lo, "gain_ci_high": hi})
    return out
