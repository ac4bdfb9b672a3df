#!/usr/bin/env python3
"""Does NExtLong data teach long context? The paper's NExtLong-vs-Standard comparison at CPU scale.

One command runs everything, each stage resumable (a finished stage is skipped on a rerun with the same
settings; the settings are recorded in ``<out>/settings.json`` and a different one refuses the directory)::

    python bench/long_range_probe.py --gpt-neox /path/to/gpt-neox --neox-python /path/to/venv/bin/python \\
        --corpus ../shared/data/openstax_textbooks.jsonl.gz --out runs/long_range_probe

1. **split**: OpenStax documents are held out by a hash of their id (``sha256(id) mod 10 == 0``); the held-out
   documents are in no tokenizer, pool, negative or training sample.
2. **tokenizer**: a byte-level BPE of ``--vocab-size`` tokens trained on the training documents (trained with
   GPT-NeoX's interpreter, so its ``tokenizers`` version reads the file).
3. **data**: ``preprocessing/make_nextlong_bin.py`` on the training documents with ``--method nextlong`` and
   ``--method standard`` (same documents, tokenizer, length, seed; both cut to the same sample count), and
   NExtLong-style evaluation samples from the held-out OpenStax documents and from Python's own documentation
   (``builtin:python-docs``, a second corpus no run trained on).
4. **train**: the same tiny Llama-style model (``configs/neox/tiny_cpu.yml`` with the overrides below) on each
   dataset with real GPT-NeoX, ``neox_plugin`` on, through ``deepy.py train.py``: same config, seeds and steps;
   only the data path differs. Checkpoints at ``--checkpoints`` evenly spaced steps.
5. **convert**: every checkpoint to HuggingFace Llama with GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py``
   (what ``launch/convert.sbatch`` runs); the last checkpoint of each run of the first seed is **verified**:
   GPT-NeoX resumes from it for one more step with the plugin's logit dump on, and the HF model's logits on the
   same tokens must equal GPT-NeoX's.
6. **eval**: on every checkpoint, the long-range gain (``nextlong.evaluation.longrange``), held-out loss and
   passkey retrieval (``nextlong.evaluation.passkey``).
7. **report**: ``results.csv``, ``results.md``, ``summary.json``, PNG plots (gain vs distance, gain and loss
   over steps, training curves).

``--quick`` shrinks everything (a few minutes) for the test suite. GPT-NeoX runs on CPU with the project's
CPU support switched on in its environment (see docs/neox_plugin.md); ``--neox-pythonpath`` prepends entries
to the runs' ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "preprocessing"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

LOG = logging.getLogger("long_range_probe")
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+).*?"
                     r"lm_loss: ([0-9.eE+-]+|nan)")
CPU_SWITCH = "NEXTLONG_NEOX_CPU"  # environment switch of the project's GPT-NeoX CPU support


class UsageError(Exception):
    """A user's mistake: one line, exit code 2."""


@dataclass
class Settings:
    """Everything that determines the experiment's results (recorded in settings.json)."""

    corpus: str  # OpenStax JSONL(.gz) with id and text
    heldout_mod: int = 10  # a document is held out when sha256(id) mod heldout_mod == 0
    max_docs: int | None = None  # read only the first max_docs corpus documents (None: all)
    vocab_size: int = 4096  # BPE vocabulary trained on the training documents
    seq_length: int = 2048  # training and evaluation sample length in tokens
    granularity: int = 512  # maximum chunk size in characters (meta-chunks of ~100 tokens with this vocabulary)
    candidates: int = 64  # FAISS candidates per meta-chunk
    methods: tuple[str, ...] = ("nextlong", "standard")  # training datasets (make_nextlong_bin.py --method)
    train_samples: int = 5000  # samples of each training dataset (both cut to the same count)
    data_seed: int = 1234  # make_nextlong_bin.py --seed of every dataset
    seeds: tuple[int, ...] = (1234, 5678)  # GPT-NeoX seeds (initialisation and data order); one run per seed and method
    num_layers: int = 2  # transformer blocks
    hidden_size: int = 128  # model width
    num_heads: int = 4  # attention heads
    train_iters: int = 60  # optimizer steps per run
    batch_size: int = 4  # sequences per step (one micro-batch)
    lr: float = 3.0e-3  # peak learning rate (cosine to lr / 10)
    warmup: float = 0.05  # warmup fraction of train_iters
    negative_loss_weight: float = 1.0  # nextlong_negative_loss_weight (paper: hard negatives stay in the loss)
    checkpoints: int = 3  # evenly spaced checkpoints per run (the last at train_iters), all evaluated
    eval_docs: int = 40  # held-out OpenStax evaluation samples for the long-range probe
    eval_docs_pydocs: int = 20  # Python-docs evaluation samples
    eval_seed: int = 7  # filler and passkey randomness
    passkey_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # needle depth as a fraction of the haystack
    passkey_trials: int = 4  # keys per depth and length
    threads: int = 1  # torch threads per GPT-NeoX run (all runs go in parallel)

    @staticmethod
    def quick(corpus: str) -> Settings:
        return Settings(corpus=corpus, max_docs=400, vocab_size=1024, seq_length=512, granularity=256, candidates=16,
                        train_samples=24, seeds=(1234,), train_iters=6, batch_size=2, checkpoints=1, eval_docs=6,
                        eval_docs_pydocs=4, passkey_depths=(0.25, 0.75), passkey_trials=2)


