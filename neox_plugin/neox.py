"""GPT-NeoX integration: patches applied to GPT-NeoX modules right after they are imported.

:mod:`neox_plugin._hook` calls the ``patch_*`` functions below when GPT-NeoX imports the matching
module. Every patch delegates to the original code unless the config says
``nextlong_lossweight: true``, so a config without the plugin's keys runs stock GPT-NeoX.

===================================== ===========================================================
module                                what changes
===================================== ===========================================================
megatron.neox_arguments.neox_args     ``NeoXArgsTraining`` gains the ``nextlong_*`` keys, so YAML
                                      validation accepts them and ``megatron_config`` forwards
                                      them to every rank
megatron.neox_arguments.arguments     ``NeoXArgs.validate_values`` also checks the plugin keys
megatron.data.gpt2_dataset            ``GPT2Dataset.__getitem__`` adds the mask sample, sliced in
                                      lock-step by the original ``__getitem__``
megatron.data.data_utils              mask readers attached to every dataset; all splits' masks
                                      validated before the first dataset is built
megatron.training                     ``_get_batch`` broadcasts the mask (uint8) over the
                                      tensor-parallel group, shifts it like the labels and turns
                                      it into normalized weights in ``loss_mask``;
                                      ``cross_entropy`` is the weighted, chunked loss;
                                      ``get_batch_sequential`` keeps the document-attention
                                      carrier instead of rebuilding the mask
megatron.model.gpt2_model             ``cross_entropy`` (the ``PipelineModule`` ``loss_fn``) is the
                                      same weighted loss
megatron.utils                        ``get_attn_mask`` returns a (1, 1, 1, 1) placeholder instead
                                      of the dense [s, s] causal mask when
                                      ``nextlong_compact_attention_mask: true``
megatron.model.transformer            ``ParallelSelfAttention`` keeps attention inside each packed
                                      sample when ``nextlong_document_attention: true``
                                      (:mod:`neox_plugin.document_attention`)
===================================== ===========================================================

The attention-mask patch is governed by ``nextlong_compact_attention_mask`` alone (it works with
or without ``nextlong_lossweight``); see :func:`placeholder_attention_mask`.

Set ``NEXTLONG_DEBUG_DUMP_DIR`` to save the logits, labels and weights of the first
``NEXTLONG_DEBUG_DUMP_CALLS`` (default 2) loss calls on global rank 0 (used by the integration test); with
``NEXTLONG_DEBUG_DUMP_ALL_RANKS=1`` every rank that computes the loss saves its own (``..._rank<r>.pt``).
"""

import dataclasses
import functools
import inspect
import logging
import os
import re
import threading
from typing import Any, Literal

from neox_plugin._targets import TARGETS
from neox_plugin.config import (
    COMPACT_MASK_KEY,
    DOCUMENT_ATTENTION_KEY,
    KEY_DEFAULTS,
    MASK_FREE_LAYER_TYPES,
    NExtLongConfig,
    NExtLongConfigError,
    config_from_args,
)
from neox_plugin.data import BATCH_KEY, NExtLongDataError, make_mask_view, mask_sample, validate_splits
from neox_plugin.document_attention import DOC_BATCH_KEY, DOCUMENT_PATCH, document_ids_sample

logger = logging.getLogger(__name__)

#: Patch that must be in place before training with ``nextlong_compact_attention_mask: true``.
COMPACT_MASK_PATCH = "megatron.utils"
#: Patches that must all be in place before training with the plugin: every hooked module but the two
#: attention ones (each checked when its own key is on).
REQUIRED_PATCHES = tuple(sorted(TARGETS - {COMPACT_MASK_PATCH, DOCUMENT_PATCH}))

#: Shape of the placeholder ``get_attn_mask`` returns with ``nextlong_compact_attention_mask: true``.
PLACEHOLDER_MASK_SHAPE = (1, 1, 1, 1)


