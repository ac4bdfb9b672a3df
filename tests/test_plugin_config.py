"""Plugin configuration: key checks, the mask-path rule, GPT-NeoX key registration and the import hook."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Literal

import pytest

REPO = Path(__file__).resolve().parents[1]

from neox_plugin.config import (  # noqa: E402
    KEY_DEFAULTS,
    NExtLongConfigError,
    config_from_args,
    derive_lossweight_prefix,
    resolve_lossweight_paths,
)

BASE = {
    "nextlong_lossweight": True,
    "train_data_paths": ["/d/a_text_document", "/d/b_text_document"],
    "valid_data_paths": ["/d/v_text_document"],
    "test_data_paths": None,
    "train_impl": "normal",
    "dataset_impl": "gpt2",
}


def test_naming_rule() -> None:
    assert derive_lossweight_prefix("/x/run_text_document") == "/x/run_lossweight_document"
    with pytest.raises(NExtLongConfigError, match="does not end with '_text_document'"):
        derive_lossweight_prefix("/x/run_tokens")


def test_defaults_are_the_documented_ones() -> None:
    cfg = config_from_args({})
    assert not cfg.enabled
    assert (cfg.negative_loss_weight, cfg.loss_normalization, cfg.loss_chunk_size) == (1.0, "weight_sum", 0)
    assert set(KEY_DEFAULTS) == {
        "nextlong_lossweight", "nextlong_train_lossweight_paths", "nextlong_valid_lossweight_paths",
        "nextlong_test_lossweight_paths", "nextlong_negative_loss_weight", "nextlong_loss_normalization",
        "nextlong_loss_chunk_size", "nextlong_compact_attention_mask", "nextlong_document_attention",
    }
    assert cfg.compact_attention_mask is False


def test_all_splits_resolved_up_front() -> None:
    cfg = config_from_args(dict(BASE, nextlong_valid_lossweight_paths=["/m/v_mask"]))
    assert cfg.resolved == {
        "train": ["/d/a_lossweight_document", "/d/b_lossweight_document"],
        "valid": ["/m/v_mask"],
        "test": [],
    }


def test_underivable_valid_prefix_fails_at_start() -> None:
    with pytest.raises(NExtLongConfigError, match="set the matching nextlong_\\*_lossweight_paths"):
        config_from_args(dict(BASE, valid_data_paths=["/d/valid_tokens"]))


def test_explicit_list_must_be_parallel() -> None:
    msg = "nextlong_train_lossweight_paths has 1 entries but train_data_paths has 2"
    with pytest.raises(NExtLongConfigError, match=msg):
        config_from_args(dict(BASE, nextlong_train_lossweight_paths=["/m/a"]))
    with pytest.raises(NExtLongConfigError, match="nextlong_test_lossweight_paths"):
        resolve_lossweight_paths("test", ["/d/t_text_document"], [""])


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("nextlong_negative_loss_weight", -0.5, "finite number >= 0"),
        ("nextlong_negative_loss_weight", float("nan"), "finite number >= 0"),
        ("nextlong_negative_loss_weight", "0.5", "finite number >= 0"),
        ("nextlong_loss_normalization", "mean", "must be one of"),
        ("nextlong_loss_chunk_size", -1, "integer >= 0"),
        ("nextlong_loss_chunk_size", 1.5, "integer >= 0"),
        ("nextlong_lossweight", "yes", "true or false"),
        ("nextlong_compact_attention_mask", 1, "true or false"),
        ("nextlong_valid_lossweight_paths", "/m/v", "list of strings or null"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, pattern: str) -> None:
    with pytest.raises(NExtLongConfigError, match=pattern) as e:
        config_from_args(dict(BASE, **{key: value}))
    assert key in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [("train_impl", "dpo", "train_impl"), ("dataset_impl", "pairwise", "dataset_impl"),
     ("curriculum_learning", {"enabled": True}, "curriculum_learning")],
)
def test_unsupported_neox_modes_are_refused(key: str, value: object, pattern: str) -> None:
    with pytest.raises(NExtLongConfigError, match=pattern):
        config_from_args(dict(BASE, **{key: value}))
    config_from_args(dict(BASE, nextlong_lossweight=False, **{key: value}))  # plugin off: not our business


def test_data_path_mode() -> None:
    cfg = config_from_args({"nextlong_lossweight": True, "data_path": "/d/all_text_document"})
    assert cfg.resolved == {"data_path": ["/d/all_lossweight_document"]}


# ------------------------------------------------------------------------------------------
# GPT-NeoX key registration (on a stand-in of megatron/neox_arguments/neox_args.py)
# ------------------------------------------------------------------------------------------

def test_keys_registered_with_types_neox_validates() -> None:
    from neox_plugin.neox import patch_neox_args

    @dataclasses.dataclass
    class NeoXArgsTraining:
        train_data_paths: list = None

    mod = types.ModuleType("fake_neox_args")
    mod.NeoXArgsTraining = NeoXArgsTraining
    assert patch_neox_args(mod)
    fields = mod.NeoXArgsTraining.__dataclass_fields__
    assert fields["nextlong_lossweight"].type is bool
    assert fields["nextlong_compact_attention_mask"].type is bool
    assert fields["nextlong_negative_loss_weight"].type is float
    assert fields["nextlong_loss_chunk_size"].type is int
    assert fields["nextlong_train_lossweight_paths"].type is list
    assert fields["nextlong_loss_normalization"].type == Literal["weight_sum", "nonzero_tokens", "all_tokens"]
    assert {k: fields[k].default for k in KEY_DEFAULTS} == KEY_DEFAULTS
    assert "train_data_paths" in fields and mod.NeoXArgsTraining.__name__ == "NeoXArgsTraining"
    assert patch_neox_args(mod) and mod.NeoXArgsTraining.__mro__[1] is NeoXArgsTraining  # idempotent


# ------------------------------------------------------------------------------------------
# the import hook, on a stand-in ``megatron`` package in a fresh interpreter
# ------------------------------------------------------------------------------------------

FAKE = {
    "megatron/__init__.py": "",
    "megatron/neox_arguments/__init__.py": "from .arguments import NeoXArgs\n",
    "megatron/neox_arguments/neox_args.py": """
        from dataclasses import dataclass
        @dataclass
        class NeoXArgsTraining:
            train_data_paths: list = None
            valid_data_paths: list = None
            test_data_paths: list = None
        """,
    "megatron/neox_arguments/arguments.py": """
        from dataclasses import dataclass
        from .neox_args import NeoXArgsTraining
        @dataclass
        class NeoXArgs(NeoXArgsTraining):
            def validate_values(self):
                return True
        """,
    # a Megatron-LM-like module of the same name must be left alone
    "megatron/training.py": "def pretrain():\n    return 'untouched'\n",
}

PROBE = """
import json, sys
from megatron.neox_arguments import NeoXArgs
from megatron import training
from neox_plugin.neox import STATE
out = {"fields": sorted(k for k in NeoXArgs.__dataclass_fields__ if k.startswith("nextlong_")),
       "applied": sorted(STATE.applied), "training": training.pretrain()}
