"""Weighted next-token cross-entropy over (optionally vocab-parallel) logits.

The math is GPT-NeoX's ``megatron.mpu.cross_entropy._VocabParallelCrossEntropy`` (max-subtract,
gather the target logit, log-sum-exp, all three reduced over the tensor-parallel group) fused with
the per-token weights and computed in sequence chunks:

* The forward pass also computes the gradient of the (scalar) weighted loss with respect to the
  logits, chunk by chunk, and stores it in the logits buffer (``inplace=True``, what GPT-NeoX's own
  kernel does to fp32 logits) or in one buffer of the logits' dtype (``inplace=False``). The
  backward pass only scales it by the incoming gradient.
* So the only fp32 ``[tokens, vocab]`` temporaries are per chunk: peak extra memory is about
  ``chunk_tokens * vocab_per_rank * 4`` bytes (x2 while a bf16/fp16 chunk is up-cast), instead of
  the full ``tokens * vocab_per_rank * 4`` bytes that ``logits.float()`` costs the stock path.
  ``chunk_size=0`` computes everything as one chunk.

Weights are normalized per micro-batch (:func:`normalize_weights`); a micro-batch whose normalizer
is 0 gets loss 0 and zero gradients, never NaN.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from neox_plugin.config import (
    MASK_NEGATIVE,
    MASK_PADDING,
    MASK_POSITIVE,
    NORMALIZATIONS,
)

logger = logging.getLogger(__name__)

__all__ = [
    "mask_to_weights",
    "normalize_weights",
    "per_token_cross_entropy",
    "weighted_cross_entropy",
]


def mask_to_weights(
    mask: torch.Tensor, negative_loss_weight: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Map a loss-weight mask to per-token weights.

    ``1`` -> 1.0, ``0`` -> ``negative_loss_weight``, :data:`~neox_plugin.config.MASK_PADDING`
    (positions past the end of the data, added by the loader) -> 0.0. Any other value raises
    ``ValueError``: the format reserves 2..254 and readers must reject them.
    """
    m = mask.to(torch.int16) if mask.dtype == torch.uint8 else mask
    bad = (m != MASK_NEGATIVE) & (m != MASK_POSITIVE) & (m != MASK_PADDING)
    if bool(bad.any()):
        vals = torch.unique(m[bad]).tolist()[:10]
        raise ValueError(f"loss-weight mask holds values {vals} outside {{0, 1}} (reserved values must be rejected)")
    w = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    w[m == MASK_POSITIVE] = 1.0
    w[m == MASK_NEGATIVE] = float(negative_loss_weight)
    return w


def normalize_weights(
    weights: torch.Tensor, normalization: str, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Divide ``weights`` by the micro-batch normalizer so that ``sum(losses * result)`` is the loss.

    ``normalization``:

    * ``weight_sum``: ``sum(weights)``: GPT-NeoX's ``sum(loss * loss_mask) / sum(loss_mask)``.
    * ``nonzero_tokens``: number of tokens with a non-zero weight.
    * ``all_tokens``: number of tokens that count at all: ``valid_mask != 0`` (GPT-NeoX's own
      loss mask: labels ``-100`` and, with ``eod_mask_loss``, EOD tokens excluded; padding
      excluded), or every position when ``valid_mask`` is None. Hard negatives with weight 0
      still count in the denominator. This is a choice of this plugin, not the paper's loss: the
      paper's Eq. 6/7 sum the next-token loss over all tokens with no weights, which is
      ``negative_loss_weight`` 1.0 (any normalization); the paper has no loss-weight experiment.

    A normalizer of 0 yields all-zero weights (loss 0, zero gradients). Returns float32.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
    w = weights.float()
    if normalization == "weight_sum":
        denom = w.sum()
    elif normalization == "nonzero_tokens":
        denom = (w != 0).sum().to(torch.float32)
    else:
        denom = (
            torch.tensor(float(w.numel()), device=w.device)
            if valid_mask is None
            else (valid_mask != 0).sum().to(torch.float32)
        )
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, w / safe, torch.zeros_like(w))


def _all_reduce(t: torch.Tensor, op: str, group: Any) -> None:
    """In-place all-reduce over the tensor-parallel group; a no-op without a group."""
    if group is not None:
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op), group=group)


