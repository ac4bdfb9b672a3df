#!/usr/bin/env python3
"""Rewrite a sequential GPT-NeoX checkpoint into the pipeline-parallel (per-layer) layout.

``tools/ckpts/convert_hf_llama_to_neox.py`` only writes the layout of ``pipe_parallel_size: 0``: one
``mp_rank_XX_model_states.pt`` per tensor-parallel rank whose ``module`` maps ``sequential.<N>.<name>`` to tensors.
A model trained with ``pipe_parallel_size >= 1`` (the 512K recipe uses 2) is a DeepSpeed ``PipelineModule`` that
loads one ``layer_<NN>-model_<XX>-model_states.pt`` per layer and tensor-parallel rank, with keys ``<name>``, and
an ``mp_rank_XX_model_states.pt`` whose ``module`` is ``None``. Layer numbers are the same in both layouts
(0 embedding, 2 .. L+1 transformer layers, L+3 final norm, L+4 LM head), and DeepSpeed names layer files by the
global layer number, so one converted directory serves every pipeline size; it is also the layout
``tools/ckpts/convert_neox_to_hf.py`` reads back when ``pipe_parallel_size`` >= 1.

Example::

    python launch/neox_seq_to_pipe.py --input ckpt/prolong_neox_tp8_seq --output ckpt/prolong_neox_tp8_pp2
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

LOG = logging.getLogger("neox_seq_to_pipe")

_SEQ_KEY = re.compile(r"^sequential\.(\d+)\.(.+)$")
_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def split_sequential(module: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Group ``sequential.<N>.<name>`` entries by layer N, with the prefix removed."""
    layers: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, tensor in module.items():
        m = _SEQ_KEY.match(key)
        if not m:
            raise ValueError(f"unexpected key {key!r}: not a sequential checkpoint")
        layers[int(m.group(1))][m.group(2)] = tensor
    return dict(sorted(layers.items()))


def layer_file(tag_dir: Path, layer: int, tp_rank: int) -> Path:
    return tag_dir / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def convert(input_dir: Path, output_dir: Path, tag: str | None = None) -> list[Path]:
    """Convert ``input_dir/<tag>`` (tag read from ``latest`` if not given) into ``output_dir/<tag>``."""
    import torch

    if tag is None:
        tag = (input_dir / "latest").read_text(encoding="utf-8").strip()
    src = input_dir / tag
    dst = output_dir / tag
    dst.mkdir(parents=True, exist_ok=True)
    rank_files = sorted(p for p in src.iterdir() if _MP_FILE.match(p.name))
    if not rank_files:
        raise FileNotFoundError(f"no mp_rank_XX_model_states.pt in {src}")
    written: list[Path] = []
    for path in rank_files:
        tp_rank = int(_MP_FILE.match(path.name).group(1))
        state = torch.load(path, map_location="cpu", weights_only=False)
        module = state.get("module")
        if not isinstance(module, dict):
            raise ValueError(f"{path}: 'module' is not a state dict (already a pipeline checkpoint?)")
        for layer, tensors in split_sequential(module).items():
            out = layer_file(dst, layer, tp_rank)
            torch.save(tensors, out)
            written.append(out)
        meta = {k: v for k, v in state.items() if k != "module"}
        meta["module"] = None
        torch.save(meta, dst / path.name)
        written.append(dst / path.name)
        LOG.info("rank %d: %d layer files", tp_rank, len(split_sequential(module)))
    (output_dir / "latest").write_text(tag, encoding="utf-8")
    tok = input_dir / "tokenizer"
    if tok.is_dir() and not (output_dir / "tokenizer").exists():
        shutil.copytree(tok, output_dir / "tokenizer")
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="sequential checkpoint directory (holds 'latest')")
    p.add_argument("--output", type=Path, required=True, help="pipeline-layout checkpoint directory to create")
    p.add_argument("--tag", default=None, help="checkpoint tag (sub-directory); default: contents of <input>/latest")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s"
    )
    files = convert(args.input, args.output, args.tag)
    LOG.info("wrote %d files under %s", len(files), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
