"""The GPT-NeoX recipe configs: parse, merge like deepy.py, match paper Tables 9 / 10, and describe Llama-3-8B.

Runs without GPT-NeoX; tests/test_neox_config_parse.py parses the recipes with GPT-NeoX's own argument code.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "neox"
JSON_DIR = CONFIGS / "json"
OURS = ("llama3_8b.yml", "llama3_128k.yml", "llama3_512k.yml", "site_example.yml", "site_example_512k.yml")
PARTS = ("parts/training_128k.yml", "parts/training_512k.yml", "parts/paths_128k.yml", "parts/paths_512k.yml")
#: the card's command: one file per recipe
RECIPES = {
    "128k": ("llama3_128k.yml",),
    "512k": ("llama3_512k.yml",),
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pm = _load("plan_memory")
nc = _load("neox_configs")

# Paper Table 9 (128K) and Table 10 (512K); batch from Section 4.2 ("batch size of 4M tokens")
PAPER = {
    "128k": {
        "rotary_emb_base": 200_000_000,
        "beta1": 0.9,
        "beta2": 0.95,
        "lr": 4e-5,
        "precision": "bfloat16",
        "gradient_clipping": 1.0,
        "weight_decay": 0.1,
        "lr_decay_style": "cosine",
        "train_iters": 1000,
        "warmup_iters": 200,
        "seq_length": 131072,
        "gpus": 64,
        "tokens_per_step": 4_194_304,
    },
    "512k": {
        "rotary_emb_base": 128_000_000,
        "beta1": 0.9,
        "beta2": 0.95,
        "lr": 1e-5,
        "precision": "bfloat16",
        "gradient_clipping": 1.0,
        "weight_decay": 0.1,
        "lr_decay_style": "cosine",
        "train_iters": 500,
        "warmup_iters": 50,
        "seq_length": 524288,
        "gpus": 128,
        "tokens_per_step": 4_194_304,
    },
}

# GPT-NeoX field types (megatron/neox_arguments/neox_args.py); validate_types() rejects float for int fields and
# PyYAML reads "1e-5" (no dot) as a string, so these are checked exactly
INT_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "intermediate_size",
    "mlp_multiple_of",
    "make_vocab_size_divisible_by",
    "seq_length",
    "max_position_embeddings",
    "rotary_emb_base",
    "train_iters",
    "lr_decay_iters",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "model_parallel_size",
    "pipe_parallel_size",
    "checkpoint_num_layers",
    "checkpoint_factor",
    "eval_interval",
    "eval_iters",
    "seed",
    "nextlong_loss_chunk_size",
)
FLOAT_KEYS = (
    "rms_norm_epsilon",
    "min_lr",
    "warmup",
    "weight_decay",
    "gradient_clipping",
    "hidden_dropout",
    "attention_dropout",
    "nextlong_negative_loss_weight",
)


def merged(recipe: str) -> dict[str, Any]:
    return pm.load_configs([CONFIGS / n for n in RECIPES[recipe]])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yml")) + sorted(JSON_DIR.glob("*.json")), ids=str)
def test_every_config_parses(path: Path) -> None:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.FullLoader)  # GPT-NeoX's loader
    assert isinstance(data, dict) and data


@pytest.mark.parametrize("name", OURS + PARTS)
def test_every_key_is_commented(name: str) -> None:
    lines = (CONFIGS / name).read_text(encoding="utf-8").splitlines()
    key_line = re.compile(r"^\s*[A-Za-z_][\w-]*:")
    for i, line in enumerate(lines):
        if not key_line.match(line):
            continue
        prev = lines[i - 1].strip() if i else ""
        assert "#" in line or prev.startswith("#"), f"{name}:{i + 1}: key without comment: {line.strip()}"


def test_one_file_recipes_are_current() -> None:
    """configs/neox/llama3_{128k,512k}.yml are exactly what `neox_configs.py recipes` makes from the parts."""
    assert nc.stale_recipes() == []


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_file_is_the_union_of_disjoint_parts(recipe: str) -> None:
    cfg = merged(recipe)
    parts = [nc.read_config(CONFIGS / p) for p in nc.RECIPE_PARTS[f"llama3_{recipe}.yml"]]
    assert len(cfg) == sum(len(p) for p in parts)  # no key in two parts
    for part in parts:
        for key, value in part.items():
            assert cfg[key] == value, key


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_architecture_has_one_source(recipe: str) -> None:
    """Every architecture key of the one file equals llama3_8b.yml's, and no other part sets one."""
    arch = nc.read_config(CONFIGS / "llama3_8b.yml")
    cfg = merged(recipe)
    assert {k: cfg[k] for k in arch} == arch
    for part in nc.RECIPE_PARTS[f"llama3_{recipe}.yml"][1:]:
        assert not set(nc.read_config(CONFIGS / part)) & set(arch), part


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_default_paths_are_relative_and_documented(recipe: str) -> None:
    cfg = merged(recipe)
    paths = [*cfg["train_data_paths"], *cfg["valid_data_paths"], *cfg["test_data_paths"], cfg["vocab_file"],
             cfg["load"], cfg["save"], cfg["log_dir"], cfg["tensorboard_dir"]]
    for p in paths:
        assert not p.startswith("/") and "$" not in p, p
        assert p.split("/")[0] in {"data", "checkpoints", "logs"}, p
    header = (CONFIGS / f"llama3_{recipe}.yml").read_text(encoding="utf-8")
    assert f"python deepy.py train.py configs/neox/llama3_{recipe}.yml" in header
    assert "relative to" in header and "site file" in header