class _State:
    """Process-wide plugin state."""

    def __init__(self) -> None:
        self.config: NExtLongConfig = NExtLongConfig()
        self.applied: set[str] = set()
        self.failed: dict[str, str] = {}
        self.validated = False
        self.dump_calls = 0
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.enabled


STATE = _State()


def set_config(args: Any) -> NExtLongConfig:
    """Validate the plugin keys of ``args`` and make them the process-wide configuration."""
    cfg = config_from_args(args)
    STATE.config = cfg
    if cfg.enabled:
        logger.info(
            "NExtLong loss weights on: negative weight %s, normalization %s, chunk %s",
            cfg.negative_loss_weight, cfg.loss_normalization, cfg.loss_chunk_size,
        )
    if cfg.document_attention:
        logger.info("%s on: attention stays inside each packed sample", DOCUMENT_ATTENTION_KEY)
    if cfg.compact_attention_mask:
        logger.info("%s on: get_attn_mask returns a %s placeholder (layer types allowed: %s)",
                    COMPACT_MASK_KEY, PLACEHOLDER_MASK_SHAPE, ", ".join(sorted(MASK_FREE_LAYER_TYPES)))
    return cfg


def check_compact_mask_patch() -> None:
    """Raise if ``nextlong_compact_attention_mask`` is on but ``megatron.utils`` could not be patched.

    Without the patch GPT-NeoX would silently build the dense mask the key is meant to avoid.
    """
    if not STATE.config.compact_attention_mask or COMPACT_MASK_PATCH in STATE.applied:
        return
    reason = STATE.failed.get(COMPACT_MASK_PATCH, "not imported through the hook")
    raise NExtLongConfigError(
        f"{COMPACT_MASK_KEY} is true but {COMPACT_MASK_PATCH}.get_attn_mask could not be patched ({reason}). "
        "Is the neox_plugin import hook installed (python -m neox_plugin.install_hook) and is this GPT-NeoX "
        "version supported? See docs/neox_plugin.md."
    )


def check_patches(needed: tuple[str, ...] = REQUIRED_PATCHES) -> None:
    """Raise if the plugin is enabled but a GPT-NeoX module could not be patched."""
    if not STATE.enabled:
        return
    missing = [m for m in needed if m not in STATE.applied]
    if missing:
        detail = "; ".join(f"{m}: {STATE.failed.get(m, 'not imported through the hook')}" for m in missing)
        raise NExtLongConfigError(
            "nextlong_lossweight is true but the GPT-NeoX integration is incomplete (" + detail + "). "
            "Is the neox_plugin import hook installed (python -m neox_plugin.install_hook) and is this "
            "GPT-NeoX version supported? See docs/neox_plugin.md."
        )


def _require(module: Any, *names: str) -> bool:
    return all(hasattr(module, n) for n in names)


# --------------------------------------------------------------------------------------------
# megatron.neox_arguments.neox_args / arguments
# --------------------------------------------------------------------------------------------

