"""Command line of ``make_nextlong_bin.py``: corpus -> NExtLong samples as Megatron indexed datasets."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys

from .config import (
    BUDGETS,
    METHODS,
    NEGATIVE_ALLOCATIONS,
    NEGATIVE_ORDERS,
    NEGATIVE_SELECTIONS,
    SPLITS,
    ConfigError,
    SynthesisConfig,
)

log = logging.getLogger("nextlong")

DEMO = dict(inputs=["builtin:python-docs"], tokenizer="builtin:cl100k_base", target_length=16384,
            output_prefix="demo/nextlong_python_docs", max_samples=64)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's true default once: none for switches and unset values, strings with escapes."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is argparse.SUPPRESS or isinstance(d, bool) or d == []:
            return text
        shown = repr(d) if isinstance(d, str) and (d != d.strip() or not d) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})"


REQUIRED = "required unless --demo: "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_nextlong_bin.py",
        description="Synthesize NExtLong long-context samples (meta-chunks + FAISS-mined hard negatives) and "
                    "write them as GPT-NeoX / megatron-core indexed datasets with a parallel loss-weight mask. "
                    "Flags marked 'required' must be given unless --demo is.",
        formatter_class=_HelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--input", action="append", dest="inputs", metavar="PATH_OR_GLOB",
                    help=REQUIRED + "corpus: JSONL (.gz/.zst), Parquet, a directory, a glob, or builtin:python-docs; "
                         "repeatable")
    io.add_argument("--mix", type=float, action="append", metavar="WEIGHT",
                    help="mixing weight of each --input for drawing meta-documents (one per --input)")
    io.add_argument("--input-name", action="append", dest="input_names", metavar="NAME",
                    help="name of each --input in the provenance (default: file stem)")
    io.add_argument("--text-field", default="text", help="JSON key / Parquet column of the document text")
    io.add_argument("--id-field", default="id", help="JSON key / Parquet column of the document id")
    io.add_argument("--output-prefix", help=REQUIRED + "output prefix: <prefix>_text_document.bin, ... (dirs are "
                    "created)")
    io.add_argument("--work-dir", help="intermediate files (default: <prefix>.work); reruns resume from it")
    io.add_argument("--emit-labels", action="store_true",
                    help="also write <prefix>_label_document (int32 ids, -100 on hard negatives) for stock "
                         "GPT-NeoX's train_label_data_paths")
    io.add_argument("--duplicates", choices=("drop", "keep"), default="drop",
                    help="a document whose normalized text repeats an earlier one of its file: drop or keep it "
                         "(counted either way; repeats across files are counted and kept)")
    io.add_argument("--control-chars", choices=("strip", "keep"), default="strip",
                    help="control characters and ANSI escapes in document text (NUL, ESC, DEL, C1; not tab, "
                         "newline, CR, FF, VT): strip or keep them (counted either way)")
    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--tokenizer", help=REQUIRED + "tokenizer.json, a HuggingFace model dir, or builtin:cl100k_base")
    tk.add_argument("--bos-token", default="auto", help="BOS token string, 'auto' or 'none'")
    tk.add_argument("--eos-token", default="auto", help="EOS token string, 'auto' or 'none'")
    tk.add_argument("--separator", default="\n\n", help="text joining consecutive chunks (may be empty)")
    sy = p.add_argument_group("synthesis (paper Section 3, Appendix C)")
    sy.add_argument("--target-length", type=int, default=131072, help="tokens per sample, exactly")
    sy.add_argument("--granularity", type=int, default=2048, help="maximum chunk size s, in characters")
    sy.add_argument("--candidates", type=int, default=512, help="chunks retrieved per meta-chunk")
    sy.add_argument("--max-candidates", type=int, default=2048,
                    help="longest candidate list per meta-chunk, in chunks: lists that run out are widened "
                         "(doubling from --candidates) up to this, so short documents are not dropped")
    sy.add_argument("--near-duplicate-threshold", type=float, default=0.95,
                    help="drop candidates with cosine similarity >= this to the meta-chunk")
    sy.add_argument("--budget", choices=BUDGETS, default="exact",
                    help="exact: fill to the target from ranked negatives; paper: k from Appendix C.1")
    sy.add_argument("--paper-w", type=float, default=1.5, help="adjustment factor w of Appendix C.1 (Eq. 8)")
    sy.add_argument("--method", choices=METHODS, default="nextlong", help="nextlong, or a baseline")
    sy.add_argument("--negative-order", choices=NEGATIVE_ORDERS, default="head",
                    help="meta-chunk position in its extended chunk (Table 5)")
    sy.add_argument("--negative-selection", choices=NEGATIVE_SELECTIONS, default="topk",
                    help="which retrieved chunks become negatives (Figure 6)")
    sy.add_argument("--negative-allocation", choices=NEGATIVE_ALLOCATIONS, default="even",
                    help="even: meta-chunks take their next-best unused candidate in turn; sequential: each "
                         "meta-chunk fills its budget before the next")
    sy.add_argument("--split", choices=SPLITS, default="all",
                    help="all documents, or only the train/valid/test split of a stable hash of the document ids "
                         "(meta-documents and negatives alike; the pool is shared)")
    sy.add_argument("--valid-fraction", type=float, default=0.005,
                    help="share of documents held out for validation (0-1, with --split)")
    sy.add_argument("--test-fraction", type=float, default=0.005,
                    help="share of documents held out for test (0-1, with --split)")
    sy.add_argument("--max-samples", type=int, help="stop after this many samples (default: all meta-documents)")
    sy.add_argument("--seed", type=int, default=1234, help="seed of every random choice")
    em = p.add_argument_group("embedding and index")
    em.add_argument("--embedder", default="hashing",
                    help="'hashing' (offline TF-IDF projection) or a local sentence-transformers model path")
    em.add_argument("--embedding-dim", type=int, default=256, help="dimension of the hashing embedder")
    em.add_argument("--embedding-dtype", choices=("float16", "float32"), default="float16",
                    help="on-disk dtype of chunk embeddings")
    em.add_argument("--trust-remote-code", action="store_true",
                    help="allow the embedder's model directory to run its own code (jina-embeddings-v3 needs it)")
    em.add_argument("--embed-batch-size", type=int, default=1024,
                    help="at most this many texts per sentence-transformers batch")
    em.add_argument("--embed-batch-tokens", type=int, default=0,
                    help="padded tokens per sentence-transformers batch, texts sorted by token count "
                         "(0: by device, 16384 on a GPU, 4096 on a CPU)")
    em.add_argument("--embed-precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                    help="embedder compute precision; auto: bf16 on CUDA and bf16-capable CPUs, else fp32")
    em.add_argument("--embed-threads", type=int, default=0,
                    help="torch CPU threads per embed task (0: one per core)")
    em.add_argument("--embed-streams", type=int, default=0,
                    help="batches embedded at once per CPU embed task, each on its share of the threads "
                         "(0: one per thread)")
    em.add_argument("--index-factory", default="Flat", help="FAISS factory string (inner product)")
    em.add_argument("--index-train-size", type=int, default=262144, help="vectors sampled to train IVF/PQ")
    em.add_argument("--nprobe", type=int, default=64, help="IVF lists searched per query")
    ru = p.add_argument_group("run")
    ru.add_argument("--block-docs", type=int, default=256,
                    help="meta-documents per batched FAISS search (and per unit of work shared by tasks)")
    ru.add_argument("--tasks", type=int, default=1, help="parallel local synthesis tasks (bytes do not change)")
    ru.add_argument("--stage", default="all",
                    choices=("all", "chunk", "embed", "gather", "index", "synth", "merge", "publish"),
                    help="run one stage only (the others must be done, or be run later)")
    ru.add_argument("--task-index", type=int, default=None,
                    help="with --stage: do only this array task's share of the stage (0 .. --tasks - 1)")
    ru.add_argument("--status", action="store_true",
                    help="list the done and missing units of every stage for these flags, then exit")
    ru.add_argument("--executor", choices=("local", "slurm"), default="local",
                    help="local: run here; slurm: submit one job array per stage, chained with afterok")
    dr = p.add_argument_group("cost estimate (with --dry-run; nothing is written)")
    dr.add_argument("--dry-run", action="store_true",
                    help="measure a sample of the inputs and print the run's estimated cost, then exit")
    dr.add_argument("--estimate-documents", type=int, help="corpus size to estimate for, in documents "
                    "(default: count the inputs)")
    dr.add_argument("--estimate-chunks", type=int, help="corpus size to estimate for, in chunks")
    dr.add_argument("--estimate-samples", type=int, help="samples to synthesize (default: --max-samples, else "
                    "one per meta-document)")
    dr.add_argument("--sample-docs", type=int, default=2000, help="documents read to measure the corpus")
    dr.add_argument("--gpus", type=int, default=None,
                    help="GPUs for embedding and search (default: the GPUs present here; 0: estimate for this CPU)")
    dr.add_argument("--gpu", default="H100", help="GPU type (bf16 dense peak: H100, A100, ...)")
    dr.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilization assumed for embedding")
    dr.add_argument("--embedder-params", type=int, help="parameters of a sentence-transformers embedder "
                    "(e.g. 572000000 for jina-embeddings-v3)")
    dr.add_argument("--embedder-layers", type=int, help="transformer layers of the embedder (attention FLOPs; "
                    "default: read from its directory)")
    dr.add_argument("--embedder-hidden", type=int, help="hidden size of the embedder (attention FLOPs)")
    dr.add_argument("--embedder-dim", type=int, help="output dimension of the embedder (storage, index)")
    dr.add_argument("--embedder-max-tokens", type=int, help="tokens the embedder keeps per chunk (its "
                    "max_seq_length; default: read from its directory)")
    sl = p.add_argument_group("slurm (with --executor slurm)")
    sl.add_argument("--partition", help="partition of every job")
    sl.add_argument("--gpu-partition", help="partition of the embed array (default: --partition)")
    sl.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per embed task")
    sl.add_argument("--slurm-cpus", type=int, default=8, help="CPU cores per task")
    sl.add_argument("--slurm-mem", default="64G", help="memory per task, Slurm syntax")
    sl.add_argument("--slurm-time", default="24:00:00", help="time limit per task, Slurm syntax")
    sl.add_argument("--slurm-account", help="account to charge")
    sl.add_argument("--slurm-extra", action="append", default=[], help="extra #SBATCH line, e.g. --qos=high")
    ru.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the dataset check at the end (it runs by default)")
    ru.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars (shown by default)")
    ru.add_argument("--demo", action="store_true",
                    help="run on the built-in corpus with the built-in tokenizer (16384-token samples, "
                         "64 samples, prefix demo/nextlong_python_docs) unless flags say otherwise")
    ru.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ru.add_argument("--debug", action="store_true",
                    help="print the traceback of a user error too (internal errors always print one)")
    return p


#: flags that choose where and how much of the run happens, not what it computes
RUN_ONLY = ("demo", "verbose", "debug", "progress", "stage", "task_index", "status", "executor", "partition",
            "gpu_partition",
            "slurm_gpus", "slurm_cpus", "slurm_mem", "slurm_time", "slurm_account", "slurm_extra", "dry_run",
            "estimate_documents", "estimate_chunks", "estimate_samples", "sample_docs", "gpus", "gpu", "mfu",
            "embedder_params", "embedder_layers", "embedder_hidden", "embedder_dim", "embedder_max_tokens")


def strip_flags(parser: argparse.ArgumentParser, argv: list[str], dests: tuple[str, ...]) -> list[str]:
    """``argv`` without the options whose destination is in ``dests`` (both ``--f v`` and ``--f=v``)."""
    takes_value: dict[str, bool] = {}
    for action in parser._actions:  # noqa: SLF001 - argparse exposes no public list of actions
        if action.dest in dests:
            for opt in action.option_strings:
                takes_value[opt] = action.nargs != 0
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in takes_value:
            i += 1 if ("=" in a or not takes_value[name]) else 2
            continue
        out.append(a)
        i += 1
    return out


def config_from_args(args: argparse.Namespace) -> SynthesisConfig:
    values = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    if args.demo:
        for k, v in DEMO.items():
            if values.get(k) in (None, build_parser().get_default(k)):
                values[k] = v
    for flag in ("inputs", "output_prefix", "tokenizer"):
        if not values.get(flag):
            raise ConfigError(f"--{flag.rstrip('s').replace('_', '-')}: required (or use --demo)")
    return SynthesisConfig(**values)


#: errno values of the environment, not of the code: a clear one-line error, exit 2
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENAMETOOLONG}


def _user_errors() -> tuple[type[BaseException], ...]:
    from .indexed import IndexedFormatError
    from .pipeline import SynthesisError
    from .readers import InputError
    from .tokenization import TokenizerError

    return ConfigError, InputError, TokenizerError, SynthesisError, IndexedFormatError


def _describe_os_error(e: OSError) -> str:
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}.get(e.errno or 0, e.strerror or str(e))
    where = e.filename or "a file"
    hint = {errno.ENOSPC: "; free space or choose another --work-dir / --output-prefix (the run resumes)",
            errno.EDQUOT: "; free space or choose another --work-dir / --output-prefix (the run resumes)",
            errno.EROFS: "; choose a writable --output-prefix / --work-dir",
            errno.EACCES: "; choose a writable --output-prefix / --work-dir"}.get(e.errno or 0, "")
    return f"{where}: {what}{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    from .stages.runner import Interrupted

    try:
        return _main(parser, args, argv)
    except Interrupted as e:
        log.error("%s", e)
        return 128 + e.signum
    except _user_errors() as e:
        log.error("%s", " ".join(str(e).split()) if not args.debug else e, exc_info=args.debug)
        return 2
    except OSError as e:
        if e.errno not in _ENV_ERRNOS:
            raise
        log.error("%s", _describe_os_error(e), exc_info=args.debug)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume")
        return 130


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    from .pipeline import run

    cfg = config_from_args(args)
    if args.task_index is not None and not 0 <= args.task_index < cfg.tasks:
        raise ConfigError(f"--task-index: {args.task_index} is not in [0, --tasks {cfg.tasks})")
    if args.task_index is not None and args.stage not in ("chunk", "embed", "synth"):
        raise ConfigError("--task-index: only the chunk, embed and synth stages are split into tasks")
    if args.status:
        from .pipeline import status

        print(status(cfg))
        return 0
    if args.dry_run:
        from .estimate import estimate, format_estimate

        est = estimate(cfg, documents=args.estimate_documents, chunks=args.estimate_chunks,
                       samples=args.estimate_samples, sample_docs=args.sample_docs, gpus=args.gpus, gpu=args.gpu,
                       mfu=args.mfu, embedder_params=args.embedder_params,
                       **{k: getattr(args, k) for k in ("embedder_layers", "embedder_hidden", "embedder_dim",
                                                        "embedder_max_tokens") if getattr(args, k) is not None})
        print(format_estimate(est))
        return 0
    tok = None
    if args.stage in ("all", "chunk") and args.task_index is None:
        from .pipeline import load_tok
        from .preflight import preflight

        tok = load_tok(cfg)
        preflight(cfg, tok=tok)  # cheap checks before the first expensive stage: nothing is written yet
    if args.executor == "slurm":
        from .slurm import SlurmOptions, submit

        opts = SlurmOptions(partition=args.partition, gpu_partition=args.gpu_partition,
                            gpus_per_task=args.slurm_gpus, cpus_per_task=args.slurm_cpus, mem=args.slurm_mem,
                            time=args.slurm_time, account=args.slurm_account, extra=args.slurm_extra)
        base = strip_flags(parser, argv, RUN_ONLY)
        if args.demo:
            base += [f"--{k.replace('_', '-')}={v}" for k, v in DEMO.items() if k != "inputs"]
            base += [f"--input={x}" for x in DEMO["inputs"]]
        ids = submit(cfg, base, opts)
        print(json.dumps(ids))
        return 0
    manifest = run(cfg, progress=args.progress, stage=args.stage, task_index=args.task_index, tok=tok)
    if manifest is None:
        return 0
    return 1 if manifest.get("verified") is False else 0