@dataclass
class Env:
    """Where GPT-NeoX is and how to run it (not part of the results)."""

    neox_dir: Path
    neox_python: str
    pythonpath: list[str] = field(default_factory=list)
    master_port: int = 29731


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def _done(path: Path) -> bool:
    return (path / ".done").exists()


def _mark(path: Path, info: dict | None = None) -> None:
    tmp = path / ".done.tmp"
    tmp.write_text(json.dumps(info or {}, indent=1))
    os.replace(tmp, path / ".done")


def _run(cmd: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    LOG.info("run: %s (log %s)", " ".join(cmd), log_path)
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def neox_env(env: Env, threads: int, extra: dict | None = None) -> dict[str, str]:
    """Environment of a GPT-NeoX process: this checkout first on PYTHONPATH, CPU support on, one port."""
    e = dict(os.environ)
    e["PATH"] = str(Path(env.neox_python).parent) + os.pathsep + e.get("PATH", "")  # helpers build with python3
    e[CPU_SWITCH] = "1"
    e["DS_ACCELERATOR"] = e.get("DS_ACCELERATOR", "cpu")
    e["OMP_NUM_THREADS"] = str(threads)
    e["MKL_NUM_THREADS"] = str(threads)
    e["PYTHONPATH"] = os.pathsep.join([*env.pythonpath, str(REPO), str(REPO / "preprocessing"),
                                       *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    e.pop("NEXTLONG_DEBUG_DUMP_DIR", None)
    e.update(extra or {})
    return e


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------

def split_corpus(s: Settings, out: Path) -> dict:
    """train.jsonl and heldout.jsonl by id hash."""
    d = out / "split"
    if _done(d):
        return json.loads((d / ".done").read_text())
    d.mkdir(parents=True, exist_ok=True)
    n = {"train": 0, "heldout": 0}
    opener = gzip.open if s.corpus.endswith(".gz") else open
    try:
        with opener(s.corpus, "rt", encoding="utf-8") as f, open(d / "train.jsonl.tmp", "w") as tr, \
                open(d / "heldout.jsonl.tmp", "w") as ho:
            for lineno, line in enumerate(f, 1):
                if s.max_docs is not None and lineno > s.max_docs:
                    break
                if not line.strip():
                    continue
                try:
                    doc_id = str(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise UsageError(f"{s.corpus}: line {lineno}: not a JSON object with an 'id' ({e})") from None
                held = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % s.heldout_mod == 0
                (ho if held else tr).write(line if line.endswith("\n") else line + "\n")
                n["heldout" if held else "train"] += 1
    except UsageError:
        for tmp in ("train.jsonl.tmp", "heldout.jsonl.tmp"):
            (d / tmp).unlink(missing_ok=True)
        raise
    os.replace(d / "train.jsonl.tmp", d / "train.jsonl")
    os.replace(d / "heldout.jsonl.tmp", d / "heldout.jsonl")
    _mark(d, n)
    LOG.info("split: %d training and %d held-out documents", n["train"], n["heldout"])
    return n


TOKENIZER_SCRIPT = """
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
docs = (json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8"))
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=int(sys.argv[3]), special_tokens=["<|endoftext|>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save(sys.argv[2])
"""


def train_tokenizer(s: Settings, env: Env, out: Path) -> Path:
    d = out / "tokenizer"
    tok = d / "tokenizer.json"
    if _done(d):
        return tok
    d.mkdir(parents=True, exist_ok=True)
    _run([env.neox_python, "-c", TOKENIZER_SCRIPT, str(out / "split" / "train.jsonl"), str(d / "tmp.json"),
          str(s.vocab_size)], d / "log.txt", env=neox_env(env, 1))
    os.replace(d / "tmp.json", tok)
    # a tokenizer_config.json makes the directory loadable with transformers' AutoTokenizer
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "model_max_length": s.seq_length}, indent=1))
    _mark(d)
    return tok


def make_data(s: Settings, out: Path, tok: Path) -> dict[str, str]:
    """Training and evaluation datasets; returns name -> output prefix."""
    common = ["--tokenizer", str(tok), "--target-length", str(s.seq_length), "--granularity", str(s.granularity),
              "--candidates", str(s.candidates), "--seed", str(s.data_seed), "--no-progress"]
    train = str(out / "split" / "train.jsonl")
    jobs = {m: ["--input", train, "--input-name", "openstax", "--method", m, "--max-samples", str(s.train_samples)]
            for m in s.methods}
    jobs["eval_openstax"] = ["--input", str(out / "split" / "heldout.jsonl"), "--input-name", "openstax_heldout",
                             "--method", "nextlong", "--max-samples", str(4 * s.eval_docs)]
    jobs["eval_pydocs"] = ["--input", "builtin:python-docs", "--input-name", "python_docs", "--method", "nextlong",
                           "--max-samples", str(4 * s.eval_docs_pydocs)]
    prefixes = {}
    for name, args in jobs.items():
        d = out / "data" / name
        prefixes[name] = str(d / name)
        if _done(d):
            continue
        d.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, str(REPO / "preprocessing" / "make_nextlong_bin.py"), *args, *common,
              "--output-prefix", prefixes[name]], d / "log.txt")
        _mark(d)
    counts = {m: json.loads(Path(f"{prefixes[m]}_manifest.json").read_text())["counts"]["samples_out"]
              for m in s.methods}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"training datasets differ in sample count: {counts}; lower --train-samples")
    return prefixes


