"""The pipeline: seven stages of one shape, run in order by one runner.

====== ================================ ===================================================================
stage  unit                             writes
====== ================================ ===================================================================
chunk  one input file (``shard-XXXXX``) ``<work>/pool/shard-XXXXX/``: chunks, tokens, hashing counts
embed  one input file (``shard-XXXXX``) ``<work>/pool/shard-XXXXX/embeddings.npy``
gather the pool (``pool``)              ``<work>/``: chunks.parquet, tokens, embeddings, chunk/doc tables
index  the pool (``faiss``)             ``<work>/index.faiss``
synth  one block of ``--block-docs``    ``<work>/synth/block-XXXXX_*``: the block's datasets and spans
       meta-documents (``block-XXXXX``)
merge  the output (``dataset``)         ``<prefix>.data/<version>/``: the complete new dataset, staged
publish the output (``current``)        the manifest; ``<prefix>.data/current`` switched to the new version
====== ================================ ===================================================================

Each stage is a module of :mod:`nextlong.stages` (units, key, outputs, run); :mod:`nextlong.stages.runner`
skips a unit whose marker ``<work>/<stage>/done/<unit>.json`` matches its key and whose outputs still have
their recorded sizes and checksums, and runs the others. A changed setting redoes exactly the units whose
key holds it: ``--seed``, ``--mix``, ``--target-length``, ``--method``, the ablation flags and
``--max-samples`` re-chunk and re-embed nothing; ``--tasks`` redoes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .config import SynthesisConfig
from .stages.base import SynthesisError
from .stages.registry import ORDER as STAGES

log = logging.getLogger(__name__)

#: meta-chunk spans the end-of-run check compares with the input files
SOURCE_SPANS = 32
#: ... within this share of the run's wall time
SOURCE_SHARE = 0.05

__all__ = ["STAGES", "SynthesisError", "load_tok", "run", "status", "verify_outputs"]


def _progress_factory(enabled: bool):
    def make(total=None, desc="", unit="it"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=2.0, dynamic_ncols=True)

    return make


def load_tok(cfg: SynthesisConfig):
    """The run's tokenizer, loaded and described in one log line."""
    from .tokenization import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token)
    log.info("tokenizer %s: vocabulary %d, bos %s (%s), eos %s (%s), sha256 %s", cfg.tokenizer, tok.vocab_size,
             tok.bos_token, tok.bos_id, tok.eos_token, tok.eos_id, tok.sha256[:12])
    return tok


def run(cfg: SynthesisConfig, progress: bool = True, stage: str = "all", task_index: int | None = None,
        tok=None) -> dict | None:
    """Run every stage (``stage="all"``), or one stage, or one array task of one stage. Returns the manifest
    when the dataset was published (it is also written to ``<prefix>_manifest.json``). ``tok``: the tokenizer
    of ``cfg`` when the caller has loaded it (:func:`load_tok`), else it is loaded here."""
    from .stages import runner

    if stage != "all" and stage not in STAGES:
        raise SynthesisError(f"--stage {stage!r}: choose from all, {', '.join(STAGES)}")
    return runner.run(cfg, (lambda: tok) if tok is not None else (lambda: load_tok(cfg)), _progress_factory(progress),
                      stage, task_index,
                      verify=verify_outputs)


def status(cfg: SynthesisConfig) -> str:
    """Done and missing units per stage (``--status``)."""
    from .stages import runner
    from .tokenization import load_tokenizer

    return runner.status(cfg, load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token))


def verify_outputs(cfg: SynthesisConfig, run_seconds: float | None = None) -> bool:
    """Check the published dataset with :mod:`nextlong.verify`; log every failure. Returns True when sound.
    Called by the runner right after the switch; a failure puts the previous dataset back.

    Besides the format and content checks, up to :data:`SOURCE_SPANS` meta-chunk spans are decoded and compared
    with the input files, within :data:`SOURCE_SHARE` of the run's wall time ``run_seconds`` (unbounded when it
    is not given). That check and its cost are recorded in the manifest under ``verify``; the manifest is
    rewritten through ``os.path.realpath`` of ``<prefix>_manifest.json``, a link into the published version."""
    from .verify import verify_dataset

    t0 = time.time()
    budget = SOURCE_SHARE * run_seconds if run_seconds else None
    res = verify_dataset(cfg.output_prefix, decode=2, source=SOURCE_SPANS, source_seconds=budget)
    src = res.stats.get("source_check")
    if src is not None:
        src["share_of_run"] = round(src["seconds"] / max(float(run_seconds or 0), 1e-9), 4) if run_seconds else None
        path = Path(os.path.realpath(f"{cfg.output_prefix}_manifest.json"))
        manifest = json.loads(path.read_text())
        manifest["verify"] = {"seconds": round(time.time() - t0, 3), "source_check": src, "checks": res.checks}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        log.info("verify: %d meta-chunk spans compared with the input files (%d documents read) in %.1f s%s",
                 src["spans_checked"], src["documents_read"], src["seconds"],
                 f", {100 * src['share_of_run']:.1f}% of the run" if src["share_of_run"] is not None else "")
    if res.ok:
        log.info("verify: %s: all checks passed", cfg.output_prefix)
    for f in res.failures:
        log.error("verify: %s", f)
    return bool(res.ok)