def _args_mixin(base: type) -> type:
    """A dataclass subclass of ``base`` with the plugin keys (GPT-NeoX type-checks field types)."""

    @dataclasses.dataclass
    class NeoXArgsTraining(base):  # type: ignore[valid-type, misc]
        nextlong_lossweight: bool = KEY_DEFAULTS["nextlong_lossweight"]
        """NExtLong: weight the next-token loss by the loss-weight mask (neox_plugin)."""

        nextlong_train_lossweight_paths: list = None
        """NExtLong: mask prefixes parallel to train_data_paths (null: derived from the data prefixes)."""

        nextlong_valid_lossweight_paths: list = None
        """NExtLong: mask prefixes parallel to valid_data_paths (null: derived)."""

        nextlong_test_lossweight_paths: list = None
        """NExtLong: mask prefixes parallel to test_data_paths (null: derived)."""

        nextlong_negative_loss_weight: float = KEY_DEFAULTS["nextlong_negative_loss_weight"]
        """NExtLong: loss weight of hard-negative tokens (mask value 0); mask value 1 has weight 1.0."""

        nextlong_loss_normalization: Literal["weight_sum", "nonzero_tokens", "all_tokens"] = KEY_DEFAULTS[
            "nextlong_loss_normalization"
        ]
        """NExtLong: divide the weighted loss sum by the weight sum, the non-zero-weight tokens or all tokens."""

        nextlong_loss_chunk_size: int = KEY_DEFAULTS["nextlong_loss_chunk_size"]
        """NExtLong: tokens per cross-entropy chunk (0 = one chunk)."""

        nextlong_compact_attention_mask: bool = KEY_DEFAULTS["nextlong_compact_attention_mask"]
        """NExtLong: get_attn_mask returns a (1, 1, 1, 1) placeholder instead of the dense [s, s] causal mask
        (every layer must be flash or another type that never reads the mask)."""

        nextlong_document_attention: bool = KEY_DEFAULTS["nextlong_document_attention"]
        """NExtLong: attention stays inside each packed sample (flash: varlen cu_seqlens per document; global:
        block-diagonal causal mask); the first token of a sample is not predicted from the previous sample."""

    NeoXArgsTraining.__module__ = base.__module__
    NeoXArgsTraining.__qualname__ = base.__qualname__
    NeoXArgsTraining.__doc__ = (base.__doc__ or "") + "\n    (with the NExtLong loss-weight keys)\n"
    return NeoXArgsTraining


def patch_neox_args(module: Any) -> bool:
    """Add the plugin keys to ``NeoXArgsTraining`` (before ``arguments.py`` builds ``NeoXArgs``)."""
    if not _require(module, "NeoXArgsTraining"):
        return False
    base = module.NeoXArgsTraining
    if "nextlong_lossweight" in getattr(base, "__dataclass_fields__", {}):
        return True
    module.NeoXArgsTraining = _args_mixin(base)
    return True


def patch_arguments(module: Any) -> bool:
    """Validate the plugin keys whenever GPT-NeoX validates its arguments (deepy.py and every rank)."""
    if not _require(module, "NeoXArgs"):
        return False
    cls = module.NeoXArgs
    if "nextlong_lossweight" not in cls.__dataclass_fields__:
        raise NExtLongConfigError(
            "megatron.neox_arguments.arguments was imported without the plugin keys; NeoXArgsTraining was not patched"
        )
    original = cls.validate_values
    if getattr(original, "_nextlong", False):
        return True

    @functools.wraps(original)
    def validate_values(self: Any) -> bool:
        set_config(self)
        check_compact_mask_patch()
        return original(self)

    validate_values._nextlong = True  # type: ignore[attr-defined]
    cls.validate_values = validate_values
    return True


# --------------------------------------------------------------------------------------------
# megatron.data.gpt2_dataset / data_utils
# --------------------------------------------------------------------------------------------

def patch_gpt2_dataset(module: Any) -> bool:
    """``GPT2Dataset.__getitem__`` adds ``nextlong_lossweight`` (uint8) when a mask is attached."""
    if not _require(module, "GPT2Dataset"):
        return False
    cls = module.GPT2Dataset
    original = cls.__getitem__
    if getattr(original, "_nextlong", False):
        return True

    @functools.wraps(original)
    def getitem(self: Any, idx: int) -> dict:
        ret = original(self, idx)
        add_document_ids(self, idx, ret, original)
        view = self.__dict__.get("_nextlong_mask_view")
        if view is not None:
            ret[BATCH_KEY] = mask_sample(view, idx, original)
            if ret[BATCH_KEY].shape != ret["text"].shape:
                raise NExtLongDataError(
                    f"mask sample {idx} has shape {ret[BATCH_KEY].shape}, text {ret['text'].shape}"
                )
        return ret

    getitem._nextlong = True  # type: ignore[attr-defined]
    cls.__getitem__ = getitem
    return True


