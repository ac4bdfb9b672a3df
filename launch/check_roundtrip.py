#!/usr/bin/env python3
"""Check a HuggingFace -> GPT-NeoX -> HuggingFace round trip of a Llama checkpoint.

Compares the converted model's ``config.json`` with the original (architecture fields must match; in particular
``intermediate_size``, which ``tools/ckpts/convert_neox_to_hf.py`` copies verbatim from the GPT-NeoX config and
must come out as Llama-3's 14336), every weight tensor, and the logits of both models on a few tokens (fp32, CPU).
The logits of both weight sets are computed under the original config: ``rope_theta`` and
``max_position_embeddings`` of the converted config are the recipe's (check them with ``--expect``).
``--fix-config`` first copies fields the converter cannot know from the original (``bos_token_id`` and
``eos_token_id``: GPT-NeoX's HFTokenizer looks for ``<|endoftext|>``, which Llama-3 does not have) and
``torch_dtype`` into the converted ``config.json``.

Exit status 0 when everything matches, 1 otherwise. Example::

    python launch/check_roundtrip.py --original /models/Meta-Llama-3-8B --converted ckpt/llama3_roundtrip_hf \\
        --expect intermediate_size=14336 --expect rope_theta=500000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

LOG = logging.getLogger("check_roundtrip")

# fields that define the architecture and must survive the round trip
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
)
# fields copied from the original by --fix-config
FIXABLE_FIELDS = ("bos_token_id", "eos_token_id", "torch_dtype")


def parse_expect(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if not key or not raw:
            raise ValueError(f"--expect wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def compare_configs(original: dict[str, Any], converted: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    """Human-readable mismatches between two HF config dicts (architecture fields and explicit expectations)."""
    problems = []
    for key in ARCH_FIELDS:
        a, b = original.get(key), converted.get(key)
        if key == "attention_bias" and a is None:
            a = False
        if a != b:
            problems.append(f"config {key}: original {a!r} != converted {b!r}")
    for key, want in expect.items():
        got = converted.get(key)
        if got != want and not (isinstance(got, (int, float)) and isinstance(want, (int, float)) and got == want):
            problems.append(f"config {key}: converted {got!r} != expected {want!r}")
    return problems


def fix_config(original_dir: Path, converted_dir: Path) -> None:
    orig = json.loads((original_dir / "config.json").read_text(encoding="utf-8"))
    path = converted_dir / "config.json"
    conv = json.loads(path.read_text(encoding="utf-8"))
    for key in FIXABLE_FIELDS:
        if key in orig and conv.get(key) != orig[key]:
            LOG.info("config %s: %r -> %r (from the original)", key, conv.get(key), orig[key])
            conv[key] = orig[key]
    path.write_text(json.dumps(conv, indent=2) + "\n", encoding="utf-8")


def compare_models(original_dir: Path, converted_dir: Path, token_ids: list[int], atol: float) -> list[str]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    problems = []

    def load(path: Path, config: Any) -> Any:
        try:
            return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
        except TypeError:  # transformers < 4.56 names it torch_dtype
            return AutoModelForCausalLM.from_pretrained(path, config=config, torch_dtype=torch.float32).eval()

    # both models run with the ORIGINAL config: the converted config legitimately differs in rope_theta and
    # max_position_embeddings (the recipe's values) and is checked field by field in compare_configs
    config = AutoConfig.from_pretrained(original_dir)
    a = load(original_dir, config)
    b = load(converted_dir, config)
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        problems.append(f"weights: keys differ: {sorted(set(sa) ^ set(sb))[:8]}")
    for key in sorted(set(sa) & set(sb)):
        if sa[key].shape != sb[key].shape:
            problems.append(f"weights {key}: shape {tuple(sa[key].shape)} != {tuple(sb[key].shape)}")
        elif not torch.equal(sa[key], sb[key]):
            diff = (sa[key] - sb[key]).abs().max().item()
            problems.append(f"weights {key}: max abs diff {diff:.3e}")
    ids = torch.tensor([token_ids], dtype=torch.long)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    diff = (la - lb).abs().max().item()
    LOG.info("logits on %d tokens: max abs diff %.3e (tolerance %.1e)", len(token_ids), diff, atol)
    if diff > atol:
        problems.append(f"logits: max abs diff {diff:.3e} > {atol:.1e}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", type=Path, required=True, help="original HF model directory")
    p.add_argument("--converted", type=Path, required=True, help="HF directory written by convert_neox_to_hf.py")
    p.add_argument(
        "--tokens",
        default="128000,791,6864,315,9822,374,12366,13",
        help="comma-separated token ids for the logits check (default: a short Llama-3 sentence, 8 tokens)",
    )
    p.add_argument("--atol", type=float, default=0.0, help="max abs logit difference allowed (logit units, fp32)")
    p.add_argument(
        "--expect",
        action="append",
        default=[],
        help="KEY=VALUE the converted config.json must hold (JSON value), e.g. intermediate_size=14336; repeatable",
    )
    p.add_argument(
        "--fix-config", action="store_true", help="copy bos/eos token ids and torch_dtype from the original first"
    )
    p.add_argument("--config-only", action="store_true", help="compare config.json only (no weights, no logits)")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s"
    )
    if args.fix_config:
        fix_config(args.original, args.converted)
    original = json.loads((args.original / "config.json").read_text(encoding="utf-8"))
    converted = json.loads((args.converted / "config.json").read_text(encoding="utf-8"))
    problems = compare_configs(original, converted, parse_expect(args.expect))
    if not args.config_only:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        problems += compare_models(args.original, args.converted, tokens, args.atol)
    for line in problems:
        LOG.error("%s", line)
    if problems:
        return 1
    LOG.info("round trip OK: config, weights and logits match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
