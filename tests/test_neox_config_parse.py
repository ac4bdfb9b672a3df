"""The recipe configs, as written, through GPT-NeoX's own argument code at their real world sizes.

Skipped unless ``GPT_NEOX_DIR`` points at a GPT-NeoX checkout. The parse runs in ``NEOX_PYTHON`` (GPT-NeoX's
environment; default: this interpreter) in a fresh process, exactly as ``deepy.py`` starts: ``DLTS_HOSTFILE``
names a hostfile of 8 (128K) or 16 (512K) nodes x 8 slots, as ``launch/train.sbatch`` writes it, and
``NeoXArgs.consume_deepy_args(["train.py", config])`` then ``get_deepspeed_main_args()`` run unchanged with the
plugin's hook active. Two single files are parsed: the one-file recipe exactly as it is in the repository (the
card's ``python deepy.py train.py configs/neox/llama3_128k.yml``), and the recipe with the example site file
applied by ``launch/neox_configs.py site`` in the format the Slurm job writes it (JSON, no comments).

Stand-ins, only where this machine cannot provide what the parse reads, and only when it is absent:

* ``flash-attn``: with ``flash`` layers, ``NeoXArgs`` asks ``importlib.metadata.version("flash-attn")``. It needs
  CUDA to install, so on CPU a distribution record ``flash_attn-2.5.6.dist-info`` (GPT-NeoX's pin in
  requirements-flashattention.txt; no code) is put on ``sys.path``. The attention layers stay ``flash`` and
  ``nextlong_compact_attention_mask`` stays on.
* ``pkg_resources``: GPT-NeoX imports ``from pkg_resources import packaging``; setuptools >= 81 no longer has
  it. Where it is missing, a module ``pkg_resources`` whose ``packaging`` is the real ``packaging`` package
  (what setuptools vendored there) stands in, so the test does not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "neox"
NEOX_DIR = os.environ.get("GPT_NEOX_DIR")
NEOX_PYTHON = os.environ.get("NEOX_PYTHON", sys.executable)
pytestmark = [
    pytest.mark.neox,
    pytest.mark.skipif(not NEOX_DIR, reason="GPT_NEOX_DIR is not set (path to a GPT-NeoX checkout)"),
]

#: recipe -> (site file, nodes x 8 GPUs: paper Tables 9 and 10)
RECIPES = {"128k": ("site_example", 8), "512k": ("site_example_512k", 16)}
GPUS_PER_NODE = 8
FLASH_ATTN_PIN = "2.5.6"

PARSE_SCRIPT = r"""
import importlib.util, json, sys, types
stand_ins = []
if importlib.util.find_spec("pkg_resources") is None:
    import packaging, packaging.version
    mod = types.ModuleType("pkg_resources")
    mod.packaging = packaging
    sys.modules["pkg_resources"] = mod
    stand_ins.append("pkg_resources")
from importlib.metadata import PackageNotFoundError, version
try:
    flash = version("flash-attn")
except PackageNotFoundError:
    sys.path.append(sys.argv[1])
    flash = version("flash-attn")
    stand_ins.append("flash-attn dist-info")
from megatron.neox_arguments import NeoXArgs
keys = ["global_num_gpus", "model_parallel_size", "pipe_parallel_size", "train_batch_size",
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "seq_length", "attention_config",
        "nextlong_lossweight", "nextlong_compact_attention_mask", "nextlong_loss_chunk_size", "rotary_emb_base",
        "hostfile", "launcher", "precision", "num_layers"]
result = {}
for fmt, files in json.loads(sys.argv[2]).items():
    args = NeoXArgs.consume_deepy_args(["train.py"] + files)
    ds_args = args.get_deepspeed_main_args()
    out = {k: getattr(args, k) for k in keys}
    out["data_parallel"] = args.global_num_gpus // (args.model_parallel_size * max(args.pipe_parallel_size, 1))
    out["flash_attn"] = flash
    out["stand_ins"] = stand_ins
    out["deepspeed_main_args"] = [a for a in ds_args if len(a) < 300]
    result[fmt] = out
