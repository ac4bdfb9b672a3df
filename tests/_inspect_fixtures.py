"""Tiny synthesized datasets in the documented output format, built without the synthesis pipeline.

Used by the tests of the verifier, the stats report and the sample viewer, beside the tests of the same tools
on real pipeline output (the ``pipeline_run`` fixture in conftest.py): here every number is known from the
construction. A BPE tokenizer is trained on the fixture's own text, chunks are embedded with a seeded
bag-of-words projection, and samples are assembled the NExtLong way (meta-chunk, then its most similar chunks of
other documents, none used twice in a sample) or the Standard way (whole random documents), exactly
``target_length`` tokens each. The manifest holds only keys the pipeline writes, with the pipeline's names for
stages, drop reasons and reject records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "preprocessing") not in sys.path:  # the package is importable without installation
    sys.path.insert(0, str(REPO / "preprocessing"))

from nextlong.chunking import chunk_text  # noqa: E402 - after the sys.path entry
from nextlong.indexed import IndexedDatasetWriter, token_dtype_for_vocab  # noqa: E402

TOPICS = {
    "astronomy": "star planet orbit galaxy telescope light comet moon sun gravity nebula",
    "biology": "cell protein gene membrane enzyme organism tissue evolution species dna",
    "economics": "market price demand supply inflation trade tax money bank policy",
    "chemistry": "atom molecule bond reaction acid electron solution gas element compound",
}
FILLER = ["the", "a", "of", "and", "in", "is", "to", "that", "which", "with", "for", "this", "are", "by", "on",
          "as", "we"]


def make_documents(n_docs: int = 12, seed: int = 0) -> list[dict]:
    """Documents of a few paragraphs, each about one topic, from two corpora; ids ``doc0``..."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    docs = []
    for d in range(n_docs):
        topic = names[d % len(names)]
        words = TOPICS[topic].split()
        paras = []
        for _ in range(int(rng.integers(3, 6))):
            sents = []
            for _ in range(int(rng.integers(2, 4))):
                n = int(rng.integers(6, 12))
                w = [words[i] if rng.random() < 0.5 else FILLER[i % len(FILLER)]
                     for i in rng.integers(0, len(words), n)]
                sents.append(" ".join(w).capitalize() + ".")
            paras.append(" ".join(sents))
        paras[0] = f"Section {d} <b>&amp</b> " + paras[0]  # markup to check escaping
        docs.append({"corpus": "books" if d % 3 else "web", "doc_id": f"doc{d}", "text": "\n\n".join(paras)})
    return docs


def train_tokenizer(texts: list[str], path: Path) -> Path:
    """A small byte-level BPE with ``<s>``/``</s>`` special tokens, saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


def _embed(texts: list[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    vocab: dict[str, int] = {}
    rows = []
    for t in texts:
        counts: dict[int, float] = {}
        for w in t.lower().replace(".", " ").split():
            if w in FILLER:
                continue
            j = vocab.setdefault(w, len(vocab))
            counts[j] = counts.get(j, 0.0) + 1.0
        rows.append(counts)
    proj = np.random.default_rng(seed).standard_normal((max(len(vocab), 1), dim))
    out = np.zeros((len(texts), dim), dtype=np.float64)
    for i, counts in enumerate(rows):
        for j, v in counts.items():
            out[i] += v * proj[j]
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def build_dataset(
    out_dir: Path,
    name: str = "run",
    *,
    method: str = "nextlong",
    selection: str = "topk",
    n_samples: int = 4,
    target_length: int = 300,
    granularity: int = 160,
    emit_labels: bool = True,
    seed: int = 0,
) -> Path:
    """Write a complete run with ``--output-prefix out_dir/name``; return that prefix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / name
    docs = make_documents(seed=seed)
    # one document longer than any sample: in the pool, and dropped as a meta-document (as the pipeline does)
    long_text = "\n\n".join(d["text"] for d in docs[:6])
    docs.append({"corpus": "web", "doc_id": f"doc{len(docs)}", "text": long_text})
    long_doc = len(docs) - 1
    tok_path = train_tokenizer([d["text"] for d in docs], out_dir / f"{name}_tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    sep_ids = tok.encode("\n\n", add_special_tokens=False).ids

    chunk_rows = []
    for ordinal, d in enumerate(docs):
        for k, text in enumerate(chunk_text(d["text"], granularity)):
            chunk_rows.append({"corpus": d["corpus"], "doc_id": d["doc_id"], "doc_ordinal": ordinal,
                               "chunk_in_doc": k, "text": text})
    texts = [r["text"] for r in chunk_rows]
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    emb = _embed(texts, seed=seed)
    work = Path(f"{prefix}.work")
    work.mkdir(exist_ok=True)
    pq.write_table(pa.table({
        "chunk_id": pa.array(np.arange(len(texts)), pa.int64()),
        "corpus": [r["corpus"] for r in chunk_rows],
        "doc_id": [r["doc_id"] for r in chunk_rows],
        "doc_ordinal": pa.array([r["doc_ordinal"] for r in chunk_rows], pa.int64()),
        "chunk_in_doc": pa.array([r["chunk_in_doc"] for r in chunk_rows], pa.int32()),
        "text": texts,
        "n_chars": pa.array([len(t) for t in texts], pa.int32()),
        "n_tokens": pa.array([len(i) for i in ids], pa.int32()),
    }), work / "chunks.parquet")
    np.save(work / "embeddings.npy", emb)

    doc_chunks: dict[str, list[int]] = {}
    for cid, r in enumerate(chunk_rows):
        doc_chunks.setdefault(r["doc_id"], []).append(cid)
    rng = np.random.default_rng(seed)
    order = [long_doc] + [int(d) for d in rng.permutation(len(docs)) if d != long_doc]
    dropped: dict[str, int] = {}
    next_meta = 0
    dtype = token_dtype_for_vocab(tok.get_vocab_size())
    span_cols: dict[str, list] = {k: [] for k in (
        "sample", "span", "start", "length", "role", "meta_index", "corpus", "doc_id", "chunk_id", "rank",
        "similarity", "truncated")}
    total_tokens = 0
    text_w = IndexedDatasetWriter(f"{prefix}_text_document", dtype)
    mask_w = IndexedDatasetWriter(f"{prefix}_lossweight_document", np.uint8)
    label_w = IndexedDatasetWriter(f"{prefix}_label_document", np.int32) if emit_labels else None
    for s in range(n_samples):
        pieces: list[dict] = [{"role": "bos", "meta_index": -1, "chunk_id": -1, "ids": [bos]}]

        def add_chunk(cid: int, role: str, mi: int, rank: int = -1, sim: float = float("nan"),
                      pieces: list[dict] = pieces) -> None:
            if len(pieces) > 1:
                pieces.append({"role": "separator", "meta_index": mi, "chunk_id": -1, "ids": sep_ids})
            pieces.append({"role": role, "meta_index": mi, "chunk_id": cid, "ids": ids[cid], "rank": rank,
                           "sim": sim})

        budget = target_length - 1
        if method == "standard":
            for j, d in enumerate(rng.permutation(len(docs))):
                for cid in doc_chunks[docs[d]["doc_id"]]:
                    add_chunk(cid, "meta", j)
                if sum(len(p["ids"]) for p in pieces) >= budget:
                    break
        else:
            while True:  # the next meta-document that fits in a sample; longer ones are dropped and counted
                meta_doc = docs[order[next_meta]]["doc_id"]
                next_meta += 1
                metas = doc_chunks[meta_doc]
                if sum(len(ids[c]) for c in metas) + len(sep_ids) * (len(metas) - 1) <= budget - 1:
                    break
                dropped["meta_document_longer_than_target"] = dropped.get("meta_document_longer_than_target", 0) + 1
            share = budget // len(metas)
            used = set(metas)  # no chunk twice in a sample
            for mi, cid in enumerate(metas):
                add_chunk(cid, "meta", mi)
                sims = emb @ emb[cid]
                ranked = [int(j) for j in np.argsort(-sims, kind="stable")]
                cand = [(r, j) for r, j in enumerate(ranked) if chunk_rows[j]["doc_id"] != meta_doc]
                if selection == "tailk":
                    cand = cand[::-1]
                cand = iter(cand)
                while sum(len(p["ids"]) for p in pieces) < share * (mi + 1) or (
                        mi == len(metas) - 1 and sum(len(p["ids"]) for p in pieces) < budget):
                    rank, j = next((r, j) for r, j in cand if j not in used)  # StopIteration: pool too small
                    used.add(j)
                    add_chunk(j, "negative", mi, rank, float(sims[j]))
        # cut to exactly target_length - 1, then EOS
        out_pieces, used = [], 0
        for p in pieces:
            room = budget - used
            if room <= 0:
                break
            take = p["ids"][:room]
            out_pieces.append({**p, "ids": take, "truncated": len(take) < len(p["ids"])})
            used += len(take)
        if out_pieces[-1]["role"] == "separator":  # never end on a cut separator: give it to the chunk
            out_pieces.pop()
            used = sum(len(p["ids"]) for p in out_pieces)
            prev = out_pieces[-1]
            full = ids[prev["chunk_id"]]
            extra = full[len(prev["ids"]):len(prev["ids"]) + budget - used]
            prev["ids"] = prev["ids"] + extra
            prev["truncated"] = len(prev["ids"]) < len(full)
        out_pieces.append({"role": "eos", "meta_index": -1, "chunk_id": -1, "ids": [eos], "truncated": False})
        toks, mask, start = [], [], 0
        for k, p in enumerate(out_pieces):
            n = len(p["ids"])
            toks += p["ids"]
            mask += [0 if p["role"] == "negative" else 1] * n
            cid = p["chunk_id"]
            span_cols["sample"].append(s)
            span_cols["span"].append(k)
            span_cols["start"].append(start)
            span_cols["length"].append(n)
            span_cols["role"].append(p["role"])
            span_cols["meta_index"].append(p["meta_index"])
            span_cols["corpus"].append(chunk_rows[cid]["corpus"] if cid >= 0 else "")
            span_cols["doc_id"].append(chunk_rows[cid]["doc_id"] if cid >= 0 else "")
            span_cols["chunk_id"].append(cid)
            span_cols["rank"].append(p.get("rank", -1) if p["role"] == "negative" else -1)
            span_cols["similarity"].append(p.get("sim", float("nan")) if p["role"] == "negative" else float("nan"))
            span_cols["truncated"].append(bool(p.get("truncated", False)))
            start += n
        assert len(toks) == target_length, (len(toks), target_length)
        text_w.add_document(np.asarray(toks))
        mask_w.add_document(np.asarray(mask, dtype=np.uint8))
        if label_w is not None:
            label_w.add_document(np.where(np.asarray(mask) == 0, -100, np.asarray(toks)).astype(np.int32))
        total_tokens += len(toks)
    for w in (text_w, mask_w, label_w):
        if w is not None:
            w.finalize()
    pq.write_table(pa.table({
        "sample": pa.array(span_cols["sample"], pa.int64()),
        "span": pa.array(span_cols["span"], pa.int32()),
        "start": pa.array(span_cols["start"], pa.int64()),
        "length": pa.array(span_cols["length"], pa.int32()),
        "role": pa.array(span_cols["role"], pa.string()),
        "meta_index": pa.array(span_cols["meta_index"], pa.int32()),
        "corpus": pa.array(span_cols["corpus"], pa.string()),
        "doc_id": pa.array(span_cols["doc_id"], pa.string()),
        "chunk_id": pa.array(span_cols["chunk_id"], pa.int64()),
        "rank": pa.array(span_cols["rank"], pa.int32()),
        "similarity": pa.array(span_cols["similarity"], pa.float32()),
        "truncated": pa.array(span_cols["truncated"], pa.bool_()),
    }), f"{prefix}_spans.parquet")
    import hashlib

    # the input had one more line, an empty document, rejected while reading (the pipeline's reject record)
    per_input = {c: sum(d["corpus"] == c for d in docs) for c in ("books", "web")}
    reject = {"reason": "empty_document", "where": f"web.jsonl:{per_input['web'] + 1}", "detail": ""}
    manifest = {
        "format": "nextlong-neox/1 (docs/format.md)",
        "config": {"inputs": ["books.jsonl", "web.jsonl"], "input_names": list(per_input), "mix": None,
                   "output_prefix": str(prefix), "tokenizer": str(tok_path),
                   "target_length": target_length, "granularity": granularity, "embedder": "hashing",
                   "embedding_dim": emb.shape[1], "separator": "\n\n", "budget": "exact", "method": method,
                   "negative_order": "head", "negative_selection": selection, "max_samples": n_samples,
                   "seed": seed, "emit_labels": emit_labels},
        "seed": seed,
        "tokenizer": {"spec": tok_path.name, "sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
                      "vocab_size": tok.get_vocab_size(), "bos_token": "<s>", "bos_id": bos, "eos_token": "</s>",
                      "eos_id": eos, "separator_ids": sep_ids, "token_dtype": np.dtype(dtype).name},
        "files": {"text": f"{name}_text_document", "lossweight": f"{name}_lossweight_document",
                  "label": f"{name}_label_document" if emit_labels else None, "spans": f"{name}_spans.parquet",
                  "rejects": f"{name}_rejects.jsonl", "work_dir": f"{name}.work"},
        "counts": {"documents_in": len(docs), "documents_per_input": per_input,
                   "inputs_rejected": {"empty_document": 1}, "chunks": len(texts),
                   "samples_out": n_samples, "tokens_out": total_tokens, "dropped": dropped},
        "stage_seconds": {"chunk": 0.1, "embed": 0.2, "gather": 0.01, "index": 0.01, "synth": 0.3,
                          "merge": 0.01},
    }
    Path(f"{prefix}_manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    Path(f"{prefix}_rejects.jsonl").write_text(json.dumps(reject) + "\n", encoding="utf-8")
    return prefix
