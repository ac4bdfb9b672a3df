#!/usr/bin/env python3
"""Expand a Slurm host list (``gpu[001-003,007],login1``) to one host name per line, like
``scontrol show hostnames``; ``launch/train.sbatch`` uses it where ``scontrol`` is absent (``--dry-run`` on a
machine without Slurm).

    python launch/slurm_hosts.py "gpu[001-002],cpu7"
"""

from __future__ import annotations

import argparse
import re
import sys

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {s!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in {s!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def expand(hostlist: str) -> list[str]:
    """Host names of a Slurm host list, in order (zero padding kept)."""
    out: list[str] = []
    for item in _split_top(hostlist.strip()):
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
        if not m:
            out.append(item)
            continue
        prefix, body, rest = m.groups()
        for r in body.split(","):
            rm = _RANGE.match(r)
            if not rm:
                raise ValueError(f"bad range {r!r} in {item!r}")
            lo, hi = rm.group(1), rm.group(2) or rm.group(1)
            if int(hi) < int(lo):
                raise ValueError(f"descending range {r!r} in {item!r}")
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                out.extend(f"{prefix}{n:0{width}d}{tail}" for tail in (expand(rest) if rest else [""]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="slurm_hosts.py", description=__doc__.split("\n")[0])
    p.add_argument("hostlist", help="Slurm host list, e.g. $SLURM_JOB_NODELIST")
    args = p.parse_args(argv)
    try:
        hosts = expand(args.hostlist)
    except ValueError as e:
        print(f"slurm_hosts.py: host list {args.hostlist!r}: {e}", file=sys.stderr)
        return 2
    print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