def neox_config(s: Settings, seed: int, env: Env, port: int) -> dict:
    """tiny_cpu.yml with the experiment's model, schedule and loss settings."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "neox" / "tiny_cpu.yml").read_text())
    every = max(1, s.train_iters // s.checkpoints)
    cfg.update(
        num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
        # HF intermediate_size = 4 x hidden: with mlp_multiple_of equal to it GPT-NeoX's gated sizing rule lands
        # on it exactly and the converter, which copies intermediate_size, writes the right HF config
        intermediate_size=4 * s.hidden_size, mlp_multiple_of=4 * s.hidden_size, use_bias_in_mlp=False,
        attention_config=[[["global"], s.num_layers]],
        seq_length=s.seq_length, max_position_embeddings=s.seq_length,
        train_iters=s.train_iters, lr_decay_iters=s.train_iters, warmup=s.warmup, min_lr=s.lr / 10,
        train_batch_size=s.batch_size, train_micro_batch_size_per_gpu=s.batch_size, gradient_accumulation_steps=1,
        nextlong_negative_loss_weight=s.negative_loss_weight, nextlong_loss_chunk_size=0,
        eval_interval=s.train_iters, eval_iters=2, checkpoint_factor=every, log_interval=1, seed=seed,
        master_port=port,
    )
    cfg["optimizer"]["params"]["lr"] = s.lr
    return cfg


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}_seed{seed}"


def train_runs(s: Settings, env: Env, out: Path, prefixes: dict[str, str], tok: Path) -> None:
    """All runs (one per seed and method), in parallel, each with ``threads`` torch threads."""
    import yaml

    procs = []
    for si, seed in enumerate(s.seeds):
        for mi, method in enumerate(s.methods):
            d = run_dir(out, method, seed)
            if _done(d):
                continue
            if d.exists():
                shutil.rmtree(d)  # an interrupted run starts over (a few minutes at this scale)
            d.mkdir(parents=True)
            cfg = neox_config(s, seed, env, env.master_port + 10 * si + mi)
            text = f"{prefixes[method]}_text_document"
            valid = f"{prefixes['eval_openstax']}_text_document"
            cfg.update(train_data_paths=[text], valid_data_paths=[valid], test_data_paths=[valid],
                       train_data_weights=[1.0], valid_data_weights=[1.0], test_data_weights=[1.0],
                       vocab_file=str(tok), save=str(d / "checkpoints"), log_dir=str(d / "logs"))
            (d / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=True))
            log = open(d / "train.log", "w")  # noqa: SIM115 - open while the run writes to it
            cmd = [env.neox_python, "deepy.py", "train.py", str(d / "config.yml")]
            LOG.info("train %s seed %d: %s", method, seed, " ".join(cmd))
            procs.append((d, subprocess.Popen(cmd, cwd=env.neox_dir, stdout=log, stderr=subprocess.STDOUT,
                                              env=neox_env(env, s.threads)), time.time()))
    failed = []
    for d, p, t0 in procs:
        rc = p.wait()
        text = (d / "train.log").read_text(errors="replace")
        if rc != 0:
            failed.append(f"GPT-NeoX run {d.name} failed ({rc}); log {d / 'train.log'}:\n{text[-3000:]}")
            continue
        curve = parse_train_log(text)
        (d / "train_curve.json").write_text(json.dumps(curve))
        _mark(d, {"wall_seconds": round(time.time() - t0, 1)})
        LOG.info("trained %s in %.0f s, final loss %.4f", d.name, time.time() - t0, curve["loss"][-1])
    if failed:
        raise RuntimeError("\n".join(failed))


def parse_train_log(text: str) -> dict:
    last = {int(i): (float(ms), float(v)) for i, ms, v in LOSS_RE.findall(text)}  # a step logged twice: last
    rows = [(i, ms, v) for i, (ms, v) in sorted(last.items())]
    valid = re.findall(r"validation results at the end of training for val data \| lm_loss value: ([0-9.eE+-]+)",
                       text)
    return {"step": [r[0] for r in rows], "ms": [r[1] for r in rows], "loss": [r[2] for r in rows],
            "final_valid_loss": float(valid[-1]) if valid else None}


def checkpoint_steps(d: Path) -> list[int]:
    return sorted(int(p.name[len("global_step"):]) for p in (d / "checkpoints").glob("global_step*") if p.is_dir())


def convert_runs(s: Settings, env: Env, out: Path, tok: Path, parallel: int = 4) -> dict[tuple[str, int, int], Path]:
    """Every checkpoint to HF Llama with GPT-NeoX's converter (the one launch/convert.sbatch uses), ``parallel``
    conversions at a time."""
    import yaml

    models, todo = {}, []
    for seed in s.seeds:
        for method in s.methods:
            d = run_dir(out, method, seed)
            for step in checkpoint_steps(d):
                hf = d / "hf" / f"step{step}"
                models[(method, seed, step)] = hf
                if not _done(hf):
                    todo.append((d, step, hf))
    running: list[tuple[Path, Path, subprocess.Popen]] = []

    def reap(block: bool) -> None:
        for item in list(running):
            d, hf, p = item
            if block or p.poll() is not None:
                if p.wait() != 0:
                    log = (hf / "convert.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"conversion of {hf} failed; log {hf / 'convert.log'}:\n{log}")
                cfg = yaml.safe_load((d / "config.yml").read_text())
                fix_hf_config(hf, cfg, tok)
                _mark(hf, {"qkv_resplit_per_head": fix_mha_qkv(hf, cfg)})
                LOG.info("converted %s", hf)
                running.remove(item)

    for d, step, hf in todo:
        while len(running) >= parallel:
            time.sleep(1)
            reap(False)
        if hf.exists():
            shutil.rmtree(hf)
        hf.mkdir(parents=True)
        cmd = [env.neox_python, str(env.neox_dir / "tools" / "ckpts" / "convert_neox_to_hf.py"),
               "--input_dir", str(d / "checkpoints" / f"global_step{step}"), "--config_file", str(d / "config.yml"),
               "--output_dir", str(hf), "--precision", "fp32", "--architecture", "llama", "--no_save_tokenizer"]
        LOG.info("run: %s", " ".join(cmd))
        log = open(hf / "convert.log", "w")  # noqa: SIM115 - open while the converter writes to it
        # GPT-NeoX checkpoints hold numpy objects: torch >= 2.6 loads them only with weights_only=False
        # the converter picks CUDA whenever torch.cuda says it is there: keep the CPU support off for it
        e = neox_env(env, 1, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", CPU_SWITCH: "0"})
        running.append((d, hf, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=e)))
    reap(True)
    return models


def fix_mha_qkv(hf: Path, cfg: dict) -> bool:
    """Re-split the attention projections of a converted model without grouped-query attention.

    GPT-NeoX lays its fused ``query_key_value`` weight out per head (``[heads, 3, head_dim]``) when
    ``num_kv_heads`` is unset or equal to the head count, and in blocks ``[q | k | v]`` only with grouped-query
    attention; ``convert_neox_to_hf.py --architecture llama`` (commit ea7aefd8) always splits it in blocks. For
    a multi-head model this rebuilds the fused weight from the converter's q, k, v and splits it per head. The
    conversion check (GPT-NeoX's logits against the HF model's) verifies the result. Returns True when changed.
    """
    import torch
    from safetensors.torch import load_file, save_file

    heads = int(cfg["num_attention_heads"])
    if int(cfg.get("num_kv_heads") or heads) != heads:
        return False
    files = sorted(hf.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"{hf}: expected one safetensors file, found {len(files)}")
    sd = load_file(str(files[0]))
    hd = int(cfg["hidden_size"]) // heads
    for name in [k for k in sd if k.endswith("self_attn.q_proj.weight")]:
        base = name[: -len("q_proj.weight")]
        fused = torch.cat([sd[base + "q_proj.weight"], sd[base + "k_proj.weight"], sd[base + "v_proj.weight"]])
        per_head = fused.view(heads, 3, hd, -1)
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{base}{part}.weight"] = per_head[:, i].reshape(heads * hd, -1).contiguous()
    tmp = files[0].with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, files[0])
    return True


def fix_hf_config(hf: Path, cfg: dict, tok: Path) -> None:
    """Copy the tokenizer in and set what the converter cannot know (BOS/EOS ids of our tokenizer)."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok))
    eot = t.token_to_id("<|endoftext|>")
    c = json.loads((hf / "config.json").read_text())
    c.update(bos_token_id=eot, eos_token_id=eot, max_position_embeddings=cfg["seq_length"])
    (hf / "config.json").write_text(json.dumps(c, indent=1))
    shutil.copy(tok, hf / "tokenizer.json")
    shutil.copy(tok.with_name("tokenizer_config.json"), hf / "tokenizer_config.json")



