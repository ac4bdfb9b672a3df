#!/usr/bin/env python
"""Hostile inputs and flags: run the pipeline's command line on each case and print what the user sees.

Every case must end as either a clear error (exit 2, exactly one ERROR line, no traceback) or a run that
succeeds with the bad input handled and counted in the manifest (documents read = used + dropped +
rejected). The table has one row per case: name, exit code, the line that matters (the error, or the
manifest's count), and the verdict. The script exits 1 when any case fails its expectation.

    python bench/hostile_inputs.py                 # all cases, a fresh temporary directory
    python bench/hostile_inputs.py -k zst -k gz    # cases whose name contains any of these
    python bench/hostile_inputs.py --markdown      # the table as Markdown

The base corpus is Python's own reference documentation (``pydoc_data.topics``), present wherever
Python is; the tokenizer is a small BPE trained on it first. Each case runs in its own process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "preprocessing" / "make_nextlong_bin.py"
BASE_FLAGS = ["--tokenizer", "{tokenizer}", "--target-length", "2048", "--max-samples", "4", "--no-progress"]


def small_tokenizer(path: Path) -> Path:
    """A byte-level BPE (2,000 tokens) trained on the base corpus: loads in milliseconds, unlike cl100k_base."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([r["text"] for r in base_records()], trainer)
    tok.save(str(path))
    return path


def base_records() -> list[dict]:
    import pydoc_data.topics as topics

    return [{"id": f"topic:{k}", "text": v.strip()} for k, v in sorted(topics.topics.items()) if len(v) > 600]


