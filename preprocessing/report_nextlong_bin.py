#!/usr/bin/env python
"""Statistics report of a synthesized NExtLong dataset (see docs/inspect.md).

    python preprocessing/report_nextlong_bin.py out/nextlong
    python preprocessing/report_nextlong_bin.py out/nextlong --compare out/standard out/knn --output out/compare

Writes <output>.html (self-contained, plots inlined), <output>.json and <output>_<plot>.png.
"""

from __future__ import annotations

import argparse
import logging
import sys

from nextlong.report import write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Plots and numbers of one or more synthesis runs: sample lengths, meta-chunks per sample, "
        "negatives per meta-chunk, token shares, similarity of negatives vs random pairs, dependency distance, "
        "corpus mix, negative reuse, dropped documents. Overlay several runs with --compare.")
    p.add_argument("prefix", help="the run's --output-prefix (or the path of any of its files)")
    p.add_argument("--compare", nargs="+", default=[], metavar="PREFIX",
                   help="further runs drawn in the same plots and tables (e.g. standard, knn, tailk runs)")
    p.add_argument("--name", action="append", default=None, metavar="LABEL",
                   help="label of each run in plots and tables, in order (repeat once per run; default: the "
                   "prefix name with the method and the non-default ablation settings)")
    p.add_argument("--output", default=None, metavar="OUT_PREFIX",
                   help="write OUT_PREFIX.html/.json/_<plot>.png (default: <prefix>_report beside the dataset)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not run the verifier (its verdict is shown in the summary table otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random chunk pairs and subsamples (default: 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        out = write_report(args.prefix, args.compare, output=args.output, names=args.name, verify=args.verify,
                           seed=args.seed)
    except (ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out.html)
    print(out.json)
    for r in out.runs:
        for note in r.notes:
            print(f"note: {r.label}: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