class _FusedWeightedCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(logits_i, target_i), chunked; the gradient is formed in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        weights: torch.Tensor,
        chunk_size: int,
        group: Any,
        vocab_start_index: int,
        inplace: bool,
    ) -> torch.Tensor:
        n, vp = logits.shape
        need_grad = bool(ctx.needs_input_grad[0])
        step = n if chunk_size <= 0 else min(chunk_size, max(n, 1))
        grad = None
        if need_grad:
            grad = logits if inplace else torch.empty_like(logits)
        vocab_end_index = vocab_start_index + vp
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, n, max(step, 1)):
            e = min(n, s + step)
            src = logits[s:e]
            x = src.float()
            # Work on a private fp32 chunk unless we are allowed to overwrite the logits.
            if x.data_ptr() == src.data_ptr() and not (need_grad and inplace):
                x = x.clone()
            t = target[s:e]
            w = weights[s:e]
            logits_max = x.amax(dim=-1)
            _all_reduce(logits_max, "MAX", group)
            x.sub_(logits_max.unsqueeze(-1))
            target_mask = (t < vocab_start_index) | (t >= vocab_end_index)
            masked_target = t - vocab_start_index
            masked_target = masked_target.masked_fill(target_mask, 0)
            rows = torch.arange(e - s, device=x.device)
            predicted = x[rows, masked_target].clone()
            predicted.masked_fill_(target_mask, 0.0)
            _all_reduce(predicted, "SUM", group)
            x.exp_()
            sum_exp = x.sum(dim=-1)
            _all_reduce(sum_exp, "SUM", group)
            loss = torch.log(sum_exp) - predicted
            total += (loss * w).sum()
            if need_grad:
                # d(sum w*loss)/dx = w * (softmax - onehot(target))
                x.mul_((w / sum_exp).unsqueeze(-1))
                x[rows, masked_target] -= w * (~target_mask).to(x.dtype)
                dst = grad[s:e]
                if dst.data_ptr() != x.data_ptr() or dst.dtype != x.dtype:
                    dst.copy_(x)
            del x
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError("weighted_cross_entropy: backward can run only once (the gradient buffer is reused)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None, None


def weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    normalization: str | None = "weight_sum",
    valid_mask: torch.Tensor | None = None,
    chunk_size: int = 0,
    group: Any = None,
    vocab_start_index: int = 0,
    inplace: bool = False,
) -> torch.Tensor:
    """Weighted next-token cross-entropy, a scalar fp32 tensor.

    Args:
        logits: ``[..., vocab_per_rank]`` logits (any float dtype; math runs in fp32). With tensor
            parallelism this is the rank's vocabulary shard.
        labels: ``[...]`` target token ids (already shifted: ``labels[t]`` is token ``t+1``).
        weights: ``[...]`` per-token weights, e.g. from :func:`mask_to_weights` times the loader's
            loss mask.
        normalization: ``weight_sum`` | ``nonzero_tokens`` | ``all_tokens`` (see
            :func:`normalize_weights`), or None when ``weights`` are already normalized.
        valid_mask: tokens counted by ``all_tokens`` (default: every position).
        chunk_size: tokens per chunk (over the flattened batch x sequence); 0 = one chunk.
        group: tensor-parallel process group to reduce over (None = no reduction).
        vocab_start_index: first vocabulary id of this rank's shard.
        inplace: overwrite ``logits`` with its gradient instead of allocating a gradient buffer
            (saves one ``[tokens, vocab]`` tensor; the logits are unusable afterwards, as with
            GPT-NeoX's own kernel on fp32 logits). Only applies when a gradient is needed.

    Returns:
        ``sum(w_norm * CE)``; 0 (with zero gradients) when the normalizer is 0.
    """
    if logits.shape[:-1] != labels.shape or labels.shape != weights.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
    w = weights.float() if normalization is None else normalize_weights(weights, normalization, valid_mask)
    vp = logits.shape[-1]
    logits_2d = logits.reshape(-1, vp)
    if logits_2d.data_ptr() != logits.data_ptr() and inplace:
        raise ValueError("inplace=True needs contiguous logits")
    return _FusedWeightedCrossEntropy.apply(
        logits_2d,
        labels.reshape(-1).long(),
        w.reshape(-1).detach(),
        int(chunk_size),
        group,
        int(vocab_start_index),
        bool(inplace),
    )


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unreduced fp32 cross-entropy per position (no tensor parallelism), for checks and tools."""
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(), reduction="none"
    ).view(labels.shape)
