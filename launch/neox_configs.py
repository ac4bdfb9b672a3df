#!/usr/bin/env python3
"""Config helpers for the GPT-NeoX recipe.

Subcommands:

``recipes``      write the one-file recipes ``configs/neox/llama3_128k.yml`` and ``llama3_512k.yml`` from their parts:
                 the architecture ``llama3_8b.yml`` (its single source), ``parts/training_*.yml`` and
                 ``parts/paths_*.yml`` (default paths), comments included (``--check`` only verifies they are current).
                 ``python deepy.py train.py configs/neox/llama3_128k.yml`` then runs as typed.
``site``         apply a site file to a one-file recipe: its keys (``${VAR}`` expanded) replace or extend the recipe's,
                 architecture keys are refused, and the result is again one file for deepy.py.
``json``         write comment-free JSON variants of the commented YAML configs into ``configs/neox/json/``
                 (``--check`` only verifies that the committed ones are current). GPT-NeoX's loader reads JSON
                 through the same YAML parser, so the two variants load to identical arguments.
``merge``        merge several configs into one file, with deepy.py's rules (a key may appear in one file only).
                 ``tools/ckpts/convert_neox_to_hf.py --config_file`` accepts a single file.
``render-site``  expand ``${VAR}`` / ``${VAR:-default}`` in a site config from the environment and, with
                 ``--resume``, point ``load`` at ``save`` with ``finetune: false`` when ``save`` holds a
                 ``latest`` checkpoint marker (resuming a requeued job).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

LOG = logging.getLogger("neox_configs")

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "neox"
JSON_DIR = CONFIG_DIR / "json"
# configs with a JSON variant; tiny_cpu.yml belongs to the plugin's integration test and has none
RECIPE_CONFIGS = ("llama3_8b.yml", "llama3_128k.yml", "llama3_512k.yml", "site_example.yml", "site_example_512k.yml")
#: the architecture, the single source of the model keys of every recipe
ARCHITECTURE = "llama3_8b.yml"
#: one-file recipe -> its parts, in order (relative to CONFIG_DIR); keys must be disjoint
RECIPE_PARTS: dict[str, tuple[str, ...]] = {
    "llama3_128k.yml": (ARCHITECTURE, "parts/training_128k.yml", "parts/paths_128k.yml"),
    "llama3_512k.yml": (ARCHITECTURE, "parts/training_512k.yml", "parts/paths_512k.yml"),
}
_PART_TITLES = {
    ARCHITECTURE: "architecture: copied from configs/neox/llama3_8b.yml (edit there)",
    "training": "training: copied from configs/neox/{part} (edit there)",
    "paths": "paths (defaults relative to the GPT-NeoX checkout; change them with a site file): copied from "
             "configs/neox/{part}",
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def read_config(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


def yaml11_float(value: float) -> str:
    """Float text that YAML 1.1 (PyYAML, which GPT-NeoX uses for .json too) reads back as a float.

    ``json.dumps(1e-05)`` gives ``1e-05``, which PyYAML reads as the *string* "1e-05" (YAML 1.1 floats need a dot),
    and GPT-NeoX then rejects it as a non-float. ``1.0e-05`` is valid JSON and a YAML 1.1 float.
    """
    text = repr(float(value))
    if "e" in text:
        mantissa, exponent = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        sign = "" if exponent.startswith(("-", "+")) else "+"
        text = f"{mantissa}e{sign}{exponent}"
    return text


def to_json(data: dict[str, Any]) -> str:
    """Comment-free JSON text of a config; floats written so PyYAML and json both read the same value."""
    floats: list[float] = []

    def mark(value: Any) -> Any:
        if isinstance(value, float):
            floats.append(value)
            return f"@@float{len(floats) - 1}@@"
        if isinstance(value, list):
            return [mark(v) for v in value]
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        return value

    text = json.dumps(mark(data), indent=2) + "\n"
    for i, value in enumerate(floats):
        text = text.replace(f'"@@float{i}@@"', yaml11_float(value), 1)
    return text


def json_path_for(yml: Path, out_dir: Path = JSON_DIR) -> Path:
    return out_dir / (yml.stem + ".json")


def write_json_variants(
    names: tuple[str, ...] | list[str] = RECIPE_CONFIGS, src_dir: Path = CONFIG_DIR, out_dir: Path = JSON_DIR
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        src = src_dir / name
        dst = json_path_for(src, out_dir)
        dst.write_text(to_json(read_config(src)), encoding="utf-8")
        LOG.info("wrote %s", dst)
        written.append(dst)
    return written


def stale_json_variants(
    names: tuple[str, ...] | list[str] = RECIPE_CONFIGS, src_dir: Path = CONFIG_DIR, out_dir: Path = JSON_DIR
) -> list[str]:
    stale = []
    for name in names:
        src = src_dir / name
        dst = json_path_for(src, out_dir)
        if not dst.exists() or dst.read_text(encoding="utf-8") != to_json(read_config(src)):
            stale.append(str(dst))
    return stale


def _strip_header(text: str) -> str:
    """A part without its leading comment block (its description; the recipe has its own)."""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    return "".join(lines[i:])


def assemble_recipe(name: str, src_dir: Path = CONFIG_DIR) -> str:
    """Text of the one-file recipe ``name``: a header, then each part's keys with their comments."""
    parts = RECIPE_PARTS[name]
    merge_configs([src_dir / p for p in parts])  # raises on a key in two parts
    stem = Path(name).stem
    out = [
        f"# NExtLong recipe {stem}: ONE file for GPT-NeoX, generated by `python launch/neox_configs.py recipes`\n",
        "# from " + ", ".join("configs/neox/" + p for p in parts) + "\n",
        "# (edit those, not this file). From the GPT-NeoX checkout (the default paths below are relative to it):\n",
        f"#   python deepy.py train.py configs/neox/{name}\n",
        f"# Memory plan: python launch/plan_memory.py configs/neox/{name} (docs/recipe.md).\n",
        "# Other data/checkpoint locations: a site file applied with `python launch/neox_configs.py site` (see\n",
        "# configs/neox/site_example*.yml); launch/train.sbatch does that and starts deepy.py with the result.\n",
    ]
    for part in parts:
        kind = "training" if "/training_" in part else "paths" if "/paths_" in part else part
        title = _PART_TITLES[kind].format(part=part)
        out.append(f"\n# {'=' * 10} {title} {'=' * 10}\n\n")
        out.append(_strip_header((src_dir / part).read_text(encoding="utf-8")).rstrip("\n") + "\n")
    return "".join(out)


