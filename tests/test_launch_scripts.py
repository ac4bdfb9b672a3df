"""launch/: sbatch scripts pass bash -n and shellcheck; checkpoint layout and round-trip helpers work on CPU."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SBATCH = sorted(LAUNCH.glob("*.sbatch"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_expected_scripts_exist() -> None:
    names = {p.name for p in SBATCH}
    assert {"train.sbatch", "convert.sbatch", "synth_128k.sbatch", "synth_512k.sbatch", "synth_64k.sbatch"} <= names


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    res = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_script_conventions(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    assert not re.search(r"/(home|Users)/", text), "personal path"
    # every #SBATCH directive comes before the first command
    first_cmd = next(i for i, ln in enumerate(text.splitlines()) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH"))


def test_train_script_slurm_settings() -> None:
    text = (LAUNCH / "train.sbatch").read_text(encoding="utf-8")
    for needle in (
        "scontrol show hostnames",
        "slots=$GPUS_PER_NODE",
        "DLTS_HOSTFILE",
        "MASTER_ADDR",
        "--requeue",
        "--signal=B:USR1",
        "scontrol requeue",
        "site --resume",
        "deepy.py train.py",
        "SLURM_JOB_NUM_NODES",
    ):
        assert needle in text, needle
    site = (ROOT / "configs" / "neox" / "site_example.yml").read_text(encoding="utf-8")
    assert "launcher: slurm" in site and "deepspeed_slurm: true" in site


def _dry_run(tmp_path: Path, recipe: str, nodelist: str, nodes: int, extra: dict | None = None):
    """launch/train.sbatch --dry-run under a made-up Slurm environment (no scontrol, no GPUs, no GPT-NeoX)."""
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, "RECIPE": recipe,
        "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_ID": "4242",
        "SLURM_RESTART_COUNT": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT),
        "NEOX_DIR": "/opt/gpt-neox", "NEXTLONG_DATA": "/data/nl", "NEXTLONG_CKPT": str(tmp_path / "ckpt"),
        "NEXTLONG_LOGS": str(tmp_path / "logs"), **(extra or {}),
    }
    return subprocess.run(["bash", str(LAUNCH / "train.sbatch"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_train_dry_run_prints_hostfile_and_command(tmp_path: Path) -> None:
    proc = _dry_run(tmp_path, "128k", "gpu[007-008],gpu011", 3)
    assert proc.returncode == 0, proc.stderr
    job = tmp_path / "logs" / "runs" / "llama3_8b_nextlong_128k" / "job_4242_restart1"
    out = proc.stdout.splitlines()
    i = out.index(f"dry run: hostfile {job / 'hostfile'}")
    assert out[i + 1 : i + 4] == ["gpu007 slots=8", "gpu008 slots=8", "gpu011 slots=8"]
    assert (job / "hostfile").read_text().splitlines() == out[i + 1 : i + 4]
    assert f"DLTS_HOSTFILE={job / 'hostfile'} MASTER_ADDR=gpu007 MASTER_PORT=29500" in proc.stdout
    # one file: the recipe with the site file applied
    assert out[out.index("dry run: command") + 1] == (
        f"cd /opt/gpt-neox && {sys.executable} deepy.py train.py {job / 'llama3_128k.json'}")
    site = json.loads((job / "llama3_128k.json").read_text())
    assert site["seq_length"] == 131072 and site["num_layers"] == 32
    assert site["save"] == str(tmp_path / "ckpt" / "llama3_8b_nextlong_128k") and site["finetune"] is True
    assert "/data/nl" in json.dumps(site) and "${" not in json.dumps(site)
    assert not (job / "train.log").exists() and not (job / "plan_memory.txt").exists(), "nothing may run"


def test_train_dry_run_512k_resumes_and_rejects_bad_input(tmp_path: Path) -> None:
    save = tmp_path / "ckpt" / "llama3_8b_nextlong_512k"
    save.mkdir(parents=True)
    (save / "latest").write_text("global_step100")
    proc = _dry_run(tmp_path, "512k", "node[01-16]", 16, {"CONFIG_FORMAT": "yml"})
    assert proc.returncode == 0, proc.stderr
    job = tmp_path / "logs" / "runs" / "llama3_8b_nextlong_512k" / "job_4242_restart1"
    assert len((job / "hostfile").read_text().splitlines()) == 16
    assert f"deepy.py train.py {job / 'llama3_512k.yml'}" in proc.stdout
    import yaml

    site = yaml.safe_load((job / "llama3_512k.yml").read_text())
    assert site["load"] == str(save) and site["finetune"] is False
    bad = _dry_run(tmp_path, "256k", "node1", 1)
    assert bad.returncode == 2 and "RECIPE must be 128k or 512k, got 256k" in bad.stderr
    bad = subprocess.run(["bash", str(LAUNCH / "train.sbatch"), "--dryrun"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --dryrun" in bad.stderr


def test_slurm_hostlist_expansion() -> None:
    hosts = _load("slurm_hosts")
    assert hosts.expand("gpu[001-003,010],login1") == ["gpu001", "gpu002", "gpu003", "gpu010", "login1"]
    assert hosts.expand("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]
    for bad in ("gpu[3-1]", "gpu[1-2", "gpu[x]"):
        with pytest.raises(ValueError):
            hosts.expand(bad)


def test_convert_script_modes() -> None:
    text = (LAUNCH / "convert.sbatch").read_text(encoding="utf-8")
    assert "convert_hf_llama_to_neox.py" in text and "convert_neox_to_hf.py" in text
    assert "neox_seq_to_pipe.py" in text and "check_roundtrip.py" in text
    assert "intermediate_size=14336" in text


def test_seq_to_pipe_layout(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    conv = _load("neox_seq_to_pipe")
    src = tmp_path / "seq"
    (src / "0").mkdir(parents=True)
    (src / "latest").write_text("0")
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "tokenizer.json").write_text("{}")
    for rank in range(2):
        module = {
            "sequential.0.word_embeddings.weight": torch.full((4, 2), float(rank)),
            "sequential.2.attention.query_key_value.weight": torch.ones(3, 2) * rank,
            "sequential.2.input_layernorm.scale": torch.ones(2),
            "sequential.5.norm.scale": torch.ones(2),
            "sequential.6.final_linear.weight": torch.ones(4, 2) * rank,
        }
        torch.save(
            {"module": module, "mp_world_size": 2, "iteration": 1}, src / "0" / f"mp_rank_{rank:02d}_model_states.pt"
        )
    out = tmp_path / "pipe"
    assert conv.main(["--input", str(src), "--output", str(out), "--log-level", "WARNING"]) == 0
    assert (out / "latest").read_text() == "0"
    assert (out / "tokenizer" / "tokenizer.json").exists()
    layer2 = torch.load(out / "0" / "layer_02-model_01-model_states.pt", weights_only=False)
    assert set(layer2) == {"attention.query_key_value.weight", "input_layernorm.scale"}
    assert torch.equal(layer2["attention.query_key_value.weight"], torch.ones(3, 2))
    assert sorted(p.name for p in (out / "0").glob("layer_*-model_00-*")) == [
        "layer_00-model_00-model_states.pt",
        "layer_02-model_00-model_states.pt",
        "layer_05-model_00-model_states.pt",
        "layer_06-model_00-model_states.pt",
    ]
    meta = torch.load(out / "0" / "mp_rank_00_model_states.pt", weights_only=False)
    assert meta["module"] is None and meta["mp_world_size"] == 2
    with pytest.raises(ValueError):
        conv.split_sequential({"word_embeddings.weight": None})


def test_roundtrip_config_check() -> None:
    rt = _load("check_roundtrip")
    orig = {"intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}
    good = dict(orig, rope_theta=200000000, attention_bias=False)
    assert rt.compare_configs(orig, good, {"intermediate_size": 14336, "rope_theta": 200000000}) == []
    bad = dict(good, intermediate_size=43008)
    problems = rt.compare_configs(orig, bad, rt.parse_expect(["intermediate_size=14336"]))
    assert len(problems) == 2 and all("intermediate_size" in p for p in problems)


def test_roundtrip_logits_on_tiny_llama(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rt = _load("check_roundtrip")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    args = ["--original", str(tmp_path / "a"), "--converted", str(tmp_path / "b"), "--tokens", "1,2,3,4"]
    assert rt.main([*args, "--expect", "intermediate_size=64", "--log-level", "WARNING"]) == 0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "b")
    assert rt.main([*args, "--log-level", "CRITICAL"]) == 1