def lines(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@dataclass
class Case:
    """One hostile case: ``make(tmp)`` writes its inputs and returns the extra flags."""

    name: str
    make: Callable[[Path], list[str]]
    expect: str  #: "error" (exit 2, one line) or "counted:<key>=<n>" (exit 0, manifest count, see _count)
    needle: str = ""  #: a word the error line must contain (e.g. the flag or the file name)


# ------------------------------------------------------------------------------------------ corpus builders


def jsonl(tmp: Path, name: str, payload: bytes) -> list[str]:
    p = tmp / name
    p.write_bytes(payload)
    return ["--input", str(p)]


def with_bad(extra: bytes | list[bytes], name: str = "in.jsonl") -> Callable[[Path], list[str]]:
    """The base corpus with ``extra`` lines inserted after the third record."""

    def make(tmp: Path) -> list[str]:
        recs = lines(base_records()).splitlines(keepends=True)
        ins = extra if isinstance(extra, list) else [extra]
        return jsonl(tmp, name, b"".join(recs[:3] + ins + recs[3:]))

    return make


def compressed(kind: str, damage: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        raw = lines(base_records() * 3)
        if kind == "gz":
            data = gzip.compress(raw)
        else:
            import zstandard

            data = zstandard.ZstdCompressor().compress(raw)
        if damage == "truncate":
            data = data[: len(data) * 57 // 100]
        elif damage == "garbage":
            mid = len(data) // 2
            data = data[:mid] + bytes(range(256)) * 4 + data[mid + 1024 :]
        return jsonl(tmp, f"in.jsonl.{'gz' if kind == 'gz' else 'zst'}", data)

    return make


def parquet(damage: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        recs = base_records() * 3
        p = tmp / "in.parquet"
        cols = {"id": [r["id"] for r in recs], "text": [r["text"] for r in recs]}
        if damage == "no_text_column":
            cols = {"id": cols["id"], "body": cols["text"]}
        pq.write_table(pa.table(cols), p, row_group_size=16, compression="zstd")
        data = p.read_bytes()
        if damage == "truncate":
            p.write_bytes(data[: len(data) // 2])
        elif damage == "garbage":
            mid = len(data) // 2
            p.write_bytes(data[:mid] + b"\x00\xff" * 2048 + data[mid + 4096 :])
        return ["--input", str(p)]

    return make


def two_inputs_with_repeat(tmp: Path) -> list[str]:
    recs = base_records()
    a = jsonl(tmp, "a.jsonl", lines(recs))
    b = jsonl(tmp, "b.jsonl", lines([{"id": "b:" + r["id"], "text": r["text"]} for r in recs[:5]]
                                    + [{"id": "b:new", "text": "A fresh document. " * 200}]))
    return a + b


def plain(tmp: Path) -> list[str]:
    return jsonl(tmp, "in.jsonl", lines(base_records()))


def plus(make: Callable[[Path], list[str]], *flags: str) -> Callable[[Path], list[str]]:
    return lambda tmp: make(tmp) + [f.replace("{tmp}", str(tmp)) for f in flags]


NESTED = b'{"id": "deep", "text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n"
ANSI = json.dumps({"id": "ansi", "text": "\x1b[31mRed\x1b[0m text with a NUL\x00 byte and a bell\x07. " * 40})

CASES: list[Case] = [
    # --- records: handled and counted, the run succeeds
    Case("malformed JSON line", with_bad(b"{not json\n"), "counted:rejected.malformed_json=1"),
    Case("invalid UTF-8 bytes", with_bad(b'{"id": "x", "text": "\xff\xfe bad"}\n'), "counted:rejected.invalid_utf8=1"),
    Case("lone surrogate in text", with_bad(b'{"id": "s", "text": "a \\ud800 b"}\n'),
         "counted:rejected.invalid_unicode=1"),
    Case("lone surrogate in id", with_bad(b'{"id": "\\udfff", "text": "fine text here"}\n'),
         "counted:rejected.invalid_unicode=1"),
    Case("JSON array, not object", with_bad(b'["text", "x"]\n'), "counted:rejected.not_an_object=1"),
    Case("missing text field", with_bad(b'{"id": "m", "body": "x"}\n'), "counted:rejected.missing_text_field=1"),
    Case("text is a number", with_bad(b'{"id": "n", "text": 5}\n'), "counted:rejected.text_not_a_string=1"),
    Case("text is null", with_bad(b'{"id": "n", "text": null}\n'), "counted:rejected.text_not_a_string=1"),
    Case("empty text", with_bad(b'{"id": "e", "text": "   \\n  "}\n'), "counted:dropped.empty_document=1"),
    Case("blank lines", with_bad([b"\n", b"   \n", b"\r\n"]), "counted:noted.blank_line=3"),
    Case("deeply nested JSON", with_bad(NESTED), "counted:rejected.malformed_json=1"),
    Case("duplicate id", with_bad(b'{"id": "topic:assert", "text": "Another text with a reused id."}\n'),
         "counted:noted.duplicate_id=1"),
    Case("duplicate text (drop)", with_bad(lines([{"id": "dup", "text": base_records()[0]["text"].upper()}])),
         "counted:dropped.duplicate_text=1"),
    Case("duplicate text (--duplicates keep)",
         plus(with_bad(lines([{"id": "dup", "text": base_records()[0]["text"]}])), "--duplicates", "keep"),
         "counted:noted.duplicate_text=1"),
    Case("repeated across inputs", two_inputs_with_repeat, "counted:noted.repeated_across_inputs=5"),
    Case("control characters (strip)", with_bad(ANSI.encode() + b"\n"), "counted:noted.control_characters=1"),
    Case("control characters (--control-chars keep)", plus(with_bad(ANSI.encode() + b"\n"), "--control-chars",
                                                          "keep"), "counted:noted.control_characters=1"),
    Case("only control characters", with_bad(b'{"id": "c", "text": "\\u0000\\u001b[0m\\u0007"}\n'),
         "counted:dropped.empty_document=1"),
    Case("UTF-8 byte order mark", lambda tmp: jsonl(tmp, "in.jsonl", b"\xef\xbb\xbf" + lines(base_records())),
         "counted:noted.utf8_bom=1"),
    Case("CRLF line endings", lambda tmp: jsonl(tmp, "in.jsonl", lines(base_records()).replace(b"\n", b"\r\n")),
         "counted:rejected=0"),
    Case("last line without newline", lambda tmp: jsonl(tmp, "in.jsonl", lines(base_records()).rstrip(b"\n")),
         "counted:rejected=0"),
    # --- archives and files: one-line error naming the file and how far it got
    Case("truncated .jsonl.gz", compressed("gz", "truncate"), "error", "after line"),
    Case("corrupt .jsonl.gz", compressed("gz", "garbage"), "error", "in.jsonl.gz"),
    Case("truncated .jsonl.zst", compressed("zst", "truncate"), "error", "after line"),
    Case("corrupt .jsonl.zst", compressed("zst", "garbage"), "error", "in.jsonl.zst"),
    Case("truncated Parquet", parquet("truncate"), "error", "in.parquet"),
    Case("corrupt Parquet page", parquet("garbage"), "error", "in.parquet"),
    Case("Parquet without the text column", parquet("no_text_column"), "error", "--text-field"),
    Case("plain text named .jsonl.gz", lambda tmp: jsonl(tmp, "in.jsonl.gz", lines(base_records())), "error",
         "in.jsonl.gz"),
    Case("empty file", lambda tmp: jsonl(tmp, "in.jsonl", b""), "error", "--input"),
    Case("every record lacks the text field", plus(plain, "--text-field", "body"), "error", "--text-field"),
    # --- flags: one-line error naming the flag, before any work directory exists
    Case("--input does not exist", lambda tmp: ["--input", str(tmp / "missing.jsonl")], "error", "--input"),
    Case("--input glob matches nothing", lambda tmp: ["--input", str(tmp / "none-*.jsonl")], "error", "--input"),
    Case("--input wrong extension", lambda tmp: jsonl(tmp, "in.txt", b"hello\n"), "error", "--input"),
    Case("--input unknown builtin", lambda tmp: ["--input", "builtin:nothing"], "error", "--input"),
    Case("--tokenizer missing path", plus(plain, "--tokenizer", "{tmp}/no-tokenizer.json"), "error", "--tokenizer"),
    Case("--tokenizer not a tokenizer", plus(plain, "--tokenizer", "{tmp}/in.jsonl"), "error", "--tokenizer"),
    Case("--bos-token unknown", plus(plain, "--bos-token", "<nope>"), "error", "--bos-token"),
    Case("--index-factory does not parse", plus(plain, "--index-factory", "IVFx,Flatt"), "error", "--index-factory"),
    Case("--index-factory PQ not dividing dim", plus(plain, "--index-factory", "PQ7"), "error", "--index-factory"),
    Case("--index-factory more lists than vectors", plus(plain, "--index-factory", "IVF65536,Flat"), "error",
         "--index-factory"),
    Case("--index-train-size below the lists", plus(plain, "--index-factory", "IVF8,Flat", "--index-train-size", "4"),
         "error", "--index-train-size"),
    Case("--embedder missing path", plus(plain, "--embedder", "{tmp}/no-model"), "error", "--embedder"),
    Case("--embedder not a model", plus(plain, "--embedder", "{tmp}"), "error", "--embedder"),
    Case("--target-length too small (64)", plus(plain, "--target-length", "64"), "error", "raise --target-length"),
    Case("--target-length above the corpus", plus(plain, "--target-length", "100000000"), "error",
         "lower --target-length"),
    Case("--output-prefix in a read-only place", plus(plain, "--output-prefix", "/sys/nextlong-ro/out"), "error",
         "--output-prefix"),
    Case("--output-prefix under a file", plus(plain, "--output-prefix", "{tmp}/in.jsonl/out"), "error",
         "--output-prefix"),
    Case("disk too small for --max-samples", plus(plain, "--max-samples", "2000000000", "--target-length", "4096"),
         "error", "free"),
    Case("--mix count mismatch", plus(plain, "--mix", "1", "--mix", "2"), "error", "--mix"),
    Case("--mix zero", plus(plain, "--mix", "0"), "error", "--mix"),
    Case("--granularity too small", plus(plain, "--granularity", "4"), "error", "--granularity"),
    Case("--duplicates unknown value", plus(plain, "--duplicates", "maybe"), "error", "--duplicates"),
    Case("--task-index out of range", plus(plain, "--stage", "chunk", "--task-index", "3"), "error", "--task-index"),
    Case("--tokenizer missing", lambda tmp: plain(tmp) + ["--no-tokenizer-flag"], "error", "--tokenizer"),
]


def _count(manifest: dict, key: str) -> int:
    inputs = manifest["counts"]["inputs"]
    if "." not in key:
        return sum(inputs[key].values())
    group, reason = key.split(".", 1)
    return int(inputs[group].get(reason, 0))


def run_case(case: Case, tmp: Path, python: str, tokenizer: Path) -> dict:
    tmp.mkdir(parents=True)
    flags = case.make(tmp)
    argv = [a.replace("{tokenizer}", str(tokenizer)) for a in BASE_FLAGS]
    if "--no-tokenizer-flag" in flags:
        flags.remove("--no-tokenizer-flag")
        argv = argv[2:]
    if not any(f == "--output-prefix" for f in flags):
        flags += ["--output-prefix", str(tmp / "out" / "ds")]
    prefix = flags[flags.index("--output-prefix") + 1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "preprocessing"),
                                                      os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    res = subprocess.run([python, str(SCRIPT), *argv, *flags], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    seconds = time.time() - t0
    err = res.stderr
    errors = [ln for ln in err.splitlines() if " ERROR " in ln or ln.startswith(("error:", "usage:"))
              or "error:" in ln[:80]]
    traceback = "Traceback (most recent call last)" in err
    row = {"case": case.name, "exit": res.returncode, "seconds": round(seconds, 1), "traceback": traceback}
    if case.expect == "error":
        line = next((ln for ln in err.splitlines() if " ERROR " in ln or ": error:" in ln), err.strip()[-200:])
        line = re.sub(r"^\S+ \S+ ERROR \S+: ", "", line)
        work_left = Path(prefix + ".work").exists()
        one_line = len([ln for ln in errors if not ln.startswith("usage:")]) == 1
        ok = (res.returncode == 2 and not traceback and one_line and case.needle in line and not work_left)
        row.update(line=line, outcome=("clear error" if ok else "FAIL")
                   + ("" if not work_left else " (work dir left)"), ok=ok)
    else:
        key, want = case.expect.split(":", 1)[1].split("=")
        man_path = Path(prefix + "_manifest.json")
        if res.returncode != 0 or not man_path.exists():
            line = next((ln for ln in err.splitlines() if " ERROR " in ln), err.strip()[-200:])
            row.update(line=line, outcome="FAIL", ok=False)
        else:
            m = json.loads(man_path.read_text())
            got = _count(m, key)
            inputs = m["counts"]["inputs"]
            ok = got == int(want) and inputs["balanced"] and not traceback
            row.update(line=f"{key}={got}; read {inputs['read']} = used {inputs['used']} + dropped "
                            f"{sum(inputs['dropped'].values())} + rejected {sum(inputs['rejected'].values())}",
                       outcome="handled, counted" if ok else "FAIL", ok=ok)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", action="append", default=[], help="run only cases whose name contains this (repeatable)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the pipeline")
    args = p.parse_args(argv)
    cases = [c for c in CASES if not args.k or any(k.lower() in c.name.lower() for k in args.k)]
    root = Path(tempfile.mkdtemp(prefix="nextlong-hostile-"))
    rows = []
    try:
        tokenizer = small_tokenizer(root / "tokenizer.json")
        for i, c in enumerate(cases):
            rows.append(run_case(c, root / f"case{i:02d}", args.python, tokenizer))
            r = rows[-1]
            print(f"[{i + 1}/{len(cases)}] {r['outcome']:<17} exit {r['exit']}  {c.name}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    w = max(len(r["case"]) for r in rows)
    if args.markdown:
        print("| # | case | exit | what the user sees | outcome |\n|---|---|---|---|---|")
        for i, r in enumerate(rows, 1):
            print(f"| {i} | {r['case']} | {r['exit']} | {r['line'].replace('|', '/')[:160]} | {r['outcome']} |")
    else:
        for i, r in enumerate(rows, 1):
            print(f"{i:>2} {r['case']:<{w}} exit {r['exit']:>3}  {r['outcome']:<17} {r['line'][:150]}")
    failed = [r["case"] for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} cases as expected"
          + (f"; failed: {failed}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
