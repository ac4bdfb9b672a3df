"""``nextlong_compact_attention_mask``: start-up check of the layer types and the patched ``get_attn_mask``.

GPT-NeoX modules are replaced by stand-ins: ``megatron/utils.py``'s two mask functions are transcribed
from GPT-NeoX ea7aefd8 (so the patch is exercised on the same code shape), and the import hook is run on
a stand-in ``megatron`` package in a fresh interpreter.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

torch = pytest.importorskip("torch")

from neox_plugin import neox  # noqa: E402
from neox_plugin.config import (  # noqa: E402
    COMPACT_MASK_KEY,
    MASK_FREE_LAYER_TYPES,
    NExtLongConfigError,
    check_compact_attention_mask,
    config_from_args,
    expand_attention_config,
)

# megatron/utils.py of GPT-NeoX ea7aefd8: get_attn_mask and get_ltor_masks_and_position_ids, verbatim
NEOX_UTILS_SRC = '''
import torch


def get_attn_mask(seq_length, device, sliding_window_width):
    """
    Get triangular attention mask for a given sequence length / device.
    """
    # lower triangular attention mask
    mask = torch.tril(torch.ones((1, seq_length, seq_length), device=device)).view(
        1, 1, seq_length, seq_length
    )
    # get rid of lower diagonals than the sliding window width, if a value was provided
    if sliding_window_width is not None:
        mask = torch.triu(mask, diagonal=-sliding_window_width)

    # convert to binary
    return mask < 0.5


def get_ltor_masks_and_position_ids(
    data,
    eod_token,
    eod_mask_loss=False,
    sliding_window_width=None,
):
    """Build masks and position id for left to right model."""

    # Extract batch size and sequence length.
    batch_size, seq_length = data.size()

    # Attention mask (lower triangular).
    attention_mask = get_attn_mask(
        seq_length=seq_length,
        device=data.device,
        sliding_window_width=sliding_window_width,
    )

    # Loss mask.
    loss_mask = torch.ones(data.size(), dtype=torch.float, device=data.device)
    if eod_mask_loss:
        loss_mask[data == eod_token] = 0.0

    # Position ids.
    position_ids = torch.arange(seq_length, dtype=torch.long, device=data.device)
    position_ids = position_ids.unsqueeze(0).expand_as(data)

    return attention_mask, loss_mask, position_ids
'''

FLASH_32 = {"num_layers": 32, "attention_config": [[["flash"], 32]]}


# ------------------------------------------------------------------------------------------
# start-up validation of the layer types
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "attention",
    [
        [[["flash"], 32]],  # the recipes' config form
        ["flash"] * 32,  # what NeoXArgs holds after calculate_derived
        [[["flash"], "all"]],
        [[["flash", "mamba"], 16]],
        [[["flash"], 30], [["rwkv", "gmlp"], 1]],
    ],
)
def test_mask_free_layers_accepted(attention: list) -> None:
    cfg = config_from_args({COMPACT_MASK_KEY: True, "num_layers": 32, "attention_config": attention})
    assert cfg.compact_attention_mask and not cfg.enabled  # independent of nextlong_lossweight


def test_flash_with_sliding_window_accepted() -> None:
    # flash passes sliding_window_width to flash-attn as window_size; the mask is never read
    check_compact_attention_mask(dict(FLASH_32, sliding_window_width=4096))


@pytest.mark.parametrize(
    ("attention", "expected"),
    [
        ([[["global"], 2]], "'global' at layers 0-1"),
        ([[["flash"], 2], [["global"], 1], [["flash"], 2], [["global"], 1]], "'global' at layers 2, 5"),
        ([[["flash", "sparse_fixed"], 2]], "'sparse_fixed' at layers 1, 3"),
        ([[["amlp"], 1], [["flash"], 3]], "'amlp' at layer 0"),
        ([[["local", "bigbird", "bslongformer", "sparse_variable"], 1]], "'bslongformer' at layer 2"),
        ([[["ring"], 4]], "'ring' at layers 0-3 (unknown layer type"),
        (None, "'global' at layers 0-3"),  # GPT-NeoX's default attention_config
    ],
)
def test_mask_reading_layers_refused_by_name(attention: list | None, expected: str) -> None:
    args = {COMPACT_MASK_KEY: True, "num_layers": 4, "attention_config": attention}
    with pytest.raises(NExtLongConfigError) as e:
        config_from_args(args)
    msg = str(e.value)
    assert msg.startswith(f"{COMPACT_MASK_KEY} is true") and expected in msg, msg
    assert "flash" in msg and f"{COMPACT_MASK_KEY}: false" in msg
    config_from_args(dict(args, **{COMPACT_MASK_KEY: False}))  # key off: stock GPT-NeoX, nothing checked


def test_every_refused_type_is_named() -> None:
    with pytest.raises(NExtLongConfigError) as e:
        check_compact_attention_mask({"num_layers": 3, "attention_config": ["global", "flash", "sparse_fixed"]})
    assert "'global' at layer 0" in str(e.value) and "'sparse_fixed' at layer 2" in str(e.value)


@pytest.mark.parametrize("switch", ["te_mha", "te_fp8_mha"])
def test_transformer_engine_attention_refused(switch: str) -> None:
    with pytest.raises(NExtLongConfigError, match=f"{COMPACT_MASK_KEY} is true.*{switch}: true"):
        check_compact_attention_mask(dict(FLASH_32, **{switch: True}))


def test_expand_attention_config_matches_neox() -> None:
    assert expand_attention_config([[["flash", "global"], 2], [["mamba"], 1]], 5) == [
        "flash", "global", "flash", "global", "mamba"]
    assert expand_attention_config([[["flash", "global"], "all"]], 4) == ["flash", "global"] * 2
    assert expand_attention_config(None, 3) == ["global"] * 3
    with pytest.raises(NExtLongConfigError, match="does not divide"):
        expand_attention_config([[["flash", "global"], "all"]], 3)


def test_no_lossweight_warning_for_the_mask_key(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="neox_plugin.config"):
        config_from_args(dict(FLASH_32, **{COMPACT_MASK_KEY: True}))
    assert "nextlong_lossweight is false" not in caplog.text


def test_allowed_types_are_documented() -> None:
    doc = (REPO / "docs" / "neox_plugin.md").read_text(encoding="utf-8")
    for kind in MASK_FREE_LAYER_TYPES:
        assert f"`{kind}`" in doc


# ------------------------------------------------------------------------------------------
# the patched get_attn_mask (on the transcribed GPT-NeoX functions)
# ------------------------------------------------------------------------------------------

def _stand_in_utils() -> types.ModuleType:
    mod = types.ModuleType("stand_in_megatron_utils")
    exec(compile(NEOX_UTILS_SRC, "megatron/utils.py", "exec"), mod.__dict__)
    return mod


@pytest.fixture()
def patched_utils():
    saved = neox.STATE.config
    mod = _stand_in_utils()
    assert neox.patch_utils(mod)
    yield mod
    neox.STATE.config = saved


def _batch() -> torch.Tensor:
    return torch.tensor([[5, 7, 0, 9, 3, 0], [1, 0, 2, 2, 4, 8]])


def test_off_returns_the_stock_result(patched_utils: types.ModuleType) -> None:
    stock = _stand_in_utils()
    neox.set_config({})
    for window in (None, 2):
        got = patched_utils.get_ltor_masks_and_position_ids(_batch(), 0, True, sliding_window_width=window)
        want = stock.get_ltor_masks_and_position_ids(_batch(), 0, True, sliding_window_width=window)
        assert got[0].shape == (1, 1, 6, 6) and got[0].dtype == torch.bool
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert torch.equal(patched_utils.get_attn_mask(4, "cpu", None), stock.get_attn_mask(4, "cpu", None))


def test_on_returns_the_placeholder_and_stock_loss_mask_and_positions(patched_utils: types.ModuleType) -> None:
    stock = _stand_in_utils()
    neox.set_config(dict(FLASH_32, **{COMPACT_MASK_KEY: True}))
    attn, loss_mask, pos = patched_utils.get_ltor_masks_and_position_ids(_batch(), 0, True)
    assert neox.is_placeholder_attention_mask(attn)
    assert attn.shape == neox.PLACEHOLDER_MASK_SHAPE == (1, 1, 1, 1) and attn.dtype == torch.bool and bool(attn.all())
    assert not attn.requires_grad
    _, want_loss, want_pos = stock.get_ltor_masks_and_position_ids(_batch(), 0, True)
    assert torch.equal(loss_mask, want_loss) and torch.equal(pos, want_pos)
    assert neox.is_placeholder_attention_mask(patched_utils.get_attn_mask(seq_length=131072, device="cpu",
                                                                          sliding_window_width=None))
    neox.set_config({})  # switched off again: the dense mask comes back
    assert patched_utils.get_ltor_masks_and_position_ids(_batch(), 0)[0].shape == (1, 1, 6, 6)


def test_patch_is_idempotent_and_refuses_other_code_shapes() -> None:
    mod = _stand_in_utils()
    assert neox.patch_utils(mod)
    first = mod.get_attn_mask
    assert neox.patch_utils(mod) and mod.get_attn_mask is first
    other = types.ModuleType("other_utils")
    other.get_attn_mask = lambda *a, **k: None
    other.get_ltor_masks_and_position_ids = lambda data, eod: (None, None, None)  # builds no mask through it
    assert not neox.patch_utils(other)
    assert not neox.patch_utils(types.ModuleType("megatron_lm_utils"))


def test_placeholder_survives_deepspeed_pipe_send_and_recv() -> None:
    """DeepSpeed's PipelineEngine (DeeperSpeed 91d1c55) sends the last activation as .half(), restores
    .bool() on the receiving stage and sets requires_grad = is_floating_point(); replayed on the placeholder."""
    mask = neox.placeholder_attention_mask("cpu")
    hidden = torch.randn(6, 2, 8, requires_grad=True)
    outputs = (hidden, mask)
    sent = (outputs[0], outputs[-1].half())  # _exec_send_activations
    meta = [(list(t.size()), t.dtype) for t in sent]  # _send_tensor_meta
    assert meta[1] == ([1, 1, 1, 1], torch.float16)
    recvd = [t.clone().detach() for t in sent]  # _exec_recv_activations
    recvd[-1] = recvd[-1].bool()
    for buf in recvd:
        buf.requires_grad = buf.is_floating_point()
    assert torch.equal(recvd[-1], mask) and not recvd[-1].requires_grad
    grads = [t for t in recvd[:-1] if t.is_floating_point()]  # _exec_send_grads drops the mask
    assert len(grads) == 1


def test_compact_mask_without_the_patch_is_refused() -> None:
    saved = (neox.STATE.config, set(neox.STATE.applied), dict(neox.STATE.failed))
    try:
        neox.STATE.applied.discard(neox.COMPACT_MASK_PATCH)
        neox.STATE.failed[neox.COMPACT_MASK_PATCH] = "module does not look like GPT-NeoX's"
        neox.set_config(dict(FLASH_32, **{COMPACT_MASK_KEY: True}))
        with pytest.raises(NExtLongConfigError, match=f"{COMPACT_MASK_KEY} is true but megatron.utils.get_attn_mask"):
            neox.check_compact_mask_patch()
        neox.set_config({})
        neox.check_compact_mask_patch()  # off: nothing required
    finally:
        neox.STATE.config, neox.STATE.applied, neox.STATE.failed = saved[0], saved[1], saved[2]


# ------------------------------------------------------------------------------------------
# the import hook on a stand-in ``megatron`` package (fresh interpreter)
# ------------------------------------------------------------------------------------------

FAKE = {
    "megatron/__init__.py": "",
    "megatron/utils.py": NEOX_UTILS_SRC,
    "megatron/neox_arguments/__init__.py": "from .arguments import NeoXArgs\n",
    "megatron/neox_arguments/neox_args.py": """
        from dataclasses import dataclass
        @dataclass
        class NeoXArgsTraining:
            num_layers: int = 2
            attention_config: list = None
        """,
    "megatron/neox_arguments/arguments.py": """
        from dataclasses import dataclass
        from megatron.utils import get_ltor_masks_and_position_ids  # GPT-NeoX imports megatron.utils here too
        from .neox_args import NeoXArgsTraining
        @dataclass
        class NeoXArgs(NeoXArgsTraining):
            def validate_values(self):
                return True
        """,
    # training.py imports the function by name, like GPT-NeoX's megatron/training.py
    "megatron/training.py": "from megatron.utils import get_ltor_masks_and_position_ids\n",
}

PROBE = """
import json, torch
from megatron.neox_arguments import NeoXArgs
from megatron import training
from neox_plugin.neox import STATE
out = {"applied": sorted(STATE.applied)}
data = torch.zeros(2, 16, dtype=torch.long)
NeoXArgs(attention_config=["flash", "flash"]).validate_values()
out["off"] = list(training.get_ltor_masks_and_position_ids(data, 0)[0].shape)
NeoXArgs(attention_config=["flash", "flash"], nextlong_compact_attention_mask=True).validate_values()
out["on"] = list(training.get_ltor_masks_and_position_ids(data, 0)[0].shape)
try:
    NeoXArgs(attention_config=["flash", "global"], nextlong_compact_attention_mask=True).validate_values()
    out["error"] = None
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_hook_patches_megatron_utils_for_every_caller(tmp_path: Path) -> None:
    from neox_plugin.install_hook import install

    for rel, body in FAKE.items():
        f = tmp_path / "fake" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(body))
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install(site_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NEXTLONG_NEOX_PLUGIN")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), str(REPO), str(REPO / "preprocessing")])
    r = subprocess.run([sys.executable, "-c", f"import site; site.addsitedir({str(site_dir)!r})\n" + PROBE],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "megatron.utils" in out["applied"]
    assert out["off"] == [1, 1, 16, 16] and out["on"] == [1, 1, 1, 1]
    assert out["error"].startswith("NExtLongConfigError") and COMPACT_MASK_KEY in out["error"]
    assert "'global' at layer 1" in out["error"]