def add_document_ids(dataset: Any, idx: int, ret: dict, original: Any) -> None:
    """With ``nextlong_document_attention`` on, add the per-token document ids of sample ``idx`` to ``ret``."""
    if not STATE.config.document_attention:
        return
    ids = document_ids_sample(dataset, idx, original)
    if ids.shape != ret["text"].shape:
        raise NExtLongDataError(f"document ids of sample {idx} have shape {ids.shape}, text {ret['text'].shape}")
    ret[DOC_BATCH_KEY] = ids


def attach_mask(dataset: Any, mask_reader: Any) -> None:
    """Attach a mask reader to a ``GPT2Dataset`` (sliced in lock-step by its own ``__getitem__``)."""
    if getattr(dataset, "indexed_dataset", None) is None:
        raise NExtLongDataError(f"cannot attach a loss-weight mask to {type(dataset).__name__}")
    n_text, n_mask = len(dataset.indexed_dataset.sizes), len(mask_reader.sizes)
    if n_text != n_mask:
        raise NExtLongDataError(f"mask has {n_mask} sequences, text has {n_text}")
    dataset._nextlong_mask_view = make_mask_view(dataset, mask_reader)


def _bound(fn: Any, a: tuple, kw: dict) -> dict:
    """Arguments of a call to ``fn`` by parameter name, defaults included."""
    bound = inspect.signature(fn).bind(*a, **kw)
    bound.apply_defaults()
    return dict(bound.arguments)


_SPLIT_NAME = re.compile(r"^(train|valid|test)_(\d+)$")


def _all_pairs(args: Any, cfg: NExtLongConfig) -> list[tuple[str, str, str]]:
    pairs = []
    if "data_path" in cfg.resolved:
        pairs.append(("data_path", args.data_path, cfg.resolved["data_path"][0]))
    for split in ("train", "valid", "test"):
        texts = getattr(args, f"{split}_data_paths", None) or []
        for text, mask in zip(texts, cfg.resolved.get(split, []), strict=True):
            pairs.append((split, text, mask))
    return pairs


def validate_all_splits(args: Any) -> None:
    """Validate every split's masks against their text once per process (before any dataset is built)."""
    with STATE.lock:
        if STATE.validated:
            return
        cfg = set_config(args)
        check_patches()
        validate_splits(_all_pairs(args, cfg))
        STATE.validated = True


def patch_data_utils(module: Any) -> bool:
    """Validate all masks up front and attach a mask reader to every GPT2Dataset that is built."""
    if not _require(module, "build_the_dataset", "build_train_valid_test_datasets",
                    "build_train_valid_test_data_loaders", "make_indexed_dataset"):
        return False
    if getattr(module.build_the_dataset, "_nextlong", False):
        return True
    orig_loaders = module.build_train_valid_test_data_loaders
    orig_the = module.build_the_dataset
    orig_tvt = module.build_train_valid_test_datasets
    current: dict[str, Any] = {}

    @functools.wraps(orig_loaders)
    def build_train_valid_test_data_loaders(neox_args: Any) -> Any:
        set_config(neox_args)
        current["args"] = neox_args
        try:
            return orig_loaders(neox_args)
        finally:
            current.pop("args", None)

    def _args() -> Any:
        if "args" not in current:
            raise NExtLongConfigError(
                "dataset built outside build_train_valid_test_data_loaders; cannot find the masks"
            )
        return current["args"]

    @functools.wraps(orig_the)
    def build_the_dataset(*a: Any, **kw: Any) -> Any:
        if not STATE.enabled:
            return orig_the(*a, **kw)
        args = _args()
        validate_all_splits(args)
        params = _bound(orig_the, a, kw)
        dataset = orig_the(*a, **kw)
        if dataset is None:
            return None
        m = _SPLIT_NAME.match(str(params.get("name")))
        if not m:
            raise NExtLongDataError(f"unexpected dataset name {params.get('name')!r}; cannot find its mask")
        split, i = m.group(1), int(m.group(2))
        mask_prefix = STATE.config.resolved[split][i]
        text_prefix = params.get("data_prefix")
        reader = module.make_indexed_dataset(mask_prefix, params["data_impl"], params["skip_warmup"])
        if reader is None:
            raise NExtLongDataError(f"cannot open loss-weight mask {mask_prefix} (text {text_prefix})")
        attach_mask(dataset, reader)
        logger.info("%s: mask %s attached to %s", params.get("name"), mask_prefix, text_prefix)
        return dataset

    @functools.wraps(orig_tvt)
    def build_train_valid_test_datasets(*a: Any, **kw: Any) -> Any:
        if not STATE.enabled:
            return orig_tvt(*a, **kw)
        args = _args()
        validate_all_splits(args)
        params = _bound(orig_tvt, a, kw)
        datasets = orig_tvt(*a, **kw)
        mask_prefix = STATE.config.resolved["data_path"][0]
        reader = module.make_indexed_dataset(mask_prefix, params["data_impl"], params["skip_warmup"])
        for ds in datasets:
            if ds is not None:
                attach_mask(ds, reader)
        return datasets

    for f in (build_train_valid_test_data_loaders, build_the_dataset, build_train_valid_test_datasets):
        f._nextlong = True  # type: ignore[attr-defined]
    module.build_train_valid_test_data_loaders = build_train_valid_test_data_loaders
    module.build_the_dataset = build_the_dataset
    module.build_train_valid_test_datasets = build_train_valid_test_datasets
    return True