# ------------------------------------------------------------------------------------------------
# verification of the conversion: GPT-NeoX's logits against the converted HF model's
# ------------------------------------------------------------------------------------------------

def verify_start(s: Settings, env: Env, out: Path) -> tuple:
    """Launch the verification runs (they need a few minutes to start; the evaluation runs meanwhile).

    Resume GPT-NeoX from each run's last checkpoint for one more step on a
    dataset of one held-out sample of exactly ``seq_length`` tokens (every packed sample is then that sample
    plus its first token), dump the logits of the first loss call (the forward pass before the update) and
    compare them with the converted HF model's logits on the same tokens."""
    import numpy as np
    import yaml
    from nextlong.indexed import IndexedDatasetWriter, read_indexed

    vd = out / "verify"
    vd.mkdir(parents=True, exist_ok=True)
    sample = np.asarray(read_indexed(f"{out}/data/eval_openstax/eval_openstax_text_document")[0], dtype=np.int64)
    assert len(sample) == s.seq_length
    prefix = vd / "vf"
    if not Path(f"{prefix}_text_document.idx").exists():
        with IndexedDatasetWriter(f"{prefix}_text_document", np.uint16) as wt, \
                IndexedDatasetWriter(f"{prefix}_lossweight_document", np.uint8) as wm:
            wt.add_document(sample)
            wm.add_document(np.ones(len(sample), np.uint8))
    results, procs = {}, []
    for si, seed in enumerate(s.seeds[:1]):  # the first seed's runs (one GPT-NeoX process per method)
        for mi, method in enumerate(s.methods):
            d = run_dir(out, method, seed)
            rd = vd / d.name
            if _done(rd):
                results[d.name] = json.loads((rd / ".done").read_text())
                continue
            if rd.exists():
                shutil.rmtree(rd)
            rd.mkdir()
            cfg = yaml.safe_load((d / "config.yml").read_text())
            text = f"{prefix}_text_document"
            # a normal resume (weights, optimizer, schedule) for one more step: DeeperSpeed's weights-only load
            # (finetune: true) calls an fp32-refresh method torch's Adam does not have
            cfg.update(load=str(d / "checkpoints"), train_iters=checkpoint_steps(d)[-1] + 1,
                       train_data_paths=[text], valid_data_paths=[text], test_data_paths=[text],
                       checkpoint_factor=1000, eval_interval=1000, eval_iters=1, log_dir=str(rd / "logs"),
                       master_port=env.master_port + 100 + 10 * si + mi)
            cfg.pop("save", None)
            (rd / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=True))
            log = open(rd / "neox.log", "w")  # noqa: SIM115 - open while the run writes to it
            e = neox_env(env, s.threads, {"NEXTLONG_DEBUG_DUMP_DIR": str(rd / "dump"),
                                          "NEXTLONG_DEBUG_DUMP_CALLS": "1"})
            procs.append((d, rd, subprocess.Popen([env.neox_python, "deepy.py", "train.py", str(rd / "config.yml")],
                                                  cwd=env.neox_dir, stdout=log, stderr=subprocess.STDOUT, env=e)))
    return results, procs, sample


