"""Document-masked attention for packed sequences (``nextlong_document_attention: true``).

GPT-NeoX's ``pack_impl: packed`` concatenates whole NExtLong samples into each ``seq_length + 1``
token row; the 512K recipe puts eight NExtLong-64K samples into one row. With this key, attention
stays inside each sample and the first token of a sample is never predicted from the one before.

**Boundaries.** Each NExtLong sample is one sequence of the ``.bin/.idx`` pair, so the sequence
boundaries are the document boundaries, whatever the token ids (an EOS/BOS id inside a text does
not split it). GPT-NeoX's ``GPT2Dataset.__getitem__`` cuts a row from pieces of consecutive
sequences (``sample_idx``/``doc_idx``); :func:`document_ids_sample` reruns that unchanged code on a
shallow copy of the dataset whose token reader returns, for every piece it is asked for, the
piece's running number (1, 2, ...). The result, ``nextlong_document_ids`` (int64, one per token,
padding 0), is added to every sample and so lines up with the tokens in every ``pack_impl`` mode.

**Batch.** ``_get_batch`` broadcasts the ids over the tensor-parallel group like the tokens and
turns them into (:func:`document_batch`):

* the attention carrier: a bool tensor ``[b, 1, 1, s]``, ``True`` where an input token starts a
  document (:func:`document_starts`). It replaces GPT-NeoX's ``attention_mask`` and travels where
  the mask travels (through every layer; between pipeline stages DeepSpeed sends the last
  activation as fp16 and turns it back into bool, which is exact for 0/1);
* ``loss_mask`` set to 0 where the label belongs to another document than its input (the first
  token of each document is not predicted, as in ProLong's data collator).

**Attention** (patch of ``megatron.model.transformer.ParallelSelfAttention``):

* ``flash`` layers call flash-attn's varlen kernel with per-document ``cu_seqlens`` over the
  flattened ``[b * s]`` tokens (:func:`cu_seqlens_from_starts`), ``causal=True``: what ProLong does
  (``training/modeling_flash_llama.py``: ``flash_attn_varlen_kvpacked_func`` with the ``cu_seqlens``
  of the packed documents);
* ``global`` layers (and so every CPU run) get the exact equivalent, a block-diagonal causal mask
  ``[b, 1, s, s]`` (:func:`block_causal_mask`), combined with ``sliding_window_width`` like GPT-NeoX's
  own mask.

**Positions** do not restart per document. ProLong keeps the rotary positions of the packed row
("the positional embeddings are relative and stay valid"); with RoPE (and ALiBi) the attention
score of two tokens depends only on their distance, so with the block-diagonal mask each document's
outputs equal those of the document alone up to float rounding. Absolute position embeddings
(``learned``, ``sinusoidal``) would not, and are refused (:func:`neox_plugin.config.check_document_attention`).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Key of the per-token document ids in the sample dictionaries of ``GPT2Dataset``.
DOC_BATCH_KEY = "nextlong_document_ids"
#: GPT-NeoX module whose attention is patched.
DOCUMENT_PATCH = "megatron.model.transformer"


class NExtLongDocumentError(RuntimeError):
    """Document-masked attention cannot be applied as configured."""


# --------------------------------------------------------------------------------------------
# dataset: per-token document ids, cut by the loader's own code
# --------------------------------------------------------------------------------------------

class _PieceNumberReader:
    """Stands in for the token reader: every ``get`` returns the piece's running number (1, 2, ...)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.sizes = reader.sizes
        self.count = 0

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.sizes[idx])
        n = size - int(offset) if length is None else min(int(length), size - int(offset))
        self.count += 1
        return np.full(max(n, 0), self.count, dtype=np.int64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


def document_ids_sample(dataset: Any, idx: int, getitem: Any, *, reader_attr: str = "indexed_dataset",
                        key: str = "text") -> np.ndarray:
    """Per-token document ids of sample ``idx``: 1 for the first sequence piece, 2 for the next, ..., 0 for padding.

    ``getitem`` is the loader's original ``__getitem__``; it runs on a shallow copy of ``dataset``
    whose token reader is a :class:`_PieceNumberReader`, so the ids are cut, padded and truncated
    exactly like the tokens.
    """
    view = copy.copy(dataset)
    setattr(view, reader_attr, _PieceNumberReader(getattr(dataset, reader_attr)))
    for a in ("label_dataset", "reward_dataset", "ref_dataset", "_nextlong_mask_view"):
        if a in view.__dict__:
            setattr(view, a, None)
    return np.asarray(getitem(view, idx)[key], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# batch: starts, loss mask, masks for the two attention paths
# --------------------------------------------------------------------------------------------

def document_starts(doc_ids: Any) -> Any:
    """``[b, s]`` bool: True where a token starts a document (position 0 of every row included)."""
    import torch

    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def is_document_starts(mask: Any) -> bool:
    """True for the attention carrier this module builds: bool ``[b, 1, 1, s]`` with ``s > 1``.

    GPT-NeoX's own mask is ``[1, 1, s, s]`` and the compact placeholder ``(1, 1, 1, 1)``; neither matches.
    """
    import torch

    return (torch.is_tensor(mask) and mask.dim() == 4 and mask.dtype == torch.bool
            and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] > 1)


def document_batch(doc_ids: Any, loss_mask: Any) -> tuple[Any, Any]:
    """From the broadcast ids ``[b, s+1]`` and GPT-NeoX's ``loss_mask`` ``[b, s]``: (carrier ``[b, 1, 1, s]``,
    loss mask with the cross-document predictions set to 0)."""
    doc_ids = doc_ids.long()
    if doc_ids.shape[0] != loss_mask.shape[0] or doc_ids.shape[1] != loss_mask.shape[1] + 1:
        raise NExtLongDocumentError(
            f"document ids {tuple(doc_ids.shape)} do not match loss_mask {tuple(loss_mask.shape)} (+1 token)"
        )
    inputs = doc_ids[:, :-1]
    same = (doc_ids[:, 1:] == inputs).to(loss_mask.dtype)
    starts = document_starts(inputs).to(loss_mask.device)
    return starts[:, None, None, :], loss_mask * same.to(loss_mask.device)


def block_causal_mask(starts: Any, sliding_window_width: int | None = None) -> Any:
    """GPT-NeoX-convention mask (True = masked) ``[b, 1, s, s]``: causal and inside the same document.

    ``starts`` is the carrier ``[b, 1, 1, s]`` or ``[b, s]``. With ``sliding_window_width`` a key more
    than that many positions before the query is masked too (as ``get_attn_mask`` does).
    """
    import torch

    st = starts.reshape(starts.shape[0], starts.shape[-1])
    doc = torch.cumsum(st.to(torch.int32), dim=1)
    s = st.shape[1]
    pos = torch.arange(s, device=st.device)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (pos[None, :, None] >= pos[None, None, :])
    if sliding_window_width is not None:
        allowed &= (pos[None, :, None] - pos[None, None, :]) <= int(sliding_window_width)
    return (~allowed)[:, None, :, :]


def cu_seqlens_from_starts(starts: Any) -> tuple[Any, int]:
    """(``cu_seqlens`` int32 ``[n_docs + 1]``, ``max_seqlen``) of the documents of the flattened ``[b * s]`` tokens.

    Every row starts a document, so no document crosses rows.
    """
    import torch

    st = starts.reshape(starts.shape[0], starts.shape[-1]).clone()
    st[:, 0] = True
    flat = st.reshape(-1)
    begin = torch.nonzero(flat, as_tuple=False).reshape(-1).to(torch.int32)
    end = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    cu = torch.cat([begin, end])
    return cu, int((cu[1:] - cu[:-1]).max().item())


def varlen_flash_attention(attn: Any, query_layer: Any, key_layer: Any, value_layer: Any, starts: Any) -> Any:
    """``ParallelSelfAttention.flash_attention`` with per-document ``cu_seqlens``.

    Inputs ``[s, b, heads, hn]`` (K/V may have fewer heads: grouped-query attention); returns
    ``[b, heads, s, hn]`` like the stock method. Uses ``attn.flash_varlen_qkv_fn`` (flash-attn's
    ``flash_attn_varlen_func``), with the stock method's dropout, sliding window and ALiBi arguments.
    """
    if getattr(attn, "use_triton", False):
        raise NExtLongDocumentError(
            "nextlong_document_attention with ALiBi needs flash-attn >= 2.4.0.post1 (the triton fallback GPT-NeoX "
            "uses below that version has no variable-length kernel)"
        )
    sq, b, nq, hn = query_layer.shape
    sk = key_layer.shape[0]
    if sq != sk:
        raise NExtLongDocumentError(f"document attention needs self-attention over one sequence, got sq={sq} sk={sk}")
    cu, max_len = cu_seqlens_from_starts(starts)
    q = query_layer.transpose(0, 1).reshape(b * sq, nq, hn)
    k = key_layer.transpose(0, 1).reshape(b * sk, key_layer.shape[2], -1)
    v = value_layer.transpose(0, 1).reshape(b * sk, value_layer.shape[2], -1)
    extra: dict[str, Any] = {}
    if getattr(attn, "sliding_window_width", None) is not None:
        extra["window_size"] = (attn.sliding_window_width, -1)
    if getattr(attn, "pos_emb", None) == "alibi":
        import torch

        extra["alibi_slopes"] = attn.alibi_embed.slopes.to(q.device).to(torch.float32)
    out = attn.flash_varlen_qkv_fn(
        q, k, v, cu, cu, max_len, max_len, attn.dropout_p if attn.training else 0.0,
        softmax_scale=None, causal=True, **extra,
    )
    return out.reshape(b, sq, nq, -1).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# GPT-NeoX patch: megatron.model.transformer.ParallelSelfAttention
# --------------------------------------------------------------------------------------------

def patch_self_attention(module: Any) -> bool:
    """Route ``ParallelSelfAttention`` through the document paths when it receives the carrier.

    ``forward`` recognises the carrier (:func:`is_document_starts`); ``flash`` layers keep it for
    ``flash_attention``, which then runs :func:`varlen_flash_attention`; ``global`` layers get
    :func:`block_causal_mask` as their ``attention_mask``. Any other mask goes to the stock code
    unchanged, so runs without the key (and generation) are stock GPT-NeoX.
    """
    cls = getattr(module, "ParallelSelfAttention", None)
    if cls is None or not all(hasattr(cls, n) for n in ("forward", "flash_attention", "attention")):
        return False
    if getattr(cls.forward, "_nextlong", False):
        return True
    orig_forward, orig_flash = cls.forward, cls.flash_attention

    @functools.wraps(orig_forward)
    def forward(self: Any, hidden_states: Any, attention_mask: Any, layer_past: Any = None) -> Any:
        if not is_document_starts(attention_mask):
            return orig_forward(self, hidden_states, attention_mask, layer_past=layer_past)
        if getattr(self, "use_flash_attention", False):
            self._nextlong_doc_starts = attention_mask
            try:
                return orig_forward(self, hidden_states, attention_mask, layer_past=layer_past)
            finally:
                self._nextlong_doc_starts = None
        if getattr(self, "sparse", False):
            raise NExtLongDocumentError(
                f"nextlong_document_attention reached a {getattr(self, 'attention_type', '?')!r} layer, which it "
                "cannot mask (only flash and global layers are allowed)"
            )
        dense = block_causal_mask(attention_mask, getattr(self, "sliding_window_width", None))
        return orig_forward(self, hidden_states, dense, layer_past=layer_past)

    @functools.wraps(orig_flash)
    def flash_attention(self: Any, query_layer: Any, key_layer: Any, value_layer: Any) -> Any:
        starts = self.__dict__.get("_nextlong_doc_starts")
        if starts is None:
            return orig_flash(self, query_layer, key_layer, value_layer)
        return varlen_flash_attention(self, query_layer, key_layer, value_layer, starts)

    forward._nextlong = True  # type: ignore[attr-defined]
    flash_attention._nextlong = True  # type: ignore[attr-defined]
    cls.forward = forward
    cls.flash_attention = flash_attention
    return True