# --------------------------------------------------------------------------------------------
# megatron.training / megatron.model.gpt2_model
# --------------------------------------------------------------------------------------------

def batch_weights(mask: Any, loss_mask: Any) -> Any:
    """Normalized per-token weights from the broadcast mask ``[b, s+1]`` and GPT-NeoX's ``loss_mask`` ``[b, s]``.

    The mask is shifted like the labels (the weight of token t+1 scales the prediction made at
    position t), mapped to weights, multiplied by GPT-NeoX's own loss mask (label -100, EOD
    masking) and normalized per micro-batch (:func:`neox_plugin.loss.normalize_weights`).
    """
    import torch

    from neox_plugin.config import MASK_PADDING
    from neox_plugin.loss import mask_to_weights, normalize_weights

    cfg = STATE.config
    shifted = mask[:, 1:].contiguous()
    if shifted.shape != loss_mask.shape:
        raise NExtLongDataError(
            f"mask batch {tuple(mask.shape)} does not match loss_mask {tuple(loss_mask.shape)} (+1 token)"
        )
    base = loss_mask.float() * (shifted != MASK_PADDING).to(torch.float32)
    weights = mask_to_weights(shifted, cfg.negative_loss_weight) * base
    return normalize_weights(weights, cfg.loss_normalization, valid_mask=base)


def patch_training(module: Any) -> bool:
    """Weighted ``loss_mask`` from ``_get_batch`` (both paths) and the weighted loss in ``forward_step``."""
    if not _require(module, "_get_batch", "get_batch_pipe", "forward_step", "cross_entropy"):
        return False
    orig_get = module._get_batch
    if getattr(orig_get, "_nextlong", False):
        return True

    @functools.wraps(orig_get)
    def _get_batch(neox_args: Any, tokenizer: Any, keys: Any, data: Any, datatype: Any, *a: Any, **kw: Any) -> Any:
        out = orig_get(neox_args, tokenizer, keys, data, datatype, *a, **kw)
        out = document_masks(data, out)
        if not STATE.enabled:
            return out
        import torch
        from megatron import mpu

        if data is not None and BATCH_KEY not in data:
            raise NExtLongDataError(
                f"nextlong_lossweight is true but the batch has no {BATCH_KEY!r}: "
                "the data loader did not attach the masks"
            )
        mask = mpu.broadcast_data([BATCH_KEY], data, torch.uint8)[BATCH_KEY]
        tokens, labels, loss_mask, attention_mask, position_ids = out
        weights = batch_weights(mask, loss_mask).to(loss_mask.device)
        return tokens, labels, weights, attention_mask, position_ids

    _get_batch._nextlong = True  # type: ignore[attr-defined]
    module._get_batch = _get_batch
    module.forward_step = _make_forward_step(module.forward_step)
    module.cross_entropy = _make_cross_entropy(module.cross_entropy)
    _patch_batch_sequential(module)
    return True