def verify_finish(out: Path, started: tuple) -> dict:
    """Wait for the verification runs of :func:`verify_start` and compare the logits."""
    results, procs, sample = started
    vd = out / "verify"
    for d, rd, p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"GPT-NeoX verification run {rd.name} failed; log {rd / 'neox.log'}")
        step = checkpoint_steps(d)[-1]
        r = compare_logits(rd / "dump" / "loss_call_000.pt", d / "hf" / f"step{step}", sample)
        r["step"] = step
        LOG.info("conversion check %s step %d: max |logit diff| %.3g over %d logits, labels equal: %s", d.name,
                 step, r["max_abs_diff"], r["logits_compared"], r["labels_equal"])
        if not (r["labels_equal"] and r["max_abs_diff"] <= r["tolerance"]):
            raise RuntimeError(f"converted model {d / 'hf' / f'step{step}'} differs from GPT-NeoX: {r}")
        _mark(rd, r)
        results[d.name] = r
    (vd / "summary.json").write_text(json.dumps(results, indent=1))
    return results


def compare_logits(dump: Path, hf_dir: Path, sample, tolerance: float = 1e-3) -> dict:
    """GPT-NeoX's dumped logits of one packed sample against the HF model's on the same input tokens."""
    import numpy as np
    import torch
    from nextlong.evaluation.scoring import HFScorer, load_causal_lm

    d = torch.load(dump, weights_only=False)
    expected_labels = np.concatenate([sample[1:], sample[:1]])
    labels_equal = bool(np.array_equal(d["labels"][0].numpy(), expected_labels))
    model, _ = load_causal_lm(hf_dir, device="cpu", dtype="float32")
    hf = HFScorer(model).logits([sample])[0]
    neox = d["logits"][0].float()
    v = min(hf.shape[-1], neox.shape[-1])
    diff = (hf[:, :v] - neox[:, :v]).abs()
    return {"labels_equal": labels_equal, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logits_compared": int(diff.numel()), "neox_vocab": int(neox.shape[-1]), "hf_vocab": int(hf.shape[-1]),
            "argmax_agreement": float((hf[:, :v].argmax(-1) == neox[:, :v].argmax(-1)).float().mean()),
            "tolerance": tolerance}


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

def overlapping_heldout_ids(out: Path, min_chars: int = 200) -> set[str]:
    """Held-out documents sharing a paragraph of at least ``min_chars`` characters with a training document
    (OpenStax editions repeat text under other ids); the probes leave them out. Written to split/overlap.json."""
    f = out / "split" / "overlap.json"
    if f.exists():
        return set(json.loads(f.read_text()))
    seen = set()
    with open(out / "split" / "train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            for p in json.loads(line)["text"].split("\n\n"):
                if len(p) >= min_chars:
                    seen.add(hashlib.sha256(p.encode()).digest())
    ids = []
    with open(out / "split" / "heldout.jsonl", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            paras = d["text"].split("\n\n")
            if any(len(p) >= min_chars and hashlib.sha256(p.encode()).digest() in seen for p in paras):
                ids.append(str(d["id"]))
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(ids)))
    os.replace(tmp, f)
    LOG.info("%d held-out documents share a paragraph with the training documents: left out of the probes", len(ids))
    return set(ids)


