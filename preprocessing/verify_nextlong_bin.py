#!/usr/bin/env python
"""Check a synthesized NExtLong dataset against its documented format (see docs/inspect.md).

    python preprocessing/verify_nextlong_bin.py out/nextlong --decode 3

Exit status: 0 when every check passes, 1 when any fails, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from nextlong.verify import format_decoded, verify_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Verify the files written by make_nextlong_bin.py --output-prefix PREFIX: indexed-dataset "
        "headers and dtypes, aligned text/mask/label, mask values, labels, sample lengths, the spans sidecar, "
        "the manifest's counts; optionally decode random samples.")
    p.add_argument("prefix", help="the run's --output-prefix (or the path of any of its files, e.g. P_manifest.json)")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="decode N random samples, print their start and end, and compare each chunk span with a "
                   "fresh tokenization of its chunk (default: 0)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for --decode (tokenizer.json, model directory or builtin:...); default: the "
                   "manifest's tokenizer.spec")
    p.add_argument("--seed", type=int, default=0, help="picks the samples to decode (default: 0)")
    p.add_argument("--max-failures", type=int, default=20, metavar="K",
                   help="messages listed per check; further problems are only counted (default: 20)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.decode < 0 or args.max_failures < 1:
        print("error: --decode must be >= 0 and --max-failures >= 1", file=sys.stderr)
        return 2
    res = verify_dataset(args.prefix, decode=args.decode, tokenizer=args.tokenizer, seed=args.seed,
                         max_failures=args.max_failures)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1, ensure_ascii=False))
    elif args.quiet:
        for m in res.failures:
            print(f"FAIL {m}", file=sys.stderr)
    else:
        print(res.summary())
        for entry in res.decoded:
            print(format_decoded(entry))
    if not res.ok and not args.quiet and not args.json:
        print(f"{len(res.failures)} failure message(s); see above", file=sys.stderr)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
