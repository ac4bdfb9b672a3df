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
==================================== ============== =========================================
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

#: Default weight of hard-negative tokens. The paper's loss (Eq. 7) runs over all tokens,
#: hard negatives included, so the default reproduces it; set 0.0 to train on the extended
#: document only.
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
    enabled = _get(args, "nextlong_lossweight")
    if not isinstance(enabled, bool):
        raise NExtLongConfigError(f"nextlong_lossweight must be true or false, got {enabled!r}")
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
    )
    if not cfg.enabled:
        changed = [k for k, d in KEY_DEFAULTS.items() if k != "nextlong_lossweight" and _get(args, k) != d]
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