def _eval_one(args: tuple) -> dict:
    """Probes of one converted checkpoint (runs in a worker process)."""
    hf_dir, prefixes, s_dict, threads, exclude = args
    import numpy as np
    import torch
    from nextlong.evaluation import longrange, passkey
    from nextlong.evaluation.scoring import HFScorer, load_causal_lm

    torch.set_num_threads(threads)
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in s_dict.items()})
    model, tokenizer = load_causal_lm(hf_dir, device="cpu", dtype="float32")
    scorer = HFScorer(model, max_batch_tokens=4 * s.seq_length)
    res: dict = {"model": str(hf_dir)}
    for name, n in (("openstax", s.eval_docs), ("pydocs", s.eval_docs_pydocs)):
        docs = longrange.load_probe_docs(prefixes[name], name, max_docs=n, exclude_doc_ids=exclude)
        intact: dict[str, float] = {}
        rows = longrange.score_docs(docs, scorer, seed=s.eval_seed, intact_loss=intact)
        res[name] = {"summary": longrange.summarize(rows), "rows": rows,
                     "heldout_loss": float(np.mean(list(intact.values())))}
    docs = longrange.load_probe_docs(prefixes["openstax"], "openstax", max_docs=s.eval_docs, exclude_doc_ids=exclude)
    hay = np.concatenate([d.tokens[st : st + n] for d in docs for st, n in d.metas])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>") if tokenizer is not None else None
    lengths = sorted({s.seq_length // 4, s.seq_length // 2, s.seq_length})
    prompts = passkey.build_prompts(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], hay, lengths,
                                    s.passkey_depths, s.passkey_trials, seed=s.eval_seed, bos=eot)
    prow = passkey.score_prompts(prompts, scorer.logits, batch_size=4)
    res["passkey"] = {"rows": prow, "accuracy": float(np.mean([r["exact"] for r in prow])),
                      "key_logprob": float(np.mean([r["key_logprob"] for r in prow])),
                      "grid": [{"length": k[0], "depth": k[1], **v} for k, v in passkey.grid(prow).items()]}
    return res


def evaluate(s: Settings, out: Path, tok: Path, workers: int = 3) -> None:
    """Every converted checkpoint, final checkpoints first; results in runs/<run>/eval/step<N>.json."""
    from concurrent.futures import ProcessPoolExecutor

    prefixes = {"openstax": str(out / "data" / "eval_openstax" / "eval_openstax"),
                "pydocs": str(out / "data" / "eval_pydocs" / "eval_pydocs")}
    todo = []
    for seed in s.seeds:
        for method in s.methods:
            d = run_dir(out, method, seed)
            steps = checkpoint_steps(d)
            for step in steps:
                f = d / "eval" / f"step{step}.json"
                if not f.exists():
                    todo.append((step != steps[-1], d / "hf" / f"step{step}", f))
    todo.sort(key=lambda t: t[0])  # final checkpoints first
    s_dict = asdict(s)
    exclude = overlapping_heldout_ids(out)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        futs = [(f, ex.submit(_eval_one, (str(hf), prefixes, s_dict, max(1, s.threads), exclude))) for _, hf, f in todo]
        for f, fut in futs:
            r = fut.result()
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(r))
            os.replace(tmp, f)
            LOG.info("eval %s: gain openstax %.4f pydocs %.4f, held-out loss %.3f, passkey %.2f", f,
                     r["openstax"]["summary"]["gain"], r["pydocs"]["summary"]["gain"], r["openstax"]["heldout_loss"],
                     r["passkey"]["accuracy"])



# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def _doc_means(rows: list[dict]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r in rows:
        a = acc.setdefault(r["doc"], [0.0, 0.0])
        a[0] += r["gain"] * r["tokens"]
        a[1] += r["tokens"]
    return {k: v[0] / v[1] for k, v in acc.items()}


