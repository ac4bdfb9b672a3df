"""launch/synth_{128k,512k,64k}.sbatch: every command they run, parsed by make_nextlong_bin.py's own parser.

The scripts are run by bash with ``PYTHON`` pointing at a recorder that writes its arguments instead of
synthesizing; each recorded command goes through ``build_parser`` and ``config_from_args`` (so its
``SynthesisConfig`` validates) and its values are checked against the paper and the training configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from nextlong.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"128k": 131072, "512k": 524288, "64k": 65536}
#: chunks in FineWeb-Edu 10BT + Cosmopedia v2 at s = 2048 (~38B tokens, ~450 tokens per chunk): what the IVF
#: index is sized for (launch/synth_common.sh)
POOL_CHUNKS = 85_000_000


def _record(tmp: Path, script: str, data: Path, extra_env: dict | None = None) -> list[list[str]]:
    rec = tmp / f"{script}.jsonl"
    rec.unlink(missing_ok=True)
    fake = tmp / "record_python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "with open(os.environ['RECORD'], 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHON": str(fake), "RECORD": str(rec),
           "REPO_DIR": str(ROOT), "NEXTLONG_DATA": str(data), "FINEWEB_EDU": "/corpora/fineweb-edu/*.parquet",
           "COSMOPEDIA_V2": "/corpora/cosmopedia-v2/*.parquet", "TOKENIZER": "/models/Meta-Llama-3-8B",
           "EMBEDDER": "/models/jina-embeddings-v3", **(extra_env or {})}
    res = subprocess.run(["bash", str(ROOT / "launch" / f"synth_{script}.sbatch")], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return [json.loads(x) for x in rec.read_text().splitlines()] if rec.exists() else []


def _parse(argv: list[str]):
    assert argv[0] == "preprocessing/make_nextlong_bin.py"
    args = build_parser().parse_args(argv[1:])
    return args, config_from_args(args)


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "neox" / f"llama3_{name}.yml").read_text())


def _needed(recipe: dict, target: int, weight_index: int) -> tuple[int, int]:
    """(training samples, validation samples) GPT-NeoX draws from a dataset of ``target``-token samples."""
    w = recipe.get("train_data_weights") or [1.0]
    share = w[weight_index] / sum(w)
    per_seq = recipe["seq_length"] // target  # samples packed into one sequence
    seqs = math.ceil(recipe["train_iters"] * recipe["train_batch_size"] * share * 1.005)
    evals = (recipe["train_iters"] // recipe["eval_interval"] + 1) * recipe["eval_iters"] * recipe["train_batch_size"]
    return seqs * per_seq, math.ceil(evals * 1.005) * per_seq


@pytest.mark.parametrize("name", list(DATASETS))
def test_synth_script_runs_the_recipe(tmp_path, name):
    data = tmp_path / "data"
    cmds = _record(tmp_path, name, data)
    assert len(cmds) == 3
    parsed = [_parse(c) for c in cmds]
    cfgs = [c for _, c in parsed]
    assert [c.split for c in cfgs] == ["valid", "test", "train"]
    out = str(data / f"nextlong_{name}")
    assert [c.output_prefix for c in cfgs] == [f"{out}_valid", f"{out}_test", out]
    assert len({c.work_dir for c in cfgs}) == 1  # one pool for the three splits
    for args, c in parsed:
        assert c.target_length == DATASETS[name]
        assert Path(c.embedder).name == "jina-embeddings-v3" and c.trust_remote_code
        assert c.inputs == ["/corpora/fineweb-edu/*.parquet", "/corpora/cosmopedia-v2/*.parquet"]
        assert c.input_names == ["fineweb-edu", "cosmopedia-v2"] and c.mix == [1.0, 1.0]
        assert c.tokenizer == "/models/Meta-Llama-3-8B" and c.granularity == 2048 and c.candidates == 512
        assert c.method == "nextlong" and c.negative_selection == "topk" and c.negative_allocation == "even"
        assert c.budget == "exact" and c.max_candidates >= 2048 // 2
        assert 0 < c.valid_fraction < 0.05 and 0 < c.test_fraction < 0.05
        # IVF sized for the pool: 4-16 sqrt(N) lists, >= 39 training vectors per list (FAISS's minimum)
        assert c.index_factory.startswith("IVF")
        nlist = int(c.index_factory[3:].split(",")[0])
        assert 4 * math.sqrt(POOL_CHUNKS) <= nlist <= 16 * math.sqrt(POOL_CHUNKS)
        assert c.index_train_size >= 39 * nlist and 1 <= c.nprobe <= nlist
        assert args.executor == "local" and not args.dry_run
    # --max-samples from the paper's token budget, as GPT-NeoX draws it from the recipe's config
    recipe = _recipe("128k" if name == "128k" else "512k")
    train, valid = _needed(recipe, DATASETS[name], {"128k": 0, "512k": 0, "64k": 1}[name])
    assert train < cfgs[2].max_samples <= train + 2 * recipe["seq_length"] // DATASETS[name]
    if name != "64k":  # the recipe's validation and test sets
        assert cfgs[0].max_samples >= valid and cfgs[1].max_samples >= valid


def test_synth_scripts_share_one_pool_and_skip_finished_splits(tmp_path):
    data = tmp_path / "data"
    works = {_parse(c)[1].work_dir for name in DATASETS for c in _record(tmp_path, name, data)}
    assert len(works) == 1  # 128K, 512K and 64K embed and index the corpus once
    data.mkdir(exist_ok=True)
    (data / "nextlong_128k_valid_manifest.json").write_text("{}")
    assert [_parse(c)[1].split for c in _record(tmp_path, "128k", data)] == ["test", "train"]
    assert [_parse(c)[1].split for c in _record(tmp_path, "128k", data, {"FORCE": "1"})] == ["valid", "test", "train"]


def test_old_single_script_is_gone():
    assert not (ROOT / "launch" / "synth.sbatch").exists()
    assert "synth.sbatch" not in (ROOT / "docs" / "recipe.md").read_text()
