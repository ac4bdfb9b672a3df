"""One synthesized sample as a self-contained HTML page.

The sample is shown span by span, in order: meta-chunks (the document being extended, mask 1) and hard
negatives (mask 0) in different colours, each annotated with its source corpus and document, chunk id,
rank and similarity; a strip at the top maps the whole sample. Runs of many negatives are collapsed into
``<details>`` elements so 128K-token samples stay usable. Beside the sample, the original document(s) of
the meta-chunks are reassembled from ``P.work/chunks.parquet`` (by ``doc_id``, in ``chunk_in_doc``
order), with the chunks used in the sample highlighted and linked to their spans.

Span text is decoded from the sample's own token ids (the tokenizer named by the manifest, or
``tokenizer``); without a tokenizer the chunk text from ``chunks.parquet`` is shown instead. All text is
HTML-escaped.
"""

from __future__ import annotations

import html
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .indexed import read_indexed
from .verify import DatasetPaths, _decode, _load_tokenizer, read_chunk_rows, read_spans, resolve_paths

log = logging.getLogger(__name__)

#: Solid colours of the roles (strip, borders, legend); the tests look for these pixels.
ROLE_COLOURS = {"meta": "#1d4ed8", "negative": "#ea580c", "separator": "#9ca3af", "bos": "#111827",
                "eos": "#111827"}
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#1f2937}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:8px 0}
.meta-info{font-size:13px;color:#4b5563}
.legend span{display:inline-block;padding:1px 8px;margin-right:8px;border-radius:3px;color:#fff;font-size:12px}
.strip{display:flex;height:28px;width:100%;margin:10px 0;border:1px solid #d1d5db}
.strip a{display:block;height:100%;min-width:1px}
.cols{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:18px}
.span{margin:6px 0;padding:4px 8px;border-left:6px solid;border-radius:3px}
.span.meta{background:#dbeafe;border-color:#1d4ed8}
.span.negative{background:#ffedd5;border-color:#ea580c}
.span.bos,.span.eos{background:#f3f4f6;border-color:#111827;font-size:12px}
.sep{height:0;border-top:1px dashed #9ca3af;margin:2px 0 2px 40px}
.ann{font-size:12px;color:#374151;font-family:ui-monospace,Menlo,monospace}
.ann b{color:#111827}.trunc{color:#b91c1c}
pre.text{white-space:pre-wrap;word-wrap:break-word;margin:4px 0 2px;font-size:13px;font-family:inherit}
details.negrun{margin:6px 0;border-left:6px solid #ea580c;background:#fff7ed;padding:2px 6px}
details.negrun>summary{cursor:pointer;font-size:13px;color:#9a3412}
.doc{border:1px solid #d1d5db;border-radius:4px;padding:6px 8px;margin-bottom:12px}
.chunk{margin:4px 0;padding:2px 6px;font-size:13px;white-space:pre-wrap;border-left:4px solid #e5e7eb}
.chunk.used{background:#dbeafe;border-color:#1d4ed8}
.note{color:#92400e;font-size:13px}
"""


@dataclass
class SampleView:
    """Everything needed to render one sample (also handy for tests and notebooks)."""

    paths: DatasetPaths
    sample: int
    n_samples: int
    tokens: np.ndarray
    mask: np.ndarray | None
    spans: dict[str, np.ndarray]
    texts: list[str]  #: display text of every span
    documents: dict[str, list[dict]]  #: doc_id -> its chunks (chunk_id, chunk_in_doc, corpus, text), in order
    notes: list[str]


def _fmt_sim(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def load_sample(prefix: str | os.PathLike, sample: int, *, tokenizer: Any = None) -> SampleView:
    """Read sample ``sample`` of the run ``prefix``, its spans, their text and the source documents."""
    paths = resolve_paths(prefix)
    text = read_indexed(paths.text)
    if not 0 <= sample < len(text):
        raise IndexError(f"{paths.text}.idx: sample {sample} out of range [0, {len(text)})")
    tokens = np.asarray(text[sample])
    notes: list[str] = []
    try:
        mask = np.asarray(read_indexed(paths.lossweight)[sample])
    except (ValueError, IndexError) as e:
        mask = None
        notes.append(f"mask unavailable: {e}")
    if not paths.spans.exists():
        raise FileNotFoundError(f"{paths.spans}: missing; the viewer needs the spans sidecar")
    all_spans = read_spans(paths.spans)
    lo, hi = np.searchsorted(all_spans["sample"], [sample, sample + 1])
    spans = {k: v[lo:hi] for k, v in all_spans.items()}
    if hi == lo:
        notes.append(f"{paths.spans}: no spans for sample {sample}; showing the whole sample as one block")

    tok = None
    spec = tokenizer if tokenizer is not None else paths.section("tokenizer").get("spec")
    if spec is not None:
        try:
            if isinstance(spec, str) and tokenizer is None and not spec.startswith("builtin:") \
                    and not Path(spec).exists() and (paths.manifest_path.parent / spec).exists():
                spec = str(paths.manifest_path.parent / spec)
            tok = _load_tokenizer(spec)
        except Exception as e:  # noqa: BLE001 - any loading problem falls back to chunk text
            notes.append(f"tokenizer {spec} not loadable ({e}); showing chunk text from chunks.parquet")
    else:
        notes.append("no tokenizer (pass --tokenizer); showing chunk text from chunks.parquet")

    chunk_rows: dict[int, dict] = {}
    documents: dict[str, list[dict]] = {}
    if paths.chunks.exists():
        import pyarrow.parquet as pq

        names = pq.read_schema(paths.chunks).names
        cols = [c for c in ("corpus", "doc_id", "chunk_in_doc") if c in names]
        table = pq.read_table(paths.chunks, columns=cols)  # small columns only; text by row group below
        role = spans["role"].astype(str)
        meta_docs = list(dict.fromkeys(spans["doc_id"][role == "meta"].astype(str).tolist()))
        doc_col = table.column("doc_id").to_numpy(zero_copy_only=False).astype(str)
        rows = np.flatnonzero(np.isin(doc_col, meta_docs))  # row number = chunk id
        wanted = spans["chunk_id"][(spans["chunk_id"] >= 0) & (spans["chunk_id"] < table.num_rows)]
        rows = np.union1d(rows, wanted.astype(np.int64))
        texts_by_row = read_chunk_rows(paths.chunks, rows, ["text"])
        small = table.take(rows).to_pylist()
        for rid, rec in zip(rows.tolist(), small, strict=True):
            chunk_rows[rid] = {"chunk_id": rid, **rec, "text": texts_by_row[rid]["text"]}
        for d in meta_docs:
            documents[d] = sorted((r for r in chunk_rows.values() if r["doc_id"] == d),
                                  key=lambda r: r.get("chunk_in_doc", 0))
    else:
        notes.append(f"{paths.chunks} not present (work directory removed?): original documents not shown")

    texts = []
    for r in range(hi - lo):
        st, ln, cid = int(spans["start"][r]), int(spans["length"][r]), int(spans["chunk_id"][r])
        ids = tokens[st:st + ln]
        if tok is not None:
            try:
                texts.append(_decode(tok, ids))
                continue
            except Exception as e:  # noqa: BLE001 - tokenizers raise bare exceptions
                notes.append(f"span {r}: cannot decode ({e})")
        if cid in chunk_rows:
            texts.append(chunk_rows[cid]["text"])
        else:
            texts.append(" ".join(str(int(i)) for i in ids))
    return SampleView(paths, sample, len(text), tokens, mask, spans, texts, documents, notes)


def _span_block(v: SampleView, r: int, max_chars: int) -> str:
    e = html.escape
    sp = v.spans
    role = str(sp["role"][r])
    ln, st = int(sp["length"][r]), int(sp["start"][r])
    span_no = int(sp["span"][r])
    if role == "separator":
        return f'<div class="sep" id="span-{span_no}" title="separator, {ln} token(s)"></div>'
    if role in ("bos", "eos"):
        label = "BOS" if role == "bos" else "EOS"
        return (f'<div class="span {role}" id="span-{span_no}"><span class="ann"><b>{label}</b> '
                f'{e(repr(v.texts[r]))} · token {int(v.tokens[st]) if ln else "–"}</span></div>')
    ann = [f"<b>#{span_no} {e(role)}</b>", f"m{int(sp['meta_index'][r])}",
           f"{e(str(sp['corpus'][r]))}/{e(str(sp['doc_id'][r]))}", f"chunk {int(sp['chunk_id'][r])}",
           f"tokens {st}–{st + ln} ({ln})"]
    if role == "negative":
        ann.insert(2, f"rank {int(sp['rank'][r])}")
        ann.insert(3, f"sim {_fmt_sim(float(sp['similarity'][r]))}")
    if bool(sp["truncated"][r]):
        ann.append('<span class="trunc">truncated</span>')
    if v.mask is not None and ln:
        mv = np.unique(v.mask[st:st + ln])
        ann.append(f"mask {','.join(str(int(x)) for x in mv)}")
    link = ""
    if role == "meta":
        link = f' · <a href="#doc-chunk-{int(sp["chunk_id"][r])}">in document</a>'
    body = v.texts[r]
    if len(body) > max_chars:
        shown = (f'<pre class="text">{e(body[:max_chars])}</pre><details><summary>show all '
                 f'{len(body):,} characters</summary><pre class="text">{e(body[max_chars:])}</pre></details>')
    else:
        shown = f'<pre class="text">{e(body)}</pre>'
    return (f'<div class="span {role}" id="span-{span_no}"><div class="ann">{" · ".join(ann)}{link}</div>'
            f"{shown}</div>")


def _negative_run_summary(v: SampleView, rows: list[int]) -> str:
    sp = v.spans
    neg = [r for r in rows if str(sp["role"][r]) == "negative"]
    toks = sum(int(sp["length"][r]) for r in rows)
    ranks = [int(sp["rank"][r]) for r in neg]
    sims = [float(sp["similarity"][r]) for r in neg if not math.isnan(float(sp["similarity"][r]))]
    mis = sorted({int(sp["meta_index"][r]) for r in neg})
    parts = [f"{len(neg)} hard negatives", f"{toks:,} tokens"]
    if ranks:
        parts.append(f"ranks {min(ranks)}–{max(ranks)}")
    if sims:
        parts.append(f"similarity {min(sims):.3f}–{max(sims):.3f}")
    parts.append("meta-chunk " + ", ".join(f"m{m}" for m in mis))
    return ", ".join(parts)


def render_sample(
    prefix: str | os.PathLike,
    sample: int,
    *,
    tokenizer: Any = None,
    expand_negatives: int = 3,
    max_span_chars: int = 4000,
    max_documents: int = 4,
) -> str:
    """The HTML page of sample ``sample``. Runs of more than ``expand_negatives`` consecutive negatives are
    collapsed; span text beyond ``max_span_chars`` characters is folded; documents beyond
    ``max_documents`` are folded."""
    v = load_sample(prefix, sample, tokenizer=tokenizer)
    e = html.escape
    sp = v.spans
    n = len(sp["sample"])
    total = max(len(v.tokens), 1)

    strip = []
    for r in range(n):
        role, ln = str(sp["role"][r]), int(sp["length"][r])
        tip = f"#{int(sp['span'][r])} {role} {sp['doc_id'][r]} ({ln} tokens)"
        strip.append(f'<a href="#span-{int(sp["span"][r])}" title="{e(tip)}" style="flex:{ln / total:.6f} 1 0;'
                     f'background:{ROLE_COLOURS.get(role, "#6b7280")}"></a>')

    # group consecutive negatives (with the separators between them) into runs
    blocks: list[str] = []
    r = 0
    while r < n:
        if str(sp["role"][r]) != "negative":
            blocks.append(_span_block(v, r, max_span_chars))
            r += 1
            continue
        run = [r]
        k = r + 1
        while k < n:
            role = str(sp["role"][k])
            if role == "negative" or (role == "separator" and k + 1 < n and str(sp["role"][k + 1]) == "negative"):
                run.append(k)
            else:
                break
            k += 1
        n_neg = sum(1 for x in run if str(sp["role"][x]) == "negative")
        inner = "".join(_span_block(v, x, max_span_chars) for x in run)
        if n_neg > expand_negatives:
            blocks.append(f'<details class="negrun"><summary>{e(_negative_run_summary(v, run))}</summary>'
                          f"{inner}</details>")
        else:
            blocks.append(inner)
        r = k
    if n == 0:
        blocks.append(f'<pre class="text">{e(" ".join(str(int(t)) for t in v.tokens[:2000]))}</pre>')

    used: dict[int, int] = {}
    for r in range(n):
        if str(sp["role"][r]) == "meta":
            used.setdefault(int(sp["chunk_id"][r]), int(sp["span"][r]))
    docs_html = []
    for i, (doc_id, rows) in enumerate(v.documents.items()):
        chunks = []
        for row in rows:
            cid = int(row["chunk_id"])
            if cid in used:
                chunks.append(f'<div class="chunk used" id="doc-chunk-{cid}"><a class="ann" href="#span-{used[cid]}">'
                              f"chunk {cid} → span #{used[cid]}</a>\n{e(row['text'])}</div>")
            else:
                chunks.append(f'<div class="chunk" id="doc-chunk-{cid}"><span class="ann">chunk {cid} (not in '
                              f"this sample)</span>\n{e(row['text'])}</div>")
        corpus = rows[0]["corpus"] if rows and "corpus" in rows[0] else ""
        n_used = sum(1 for row in rows if int(row["chunk_id"]) in used)
        head = f"{corpus}/{doc_id}: {len(rows)} chunks, {n_used} in this sample"
        body = "".join(chunks)
        if i < max_documents:
            docs_html.append(f'<div class="doc"><h2>{e(head)}</h2>{body}</div>')
        else:
            docs_html.append(f'<details class="doc"><summary>{e(head)}</summary>{body}</details>')
    if not docs_html:
        docs_html.append('<p class="note">No source document available.</p>')

    cfg = v.paths
    roles = sp["role"].astype(str) if n else np.zeros(0, dtype=str)
    lens = sp["length"].astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    meta_tok, neg_tok = int(lens[roles == "meta"].sum()), int(lens[roles == "negative"].sum())
    info = (f"sample {v.sample} of {v.n_samples} · {len(v.tokens):,} tokens · {int((roles == 'meta').sum())} "
            f"meta-chunk(s) ({meta_tok:,} tokens) · {int((roles == 'negative').sum())} negative(s) ({neg_tok:,} tokens)"
            f" · method {cfg.config('method', '?')}, selection {cfg.config('negative_selection', '?')}, order "
            f"{cfg.config('negative_order', '?')}, granularity {cfg.config('granularity', '?')}")
    legend = "".join(f'<span style="background:{ROLE_COLOURS[k]}">{e(label)}</span>' for k, label in (
        ("meta", "meta-chunk (mask 1)"), ("negative", "hard negative (mask 0)"), ("separator", "separator"),
        ("bos", "BOS / EOS")))
    notes = "".join(f'<p class="note">{e(x)}</p>' for x in v.notes)
    title = f"{cfg.name}: sample {v.sample}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<div class="meta-info">{e(str(cfg.prefix))}<br>{e(info)}</div>
<div class="legend" style="margin-top:6px">{legend}</div>
<div class="strip" id="strip">{"".join(strip)}</div>
{notes}
<div class="cols"><div id="sample"><h2>Sample</h2>{"".join(blocks)}</div>
<div id="documents"><h2>Original document{"s" if len(v.documents) != 1 else ""}</h2>{"".join(docs_html)}</div></div>
</body></html>
"""


def write_sample_html(
    prefix: str | os.PathLike,
    sample: int,
    output: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Path:
    """Render sample ``sample`` to ``output`` (default ``<prefix>_sample<N>.html`` beside the dataset)."""
    page = render_sample(prefix, sample, **kwargs)
    out = Path(output) if output is not None else Path(f"{resolve_paths(prefix).prefix}_sample{sample}.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
