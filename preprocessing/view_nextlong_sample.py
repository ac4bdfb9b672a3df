#!/usr/bin/env python
"""Render one synthesized sample as HTML: meta-chunks and hard negatives coloured, every span annotated,
the original document alongside (see docs/inspect.md).

    python preprocessing/view_nextlong_sample.py out/nextlong --sample 0
"""

from __future__ import annotations

import argparse
import logging
import sys

from nextlong.viewer import write_sample_html


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write <prefix>_sample<N>.html: one sample span by span (meta-chunks blue, hard negatives "
        "orange, annotated with source document, rank and similarity) beside the original document(s).")
    p.add_argument("prefix", help="the run's --output-prefix (or the path of any of its files)")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="sample number, from 0 (default: 0)")
    p.add_argument("--output", default=None, metavar="HTML",
                   help="output file (default: <prefix>_sample<N>.html beside the dataset)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to decode the spans (tokenizer.json, model directory or builtin:...); default: "
                   "the manifest's; without one the chunk text from chunks.parquet is shown")
    p.add_argument("--expand-negatives", type=int, default=3, metavar="K",
                   help="collapse runs of more than K consecutive negatives into a fold (default: 3)")
    p.add_argument("--max-span-chars", type=int, default=4000, metavar="C",
                   help="fold span text beyond C characters (default: 4000)")
    p.add_argument("--max-documents", type=int, default=4, metavar="D",
                   help="show at most D source documents unfolded (default: 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = write_sample_html(args.prefix, args.sample, args.output, tokenizer=args.tokenizer,
                                expand_negatives=args.expand_negatives, max_span_chars=args.max_span_chars,
                                max_documents=args.max_documents)
    except (IndexError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
