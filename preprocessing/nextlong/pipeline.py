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

import logging

from .config import SynthesisConfig
from .stages.base import SynthesisError
from .stages.registry import ORDER as STAGES

log = logging.getLogger(__name__)

__all__ = ["STAGES", "SynthesisError", "run", "status", "verify_outputs"]


def _progress_factory(enabled: bool):
    def make(total=None, desc="", unit="it"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=2.0, dynamic_ncols=True)

    return make


def _load_tok(cfg: SynthesisConfig):
    from .tokenization import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token)
    log.info("tokenizer %s: vocabulary %d, bos %s (%s), eos %s (%s), sha256 %s", cfg.tokenizer, tok.vocab_size,
             tok.bos_token, tok.bos_id, tok.eos_token, tok.eos_id, tok.sha256[:12])
    return tok


def _preflight():
    """Hook for the cheap checks (tokenizer and embedder load, index fits, output writable, free disk, target
    reachable) of ``nextlong.preflight.preflight(cfg)``: run before the work directory exists, when this
    version of the package has them."""
    try:
        from . import preflight
    except ImportError:
        return None
    check = getattr(preflight, "preflight", None)
    return None if check is None else (lambda cfg, tok: check(cfg))


def run(cfg: SynthesisConfig, progress: bool = True, stage: str = "all", task_index: int | None = None) -> dict | None:
    """Run every stage (``stage="all"``), or one stage, or one array task of one stage. Returns the manifest
    when the dataset was published (it is also written to ``<prefix>_manifest.json``)."""
    from .stages import runner

    if stage != "all" and stage not in STAGES:
        raise SynthesisError(f"--stage {stage!r}: choose from all, {', '.join(STAGES)}")
    return runner.run(cfg, lambda: _load_tok(cfg), _progress_factory(progress), stage, task_index,
                      verify=verify_outputs, preflight=_preflight())


def status(cfg: SynthesisConfig) -> str:
    """Done and missing units per stage (``--status``)."""
    from .stages import runner
    from .tokenization import load_tokenizer

    return runner.status(cfg, load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token))


def verify_outputs(cfg: SynthesisConfig, manifest: dict | None = None) -> bool:
    """Check the published dataset with :mod:`nextlong.verify`; log every failure. Returns True when sound.
    Called by the runner right after the switch; a failure puts the previous dataset back. The end-of-run
    comparison of a bounded sample of meta-chunk spans with the source text belongs here (hook: pass its
    options to ``verify_dataset``; a manifest update must go through ``os.path.realpath`` of
    ``<prefix>_manifest.json``, which is a link into the published version)."""
    from .verify import verify_dataset

    res = verify_dataset(cfg.output_prefix, decode=2)
    if res.ok:
        log.info("verify: %s: all checks passed", cfg.output_prefix)
    for f in res.failures:
        log.error("verify: %s", f)
    return bool(res.ok)