try:
    NeoXArgs(nextlong_lossweight=True, nextlong_negative_loss_weight=-1.0,
             train_data_paths=["/d/a_text_document"]).validate_values()
    out["error"] = None
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fake_neox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake_neox")
    for rel, body in FAKE.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(body))
    return root


def _run(fake: Path, code: str, env_extra: dict | None = None) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NEXTLONG_NEOX_PLUGIN")}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), str(REPO), str(REPO / "preprocessing")])
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_pth_line_installs_hook_and_patches_on_import(fake_neox: Path, tmp_path: Path) -> None:
    from neox_plugin.install_hook import PTH_NAME, install

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install(site_dir)
    assert (site_dir / PTH_NAME).exists()
    out = _run(fake_neox, f"import site; site.addsitedir({str(site_dir)!r})\n" + PROBE)
    assert out["fields"] == sorted(k for k in KEY_DEFAULTS)
    assert "megatron.neox_arguments.neox_args" in out["applied"]
    assert "megatron.neox_arguments.arguments" in out["applied"]
    assert "megatron.training" not in out["applied"] and out["training"] == "untouched"
    assert out["error"].startswith("NExtLongConfigError") and "nextlong_negative_loss_weight" in out["error"]


def test_hook_can_be_switched_off(fake_neox: Path, tmp_path: Path) -> None:
    from neox_plugin.install_hook import install

    install(tmp_path)
    out = _run(fake_neox, f"import site; site.addsitedir({str(tmp_path)!r})\n"
               "import json; from megatron.neox_arguments import NeoXArgs\n"
               "print(json.dumps(sorted(k for k in NeoXArgs.__dataclass_fields__ if k.startswith('nextlong'))))",
               env_extra={"NEXTLONG_NEOX_PLUGIN": "0"})
    assert out == []


def test_pth_line_is_harmless_without_the_package(tmp_path: Path) -> None:
    from neox_plugin.install_hook import install

    install(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", f"import site; site.addsitedir({str(tmp_path)!r}); print('ok')"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok" and "Error" not in r.stderr
