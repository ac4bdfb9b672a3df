"""Cheap checks before the first expensive stage: a run that cannot finish fails in seconds, not hours.

:func:`preflight` checks, cheapest first, and raises :class:`~nextlong.config.ConfigError` (or the
reader's/tokenizer's own user-error type) with one line naming the flag to change:

1. ``--output-prefix`` / ``--work-dir``: the nearest existing directory accepts a new file (read-only
   file systems, missing permissions, a path component that is a file);
2. ``--input``: every input matches readable files (every Parquet file's footer is read);
3. ``--tokenizer`` loads (and ``--bos-token`` / ``--eos-token`` resolve);
4. ``--embedder`` loads (``hashing`` always does; a sentence-transformers model is loaded once, on CPU);
5. a sample of the first documents of every input is read, chunked and tokenized as the chunk stage
   does, and the corpus size is extrapolated from how much of each file the sample covered;
6. ``--index-factory`` parses for the embedder's dimension, and its inverted lists fit the pool and the
   ``--index-train-size`` training sample;
7. ``--target-length`` is reachable: some documents fit whole in one sample (a NExtLong sample holds
   its whole meta-document), and the pool holds more tokens than one sample;
8. the free disk space covers the estimated work and output sizes.

Nothing is left behind: the work and output directories are not created here (the write test creates
and removes one empty file in the nearest existing directory). The call belongs before the first stage of
a fresh or resumed run (``cli.main`` makes it before ``pipeline.run`` and before a Slurm submission).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ConfigError, SynthesisConfig

log = logging.getLogger(__name__)

#: documents read per input to measure the corpus
SAMPLE_DOCS = 400
#: decompressed bytes read per JSONL file to count its records
COUNT_BYTES = 8 << 20
#: FAISS wants about this many training vectors per inverted list (it warns below it)
VECTORS_PER_LIST = 39
#: hashed n-gram features of the ``hashing`` embedder (its document-frequency tables are this long)
HASHING_FEATURES = 1 << 20


@dataclass
class CorpusSample:
    """What the sample of the inputs says about the whole corpus (estimates are marked ``est_``)."""

    documents: int = 0  #: documents sampled (after the reader's policies)
    doc_tokens: list[int] = field(default_factory=list)  #: tokens of each sampled document as a meta-document
    chunks: int = 0
    chars: int = 0
    tokens: int = 0
    est_records: float = 0.0  #: records in all inputs, extrapolated
    est_documents: float = 0.0
    est_chunks: float = 0.0
    est_chars: float = 0.0
    est_tokens: float = 0.0


def preflight(cfg: SynthesisConfig, sample_docs: int = SAMPLE_DOCS, tok=None) -> dict:
    """Check that the run can start and finish (module docstring); raise a one-line user error if not.
    ``tok``: the run's tokenizer when the caller has loaded it already. Returns the estimates it made (logged in
    one line)."""
    _check_writable(cfg)
    from .readers import parse_input_specs
    from .tokenization import load_tokenizer

    specs = parse_input_specs(cfg.inputs, cfg.mix, cfg.input_names)
    files = {s.name: ([s.pattern] if s.pattern.startswith("builtin:") else [str(p) for p in s.files()])
             for s in specs}
    if tok is None:
        tok = load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token)
    dim = _check_embedder(cfg)
    sample = _sample_corpus(cfg, specs, files, tok, sample_docs)
    if sample.documents == 0:
        raise ConfigError(f"--input: the first records of {', '.join(cfg.inputs)} hold no usable document "
                          f"(check --text-field {cfg.text_field!r})")
    _check_index(cfg, dim, sample)
    _check_target_length(cfg, sample)
    need = _check_disk(cfg, dim, tok.vocab_size, sample, sum(len(f) for f in files.values()),
                       len(tok.tokenizer.to_str()))
    log.info("preflight: ok: about %.3g documents, %.3g chunks, %.3g tokens in the pool (from %d sampled "
             "documents); about %s of disk needed", sample.est_documents, sample.est_chunks, sample.est_tokens,
             sample.documents, _human(sum(need.values())))
    return {"estimated_documents": sample.est_documents, "estimated_chunks": sample.est_chunks,
            "estimated_pool_tokens": sample.est_tokens, "estimated_disk_bytes": need}


# ------------------------------------------------------------------------------------------ outputs


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def _check_writable(cfg: SynthesisConfig) -> None:
    for flag, target in (("--output-prefix", Path(cfg.output_prefix).parent),
                         ("--work-dir" if cfg.work_dir else "--output-prefix", Path(cfg.resolved_work_dir))):
        base = _existing_ancestor(target)
        if not base.is_dir():
            tail = "" if base == target.absolute() else f", so {target} cannot be created"
            raise ConfigError(f"{flag}: {base} is a file, not a directory{tail}")
        try:
            fd, name = tempfile.mkstemp(prefix=".nextlong-write-test-", dir=base)
        except OSError as e:
            raise ConfigError(f"{flag}: cannot write in {base} ({e.strerror}); choose a writable location") from e
        os.close(fd)
        os.unlink(name)


# ------------------------------------------------------------------------------------------ embedder


def _check_embedder(cfg: SynthesisConfig) -> int:
    """The embedder's output dimension; loads a sentence-transformers model once on CPU to prove it loads."""
    if cfg.embedder == "hashing":
        return cfg.embedding_dim
    p = Path(cfg.embedder).expanduser()
    looks_like_path = cfg.embedder.startswith((".", "/", "~")) or cfg.embedder.count("/") != 1
    if looks_like_path and not p.exists():
        raise ConfigError(f"--embedder {cfg.embedder}: no such model directory (or use --embedder hashing)")
    try:
        import sentence_transformers  # noqa: F401 - only whether it imports
    except ImportError as e:
        raise ConfigError(f"--embedder {cfg.embedder}: a model embedder needs sentence-transformers "
                          "(pip install -e '.[st]'), or use --embedder hashing") from e
    from .embedding import make_embedder

    try:
        emb = make_embedder(cfg.embedder, cfg.seed, cfg.embedding_dim, cfg.embed_batch_size, device="cpu",
                            trust_remote_code=cfg.trust_remote_code)
    except (ValueError, ImportError, OSError) as e:
        raise ConfigError(" ".join(str(e).split())[:400]) from e
    dim = int(emb.dim)
    del emb
    gc.collect()
    return dim


# ------------------------------------------------------------------------------------------ corpus


def _count_jsonl_records(path: Path) -> float:
    """Records of a JSONL file: newlines in its first :data:`COUNT_BYTES` decompressed bytes, scaled by
    the share of the (compressed) file they came from."""
    from .readers import count_lines

    lines, share = count_lines(path, COUNT_BYTES)
    return lines / max(share, 1e-9)


def _count_records(path: str) -> float:
    from .readers import InputError, format_of

    p = Path(path)
    if format_of(p) == "parquet":
        import pyarrow.parquet as pq

        try:
            return float(pq.ParquetFile(p).metadata.num_rows)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise InputError(f"{p}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from e
    return _count_jsonl_records(p)


def _sample_corpus(cfg: SynthesisConfig, specs, files: dict[str, list[str]], tok, sample_docs: int) -> CorpusSample:
    """Read the first documents of every input as the chunk stage would, and extrapolate to all its files."""
    from .chunking import chunk_spans
    from .readers import InputPolicy, InputSpec, Rejects, format_of, iter_documents

    policy = InputPolicy(cfg.duplicates, cfg.control_chars)
    sep = len(tok.encode(cfg.separator)) if cfg.separator else 0
    specials = int(tok.bos_id is not None) + int(tok.eos_id is not None)
    out = CorpusSample()
    for spec in specs:
        texts: list[str] = []
        per_doc: list[int] = []
        rejects = Rejects(max_logged=0)
        taken = 0
        first = files[spec.name][0]
        builtin = first.startswith("builtin:")
        seen = 0
        for doc in iter_documents(InputSpec(first, spec.name, spec.weight), cfg.text_field, cfg.id_field, rejects,
                                  policy):
            seen += 1
            if taken >= sample_docs:
                if builtin:
                    continue  # a built-in corpus is small: count it to its end
                break
            spans = chunk_spans(doc.text, cfg.granularity)
            if not spans:
                continue
            texts.extend(doc.text[a:b] for a, b in spans)
            per_doc.append(len(spans))
            taken += 1
        if not texts:
            continue
        lengths = [len(e) for e in tok.encode_batch(texts)]
        i = 0
        for n in per_doc:
            out.doc_tokens.append(sum(lengths[i : i + n]) + sep * (n - 1) + specials)
            i += n
        chars = sum(len(t) for t in texts)
        if builtin:
            records = float(rejects.read)
        else:
            first_records = max(1.0, _count_records(first))
            # Parquet footers are read for every file (cheap, and a truncated file fails here); JSONL files
            # are assumed to hold as many records per byte as the first one of their input
            per_byte = first_records / max(1, Path(first).stat().st_size)
            records = first_records + sum(
                _count_records(f) if format_of(Path(f)) == "parquet" else per_byte * Path(f).stat().st_size
                for f in files[spec.name][1:])
        read = rejects.read if not builtin else max(1, rejects.read * taken // max(1, seen))
        used_share = taken / max(1, read)
        scale = records / max(1, read)
        out.documents += taken
        out.chunks += len(texts)
        out.chars += chars
        out.tokens += sum(lengths)
        out.est_records += records
        out.est_documents += records * used_share
        out.est_chunks += len(texts) * scale
        out.est_chars += chars * scale
        out.est_tokens += sum(lengths) * scale
    return out


# ------------------------------------------------------------------------------------------ index


def _check_index(cfg: SynthesisConfig, dim: int, sample: CorpusSample) -> None:
    import faiss

    flag = f"--index-factory {cfg.index_factory!r}"
    try:
        index = faiss.index_factory(dim, cfg.index_factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        msg = msg.split("Error: ")[-1] if "Error: " in msg else msg
        raise ConfigError(f"{flag}: FAISS cannot build it for {dim}-dimensional vectors ({msg[:200]}); "
                          "e.g. Flat, IVF1024,Flat, IVF4096,PQ32") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    nlist = int(ivf.nlist)
    n = int(sample.est_chunks)
    train = min(n, cfg.index_train_size)
    if nlist > n:
        raise ConfigError(f"{flag}: {nlist} inverted lists but the pool holds only about {n} chunks; use at most "
                          f"IVF{max(1, n // VECTORS_PER_LIST)} (about {VECTORS_PER_LIST} vectors per list) or Flat")
    if nlist > train:
        raise ConfigError(f"--index-train-size {cfg.index_train_size}: fewer training vectors than the {nlist} "
                          f"inverted lists of {flag}; raise it to at least {nlist * VECTORS_PER_LIST}")
    if nlist * VECTORS_PER_LIST > train:
        log.warning("%s: %d lists trained on %d vectors (FAISS wants %d per list); consider IVF%d or a larger "
                    "--index-train-size", flag, nlist, train, VECTORS_PER_LIST, max(1, train // VECTORS_PER_LIST))


# ------------------------------------------------------------------------------------------ target length


def _check_target_length(cfg: SynthesisConfig, sample: CorpusSample) -> None:
    T = cfg.target_length
    lengths = np.asarray(sample.doc_tokens, dtype=np.int64)
    if cfg.method == "nextlong" and not (lengths <= T).any():
        p50 = int(np.percentile(lengths, 50))
        raise ConfigError(
            f"--target-length {T}: none of the {len(lengths)} sampled documents fits in a sample (a sample holds "
            f"its whole meta-document; they have {int(lengths.min())} to {int(lengths.max())} tokens, median "
            f"{p50}); raise --target-length well above {p50}, e.g. {_round_up(8 * p50)}"
        )
    if cfg.method == "nextlong":
        fit = float((lengths <= T).mean())
        if fit < 0.5:
            log.warning("--target-length %d: only %.0f%% of the sampled documents fit in a sample; the others are "
                        "dropped (meta_document_longer_than_target). A larger --target-length keeps them", T,
                        100 * fit)
    if sample.est_tokens < T:
        raise ConfigError(
            f"--target-length {T}: the inputs hold only about {int(sample.est_tokens)} tokens in all, fewer than "
            f"one sample needs; lower --target-length below {_round_down(sample.est_tokens / 2)} or add documents "
            "(--input)"
        )


def _round_up(x: float) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def _round_down(x: float) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


# ------------------------------------------------------------------------------------------ disk


def estimate_disk(cfg: SynthesisConfig, dim: int, vocab_size: int, sample: CorpusSample, shards: int = 1,
                  tokenizer_bytes: int = 0) -> dict[str, float]:
    """Bytes the run writes: ``work`` (per-shard pool, gathered pool, index, synthesis parts) and ``output``.
    ``shards``: input files; ``tokenizer_bytes``: the serialized tokenizer the work directory keeps."""
    chunks, tokens, chars = sample.est_chunks, sample.est_tokens, sample.est_chars
    fixed = float(tokenizer_bytes)
    if cfg.embedder == "hashing":
        fixed += (shards + 1) * HASHING_FEATURES * 4  # int32 document frequencies per shard, float32 idf
    emb_bytes = chunks * dim * (2 if cfg.embedding_dtype == "float16" else 4)
    # chunk texts are stored zstd-compressed in Parquet (about a third of the raw size for prose)
    pool_once = tokens * 4 + chunks * 8 + emb_bytes + chars * 0.4 + chunks * 40
    if cfg.embedder == "hashing":
        pool_once += chars * 2.0  # the hashed n-gram counts kept for the embed stage (sparse int32 + float32)
    index = chunks * dim * 4  # Flat; compressed indexes are smaller
    samples = cfg.max_samples if cfg.max_samples is not None else sample.est_documents
    token_bytes = 2 if vocab_size <= 65535 else 4
    per_sample = cfg.target_length * (token_bytes + 1 + (4 if cfg.emit_labels else 0)) + 16
    output = samples * per_sample * 1.02  # + spans sidecar, index files, manifest
    # shards and the gathered copy, then the synthesis parts that the merge copies into the outputs
    return {"work": fixed + 2 * pool_once + index + output, "output": output}


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                continue
    return total


def _check_disk(cfg: SynthesisConfig, dim: int, vocab_size: int, sample: CorpusSample, shards: int,
                tokenizer_bytes: int) -> dict[str, float]:
    need = estimate_disk(cfg, dim, vocab_size, sample, shards, tokenizer_bytes)
    work = Path(cfg.resolved_work_dir)
    # a resumed run has already written part of its work directory
    need["work"] = max(0.0, need["work"] - (_tree_bytes(work) if work.is_dir() else 0))
    places = {"work": _existing_ancestor(work), "output": _existing_ancestor(Path(cfg.output_prefix).parent)}
    by_device: dict[int, list[str]] = {}
    for what, p in places.items():
        by_device.setdefault(os.stat(p).st_dev, []).append(what)
    for whats in by_device.values():
        p = places[whats[0]]
        want = sum(need[w] for w in whats)
        free = shutil.disk_usage(p).free
        if want > free:
            flag = "--work-dir" if whats == ["work"] and cfg.work_dir else "--output-prefix"
            parts = ", ".join(f"{w} {_human(need[w])}" for w in whats)
            raise ConfigError(f"{flag}: {p} has {_human(free)} free but the run needs about {_human(want)} ({parts}); "
                              "free space, choose another location (--work-dir, --output-prefix) or set --max-samples")
    return need


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