@pytest.mark.parametrize("name", ["llama3_128k.yml", "llama3_512k.yml", "site_example.yml", "site_example_512k.yml"])
def test_valid_and_test_read_the_held_out_splits(name: str) -> None:
    """Validation and test read the valid and test splits that launch/synth_common.sh writes (<OUT>_valid,
    <OUT>_test of the training prefix): never the training data, never each other."""
    cfg = nc.read_config(CONFIGS / name)
    train, valid, test = (cfg[f"{s}_data_paths"] for s in ("train", "valid", "test"))
    suffix = "_text_document"
    stems = {p[: -len(suffix)] for p in train}
    assert valid and all(p.endswith("_valid" + suffix) and p[: -len("_valid" + suffix)] in stems for p in valid)
    assert test and all(p.endswith("_test" + suffix) and p[: -len("_test" + suffix)] in stems for p in test)
    assert not (set(train) & set(valid) or set(valid) & set(test) or set(train) & set(test))


def test_site_file_replaces_paths_and_refuses_architecture(tmp_path: Path) -> None:
    env = {"NEXTLONG_DATA": "/d", "NEXTLONG_CKPT": "/c", "NEXTLONG_LOGS": "/l"}
    recipe = nc.read_config(CONFIGS / "llama3_128k.yml")
    out = nc.apply_site(recipe, nc.render_site(nc.read_config(CONFIGS / "site_example.yml"), env, resume=False))
    assert out["train_data_paths"] == ["/d/nextlong_128k_text_document"] and out["load"] == "/c/llama3_8b_neox_tp4"
    assert out["launcher"] == "slurm" and out["hidden_size"] == 4096 and out["seq_length"] == 131072
    assert set(out) >= set(recipe)
    with pytest.raises(nc.SiteError, match="my_site.yml: key 'hidden_size' is architecture"):
        nc.apply_site(recipe, {"hidden_size": 8192}, "my_site.yml")
    site = tmp_path / "bad_site.yml"
    site.write_text("num-layers: 16\n")
    rc = nc.main(["site", "--recipe", str(CONFIGS / "llama3_128k.yml"), "--site", str(site),
                  "--output", str(tmp_path / "run.yml")])
    assert rc == 2 and not (tmp_path / "run.yml").exists()
    good = tmp_path / "site.yml"
    good.write_text("save: /elsewhere/ckpt\n")
    assert nc.main(["site", "--recipe", str(CONFIGS / "llama3_512k.yml"), "--site", str(good),
                    "--output", str(tmp_path / "run.json")]) == 0
    run = nc.read_config(tmp_path / "run.json")
    assert run["save"] == "/elsewhere/ckpt" and run["seq_length"] == 524288 and len(run) == len(
        nc.read_config(CONFIGS / "llama3_512k.yml"))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_paper_table_values(recipe: str) -> None:
    cfg, want = merged(recipe), PAPER[recipe]
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "Adam"
    assert params["lr"] == pytest.approx(want["lr"], rel=0, abs=0)
    assert params["betas"] == [want["beta1"], want["beta2"]]
    assert cfg["rotary_emb_base"] == want["rotary_emb_base"] and type(cfg["rotary_emb_base"]) is int
    assert cfg["precision"] == want["precision"] and cfg["bf16"]["enabled"] is True
    assert cfg["gradient_clipping"] == want["gradient_clipping"]
    assert cfg["weight_decay"] == want["weight_decay"]
    assert cfg["lr_decay_style"] == want["lr_decay_style"]
    assert cfg["train_iters"] == want["train_iters"]
    # GPT-NeoX: warmup_iter = warmup x lr_decay_iters (megatron/training.py get_learning_rate_scheduler)
    decay = cfg.get("lr_decay_iters") or cfg["train_iters"]
    assert decay == want["train_iters"]
    assert round(cfg["warmup"] * decay) == want["warmup_iters"]
    assert cfg["warmup"] * decay == pytest.approx(want["warmup_iters"])
    assert cfg["seq_length"] == want["seq_length"] == cfg["max_position_embeddings"]
    batch = pm.batch_layout(cfg)
    assert batch.num_gpus == want["gpus"]
    assert batch.tokens_per_step == want["tokens_per_step"]
    assert cfg["min_lr"] <= params["lr"]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_types_match_gpt_neox(recipe: str) -> None:
    cfg = merged(recipe)
    for key in INT_KEYS:
        if key in cfg:
            assert type(cfg[key]) is int, f"{key}={cfg[key]!r} must be an int"
    for key in FLOAT_KEYS:
        if key in cfg:
            assert type(cfg[key]) is float, f"{key}={cfg[key]!r} must be a float"
    for key in ("lr", "eps"):
        assert type(cfg["optimizer"]["params"][key]) is float