def report(s: Settings, out: Path) -> dict:
    """results.csv (one row per run and checkpoint), results.md (per method, final checkpoints, seeds pooled),
    summary.json and the plots."""
    import csv

    import numpy as np
    from nextlong.evaluation.longrange import DEFAULT_BUCKETS, mean_ci, summarize

    evals: dict[tuple[str, int, int], dict] = {}
    curves: dict[tuple[str, int], dict] = {}
    for seed in s.seeds:
        for method in s.methods:
            d = run_dir(out, method, seed)
            if (d / "train.log").exists():
                curves[(method, seed)] = parse_train_log((d / "train.log").read_text(errors="replace"))
            for f in sorted((d / "eval").glob("step*.json")):
                evals[(method, seed, int(f.stem[4:]))] = json.loads(f.read_text())
    if not evals:
        raise RuntimeError(f"{out}: nothing evaluated yet (run the eval stage)")
    rows = []
    for (method, seed, step), r in sorted(evals.items()):
        c = curves.get((method, seed), {"step": [], "loss": []})
        near = [v for st, v in zip(c["step"], c["loss"], strict=True) if step - 10 < st <= step]
        row = {"method": method, "seed": seed, "step": step,
               "train_loss_last10": float(np.mean(near)) if near else None}
        for name in ("openstax", "pydocs"):
            sm = r[name]["summary"]
            row.update({f"{name}_heldout_loss": r[name]["heldout_loss"], f"{name}_gain": sm["gain"],
                        f"{name}_gain_ci_low": sm["gain_ci_low"], f"{name}_gain_ci_high": sm["gain_ci_high"]})
        row.update(passkey_accuracy=r["passkey"]["accuracy"], passkey_key_logprob=r["passkey"]["key_logprob"])
        rows.append(row)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # final checkpoints, seeds pooled: per evaluation document the gain averaged over seeds, CI over documents
    final = max(step for (_, _, step) in evals)
    table, pooled = [], {}
    for method in s.methods:
        runs = [evals[(method, seed, final)] for seed in s.seeds if (method, seed, final) in evals]
        if not runs:
            continue
        t = {"method": method, "seeds": len(runs), "step": final,
             "train_loss": float(np.mean([r["train_loss_last10"] for r in rows
                                          if r["method"] == method and r["step"] == final]))}
        for name in ("openstax", "pydocs"):
            per = [_doc_means(r[name]["rows"]) for r in runs]
            docs = sorted(per[0])
            g = np.array([np.mean([p[k] for p in per]) for k in docs])
            pooled[(method, name)] = dict(zip(docs, g, strict=True))
            m, lo, hi = mean_ci(g)
            t[f"{name}_heldout_loss"] = float(np.mean([r[name]["heldout_loss"] for r in runs]))
            t[f"{name}_gain"], t[f"{name}_gain_ci"] = m, [lo, hi]
            t[f"{name}_buckets"] = summarize([x for r in runs for x in r[name]["rows"]], DEFAULT_BUCKETS)["buckets"]
        t["passkey_accuracy"] = float(np.mean([r["passkey"]["accuracy"] for r in runs]))
        t["passkey_key_logprob"] = float(np.mean([r["passkey"]["key_logprob"] for r in runs]))
        table.append(t)
    # NExtLong minus Standard, paired over evaluation documents, on the seeds that have both final checkpoints
    both = [sd for sd in s.seeds if ("nextlong", sd, final) in evals and ("standard", sd, final) in evals]
    diffs = {}
    for name in ("openstax", "pydocs") if both else ():
        a = [_doc_means(evals[("nextlong", sd, final)][name]["rows"]) for sd in both]
        b = [_doc_means(evals[("standard", sd, final)][name]["rows"]) for sd in both]
        dv = np.array([np.mean([x[k] for x in a]) - np.mean([y[k] for y in b]) for k in sorted(a[0])])
        m, lo, hi = mean_ci(dv)
        diffs[name] = {"gain_difference": m, "ci": [lo, hi], "documents": len(dv), "seeds": both}
    missing = [f"{m}_seed{sd}" for sd in s.seeds for m in s.methods if (m, sd, final) not in evals]
    summary = {"settings": asdict(s), "final_step": final, "table": table, "nextlong_minus_standard": diffs,
               "runs_without_final_checkpoint": missing,
               "train_wall_seconds": {d.name: json.loads((d / ".done").read_text()).get("wall_seconds")
                                      for d in sorted((out / "runs").glob("*")) if _done(d)},
               "step_ms_median": {f"{m}_seed{sd}": float(np.median(c["ms"][1:])) if len(c["ms"]) > 1 else None
                                  for (m, sd), c in curves.items()}}
    if (out / "verify" / "summary.json").exists():
        summary["conversion_check"] = json.loads((out / "verify" / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown_table(table, diffs, missing))
    plots(s, out, evals, curves, table)
    LOG.info("report: %s", out / "results.md")
    return summary


def _ci(m: float, ci: list[float]) -> str:
    return f"{m:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def markdown_table(table: list[dict], diffs: dict, missing: list[str]) -> str:
    lines = [f"Final checkpoints (step {table[0]['step']}), training seeds pooled per row. Gain = loss of meta-chunks "
             "2..p with the earlier meta-chunks replaced minus the loss as built (nats/token), mean over evaluation "
             "documents with a 95% CI.", "",
             "| training data | seeds | train loss (last 10 steps) | held-out loss OpenStax | "
             "held-out loss Python docs | long-range gain OpenStax | long-range gain Python docs | "
             "passkey accuracy | passkey key log-prob |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['method']} | {t['seeds']} | {t['train_loss']:.3f} | {t['openstax_heldout_loss']:.3f} | "
                     f"{t['pydocs_heldout_loss']:.3f} | {_ci(t['openstax_gain'], t['openstax_gain_ci'])} | "
                     f"{_ci(t['pydocs_gain'], t['pydocs_gain_ci'])} | {t['passkey_accuracy']:.3f} | "
                     f"{t['passkey_key_logprob']:.2f} |")
    for name, dd in diffs.items():
        lines.append("")
        lines.append(f"NExtLong minus Standard, long-range gain on {name} (paired over {dd['documents']} documents, "
                     f"seeds {', '.join(map(str, dd['seeds']))}): {_ci(dd['gain_difference'], dd['ci'])}")
    if missing:
        lines += ["", f"Runs without a final checkpoint (not in the rows above): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plots(s: Settings, out: Path, evals: dict, curves: dict, table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"nextlong": "tab:blue", "standard": "tab:orange", "knn": "tab:green"}
    from nextlong.evaluation.longrange import DEFAULT_BUCKETS

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    labels = [f"{a}-{b}" if b < 1 << 29 else f">= {a}" for a, b in zip(DEFAULT_BUCKETS[:-1], DEFAULT_BUCKETS[1:],
                                                                        strict=True)]
    for ax, name in zip(axes, ("openstax", "pydocs"), strict=True):
        for k, t in enumerate(table):
            b = t[f"{name}_buckets"]
            x = np.array([DEFAULT_BUCKETS.index(q["low"]) for q in b]) + (k - (len(table) - 1) / 2) * 0.12
            y = np.array([q["gain"] for q in b])
            err = np.array([[q["gain"] - q["gain_ci_low"], q["gain_ci_high"] - q["gain"]] for q in b]).T
            ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o-", capsize=3, color=colors.get(t["method"]),
                        label=t["method"])
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("tokens back to the previous meta-chunk")
        ax.set_title(f"long-range gain, held-out {name}")
    axes[0].set_ylabel("gain (nats/token), 95% CI")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "gain_vs_distance.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (method, seed), c in sorted(curves.items()):
        st, lo = np.array(c["step"]), np.array(c["loss"])
        k = max(1, min(9, len(lo) // 5))
        sm = np.convolve(lo, np.ones(k) / k, mode="valid")
        axes[0].plot(st[k - 1 :], sm, color=colors.get(method), alpha=0.5 + 0.5 * (seed == s.seeds[0]),
                     label=f"{method} seed {seed}")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"training loss (moving mean of {k})")
    axes[0].set_title("training curves (each on its own data)")
    axes[0].legend(fontsize=7)
    for ax, name in zip(axes[1:], ("openstax", "pydocs"), strict=True):
        for method in s.methods:
            for seed in s.seeds:
                pts = sorted((st, r[name]["summary"]["gain"]) for (m, sd, st), r in evals.items()
                             if m == method and sd == seed)
                if pts:
                    ax.plot(*zip(*pts, strict=True), "o-", color=colors.get(method),
                            alpha=0.5 + 0.5 * (seed == s.seeds[0]), label=f"{method} seed {seed}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("long-range gain (nats/token)")
        ax.set_title(f"gain over training, held-out {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_and_gain_over_steps.png", dpi=110)
    plt.close(fig)


STAGES = ("split", "tokenizer", "data", "train", "convert", "verify", "eval", "report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpt-neox", required=True, type=Path, help="GPT-NeoX checkout (deepy.py, train.py, tools/)")
    p.add_argument("--neox-python", default=sys.executable,
                   help="interpreter with GPT-NeoX's dependencies and this project installed (hook active)")
    p.add_argument("--neox-pythonpath", action="append", default=[],
                   help="directory prepended to the GPT-NeoX runs' PYTHONPATH (repeatable)")
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "openstax_textbooks.jsonl.gz"),
                   help="OpenStax JSONL(.gz) with 'id' and 'text' per line")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumable)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test of a few minutes")
    p.add_argument("--train-iters", type=int, help="optimizer steps per run (default: 60, --quick: 6)")
    p.add_argument("--seeds", type=int, nargs="+", help="GPT-NeoX seeds, one run per seed and method")
    p.add_argument("--methods", nargs="+", choices=("nextlong", "standard", "knn"),
                   help="training datasets (default: nextlong standard)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: 1)")
    p.add_argument("--master-port", type=int, default=29731, help="first torch.distributed port of the runs")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def settings_from(a: argparse.Namespace) -> Settings:
    s = Settings.quick(a.corpus) if a.quick else Settings(corpus=a.corpus)
    if a.train_iters is not None:
        s.train_iters = a.train_iters
    if a.seeds:
        s.seeds = tuple(a.seeds)
    if a.methods:
        s.methods = tuple(a.methods)
    if a.threads is not None:
        s.threads = a.threads
    for name, v in (("--train-iters", s.train_iters), ("--threads", s.threads)):
        if v < 1:
            raise UsageError(f"{name}: must be >= 1, got {v}")
    if not Path(s.corpus).is_file():
        raise UsageError(f"--corpus {s.corpus}: no such file")
    return s