def write_recipes(src_dir: Path = CONFIG_DIR, out_dir: Path = CONFIG_DIR) -> list[Path]:
    written = []
    for name in RECIPE_PARTS:
        dst = out_dir / name
        dst.write_text(assemble_recipe(name, src_dir), encoding="utf-8")
        LOG.info("wrote %s", dst)
        written.append(dst)
    return written


def stale_recipes(src_dir: Path = CONFIG_DIR, out_dir: Path = CONFIG_DIR) -> list[str]:
    return [str(out_dir / n) for n in RECIPE_PARTS
            if not (out_dir / n).exists() or (out_dir / n).read_text(encoding="utf-8") != assemble_recipe(n, src_dir)]


class SiteError(ValueError):
    """A site file cannot be applied; the message names the file and the key."""


def apply_site(recipe: dict[str, Any], site: dict[str, Any], site_name: str = "site file",
               architecture: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe with the site's keys replacing or adding to its own; architecture keys are refused."""
    arch = read_config(CONFIG_DIR / ARCHITECTURE) if architecture is None else architecture
    out = {str(k).replace("-", "_"): v for k, v in recipe.items()}
    for key, value in site.items():
        norm = str(key).replace("-", "_")
        if norm in arch:
            raise SiteError(f"{site_name}: key {key!r} is architecture (configs/neox/{ARCHITECTURE}); a site file "
                            "may not change it")
        out[norm] = value
    return out


def merge_configs(paths: list[str | Path]) -> dict[str, Any]:
    """deepy.py / NeoXArgs.from_ymls merging: later files add keys, a repeated key is an error."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path in paths:
        for key, value in read_config(path).items():
            norm = str(key).replace("-", "_")
            if norm in merged:
                raise ValueError(f"{path}: key {key!r} already set in {origin[norm]}")
            merged[norm] = value
            origin[norm] = str(path)
    return merged


def expand_vars(value: Any, env: dict[str, str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a nested structure; unset VAR without default fails."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise KeyError(f"environment variable {name} is not set (needed by {value!r})")

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_vars(v, env) for v in value]
    if isinstance(value, dict):
        return {k: expand_vars(v, env) for k, v in value.items()}
    return value


def render_site(data: dict[str, Any], env: dict[str, str], resume: bool) -> dict[str, Any]:
    out = expand_vars(data, env)
    if resume:
        save = out.get("save")
        if save and (Path(save) / "latest").is_file():
            tag = (Path(save) / "latest").read_text(encoding="utf-8").strip()
            LOG.info("resuming from %s (latest = %s)", save, tag)
            out["load"] = save
            out["finetune"] = False
        else:
            LOG.info("no checkpoint in %s: starting from %s", save, out.get("load"))
    return out


def write_config(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(to_json(data), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None), encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = p.add_subparsers(dest="cmd", required=True)

    rc = sub.add_parser("recipes", help="write the one-file recipes configs/neox/llama3_{128k,512k}.yml from parts")
    rc.add_argument("--check", action="store_true", help="only check that the recipes are current (exit 1 if not)")

    st = sub.add_parser("site", help="apply a site file to a one-file recipe (one file out, for deepy.py)")
    st.add_argument("--recipe", type=Path, required=True, help="one-file recipe, e.g. configs/neox/llama3_128k.yml")
    st.add_argument("--site", type=Path, required=True, help="site file with ${VAR} placeholders (keys to change)")
    st.add_argument("--output", type=Path, required=True, help="result (YAML, or JSON if it ends in .json)")
    st.add_argument("--resume", action="store_true", help="if <save>/latest exists: load = save and finetune = false")

    j = sub.add_parser("json", help="write configs/neox/json/*.json from the commented YAML configs")
    j.add_argument("--check", action="store_true", help="only check that the JSON files are current (exit 1 if not)")
    j.add_argument("--src-dir", type=Path, default=CONFIG_DIR, help="directory of the commented YAML configs")
    j.add_argument("--out-dir", type=Path, default=JSON_DIR, help="directory for the JSON variants")
    j.add_argument("names", nargs="*", default=list(RECIPE_CONFIGS), help="YAML file names inside --src-dir")

    m = sub.add_parser("merge", help="merge configs into one file (YAML, or JSON if the output ends in .json)")
    m.add_argument("--output", type=Path, required=True, help="merged config path")
    m.add_argument("configs", nargs="+", help="config files, in deepy.py order")

    r = sub.add_parser("render-site", help="expand ${VAR} in a site config and switch to resume when possible")
    r.add_argument("--input", type=Path, required=True, help="site config with ${VAR} placeholders")
    r.add_argument("--output", type=Path, required=True, help="rendered config (YAML, or JSON if it ends in .json)")
    r.add_argument("--resume", action="store_true", help="if <save>/latest exists: load = save and finetune = false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s"
    )
    if args.cmd == "recipes":
        if args.check:
            stale = stale_recipes()
            for path in stale:
                LOG.error("stale or missing: %s (run: python launch/neox_configs.py recipes)", path)
            return 1 if stale else 0
        write_recipes()
        return 0
    if args.cmd == "site":
        try:
            recipe, site = read_config(args.recipe), read_config(args.site)
            rendered = render_site(site, dict(os.environ), args.resume)
            write_config(apply_site(recipe, rendered, str(args.site)), args.output)
        except (OSError, ValueError, KeyError, yaml.YAMLError) as e:
            LOG.error("%s", e)
            return 2
        LOG.info("wrote %s", args.output)
        return 0
    if args.cmd == "json":
        if args.check:
            stale = stale_json_variants(args.names, args.src_dir, args.out_dir)
            for path in stale:
                LOG.error("stale or missing: %s (run: python launch/neox_configs.py json)", path)
            return 1 if stale else 0
        write_json_variants(args.names, args.src_dir, args.out_dir)
        return 0
    if args.cmd == "merge":
        write_config(merge_configs(args.configs), args.output)
        LOG.info("wrote %s", args.output)
        return 0
    if args.cmd == "render-site":
        write_config(render_site(read_config(args.input), dict(os.environ), args.resume), args.output)
        LOG.info("wrote %s", args.output)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