def test_architecture_is_llama3_8b() -> None:
    cfg = nc.read_config(CONFIGS / "llama3_8b.yml")
    # GPT-NeoX's MLP sizing: fused gate+up 2 x 14336, down-projection input 14336 (HF intermediate_size)
    assert pm.mlp_sizes(cfg) == (2 * 14336, 14336)
    # the other valid spelling builds the same MLP
    assert pm.mlp_sizes(dict(cfg, intermediate_size=3 * 14336, mlp_multiple_of=256)) == (2 * 14336, 14336)
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_kv_heads"]) == (32, 4096, 32, 8)
    assert cfg["rms_norm_epsilon"] == 1e-5 and cfg["norm"] == "rmsnorm" and cfg["activation"] == "swiglu"
    assert cfg["no_weight_tying"] is True and cfg["pos_emb"] == "rotary" and cfg["rotary_pct"] == 1
    assert cfg["attention_config"] == [[["flash"], 32]]
    for recipe in RECIPES:
        full = merged(recipe)
        assert pm.padded_vocab(128256, full) == 128256
        total = pm.count_parameters(full, 128256).total
        assert abs(total - 8.03e9) / 8.03e9 < 1e-3
        assert total == 8_030_261_248  # Meta-Llama-3-8B exactly
        assert full["num_kv_heads"] % full["model_parallel_size"] == 0


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_batch_arithmetic(recipe: str) -> None:
    cfg = merged(recipe)
    gpus = PAPER[recipe]["gpus"]
    tp, pp = cfg["model_parallel_size"], max(1, cfg["pipe_parallel_size"])
    dp = gpus // (tp * pp)
    assert gpus % (tp * pp) == 0 and tp <= 8  # tensor parallelism stays inside an 8-GPU node
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    assert micro * accum * dp == cfg["train_batch_size"]
    assert cfg["train_batch_size"] * cfg["seq_length"] == 4_194_304
    assert pm.batch_layout(cfg, num_gpus=gpus).data_parallel == dp
    with pytest.raises(ValueError):
        pm.batch_layout(cfg, num_gpus=gpus // 2)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_nextlong_plugin_keys(recipe: str) -> None:
    cfg = merged(recipe)
    assert cfg["nextlong_lossweight"] is True
    assert cfg["nextlong_negative_loss_weight"] == 1.0  # paper Eq. 7: loss over all tokens
    assert cfg["nextlong_loss_normalization"] in {"weight_sum", "nonzero_tokens", "all_tokens"}
    assert cfg["nextlong_loss_chunk_size"] >= 0
    for split in ("train", "valid", "test"):
        paths = cfg[f"nextlong_{split}_lossweight_paths"]
        assert paths is None or len(paths) == len(cfg[f"{split}_data_paths"])
        assert all(p.endswith("_text_document") for p in cfg[f"{split}_data_paths"])
    if recipe == "512k":
        assert 0 < cfg["nextlong_loss_chunk_size"] < cfg["seq_length"]
        assert cfg["nextlong_document_attention"] is True  # packs of eight NExtLong-64K samples
    from neox_plugin.config import config_from_args

    assert config_from_args(cfg).document_attention is cfg.get("nextlong_document_attention", False)


def test_512k_data_mixture() -> None:
    cfg = merged("512k")
    assert len(cfg["train_data_paths"]) == 2 == len(cfg["train_data_weights"])
    assert "512k" in cfg["train_data_paths"][0] and "64k" in cfg["train_data_paths"][1]
    w512, w64 = cfg["train_data_weights"]
    assert w64 / w512 == 2.0  # Appendix B.2: NExtLong-512K : NExtLong-64K = 1 : 2


@pytest.mark.parametrize("name", ("site_example.yml", "site_example_512k.yml"))
def test_site_paths_are_placeholders(name: str) -> None:
    data = nc.read_config(CONFIGS / name)

    def strings(v: Any):
        if isinstance(v, str):
            yield v
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)

    paths = [s for k, v in data.items() for s in strings(v) if "/" in s]
    assert paths
    for p in paths:
        assert p.startswith("${NEXTLONG_"), p
        assert not re.search(r"/(home|Users|scratch)/", p), p


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", OURS)
def test_json_variant_equals_commented_yaml(name: str) -> None:
    src = yaml.load((CONFIGS / name).read_text(encoding="utf-8"), Loader=yaml.FullLoader)
    text = (JSON_DIR / (Path(name).stem + ".json")).read_text(encoding="utf-8")
    assert "#" not in text
    assert _same(json.loads(text), src)
    assert _same(yaml.load(text, Loader=yaml.FullLoader), src)  # how GPT-NeoX reads a .json config


def test_json_variants_are_current() -> None:
    assert nc.stale_json_variants() == []


def test_render_site_and_resume(tmp_path: Path) -> None:
    env = {"NEXTLONG_DATA": str(tmp_path / "d"), "NEXTLONG_CKPT": str(tmp_path / "c"), "NEXTLONG_LOGS": str(tmp_path)}
    site = nc.read_config(CONFIGS / "site_example.yml")
    first = nc.render_site(site, env, resume=True)
    assert first["load"] == f"{tmp_path}/c/llama3_8b_neox_tp4" and first["finetune"] is True
    assert first["train_data_paths"] == [f"{tmp_path}/d/nextlong_128k_text_document"]
    save = Path(first["save"])
    save.mkdir(parents=True)
    (save / "latest").write_text("global_step50")
    again = nc.render_site(site, env, resume=True)
    assert again["load"] == str(save) and again["finetune"] is False
    with pytest.raises(KeyError, match="NEXTLONG_DATA"):
        nc.render_site(site, {}, resume=False)
    assert nc.expand_vars("${UNSET_X:-fallback}/a", {}) == "fallback/a"