def check_settings(s: Settings, out: Path) -> None:
    """settings.json pins the directory to one configuration (threads aside)."""
    f = out / "settings.json"
    mine = {k: v for k, v in json.loads(json.dumps(asdict(s))).items() if k != "threads"}
    if f.exists():
        old = {k: v for k, v in json.loads(f.read_text()).items() if k != "threads"}
        diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
        if diff:
            raise UsageError(f"--out {out}: made with other settings ({', '.join(diff)}); use a new directory")
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(asdict(s), indent=1))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = settings_from(a)
        if not (a.gpt_neox / "deepy.py").is_file():
            raise UsageError(f"--gpt-neox {a.gpt_neox}: no deepy.py there (not a GPT-NeoX checkout)")
        check_settings(s, a.out)
    except UsageError as e:
        print(f"long_range_probe: error: {e}", file=sys.stderr)
        return 2
    env = Env(a.gpt_neox.resolve(), a.neox_python, [str(Path(p).resolve()) for p in a.neox_pythonpath],
              a.master_port)
    out = a.out.resolve()
    t0 = time.time()
    tok = out / "tokenizer" / "tokenizer.json"
    prefixes: dict[str, str] = {}
    verifying = None
    last = [x for x in STAGES if x in a.stages][-1]
    try:
        for stage in STAGES:
            if stage not in a.stages:
                continue
            ts = time.time()
            if stage == "split":
                split_corpus(s, out)
            elif stage == "tokenizer":
                tok = train_tokenizer(s, env, out)
            elif stage == "data":
                prefixes = make_data(s, out, tok)
            elif stage == "train":
                prefixes = prefixes or make_data(s, out, tok)
                train_runs(s, env, out, prefixes, tok)
            elif stage == "convert":
                convert_runs(s, env, out, tok)
            elif stage == "verify":  # GPT-NeoX starts slowly: the evaluation runs while it does
                verifying = verify_start(s, env, out)
            elif stage == "eval":
                evaluate(s, out, tok)
            if verifying is not None and stage in ("report", last):
                verify_finish(out, verifying)
                verifying = None
            if stage == "report":
                report(s, out)
            LOG.info("stage %s: %.1f s", stage, time.time() - ts)
    except UsageError as e:
        print(f"long_range_probe: error: {e}", file=sys.stderr)
        return 2
    LOG.info("done in %.1f s (this invocation)", time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
