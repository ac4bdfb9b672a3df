"""Real GPT-NeoX on CPU: ``nextlong_document_attention`` keeps attention inside each packed document.

Skipped unless ``GPT_NEOX_DIR`` points at a GPT-NeoX checkout (environment as in
tests/test_neox_integration.py: ``NEOX_PYTHON``; CPU support from ``neox_plugin.cpu``).

Two documents A and B of 64 tokens each, both containing the tokenizer's end-of-text id in their
middle, are written as separate sequences of a ``.bin/.idx`` pair. With ``pack_impl: packed`` and
``seq_length: 128`` every GPT-NeoX row is two whole documents (A or B, in GPT-NeoX's shuffled
order) plus the first token of a third. The tiny model (2 ``global`` layers, RoPE) is run twice
from the same seed, with the key on and off, without a pipeline and with one
(``pipe_parallel_size: 1``, DeepSpeed's PipelineModule), and the logits of the first loss call
(4 rows, before any update) are dumped (``NEXTLONG_DEBUG_DUMP_DIR``). In every row, the first
document is that document alone (causal attention: nothing precedes it), so stock GPT-NeoX's first
halves are the reference:

* key on: the per-token losses of the first and of the second document of each row equal those of
  that document alone within float tolerance, and the two cross-document predictions (first
  document -> second, second -> the third's first token) have weight 0;
* key off (stock attention): the first documents are the same (causal), the second ones differ;
* GPT-NeoX's own ``GPT2Dataset`` gives per-token document ids that change exactly at sequence
  boundaries, not at the end-of-text ids inside the documents, in all three ``pack_impl`` modes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NEOX_DIR = os.environ.get("GPT_NEOX_DIR")
pytestmark = [
    pytest.mark.neox,
    pytest.mark.skipif(not NEOX_DIR, reason="GPT_NEOX_DIR is not set (path to a GPT-NeoX checkout)"),
]

NEOX_PYTHON = os.environ.get("NEOX_PYTHON", sys.executable)
RUN_TIMEOUT = int(os.environ.get("NEOX_RUN_TIMEOUT", "1800"))
SEQ = 128
DOC = 64
EOD = 0  # id of <|endoftext|> in the tokenizer below
#: per-token loss tolerance: RoPE angles of B differ (positions 64.. vs 0..), everything else is the same fp32 math
ATOL = 2e-5

TOKENIZER_SCRIPT = """
import sys
from tokenizers import Tokenizer, models, pre_tokenizers
vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, 1000)}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.save(sys.argv[1])
"""


def _env(dump_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(NEOX_PYTHON).parent) + os.pathsep + env.get("PATH", "")
    env["NEXTLONG_NEOX_CPU"] = "1"  # neox_plugin.cpu, switched on by the .pth hook in every process
    paths = [str(REPO), str(REPO / "preprocessing")]  # this checkout's neox_plugin, not an installed copy
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NEXTLONG_DEBUG_DUMP_DIR", None)
    if dump_dir is not None:
        env["NEXTLONG_DEBUG_DUMP_DIR"] = str(dump_dir)
        env["NEXTLONG_DEBUG_DUMP_CALLS"] = "1"  # the first training micro-batch, before any update
    return env


def _docs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    a, b = rng.integers(1, 1000, size=DOC), rng.integers(1, 1000, size=DOC)
    a[20], b[30] = EOD, EOD  # an end-of-text id inside each document must not split it
    return a, b


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    from nextlong.indexed import IndexedDatasetWriter

    root = tmp_path_factory.mktemp("docattn")
    tok = root / "tokenizer.json"
    subprocess.run([NEOX_PYTHON, "-c", TOKENIZER_SCRIPT, str(tok)], check=True, env=_env())
    a, b = _docs()
    out = {"root": root, "tok": tok, "a": a, "b": b}
    for name, order in (("ab", (a, b)),):
        text, mask = root / f"{name}_text_document", root / f"{name}_lossweight_document"
        with IndexedDatasetWriter(str(text), np.uint16) as wt, IndexedDatasetWriter(str(mask), np.uint8) as wm:
            for _ in range(10):
                for d in order:
                    wt.add_document(d)
                    wm.add_document(np.ones(DOC, dtype=np.uint8))
        out[name] = str(text)
    return out


def _free_port() -> int:
    with socket.socket() as sock:  # other GPT-NeoX runs on this machine may hold the default port 29500
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(w: dict, name: str, data: str = "ab", **changes) -> dict:
    import torch
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "neox" / "tiny_cpu.yml").read_text())
    cfg.update({"train_iters": 1, "lr_decay_iters": 1, "eval_interval": 1000, "eval_iters": 1,
                "nextlong_negative_loss_weight": 1.0, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 1, "master_port": _free_port()})
    cfg.update(changes)
    run = w["root"] / name
    run.mkdir()
    text = w[data]
    cfg.update({"train_data_paths": [text], "valid_data_paths": [text], "test_data_paths": [text],
                "vocab_file": str(w["tok"]), "save": str(run / "checkpoints"), "log_dir": str(run / "logs")})
    (run / "cfg.yml").write_text(yaml.safe_dump(cfg))
    dump = run / "dump"
    proc = subprocess.run([NEOX_PYTHON, "deepy.py", "train.py", str(run / "cfg.yml")], cwd=NEOX_DIR,
                          env=_env(dump), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    (run / "run.log").write_text(log)
    assert proc.returncode == 0, f"GPT-NeoX run {name} failed (log {run / 'run.log'}):\n{log[-4000:]}"
    calls = [torch.load(p) for p in sorted(dump.glob("loss_call_*.pt"))]
    assert calls, f"no loss dumped by run {name}"
    logits = torch.cat([c["logits"] for c in calls])
    labels = torch.cat([c["labels"] for c in calls]).long()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           reduction="none").view(labels.shape)
    return {"labels": labels.numpy(), "loss": ce.double().numpy(),
            "weights": torch.cat([c["weights"] for c in calls]).numpy(), "log": log}


def _which(labels: np.ndarray, docs: dict) -> str:
    """Name of the document whose tokens 1..63 are ``labels``."""
    for name, d in docs.items():
        if np.array_equal(labels, d[1:]):
            return name
    raise AssertionError(f"labels {labels[:8]}... are not the tokens of a document")


@pytest.mark.parametrize("pipe", [0, 1])
def test_packed_document_losses_equal_each_document_alone(work: dict, pipe: int, capsys) -> None:
    """pipe 0: GPT-NeoX's sequential model (get_batch_sequential); pipe 1: DeepSpeed's PipelineModule
    (get_batch_pipe, the mask carried as the last activation), the path of the 512K recipe."""
    docs = {"A": work["a"], "B": work["b"]}
    on = _run(work, f"packed_on_pipe{pipe}", nextlong_document_attention=True, pipe_parallel_size=pipe)
    off = _run(work, f"packed_off_pipe{pipe}", pipe_parallel_size=pipe)
    assert "nextlong_document_attention on" in on["log"] and "nextlong_document_attention on" not in off["log"]
    np.testing.assert_array_equal(on["labels"], off["labels"])  # same seed, same rows
    n = DOC - 1  # predictions inside one document
    rows = []
    for r, lab in enumerate(off["labels"]):
        rows.append((r, _which(lab[:n], docs), _which(lab[DOC : DOC + n], docs)))
    # the reference: each document alone = the first document of a stock row
    alone = {}
    for r, first, _ in rows:
        alone.setdefault(first, off["loss"][r, :n])
    assert set(alone) == {"A", "B"}, "the dumped rows must start with both documents"
    for r, first, _ in rows:  # every first half of the stock run is the same document alone
        np.testing.assert_allclose(off["loss"][r, :n], alone[first], rtol=0, atol=1e-6)
    diff_on_first = max(float(np.abs(on["loss"][r, :n] - alone[f]).max()) for r, f, _ in rows)
    diff_on_second = max(float(np.abs(on["loss"][r, DOC : DOC + n] - alone[s]).max()) for r, _, s in rows)
    diff_off_second = min(float(np.abs(off["loss"][r, DOC : DOC + n] - alone[s]).max()) for r, _, s in rows)
    w_on, w_off = on["weights"], off["weights"]
    figures = {
        "pipe_parallel_size": pipe,
        "rows (first, second document)": [f"{f}{s}" for _, f, s in rows],
        "max |first doc, key on - alone|": diff_on_first,
        "max |second doc, key on - alone|": diff_on_second,
        "min over rows of max |second doc, key off - alone|": diff_off_second,
        "mean loss of second docs: alone / key on / key off": [
            float(np.mean([alone[s].mean() for _, _, s in rows])),
            float(np.mean([on["loss"][r, DOC : DOC + n].mean() for r, _, _ in rows])),
            float(np.mean([off["loss"][r, DOC : DOC + n].mean() for r, _, _ in rows]))],
        "weights at the two cross-document predictions, key on": sorted(
            {float(w_on[r, DOC - 1]) for r, _, _ in rows} | {float(w_on[r, SEQ - 1]) for r, _, _ in rows}),
        "non-zero weights per row, key on / off": [int(np.count_nonzero(w_on[0])), int(np.count_nonzero(w_off[0]))],
    }
    (work["root"] / f"summary_pipe{pipe}.json").write_text(json.dumps(figures, indent=1))
    with capsys.disabled():
        print(f"\n[neox document attention] {json.dumps(figures)}")
    for r, first, second in rows:
        np.testing.assert_allclose(on["loss"][r, :n], alone[first], rtol=0, atol=ATOL, err_msg=f"row {r} first")
        np.testing.assert_allclose(on["loss"][r, DOC : DOC + n], alone[second], rtol=0, atol=ATOL,
                                   err_msg=f"row {r} second")
        assert w_on[r, DOC - 1] == 0 and w_on[r, SEQ - 1] == 0, "cross-document predictions must not be trained"
        assert np.count_nonzero(w_on[r]) == SEQ - 2 and np.count_nonzero(w_off[r]) == SEQ
    assert diff_off_second > 100 * ATOL, "without the key the second document attends to the first"


def test_refused_with_a_layer_type_it_cannot_mask(work: dict) -> None:
    """A sparse layer type stops the run at argument validation, naming the key and the layer."""
    run = work["root"] / "refused"
    run.mkdir()
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "neox" / "tiny_cpu.yml").read_text())
    cfg.update({"nextlong_document_attention": True, "pos_emb": "learned", "master_port": _free_port(),
                "train_data_paths": [work["ab"]], "valid_data_paths": [work["ab"]],
                "test_data_paths": [work["ab"]], "vocab_file": str(work["tok"]),
                "save": str(run / "checkpoints"), "log_dir": str(run / "logs")})
    (run / "cfg.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([NEOX_PYTHON, "deepy.py", "train.py", str(run / "cfg.yml")], cwd=NEOX_DIR, env=_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "nextlong_document_attention is true but cannot be honoured: pos_emb: learned" in log, log[-3000:]


DATASET_SCRIPT = r'''
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])  # tests/ (index-map builders of test_plugin_data)
from test_plugin_data import packed_index, overflow_index, unpacked_index
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import make_dataset
from neox_plugin import neox
from neox_plugin.document_attention import DOC_BATCH_KEY

neox.set_config({"nextlong_document_attention": True, "attention_config": ["global"], "num_layers": 1,
                 "pos_emb": "rotary"})
text = make_dataset(sys.argv[2], "mmap", True)
sizes = text.sizes.astype(np.int64)
seq, eod = 64, 5
out = {"patched": "megatron.data.gpt2_dataset" in neox.STATE.applied}
for mode in ("packed", "pack_until_overflow", "unpacked"):
    rng = np.random.default_rng(3)
    if mode == "packed":
        maps = packed_index(sizes, seq, rng)
    elif mode == "pack_until_overflow":
        maps = overflow_index(sizes, seq, rng, 12)
    else:
        maps = unpacked_index(sizes, rng, 12)
    ds = GPT2Dataset("train_0", sys.argv[2], np.arange(len(sizes), dtype=np.int32), text, None, None, seq, 1234,
                     pack_impl=mode, build_index_mappings=False)
    ds.doc_idx, ds.sample_idx, ds.shuffle_idx = maps
    ds.shuffle_idx_len, ds.sample_idx_len = len(maps[2]) - 1, len(maps[1]) - 1
    bad = eod_inside = docs = 0
    for i in range(len(ds)):
        s = ds[i]
        t, d = s["text"], s[DOC_BATCH_KEY]
        real = d > 0
        # tokens count 1, 2, 3, ... inside every document, so a piece starts where t != previous + 1
        expect_new = np.ones(len(t), dtype=bool)
        expect_new[1:] = t[1:] != t[:-1] + 1
        got_new = np.ones(len(t), dtype=bool)
        got_new[1:] = d[1:] != d[:-1]
        bad += int((expect_new[real] != got_new[real]).sum()) + int((t[~real] != 0).sum())
        bad += int(d.dtype != np.int64) + int(d.shape != t.shape)
        eod_inside += int(((t == eod) & ~got_new & real).sum())
        docs += int(len(np.unique(d[real])))
    out[mode] = {"samples": len(ds), "mismatches": bad, "eod_inside_documents": eod_inside, "pieces": docs}
print(json.dumps(out))
'''


def test_document_ids_from_neox_gpt2dataset_all_pack_modes(tmp_path: Path, capsys) -> None:
    """GPT-NeoX's own GPT2Dataset (patched by the hook) gives document ids that change exactly at the
    sequence boundaries, also where the end-of-text id (5 here) occurs inside a document."""
    from nextlong.indexed import IndexedDatasetWriter

    text = str(tmp_path / "cnt_text_document")
    with IndexedDatasetWriter(text, np.uint16) as wt:
        for n in [40, 7, 130, 1, 64, 300, 9, 55]:
            wt.add_document(np.arange(1, n + 1))
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], NEOX_DIR])
    proc = subprocess.run([NEOX_PYTHON, "-c", DATASET_SCRIPT, str(REPO / "tests"), text], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\n[neox document attention] document ids from GPT-NeoX's GPT2Dataset: {json.dumps(out)}")
    assert out.pop("patched") is True
    for mode, r in out.items():
        assert r["samples"] > 0 and r["mismatches"] == 0, (mode, r)
        assert r["eod_inside_documents"] > 0, (mode, r)
