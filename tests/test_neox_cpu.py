"""neox_plugin's CPU support (NEXTLONG_NEOX_CPU=1), the package's import graph, and the GPT-NeoX set-up scripts.

Fast and without GPT-NeoX; the real GPT-NeoX runs on CPU are in test_neox_integration.py / test_neox_parallel.py.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CPU_PROBE = r"""
import json, os, sys
import neox_plugin._hook as h
installed = h.install()
before = "torch" in sys.modules
import torch
out = {"installed": installed, "torch_imported_by_install": before, "ds_accelerator": os.environ.get("DS_ACCELERATOR")}
out["available"] = torch.cuda.is_available()
if out["available"]:
    out["device"] = torch.cuda.current_device()
    out["count"] = torch.cuda.device_count()
    t = torch.ones(3)
    out["tensor_cuda_is_same"] = t.cuda() is t
    m = torch.nn.Linear(2, 2)
    out["module_cuda_is_same"] = m.cuda() is m
    out["alloc_on_device"] = str(torch.empty(2, device=torch.cuda.current_device()).device)
    out["long_tensor"] = str(torch.cuda.LongTensor([1, 2]).device)
    torch.cuda.manual_seed(7); a = torch.rand(4)
    torch.manual_seed(7); b = torch.rand(4)
    state = torch.cuda.get_rng_state(); c = torch.rand(4)
    torch.cuda.set_rng_state(state); d = torch.rand(4)
    out["rng"] = bool(torch.equal(a, b) and torch.equal(c, d))
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record(); ev1.record(); torch.cuda.synchronize()
    out["event_ms"] = ev0.elapsed_time(ev1) >= 0
    out["memory"] = torch.cuda.memory_allocated() + torch.cuda.max_memory_reserved()
    with torch.cuda.nvtx.range("x"):
        torch.cuda.nvtx.range_push("y"); torch.cuda.nvtx.range_pop()
    import torch._dynamo  # builds a rule map keyed by torch.cuda's functions: each patch is its own object
    out["dynamo"] = True
print("PROBE " + json.dumps(out))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NEXTLONG_NEOX_CPU", "DS_ACCELERATOR", "LOCAL_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "preprocessing")])
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", CPU_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))[6:])


def test_cpu_support_patches_torch_on_import() -> None:
    out = _probe({"NEXTLONG_NEOX_CPU": "1", "LOCAL_SIZE": "2"})
    assert out == {
        "installed": True, "torch_imported_by_install": False, "ds_accelerator": "cpu", "available": True,
        "device": "cpu", "count": 2, "tensor_cuda_is_same": True, "module_cuda_is_same": True,
        "alloc_on_device": "cpu", "long_tensor": "cpu", "rng": True, "event_ms": True, "memory": 0, "dynamo": True,
    }


def test_cpu_support_off_by_default() -> None:
    out = _probe({})
    assert out["installed"] is True and out["ds_accelerator"] is None
    assert out["available"] is False  # this machine has no GPU and nothing was patched
    out = _probe({"NEXTLONG_NEOX_CPU": "0", "NEXTLONG_NEOX_PLUGIN": "0"})
    assert out["installed"] is False and out["available"] is False