def _patch_batch_sequential(module: Any) -> None:
    """Keep the document carrier in the non-pipeline path.

    Without pipeline parallelism GPT-NeoX's ``SequentialWrapper`` runs ``get_batch_sequential`` on the
    model input, which rebuilds the attention mask from the tokens and drops the one ``_get_batch``
    made. With the carrier of ``nextlong_document_attention`` in the input, it is passed on instead.
    """
    original = getattr(module, "get_batch_sequential", None)
    if original is None or getattr(original, "_nextlong", False):
        return

    @functools.wraps(original)
    def get_batch_sequential(forward_input: Any, neox_args: Any) -> Any:
        from neox_plugin.document_attention import is_document_starts

        if len(forward_input) == 3 and is_document_starts(forward_input[2]):
            return tuple(forward_input)
        return original(forward_input, neox_args)

    get_batch_sequential._nextlong = True  # type: ignore[attr-defined]
    module.get_batch_sequential = get_batch_sequential


def document_masks(data: Any, out: tuple) -> tuple:
    """With ``nextlong_document_attention`` on, replace ``_get_batch``'s attention mask by the document carrier
    and zero the loss of cross-document predictions (:func:`neox_plugin.document_attention.document_batch`)."""
    if not STATE.config.document_attention:
        return out
    import torch
    from megatron import mpu

    from neox_plugin.document_attention import document_batch

    if DOCUMENT_PATCH not in STATE.applied:
        reason = STATE.failed.get(DOCUMENT_PATCH, "not imported through the hook")
        raise NExtLongConfigError(
            f"{DOCUMENT_ATTENTION_KEY} is true but {DOCUMENT_PATCH}.ParallelSelfAttention could not be patched "
            f"({reason}); see docs/neox_plugin.md"
        )
    if data is not None and DOC_BATCH_KEY not in data:
        raise NExtLongDataError(
            f"{DOCUMENT_ATTENTION_KEY} is true but the batch has no {DOC_BATCH_KEY!r}: the dataset is not GPT-NeoX's "
            "GPT2Dataset patched by the plugin"
        )
    doc_ids = mpu.broadcast_data([DOC_BATCH_KEY], data, torch.int64)[DOC_BATCH_KEY]
    tokens, labels, loss_mask, _attention_mask, position_ids = out
    carrier, loss_mask = document_batch(doc_ids.to(loss_mask.device), loss_mask)
    return tokens, labels, loss_mask, carrier, position_ids


def _make_forward_step(original: Any) -> Any:
    """Make pipeline evaluation return ``(loss, metrics)`` like the non-pipeline path.

    GPT-NeoX's ``evaluate`` unpacks ``loss, metric_dict = forward_step(...)``, but with
    ``pipe_parallel_size >= 1`` ``forward_step`` returns ``model.eval_batch(...)``, a bare loss
    tensor, so the first validation of a pipeline run crashes ("iteration over a 0-d tensor",
    GPT-NeoX ea7aefd8). With the plugin on, the bare tensor is paired with an empty metrics dict.
    """

    @functools.wraps(original)
    def forward_step(data_iterator: Any, model: Any, neox_args: Any, timers: Any, return_logits: bool = False,
                     *a: Any, **kw: Any) -> Any:
        out = original(data_iterator, model, neox_args, timers, return_logits, *a, **kw)
        if STATE.enabled and getattr(neox_args, "is_pipe_parallel", False) and not return_logits:
            import torch

            if torch.is_tensor(out):
                return out, {}
        return out

    forward_step._nextlong = True  # type: ignore[attr-defined]
    return forward_step


