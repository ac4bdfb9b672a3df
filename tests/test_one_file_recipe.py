"""The design card's command, ``python deepy.py train.py configs/neox/llama3_128k.yml``, parsed by GPT-NeoX itself.

``deepy.py`` first runs ``NeoXArgs.consume_deepy_args()`` on its command line (reads the files, validates every
value, derives the batch and the GPU count), then ``get_deepspeed_main_args()``, then DeepSpeed's launcher. This
test runs the first two in the GPT-NeoX environment on each one-file recipe exactly as committed, with a hostfile
of the recipe's node count (8 or 16 nodes x 8 GPUs) as the launcher would see it. Skipped unless ``GPT_NEOX_DIR``
is set (``NEOX_PYTHON``: the interpreter with GPT-NeoX's dependencies).

flash-attn cannot be installed without CUDA; GPT-NeoX's argument code only reads its version number for flash
layers (``importlib.metadata.version("flash-attn")``), so a metadata-only ``flash_attn-2.6.3.dist-info`` stands in
for it here. Nothing else is replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEOX_DIR = os.environ.get("GPT_NEOX_DIR")
NEOX_PYTHON = os.environ.get("NEOX_PYTHON", sys.executable)
pytestmark = [
    pytest.mark.neox,
    pytest.mark.skipif(not NEOX_DIR, reason="GPT_NEOX_DIR is not set (path to a GPT-NeoX checkout)"),
]

SCRIPT = r"""
import json, sys
from megatron.neox_arguments import NeoXArgs
args = NeoXArgs.consume_deepy_args(["train.py", sys.argv[1], "--hostfile", sys.argv[2]])
main_args = args.get_deepspeed_main_args()
keys = ("global_num_gpus", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
        "seq_length", "num_layers", "hidden_size", "num_kv_heads", "model_parallel_size", "pipe_parallel_size",
        "rotary_emb_base", "nextlong_lossweight", "nextlong_document_attention", "nextlong_compact_attention_mask",
        "train_data_paths", "load", "save", "vocab_file", "config_files")
out = {k: getattr(args, k) for k in keys}
out["config_files"] = sorted(out["config_files"])
out["deepspeed_main_flags"] = [a for a in main_args if a.startswith("--")]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize(("recipe", "nodes"), [("llama3_128k.yml", 8), ("llama3_512k.yml", 16)])
def test_deepy_parses_the_one_file_recipe(recipe: str, nodes: int, tmp_path: Path, capsys) -> None:
    meta = tmp_path / "site" / "flash_attn-2.6.3.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.6.3\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=8\n" for i in range(nodes)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "preprocessing"), str(tmp_path / "site")]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    config = REPO / "configs" / "neox" / recipe
    proc = subprocess.run([NEOX_PYTHON, "-c", SCRIPT, str(config), str(hostfile)], cwd=NEOX_DIR, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    with capsys.disabled():
        print(f"\n[one-file recipe] NeoXArgs.consume_deepy_args(['train.py', 'configs/neox/{recipe}']): {line}")
    assert got["config_files"] == [recipe]
    assert {"--deepspeed_config", "--megatron_config"} <= set(got["deepspeed_main_flags"])
    assert got["global_num_gpus"] == 8 * nodes
    assert got["train_batch_size"] * got["seq_length"] == 4_194_304
    assert (got["num_layers"], got["hidden_size"], got["num_kv_heads"]) == (32, 4096, 8)
    assert got["nextlong_lossweight"] is got["nextlong_document_attention"] is True
    assert got["train_data_paths"][0].startswith("data/nextlong/") and got["load"].startswith("checkpoints/")
    tp, pp = got["model_parallel_size"], max(1, got["pipe_parallel_size"])
    dp = got["global_num_gpus"] // (tp * pp)
    assert got["train_micro_batch_size_per_gpu"] * got["gradient_accumulation_steps"] * dp == got["train_batch_size"]
