"""Configuration of the NExtLong loss-weight plugin: key names, defaults, path rules and checks.

This module is pure Python (no torch, no GPT-NeoX) so it can be imported at interpreter start-up
and by tools that only want to validate a configuration.

The keys below are the contract used by the YAML configs in ``configs/neox/``:

==================================== ============== =========================================
key                                  type           meaning
==================================== ============== =========================================
``nextlong_lossweight``              bool           turn the plugin on (default ``False``)
``nextlong_train_lossweight_paths``  list[str]|None mask prefixes parallel to ``train_data_paths``
``nextlong_valid_lossweight_paths``  list[str]|None mask prefixes parallel to ``valid_data_paths``
``nextlong_test_lossweight_paths``   list[str]|None mask prefixes parallel to ``test_data_paths``
``nextlong_negative_loss_weight``    float          weight of mask value 0 (default ``1.0``)
``nextlong_loss_normalization``      str            ``weight_sum`` | ``nonzero_tokens`` | ``all_tokens``
``nextlong_loss_chunk_size``         int            tokens per cross-entropy chunk, 0 = one chunk
``nextlong_compact_attention_mask``  bool           replace GPT-NeoX's dense [s, s] causal mask with
                                                    a (1, 1, 1, 1) placeholder; every layer must be
                                                    of a type that never reads the mask
``nextlong_document_attention``      bool           attention stays inside each packed sample
                                                    (flash: varlen ``cu_seqlens``; global: a
                                                    block-diagonal causal mask), and the first token
                                                    of a sample is not predicted from the previous one
==================================== ============== =========================================

``nextlong_compact_attention_mask`` is independent of ``nextlong_lossweight``: it only changes
the attention mask GPT-NeoX builds per batch (see :func:`check_compact_attention_mask`).
``nextlong_document_attention`` is independent of both (see :func:`check_document_attention` and
:mod:`neox_plugin.document_attention`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Suffix of the token dataset prefix written by the synthesis tool.
TEXT_SUFFIX = "_text_document"
#: Suffix of the loss-weight (mask) dataset prefix written by the synthesis tool.
LOSSWEIGHT_SUFFIX = "_lossweight_document"

#: Accepted values of ``nextlong_loss_normalization``.
NORMALIZATIONS: tuple[str, ...] = ("weight_sum", "nonzero_tokens", "all_tokens")

#: Mask values a reader accepts (``docs/format.md``): 1 = extended-document token, 0 = hard negative.
MASK_POSITIVE = 1
MASK_NEGATIVE = 0
VALID_MASK_VALUES: tuple[int, ...] = (MASK_NEGATIVE, MASK_POSITIVE)
#: In-memory marker for positions beyond the data (padding added by the loader); weight 0, never on disk.
MASK_PADDING = 255

SPLITS: tuple[str, ...] = ("train", "valid", "test")

#: Default weight of hard-negative tokens. The paper's loss (Eq. 6/7) runs over all tokens,
#: hard negatives included, with no weights, so the default reproduces it; 0.0 (train on the
#: extended document only) is an option of this plugin the paper does not evaluate.
DEFAULT_NEGATIVE_LOSS_WEIGHT = 1.0
DEFAULT_NORMALIZATION = "weight_sum"
DEFAULT_CHUNK_SIZE = 0

#: GPT-NeoX key name -> default. The order is the order in which keys are documented.
KEY_DEFAULTS: dict[str, Any] = {
    "nextlong_lossweight": False,
    "nextlong_train_lossweight_paths": None,
    "nextlong_valid_lossweight_paths": None,
    "nextlong_test_lossweight_paths": None,
    "nextlong_negative_loss_weight": DEFAULT_NEGATIVE_LOSS_WEIGHT,
    "nextlong_loss_normalization": DEFAULT_NORMALIZATION,
    "nextlong_loss_chunk_size": DEFAULT_CHUNK_SIZE,
    "nextlong_compact_attention_mask": False,
    "nextlong_document_attention": False,
}

#: The key that replaces GPT-NeoX's dense attention mask with a placeholder.
COMPACT_MASK_KEY = "nextlong_compact_attention_mask"
#: The key that keeps attention inside each packed sample.
DOCUMENT_ATTENTION_KEY = "nextlong_document_attention"
#: Keys that configure the loss weights (only meaningful with ``nextlong_lossweight: true``).
LOSSWEIGHT_KEYS: tuple[str, ...] = tuple(k for k in KEY_DEFAULTS if k not in (COMPACT_MASK_KEY, DOCUMENT_ATTENTION_KEY))

#: GPT-NeoX ``attention_config`` layer types whose forward pass never reads ``attention_mask``
#: (GPT-NeoX ea7aefd8), with the code path that shows it. Only these are allowed with
#: ``nextlong_compact_attention_mask: true``.
MASK_FREE_LAYER_TYPES: dict[str, str] = {
    "flash": "ParallelSelfAttention.flash_attention calls flash-attn with causal=True (sliding_window_width as "
             "window_size; the triton ALiBi fallback also causal=True) and never receives the mask",
    "mamba": "ParallelMambaResidualLayer.forward ignores attention_mask; the Pipe wrapper only passes it on",
    "rwkv": "RWKVResidualLayerPipe passes the mask on without reading it",
    "gmlp": "GMLPBlock without tiny attention (d_attn is None) only passes the mask on",
}
#: Known GPT-NeoX layer types that read ``attention_mask``, with where; refused with the key on.
MASK_READING_LAYER_TYPES: dict[str, str] = {
    "global": "ParallelSelfAttention.attention masks the [s, s] scores with it (FusedScaleMaskSoftmax)",
    "local": "sparse attention adds the mask to the scores (ParallelSelfAttention.sparse_attention)",
    "sparse_fixed": "sparse attention adds the mask to the scores (ParallelSelfAttention.sparse_attention)",
    "sparse_variable": "sparse attention adds the mask to the scores (ParallelSelfAttention.sparse_attention)",
    "bigbird": "sparse attention adds the mask to the scores (ParallelSelfAttention.sparse_attention)",
    "bslongformer": "sparse attention adds the mask to the scores (ParallelSelfAttention.sparse_attention)",
    "amlp": "the tiny attention of the aMLP block masks its scores with it (gmlp.TinyAttention)",
}
#: GPT-NeoX switches that route attention through code which receives the mask, whatever the layer type.
MASK_READING_SWITCHES: dict[str, str] = {
    "te_mha": "TransformerEngine's MultiheadAttention is given the mask",
    "te_fp8_mha": "TransformerEngine's MultiheadAttention is given the mask",
}


class NExtLongConfigError(ValueError):
    """A NExtLong plugin setting is invalid; the message names the key."""


def derive_lossweight_prefix(data_prefix: str) -> str:
    """Mask prefix for a text prefix by the documented rule.

    A trailing ``_text_document`` is replaced with ``_lossweight_document``:
    ``/data/foo_text_document`` -> ``/data/foo_lossweight_document``. A prefix without that
    suffix has no derivable mask and raises :class:`NExtLongConfigError`.
    """
    if not data_prefix.endswith(TEXT_SUFFIX):
        raise NExtLongConfigError(
            f"cannot derive the loss-weight prefix of data prefix {data_prefix!r}: it does not end with "
            f"{TEXT_SUFFIX!r}; set the matching nextlong_*_lossweight_paths entry explicitly"
        )
    return data_prefix[: -len(TEXT_SUFFIX)] + LOSSWEIGHT_SUFFIX


def resolve_lossweight_paths(
    split: str, data_paths: Sequence[str] | None, lossweight_paths: Sequence[str] | None
) -> list[str]:
    """Mask prefixes of one split, parallel to its data prefixes.

    ``lossweight_paths`` wins when given (and must have the same length as ``data_paths``);
    otherwise every prefix is derived with :func:`derive_lossweight_prefix`.
    """
    data = list(data_paths or [])
    if lossweight_paths is None:
        return [derive_lossweight_prefix(p) for p in data]
    masks = list(lossweight_paths)
    if len(masks) != len(data):
        raise NExtLongConfigError(
            f"nextlong_{split}_lossweight_paths has {len(masks)} entries but {split}_data_paths has "
            f"{len(data)}; they must be parallel (one mask prefix per data prefix)"
        )
    for i, m in enumerate(masks):
        if not isinstance(m, str) or not m:
            raise NExtLongConfigError(f"nextlong_{split}_lossweight_paths[{i}] must be a non-empty string, got {m!r}")
    return masks


@dataclass(frozen=True)
class NExtLongConfig:
    """Validated plugin settings (see the module docstring for the key table)."""

    enabled: bool = False
    train_lossweight_paths: list[str] | None = None
    valid_lossweight_paths: list[str] | None = None
    test_lossweight_paths: list[str] | None = None
    negative_loss_weight: float = DEFAULT_NEGATIVE_LOSS_WEIGHT
    loss_normalization: str = DEFAULT_NORMALIZATION
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Replace GPT-NeoX's dense causal mask with :data:`neox_plugin.neox.PLACEHOLDER_MASK_SHAPE` (independent
    #: of ``enabled``).
    compact_attention_mask: bool = False
    #: Keep attention inside each packed sample (independent of ``enabled``; :mod:`neox_plugin.document_attention`).
    document_attention: bool = False
    #: Resolved mask prefixes per split, parallel to the data prefixes (filled by :func:`config_from_args`).
    resolved: dict[str, list[str]] = field(default_factory=dict)

    @property
    def class_weights(self) -> tuple[float, float]:
        """(weight of mask value 0, weight of mask value 1)."""
        return (float(self.negative_loss_weight), 1.0)


def _get(args: Any, key: str) -> Any:
    if isinstance(args, Mapping):
        return args.get(key, KEY_DEFAULTS.get(key))
    return getattr(args, key, KEY_DEFAULTS.get(key))


def validate_values(args: Any) -> None:
    """Check the types and ranges of the plugin keys of ``args`` (a NeoXArgs or a mapping).

    Raises :class:`NExtLongConfigError` naming the offending key. Does not touch the file system.
    """
    for key in ("nextlong_lossweight", COMPACT_MASK_KEY, DOCUMENT_ATTENTION_KEY):
        flag = _get(args, key)
        if not isinstance(flag, bool):
            raise NExtLongConfigError(f"{key} must be true or false, got {flag!r}")
    w = _get(args, "nextlong_negative_loss_weight")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)) or float(w) < 0:
        raise NExtLongConfigError(f"nextlong_negative_loss_weight must be a finite number >= 0, got {w!r}")
    if float(w) > 1.0:
        logger.warning("nextlong_negative_loss_weight=%s weights hard negatives above the document tokens", w)
    norm = _get(args, "nextlong_loss_normalization")
    if norm not in NORMALIZATIONS:
        raise NExtLongConfigError(f"nextlong_loss_normalization must be one of {list(NORMALIZATIONS)}, got {norm!r}")
    chunk = _get(args, "nextlong_loss_chunk_size")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise NExtLongConfigError(f"nextlong_loss_chunk_size must be an integer >= 0 (0 = off), got {chunk!r}")
    for split in SPLITS:
        key = f"nextlong_{split}_lossweight_paths"
        v = _get(args, key)
        if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v)):
            raise NExtLongConfigError(f"{key} must be a list of strings or null, got {v!r}")


def config_from_args(args: Any) -> NExtLongConfig:
    """Build and validate a :class:`NExtLongConfig` from a NeoXArgs object or a mapping.

    When the plugin is enabled, the mask prefixes of every split are resolved here (explicit list
    or derived), so a bad valid/test entry fails at start-up, not at the first evaluation.
    Also rejects GPT-NeoX settings the plugin does not support.
    """
    validate_values(args)
    cfg = NExtLongConfig(
        enabled=_get(args, "nextlong_lossweight"),
        train_lossweight_paths=_get(args, "nextlong_train_lossweight_paths"),
        valid_lossweight_paths=_get(args, "nextlong_valid_lossweight_paths"),
        test_lossweight_paths=_get(args, "nextlong_test_lossweight_paths"),
        negative_loss_weight=float(_get(args, "nextlong_negative_loss_weight")),
        loss_normalization=_get(args, "nextlong_loss_normalization"),
        loss_chunk_size=int(_get(args, "nextlong_loss_chunk_size")),
        compact_attention_mask=_get(args, COMPACT_MASK_KEY),
        document_attention=_get(args, DOCUMENT_ATTENTION_KEY),
    )
    if cfg.compact_attention_mask:
        check_compact_attention_mask(args)
    if cfg.document_attention:
        check_document_attention(args)
    if not cfg.enabled:
        changed = [k for k in LOSSWEIGHT_KEYS if k != "nextlong_lossweight" and _get(args, k) != KEY_DEFAULTS[k]]
        if changed:
            logger.warning("%s set but nextlong_lossweight is false: the loss is not weighted", ", ".join(changed))
        return cfg
    _check_neox_compat(args)
    data_path = _get(args, "data_path")
    if _get(args, "train_data_paths"):
        for split in SPLITS:
            cfg.resolved[split] = resolve_lossweight_paths(
                split, _get(args, f"{split}_data_paths"), _get(args, f"nextlong_{split}_lossweight_paths")
            )
    elif data_path:
        explicit = _get(args, "nextlong_train_lossweight_paths")
        if explicit is not None and len(explicit) != 1:
            raise NExtLongConfigError(
                "with data_path, nextlong_train_lossweight_paths must hold exactly one mask prefix "
                f"(the mask of data_path {data_path!r}), got {len(explicit)}"
            )
        mask = explicit[0] if explicit else derive_lossweight_prefix(data_path)
        cfg.resolved["data_path"] = [mask]
    return cfg


def _check_neox_compat(args: Any) -> None:
    """Reject GPT-NeoX settings under which the weights would be silently wrong."""
    impl = _get(args, "train_impl")
    if impl not in (None, "normal"):
        raise NExtLongConfigError(f"nextlong_lossweight supports train_impl 'normal' only, got train_impl={impl!r}")
    ds = _get(args, "dataset_impl")
    if ds not in (None, "gpt2"):
        raise NExtLongConfigError(f"nextlong_lossweight supports dataset_impl 'gpt2' only, got dataset_impl={ds!r}")
    if _get(args, "curriculum_learning"):
        raise NExtLongConfigError(
            "nextlong_lossweight does not support curriculum_learning (it truncates the loss mask after the "
            "per-micro-batch normalization); turn one of them off"
        )
    if not _get(args, "train_data_paths") and not _get(args, "data_path"):
        raise NExtLongConfigError("nextlong_lossweight needs train_data_paths (or data_path) to find the masks")


# --------------------------------------------------------------------------------------------
# nextlong_compact_attention_mask
# --------------------------------------------------------------------------------------------

def expand_attention_config(attention_config: Any, num_layers: int | None) -> list[str]:
    """One layer type per layer, like GPT-NeoX's ``expand_attention_types`` (``megatron/utils.py``).

    Accepts the expanded form (a list of strings, what ``NeoXArgs`` holds after ``calculate_derived``)
    and the config form ``[[["flash"], 32]]`` / ``[[["flash", "global"], "all"]]``. ``None`` is
    GPT-NeoX's default: every layer ``global``.
    """
    if attention_config is None:
        return ["global"] * int(num_layers or 1)
    if not isinstance(attention_config, (list, tuple)):
        raise NExtLongConfigError(f"attention_config must be a list, got {attention_config!r}")
    if all(isinstance(item, str) for item in attention_config):
        return list(attention_config)
    layers: list[str] = []
    for item in attention_config:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))):
            raise NExtLongConfigError(f"attention_config entry {item!r} is not [[layer types], count]")
        types, count = list(item[0]), item[1]
        if count == "all":
            if not num_layers or not types or num_layers % len(types):
                raise NExtLongConfigError(f"attention_config pattern {types} does not divide num_layers={num_layers}")
            return types * (num_layers // len(types))
        layers.extend(types * int(count))
    return layers


def _layer_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def check_compact_attention_mask(args: Any) -> None:
    """Refuse ``nextlong_compact_attention_mask: true`` unless no layer can read the attention mask.

    With the key on, GPT-NeoX's ``get_attn_mask`` returns a (1, 1, 1, 1) placeholder instead of the
    dense causal mask, so every layer of ``attention_config`` (expanded, one type per layer) must be
    in :data:`MASK_FREE_LAYER_TYPES`, and no switch of :data:`MASK_READING_SWITCHES` may be on.
    Unknown layer types are refused too. The error names the key, the offending types and their layers.
    """
    layers = expand_attention_config(_get(args, "attention_config"), _get(args, "num_layers"))
    offending: dict[str, list[int]] = {}
    for i, kind in enumerate(layers):
        if kind not in MASK_FREE_LAYER_TYPES:
            offending.setdefault(str(kind), []).append(i)
    problems = []
    for kind, idx in offending.items():
        why = MASK_READING_LAYER_TYPES.get(kind, "unknown layer type, not verified to ignore the mask")
        problems.append(f"{kind!r} at layer{'s' if len(idx) > 1 else ''} {_layer_ranges(idx)} ({why})")
    for switch, why in MASK_READING_SWITCHES.items():
        if _get(args, switch):
            problems.append(f"{switch}: true ({why})")
    if problems:
        raise NExtLongConfigError(
            f"{COMPACT_MASK_KEY} is true, but these layers read the attention mask it replaces with a placeholder: "
            + "; ".join(problems)
            + f". Use only the layer types {sorted(MASK_FREE_LAYER_TYPES)} in attention_config (e.g. "
            f'[[["flash"], num_layers]]) or set {COMPACT_MASK_KEY}: false'
        )


# --------------------------------------------------------------------------------------------
# nextlong_document_attention
# --------------------------------------------------------------------------------------------

#: Layer types document attention can mask exactly, with how.
DOCUMENT_LAYER_TYPES: dict[str, str] = {
    "flash": "flash-attn's varlen kernel with per-document cu_seqlens",
    "global": "a block-diagonal causal [b, 1, s, s] mask",
}
#: Layer types refused with the key, with why (any other unknown type is refused too).
DOCUMENT_REFUSED_LAYER_TYPES: dict[str, str] = {
    **{k: "sparse attention kernels take a shared [s, s] layout, not a per-sample block-diagonal mask"
       for k in ("local", "sparse_fixed", "sparse_variable", "bigbird", "bslongformer")},
    "mamba": "a recurrent state runs across the whole row and cannot be reset at document boundaries",
    "rwkv": "a recurrent state runs across the whole row and cannot be reset at document boundaries",
    "gmlp": "the spatial gating unit mixes all positions of the row",
    "amlp": "the spatial gating unit mixes all positions of the row",
}
#: ``pos_emb`` values with which per-document outputs equal each document alone (relative encodings, or none).
DOCUMENT_POS_EMB: tuple[str, ...] = ("rotary", "alibi", "rpe", "none")


def check_document_attention(args: Any) -> None:
    """Refuse ``nextlong_document_attention: true`` where it cannot be honoured; the error names what to change.

    Allowed: layer types ``flash`` and ``global`` (:data:`DOCUMENT_LAYER_TYPES`), relative or no position
    encoding (positions run on across the packed row, as in ProLong, which is exact only when attention
    depends on distances), ``train_impl: normal``, ``dataset_impl: gpt2`` (its ``GPT2Dataset`` knows the
    sequence boundaries), pipeline stages (the boundary carrier is a bool activation like GPT-NeoX's mask)
    and sequence parallelism (the QKV projection gathers the whole sequence before attention).
    Refused: other layer types, TransformerEngine attention, the upper-triangular fused softmax (it
    ignores the mask), absolute position embeddings, curriculum learning (it cuts the mask as [s, s]).
    """
    key = DOCUMENT_ATTENTION_KEY
    layers = expand_attention_config(_get(args, "attention_config"), _get(args, "num_layers"))
    problems: list[str] = []
    offending: dict[str, list[int]] = {}
    for i, kind in enumerate(layers):
        if kind not in DOCUMENT_LAYER_TYPES:
            offending.setdefault(str(kind), []).append(i)
    for kind, idx in offending.items():
        why = DOCUMENT_REFUSED_LAYER_TYPES.get(kind, "unknown layer type")
        problems.append(f"attention_config has {kind!r} at layer{'s' if len(idx) > 1 else ''} "
                        f"{_layer_ranges(idx)} ({why}); use flash or global")
    for switch, why in MASK_READING_SWITCHES.items():
        if _get(args, switch):
            problems.append(f"{switch}: true ({why} as a shared causal mask; not supported)")
    if "global" in layers and _get(args, "scaled_upper_triang_masked_softmax_fusion"):
        problems.append("scaled_upper_triang_masked_softmax_fusion: true on global layers (the fused kernel "
                        "applies its own causal mask and ignores the document mask); use scaled_masked_softmax_fusion")
    pos = _get(args, "pos_emb") or "learned"
    if pos not in DOCUMENT_POS_EMB:
        problems.append(f"pos_emb: {pos} (absolute positions run on across the packed row, so a document's "
                        f"outputs would depend on where it sits; use one of {list(DOCUMENT_POS_EMB)})")
    impl = _get(args, "train_impl")
    if impl not in (None, "normal"):
        problems.append(f"train_impl: {impl} (only 'normal' builds batches with document boundaries)")
    ds = _get(args, "dataset_impl")
    if ds not in (None, "gpt2"):
        problems.append(f"dataset_impl: {ds} (only GPT2Dataset carries the document boundaries)")
    if _get(args, "curriculum_learning"):
        problems.append("curriculum_learning: true (it cuts the attention mask as a dense [s, s] mask)")
    if problems:
        raise NExtLongConfigError(f"{key} is true but cannot be honoured: " + "; ".join(problems)
                                  + f". Change these or set {key}: false")