def patch_gpt2_model(module: Any) -> bool:
    """Replace the ``cross_entropy`` that ``GPT2ModelPipe`` binds as ``PipelineModule.loss_fn``."""
    if not _require(module, "cross_entropy", "GPT2ModelPipe"):
        return False
    module.cross_entropy = _make_cross_entropy(module.cross_entropy)
    return True


def _make_cross_entropy(original: Any) -> Any:
    if getattr(original, "_nextlong", False):
        return original

    @functools.wraps(original)
    def cross_entropy(output: Any, labels: Any, _fp16: bool = False) -> Any:
        if not STATE.enabled:
            return original(output, labels, _fp16=_fp16)
        return neox_weighted_loss(output, labels[0], labels[1])

    cross_entropy._nextlong = True  # type: ignore[attr-defined]
    cross_entropy._nextlong_original = original  # type: ignore[attr-defined]
    return cross_entropy


def neox_weighted_loss(output: Any, labels: Any, weights: Any) -> Any:
    """The plugin's loss on GPT-NeoX logits ``[b, s, vocab/TP]`` with normalized ``weights`` ``[b, s]``."""
    import torch
    from megatron import mpu

    from neox_plugin.loss import weighted_cross_entropy

    world = mpu.get_model_parallel_world_size()
    group = mpu.get_model_parallel_group() if world > 1 else None
    vocab_start = mpu.get_model_parallel_rank() * output.size(-1)
    logits = output.contiguous()
    _maybe_dump(logits, labels, weights, vocab_start)
    return weighted_cross_entropy(
        logits,
        labels,
        weights.to(torch.float32),
        normalization=None,
        chunk_size=STATE.config.loss_chunk_size,
        group=group,
        vocab_start_index=vocab_start,
        inplace=True,
    )


def _maybe_dump(logits: Any, labels: Any, weights: Any, vocab_start: int = 0) -> None:
    out_dir = os.environ.get("NEXTLONG_DEBUG_DUMP_DIR")
    if not out_dir:
        return
    import torch

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0 and os.environ.get("NEXTLONG_DEBUG_DUMP_ALL_RANKS") != "1":
        return
    limit = int(os.environ.get("NEXTLONG_DEBUG_DUMP_CALLS", "2"))
    if STATE.dump_calls >= limit:
        return
    os.makedirs(out_dir, exist_ok=True)
    suffix = "" if rank == 0 else f"_rank{rank}"
    path = os.path.join(out_dir, f"loss_call_{STATE.dump_calls:03d}{suffix}.pt")
    torch.save(
        {"logits": logits.detach().float().cpu().clone(), "labels": labels.detach().cpu().clone(),
         "weights": weights.detach().float().cpu().clone(), "grad_enabled": torch.is_grad_enabled(),
         "rank": rank, "vocab_start": vocab_start},
        path,
    )
    STATE.dump_calls += 1


# --------------------------------------------------------------------------------------------
# megatron.utils: nextlong_compact_attention_mask
# --------------------------------------------------------------------------------------------

def placeholder_attention_mask(device: Any = None) -> Any:
    """The stand-in GPT-NeoX carries instead of its causal mask with ``nextlong_compact_attention_mask: true``.

    A ``torch.bool`` tensor of shape :data:`PLACEHOLDER_MASK_SHAPE` = (1, 1, 1, 1), all ``True``.

    It is **not** an attention mask. It exists only because GPT-NeoX threads an ``attention_mask``
    through every layer (``(hidden_states, attention_mask)`` between ``PipelineModule`` layers and
    stages) and DeepSpeed's pipeline engine expects a bool tensor as the last activation. The layer
    types allowed with the key (:data:`neox_plugin.config.MASK_FREE_LAYER_TYPES`, e.g. flash) apply
    causality themselves and never read it; the start-up check refuses every other type. ``True``
    means "masked" in GPT-NeoX's convention, so code that did broadcast it against scores would
    mask every position (uniform attention, an obviously broken loss) rather than silently attend
    to future tokens. Stock GPT-NeoX's mask is ``(1, 1, s, s)`` bool, built from two fp32 ``s x s``
    temporaries (~64 GiB at s = 131072) and, with pipeline parallelism, sent between stages as fp16
    (2 s^2 bytes per micro-batch); the placeholder costs one element in both places.

    DeepSpeed's pipeline engine handles it like the real mask: sent as ``.half()`` (shape from the
    tensor metadata), turned back into bool on the receiving stage, never given ``requires_grad``
    (not floating point), and dropped from the gradient sends.
    """
    import torch

    return torch.ones(PLACEHOLDER_MASK_SHAPE, dtype=torch.bool, device=device)


def is_placeholder_attention_mask(mask: Any) -> bool:
    """True for a tensor shaped like :func:`placeholder_attention_mask` (used by checks and tests)."""
    import torch

    return torch.is_tensor(mask) and tuple(mask.shape) == PLACEHOLDER_MASK_SHAPE and mask.dtype == torch.bool


def patch_utils(module: Any) -> bool:
    """``get_attn_mask`` returns :func:`placeholder_attention_mask` when the compact mask is on.

    ``get_ltor_masks_and_position_ids`` (used by ``_get_batch``, so ``get_batch`` and
    ``get_batch_pipe``, and by text generation) looks ``get_attn_mask`` up in this module's globals
    at call time, so replacing the module attribute reaches every caller, including the ones that
    imported ``get_ltor_masks_and_position_ids`` by name. Loss mask and position ids are untouched.
    """
    if not _require(module, "get_attn_mask", "get_ltor_masks_and_position_ids"):
        return False
    original = module.get_attn_mask
    if getattr(original, "_nextlong", False):
        return True
    ltor = module.get_ltor_masks_and_position_ids
    if "get_attn_mask" not in getattr(getattr(ltor, "__code__", None), "co_names", ()):
        return False  # builds its mask some other way: patching get_attn_mask would not reach it

    @functools.wraps(original)
    def get_attn_mask(*a: Any, **kw: Any) -> Any:
        if not STATE.config.compact_attention_mask:
            return original(*a, **kw)
        return placeholder_attention_mask(_bound(original, a, kw).get("device"))

    get_attn_mask._nextlong = True  # type: ignore[attr-defined]
    get_attn_mask._nextlong_original = original  # type: ignore[attr-defined]
    module.get_attn_mask = get_attn_mask
    return True


def _patch_self_attention(module: Any) -> bool:
    from neox_plugin.document_attention import patch_self_attention

    return patch_self_attention(module)


#: module name -> patch function, used by the import hook.
PATCHES = {
    "megatron.neox_arguments.neox_args": patch_neox_args,
    "megatron.neox_arguments.arguments": patch_arguments,
    "megatron.data.gpt2_dataset": patch_gpt2_dataset,
    "megatron.data.data_utils": patch_data_utils,
    "megatron.training": patch_training,
    "megatron.model.gpt2_model": patch_gpt2_model,
    "megatron.utils": patch_utils,
    DOCUMENT_PATCH: _patch_self_attention,
}


def apply_patch(name: str, module: Any) -> None:
    """Apply the patch for ``name`` to the freshly imported ``module``; record success or failure."""
    fn = PATCHES.get(name)
    if fn is None:
        return
    try:
        ok = fn(module)
    except NExtLongConfigError:
        raise
    except Exception as e:  # a GPT-NeoX version we do not recognise must not break stock runs
        STATE.failed[name] = f"{type(e).__name__}: {e}"
        logger.warning("neox_plugin: could not patch %s: %s", name, e)
        return
    if ok:
        STATE.applied.add(name)
    else:
        STATE.failed[name] = "module does not look like GPT-NeoX's"
        logger.debug("neox_plugin: %s does not look like GPT-NeoX's; left alone", name)


def patch_loaded_modules() -> None:
    """Patch GPT-NeoX modules that are already imported (when the hook is installed late)."""
    import sys

    for name in PATCHES:
        if name in sys.modules and name not in STATE.applied:
            apply_patch(name, sys.modules[name])