print("PARSED " + json.dumps(result, default=str))
"""


def _load_neox_configs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("neox_configs", ROOT / "launch" / "neox_configs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse(tmp_path: Path, recipe: str) -> tuple[dict, dict]:
    """Parse the recipe in both formats in one GPT-NeoX process; returns (results, files) keyed by format."""
    nc = _load_neox_configs()
    site_name, nodes = RECIPES[recipe]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i:03d} slots={GPUS_PER_NODE}\n" for i in range(nodes)))
    env_vars = {"NEXTLONG_DATA": str(tmp_path / "data"), "NEXTLONG_CKPT": str(tmp_path / "ckpt"),
                "NEXTLONG_LOGS": str(tmp_path / "logs")}
    site = nc.render_site(nc.read_config(CONFIGS / f"{site_name}.yml"), env_vars, resume=False)
    job_config = tmp_path / f"llama3_{recipe}.json"
    nc.write_config(nc.apply_site(nc.read_config(CONFIGS / f"llama3_{recipe}.yml"), site), job_config)
    files = {"yml": [str(CONFIGS / f"llama3_{recipe}.yml")], "json": [str(job_config)]}
    dist = tmp_path / "stand_in" / f"flash_attn-{FLASH_ATTN_PIN}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flash-attn\nVersion: {FLASH_ATTN_PIN}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "preprocessing"), NEOX_DIR] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # deepy.py's process in launch/train.sbatch: the batch step of an allocation of `nodes` x 8 tasks
    env.update(DLTS_HOSTFILE=str(hostfile), MASTER_ADDR="node000", SLURM_LOCALID="0", SLURM_PROCID="0",
               SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(GPUS_PER_NODE),
               SLURM_NTASKS=str(nodes * GPUS_PER_NODE), SLURM_JOB_NODELIST=f"node[000-{nodes - 1:03d}]")
    for k in ("NEXTLONG_NEOX_CPU", "NEXTLONG_NEOX_PLUGIN"):
        env.pop(k, None)
    check = subprocess.run([NEOX_PYTHON, "-c", "import deepspeed"], capture_output=True, text=True, env=env)
    if check.returncode != 0:
        pytest.skip(f"{NEOX_PYTHON} has no DeepSpeed (set NEOX_PYTHON to GPT-NeoX's environment)")
    proc = subprocess.run([NEOX_PYTHON, "-c", PARSE_SCRIPT, str(dist.parent), json.dumps(files)],
                          capture_output=True, text=True, env=env, cwd=NEOX_DIR, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PARSED ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:] + proc.stderr[-4000:])
    return json.loads(lines[-1][len("PARSED "):]), files


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_parses_as_written_at_real_world_size(recipe: str, tmp_path: Path, capsys) -> None:
    nc = _load_neox_configs()
    originals = sorted(CONFIGS.glob("*.yml")) + sorted((CONFIGS / "json").glob("*.json"))
    before = {p: p.read_bytes() for p in originals}
    results, files = _parse(tmp_path, recipe)
    assert {p: p.read_bytes() for p in originals} == before, "the configs must not change"
    assert set(results) == {"yml", "json"}
    for fmt, out in results.items():
        _check(recipe, fmt, out, nc.merge_configs(files[fmt]), capsys)


def _check(recipe: str, fmt: str, out: dict, written: dict, capsys) -> None:
    gpus = RECIPES[recipe][1] * GPUS_PER_NODE
    summary = {k: out[k] for k in ("global_num_gpus", "model_parallel_size", "pipe_parallel_size", "data_parallel",
                                   "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                   "seq_length", "nextlong_compact_attention_mask", "flash_attn", "stand_ins")}
    with capsys.disabled():
        print(f"\n[neox config parse] {recipe} ({fmt}): {json.dumps(summary)}")
    assert out["global_num_gpus"] == gpus  # from the hostfile, as deepy.py resolves it
    assert "--hostfile" in out["deepspeed_main_args"], out["deepspeed_main_args"]
    tp, pp = written["model_parallel_size"], written["pipe_parallel_size"]
    assert (out["model_parallel_size"], out["pipe_parallel_size"]) == (tp, pp)
    assert out["data_parallel"] == gpus // (tp * max(pp, 1))
    assert out["train_batch_size"] == (out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"]
                                       * out["data_parallel"])
    assert out["train_batch_size"] * out["seq_length"] == 4_194_304  # 4M tokens per step (Tables 9 and 10)
    # flash attention and the compact mask as written
    assert written["attention_config"] == [[["flash"], out["num_layers"]]]
    assert out["attention_config"] == ["flash"] * out["num_layers"]
    assert out["nextlong_compact_attention_mask"] is True is written["nextlong_compact_attention_mask"]
    assert out["nextlong_lossweight"] is True
    # the site file (json: the job's file) chooses the Slurm launcher; the recipe alone keeps GPT-NeoX's default
    for key in ("seq_length", "rotary_emb_base", "nextlong_loss_chunk_size", "precision") + (
            ("launcher",) if fmt == "json" else ()):
        assert out[key] == written[key], key
    assert set(out["stand_ins"]) <= {"pkg_resources", "flash-attn dist-info"}