def test_cpu_support_when_torch_is_already_imported() -> None:
    code = ("import torch, neox_plugin.cpu as c; assert not torch.cuda.is_available(); assert c.install(); "
            "assert c.patched() and torch.cuda.is_available() and torch.cuda.device_count() == 1")
    env = dict(os.environ, NEXTLONG_NEOX_CPU="1", PYTHONPATH=str(REPO))
    env.pop("LOCAL_SIZE", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_fp32_refresh_is_added_only_to_an_optimizer_of_the_module_params() -> None:
    import torch

    from neox_plugin.cpu import add_fp32_refresh

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    plain = torch.optim.Adam(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    assert add_fp32_refresh(plain, model) and not add_fp32_refresh(plain, model)  # added once
    plain.refresh_fp32_params()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not hasattr(torch.optim.Adam(model.parameters()), "refresh_fp32_params")  # the instance, not the class
    # An optimizer over master copies (what mixed precision keeps) needs a real refresh: left alone.
    master = torch.optim.Adam([p.detach().clone().requires_grad_() for p in model.parameters()])
    assert not add_fp32_refresh(master, model) and not hasattr(master, "refresh_fp32_params")

    class Wrapper:  # DeepSpeed's fp16/bf16/ZeRO wrappers bring their own method: never replaced
        param_groups = plain.param_groups

        def refresh_fp32_params(self) -> str:
            return "own"

    w = Wrapper()
    assert not add_fp32_refresh(w, model) and w.refresh_fp32_params() == "own"
    assert not add_fp32_refresh(None, model)


ENGINE_STANDIN = """
import torch

class DeepSpeedEngine:  # the calls of deepspeed/runtime/engine.py's _load_checkpoint that matter here
    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def _load_checkpoint(self, state, load_module_only=False):
        self.module.load_state_dict(state)
        if load_module_only and self.optimizer is not None:
            self.optimizer.refresh_fp32_params()
        return "loaded"
"""

ENGINE_PROBE = """
import torch, neox_plugin._hook as h
h.install()
from deepspeed.runtime.engine import DeepSpeedEngine
m = torch.nn.Linear(2, 2)
e = DeepSpeedEngine(m, torch.optim.Adam(m.parameters()))
state = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
try:
    print("RESULT", e._load_checkpoint(state, load_module_only=True), float(m.weight.abs().sum()))
except AttributeError as err:
    print("RESULT", err)
"""


@pytest.mark.parametrize("cpu", ["1", "0"])
def test_hook_patches_deepspeed_engine_only_for_cpu_runs(tmp_path: Path, cpu: str) -> None:
    pkg = tmp_path / "deepspeed" / "runtime"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "deepspeed", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "engine.py").write_text(ENGINE_STANDIN)
    env = {k: v for k, v in os.environ.items() if k not in ("NEXTLONG_NEOX_CPU", "DS_ACCELERATOR")}
    env.update(NEXTLONG_NEOX_CPU=cpu, PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]))
    proc = subprocess.run([sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    if cpu == "1":
        assert result == "RESULT loaded 0.0" and "refresh_fp32_params is a no-op" in proc.stderr
    else:
        assert result == "RESULT 'Adam' object has no attribute 'refresh_fp32_params'"


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith(package + ".")}


def test_no_import_cycles_in_neox_plugin() -> None:
    pkg = REPO / "neox_plugin"
    mods = {f"neox_plugin.{p.stem}": p for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph = {m: sorted(i for i in _imports(p, "neox_plugin") if i in mods and i != m) for m, p in mods.items()}
    assert "neox_plugin._hook" not in graph["neox_plugin.neox"]
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_checkouts(tmp_path: Path, pin: str = "91d1c55ba037b5ada99ae14884dff87a4dc5b9ea") -> tuple[Path, Path]:
    neox, ds = tmp_path / "gpt-neox", tmp_path / "DeeperSpeed"
    (neox / "megatron").mkdir(parents=True)
    (neox / "deepy.py").write_text("")
    (neox / "requirements").mkdir()
    (neox / "requirements" / "requirements.txt").write_text(
        f"deepspeed@git+https://github.com/EleutherAI/DeeperSpeed.git@{pin}#egg=deepspeed\nnumpy<2.0\n")
    (ds / "deepspeed").mkdir(parents=True)
    (ds / "setup.py").write_text("")
    return neox, ds


def test_setup_env_dry_run_order_and_pins(tmp_path: Path, capsys) -> None:
    setup = _load("setup_neox_env")
    neox, ds = _fake_checkouts(tmp_path)
    assert setup.pinned_deeperspeed_commit(neox) == "91d1c55ba037b5ada99ae14884dff87a4dc5b9ea"
    venv = tmp_path / "env"
    assert setup.main(["--gpt-neox", str(neox), "--deeperspeed", str(ds), "--venv", str(venv), "--cpu",
                       "--torch-index-url", "https://download.pytorch.org/whl/cpu", "--dry-run"]) == 0
    cmds = [x for x in capsys.readouterr().out.splitlines() if x.startswith("+ ")]
    assert "-m venv --system-site-packages" in cmds[0]
    assert cmds[1].endswith("pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu")
    pins = cmds[2]
    for pin in ("'numpy<2'", "'setuptools<81'", "transformers==4.38.0", "'tokenizers>=0.15,<0.16'", "psutil"):
        assert pin in pins, pin
    assert cmds[3].startswith("+ DS_BUILD_OPS=0 ") and "--no-deps" in cmds[3] and cmds[3].endswith(str(ds))
    assert "--no-deps" in cmds[4] and cmds[4].endswith(f"-e {REPO}")
    assert cmds[5].endswith("-m neox_plugin.install_hook")
    assert not venv.exists()


def test_setup_env_rejects_wrong_directories(tmp_path: Path, capsys) -> None:
    setup = _load("setup_neox_env")
    neox, ds = _fake_checkouts(tmp_path)
    assert setup.main(["--gpt-neox", str(tmp_path), "--deeperspeed", str(ds), "--venv", str(tmp_path / "e")]) == 2
    assert f"--gpt-neox {tmp_path}: not a GPT-NeoX checkout" in capsys.readouterr().err
    assert setup.main(["--gpt-neox", str(neox), "--deeperspeed", str(neox), "--venv", str(tmp_path / "e")]) == 2
    assert "--deeperspeed" in capsys.readouterr().err


def test_smoke_script_rejects_bad_arguments(tmp_path: Path, capsys) -> None:
    smoke = _load("neox_cpu_smoke")
    assert smoke.main(["--gpt-neox", str(tmp_path), "--neox-python", sys.executable]) == 2
    assert "no deepy.py" in capsys.readouterr().err
    (tmp_path / "deepy.py").write_text("")
    assert smoke.main(["--gpt-neox", str(tmp_path), "--neox-python", str(tmp_path / "nope")]) == 2
    assert "--neox-python" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["setup_neox_env", "neox_cpu_smoke", "slurm_hosts"])
def test_launch_scripts_have_help(name: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "launch" / f"{name}.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout
