"""The synthesis configuration: one dataclass, one docstring per field, validated on construction.

Every field maps to the command-line flag of the same name (underscores -> dashes); errors name the
flag to fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("nextlong", "standard", "knn")
NEGATIVE_ORDERS = ("head", "tail", "random")
NEGATIVE_SELECTIONS = ("topk", "random-retrieved", "tailk", "random-doc", "self-repeat")
BUDGETS = ("exact", "paper")
NEGATIVE_ALLOCATIONS = ("even", "sequential")
SPLITS = ("all", "train", "valid", "test")


class ConfigError(ValueError):
    """A flag has a value the pipeline cannot use; the message names the flag."""


@dataclass
class SynthesisConfig:
    """Everything that determines the bytes of a synthesis run's output."""

    inputs: list[str]
    """``--input``: paths, globs, directories or ``builtin:python-docs``; JSONL(.gz/.zst) or Parquet."""
    output_prefix: str
    """``--output-prefix``: outputs are ``<prefix>_text_document.bin`` etc.; its directory is created."""
    tokenizer: str
    """``--tokenizer``: a ``tokenizer.json``, a HuggingFace model directory, or ``builtin:cl100k_base``."""
    mix: list[float] | None = None
    """``--mix``: one weight per input; meta-documents are drawn from the inputs in these proportions
    (the paper mixes FineWeb-Edu and Cosmopedia v2). Every input's chunks are in the retrieval pool."""
    input_names: list[str] | None = None
    """``--input-name``: one name per input (default: the file stem); recorded in the spans sidecar."""
    text_field: str = "text"
    """``--text-field``: the JSON key / Parquet column holding the document text."""
    id_field: str = "id"
    """``--id-field``: the key / column holding a document id (file:line when absent)."""
    duplicates: str = "drop"
    """``--duplicates``: ``drop`` or ``keep`` a document whose normalized text (whitespace collapsed,
    lower case) repeats an earlier document of the same input file; counted either way. Repeats across
    input files are counted and kept (see ``nextlong.readers``)."""
    control_chars: str = "strip"
    """``--control-chars``: ``strip`` or ``keep`` control characters (NUL, ESC and ANSI escape sequences,
    DEL, C1) in document text; tab, newline, CR, FF and VT are text. Counted either way."""
    target_length: int = 131072
    """``--target-length``: tokens per synthesized sample, exactly (BOS and EOS included). Paper: 131072."""
    granularity: int = 2048
    """``--granularity``: maximum characters per chunk, s in the paper (Section 3.1.1; default 2048)."""
    embedder: str = "hashing"
    """``--embedder``: ``hashing`` (offline TF-IDF projection) or a sentence-transformers model path."""
    embedding_dim: int = 256
    """``--embedding-dim``: output dimension of the ``hashing`` embedder."""
    embedding_dtype: str = "float16"
    """``--embedding-dtype``: storage of the chunk embeddings on disk (float16 halves the pool's size;
    similarities are computed in float32)."""
    trust_remote_code: bool = False
    """``--trust-remote-code``: let a sentence-transformers model directory run its own code (needed by
    jina-embeddings-v3); off by default."""
    embed_batch_size: int = 1024
    """``--embed-batch-size``: at most this many texts per forward pass of a sentence-transformers model
    (the token budget ``--embed-batch-tokens`` usually binds first)."""
    embed_batch_tokens: int = 0
    """``--embed-batch-tokens``: padded tokens per forward pass (rows x longest row) of a sentence-transformers
    model; texts are sorted by token count and packed up to this budget. 0: by device, 16,384 on a GPU and
    4,096 on a CPU (:func:`nextlong.embedding.resolve_batch_tokens`)."""
    embed_precision: str = "auto"
    """``--embed-precision``: compute precision of a sentence-transformers model: ``auto`` (bf16 on CUDA and
    on CPUs with native bf16, else fp32), ``bf16``, ``fp16`` (CUDA only) or ``fp32``."""
    embed_threads: int = 0
    """``--embed-threads``: torch CPU threads per embed task (0: torch's default, one per core)."""
    embed_streams: int = 0
    """``--embed-streams``: batches embedded at once by a CPU embed task, each on its share of the task's torch
    threads (0: one per thread; at most the thread count). Ignored on a GPU (one)."""
    index_factory: str = "Flat"
    """``--index-factory``: FAISS factory string, inner-product metric (``Flat`` exact; ``IVFn,Flat``...)."""
    index_train_size: int = 262144
    """``--index-train-size``: vectors sampled to train an IVF/PQ index."""
    nprobe: int = 64
    """``--nprobe``: IVF lists visited per query (ignored by ``Flat``)."""
    candidates: int = 512
    """``--candidates``: chunks retrieved per meta-chunk before filtering (paper Section 5.3: 512)."""
    max_candidates: int = 2048
    """``--max-candidates``: longest candidate list per meta-chunk (top-k selection): a document whose
    lists run out is mined again with lists of ``--candidates``, doubling, up to this many, so short
    documents are not dropped for lack of negatives at long targets. 2048 is also the largest k of FAISS's
    GPU search."""
    near_duplicate_threshold: float = 0.95
    """``--near-duplicate-threshold``: candidates whose cosine similarity to the meta-chunk is at or above
    this are near-duplicates and dropped (exact duplicates are dropped by text hash)."""
    separator: str = "\n\n"
    """``--separator``: text between consecutive chunks, tokenized once; mask value 1. May be empty."""
    bos_token: str = "auto"
    """``--bos-token``: token string placed first in every sample; ``auto`` or ``none``."""
    eos_token: str = "auto"
    """``--eos-token``: token string placed last in every sample; ``auto`` or ``none``."""
    budget: str = "exact"
    """``--budget``: ``exact`` fills each meta-chunk's share of the target from its ranked negatives;
    ``paper`` takes k = (T*E*w - S)/(p*s) negatives per meta-chunk (Appendix C.1), then truncates."""
    paper_w: float = 1.5
    """``--paper-w``: the adjustment factor w of Appendix C.1, Eq. 8 (paper: 1.5)."""
    method: str = "nextlong"
    """``--method``: ``nextlong``; baselines ``standard`` (random whole documents) and ``knn`` (each
    document followed by its most similar documents), written in the same format."""
    negative_order: str = "head"
    """``--negative-order``: where the meta-chunk sits in its extended chunk (paper Table 5; head = first)."""
    negative_selection: str = "topk"
    """``--negative-selection``: Figure 6 ablations: topk, random-retrieved, tailk, random-doc, self-repeat."""
    negative_allocation: str = "even"
    """``--negative-allocation``: ``even`` (meta-chunks take their next-best unused candidate in turn) or
    ``sequential`` (each meta-chunk fills its budget before the next starts); see nextlong.assemble."""
    split: str = "all"
    """``--split``: ``all`` (every document), or ``train``/``valid``/``test``: meta-documents and negatives
    only from that split of a stable hash of the document ids (nextlong.split); the pool is shared."""
    valid_fraction: float = 0.005
    """``--valid-fraction``: share of the documents held out for validation (with ``--split``)."""
    test_fraction: float = 0.005
    """``--test-fraction``: share of the documents held out for test (with ``--split``)."""
    max_samples: int | None = None
    """``--max-samples``: stop after this many samples (default: one per meta-document)."""
    seed: int = 1234
    """``--seed``: drives the meta-document order, all random choices and the hashing embedder."""
    emit_labels: bool = False
    """``--emit-labels``: also write ``<prefix>_label_document`` (int32 ids, -100 on hard negatives)."""
    work_dir: str | None = None
    """``--work-dir``: intermediate files (chunks, tokens, embeddings, index); default ``<prefix>.work``."""
    block_docs: int = 256
    """``--block-docs``: meta-documents per batched FAISS search, and the unit that tasks share out. Large
    batches keep FAISS efficient (hundreds of queries per call); the output does not depend on it."""
    tasks: int = 1
    """``--tasks``: parallel local tasks for the synthesis stage (output bytes do not depend on it)."""
    verify: bool = True
    """``--no-verify`` turns off the dataset check at the end of the run."""
    extra: dict = field(default_factory=dict)
    """Reserved for settings recorded in the manifest but not affecting bytes."""

    def __post_init__(self) -> None:
        def need(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{flag}: {msg}")

        need(bool(self.inputs), "--input", "give at least one input")
        need(bool(self.output_prefix), "--output-prefix", "required")
        need(self.target_length >= 16, "--target-length", f"must be >= 16 tokens, got {self.target_length}")
        need(self.target_length < 2**31, "--target-length", "must fit an int32 sequence length")
        need(self.granularity >= 16, "--granularity", f"must be >= 16 characters, got {self.granularity}")
        need(self.candidates >= 1, "--candidates", "must be >= 1")
        need(self.max_candidates >= self.candidates, "--max-candidates",
             f"must be >= --candidates ({self.candidates}), got {self.max_candidates}")
        need(self.negative_allocation in NEGATIVE_ALLOCATIONS, "--negative-allocation",
             f"choose from {NEGATIVE_ALLOCATIONS}")
        need(self.split in SPLITS, "--split", f"choose from {SPLITS}")
        need(0.0 <= self.valid_fraction < 1.0, "--valid-fraction", f"must be in [0, 1), got {self.valid_fraction}")
        need(0.0 <= self.test_fraction < 1.0, "--test-fraction", f"must be in [0, 1), got {self.test_fraction}")
        need(self.valid_fraction + self.test_fraction < 1.0, "--valid-fraction",
             "--valid-fraction + --test-fraction must leave documents for training (< 1)")
        need(self.split != "valid" or self.valid_fraction > 0, "--valid-fraction", "must be > 0 with --split valid")
        need(self.split != "test" or self.test_fraction > 0, "--test-fraction", "must be > 0 with --split test")
        need(0.0 < self.near_duplicate_threshold <= 1.0, "--near-duplicate-threshold", "must be in (0, 1]")
        need(self.budget in BUDGETS, "--budget", f"choose from {BUDGETS}")
        need(self.paper_w > 0, "--paper-w", "must be > 0")
        need(self.method in METHODS, "--method", f"choose from {METHODS}")
        need(self.negative_order in NEGATIVE_ORDERS, "--negative-order", f"choose from {NEGATIVE_ORDERS}")
        need(self.negative_selection in NEGATIVE_SELECTIONS, "--negative-selection",
             f"choose from {NEGATIVE_SELECTIONS}")
        need(self.max_samples is None or self.max_samples >= 1, "--max-samples", "must be >= 1")
        need(self.tasks >= 1, "--tasks", "must be >= 1")
        need(self.block_docs >= 1, "--block-docs", "must be >= 1")
        need(self.embedding_dim >= 8, "--embedding-dim", "must be >= 8")
        need(self.nprobe >= 1, "--nprobe", "must be >= 1")
        need(self.embedding_dtype in ("float16", "float32"), "--embedding-dtype", "float16 or float32")
        need(self.duplicates in ("drop", "keep"), "--duplicates", f"drop or keep, got {self.duplicates!r}")
        need(self.control_chars in ("strip", "keep"), "--control-chars", f"strip or keep, got {self.control_chars!r}")
        need(self.embed_batch_size >= 1, "--embed-batch-size", "must be >= 1")
        need(self.embed_batch_tokens >= 0, "--embed-batch-tokens", "must be >= 0 (0: by device)")
        need(self.embed_streams >= 0, "--embed-streams", "must be >= 0 (0: one per CPU thread)")
        need(self.embed_precision in ("auto", "bf16", "fp16", "fp32"), "--embed-precision",
             "choose from auto, bf16, fp16, fp32")
        need(self.embed_threads >= 0, "--embed-threads", "must be >= 0")
        if self.mix is not None:
            need(len(self.mix) == len(self.inputs), "--mix", f"give one weight per --input ({len(self.inputs)})")
            need(all(w > 0 for w in self.mix), "--mix", "weights must be > 0")
        if self.input_names is not None:
            need(len(self.input_names) == len(self.inputs), "--input-name", "give one name per --input")

    @property
    def resolved_work_dir(self) -> str:
        return self.work_dir or f"{self.output_prefix}.work"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
