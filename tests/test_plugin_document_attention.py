"""Document-masked attention without GPT-NeoX: masks, cu_seqlens, the varlen path, the checks.

The real-GPT-NeoX test (packed row vs each document alone) is tests/test_neox_document_attention.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neox_plugin.config import NExtLongConfigError, check_document_attention, config_from_args
from neox_plugin.document_attention import (
    block_causal_mask,
    cu_seqlens_from_starts,
    document_batch,
    document_ids_sample,
    document_starts,
    is_document_starts,
    varlen_flash_attention,
)

LLAMA = {"num_layers": 4, "attention_config": [[["flash"], 4]], "pos_emb": "rotary"}


def _ids(rows: list[list[int]]) -> torch.Tensor:
    """Per-token document ids from per-row document lengths."""
    return torch.tensor([sum(([i + 1] * n for i, n in enumerate(r)), []) for r in rows])


def test_block_causal_mask_matches_the_definition() -> None:
    ids = _ids([[3, 1, 4], [8]])
    mask = block_causal_mask(document_starts(ids)[:, None, None, :])
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(8):
            for j in range(8):
                allowed = j <= i and ids[b, i] == ids[b, j]
                assert bool(mask[b, 0, i, j]) is (not allowed), (b, i, j)


def test_block_causal_mask_with_sliding_window() -> None:
    ids = _ids([[6, 2]])
    mask = block_causal_mask(document_starts(ids), sliding_window_width=2)[0, 0]
    assert not mask[5, 3] and mask[5, 2]  # 2 back allowed, 3 back masked
    assert mask[6, 5] and not mask[7, 6]  # other document masked


def test_cu_seqlens_of_flattened_rows() -> None:
    ids = _ids([[3, 1, 4], [8], [5, 3]])
    cu, max_len = cu_seqlens_from_starts(document_starts(ids)[:, None, None, :])
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 8, 16, 21, 24] and max_len == 8


def test_document_ids_that_repeat_across_rows_still_split_rows() -> None:
    ids = torch.tensor([[1, 1, 1, 1], [1, 1, 2, 2]])  # row 2 starts with the same id as row 1 ends
    cu, _ = cu_seqlens_from_starts(document_starts(ids))
    assert cu.tolist() == [0, 4, 6, 8]


def test_document_batch_zeroes_cross_document_predictions() -> None:
    ids = torch.tensor([[1, 1, 1, 2, 2, 3]])  # s + 1 = 6 tokens
    loss_mask = torch.ones(1, 5)
    carrier, lm = document_batch(ids, loss_mask)
    assert carrier.shape == (1, 1, 1, 5) and is_document_starts(carrier)
    assert carrier[0, 0, 0].tolist() == [True, False, False, True, False]
    assert lm.tolist() == [[1, 1, 0, 1, 0]]  # token 2 -> 3 and 4 -> 5 cross a boundary
    with pytest.raises(RuntimeError, match="do not match loss_mask"):
        document_batch(ids[:, :5], loss_mask)


def test_carrier_is_told_apart_from_neox_masks() -> None:
    assert not is_document_starts(torch.ones(1, 1, 8, 8, dtype=torch.bool))  # stock causal mask
    assert not is_document_starts(torch.ones(1, 1, 1, 1, dtype=torch.bool))  # compact placeholder
    assert is_document_starts(torch.ones(2, 1, 1, 8, dtype=torch.bool))


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale=None, causal=False, **kw):
    """flash_attn_varlen_func's contract in plain torch: causal attention inside each [cu[i], cu[i+1]) range,
    grouped-query heads shared."""
    assert dropout_p == 0.0 and causal and not kw and torch.equal(cu_q, cu_k)
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
        vs = v[s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
        out[s:e] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


class _FlashLayer(torch.nn.Module):
    """The attributes of GPT-NeoX's ParallelSelfAttention that the varlen path reads (flash-attn needs a GPU)."""

    sliding_window_width = None
    pos_emb = "rotary"
    use_triton = False
    dropout_p = 0.0
    flash_varlen_qkv_fn = staticmethod(_reference_varlen)


def test_varlen_path_equals_each_document_alone_and_the_dense_mask() -> None:
    torch.manual_seed(0)
    rows = [[5, 3, 8], [16]]
    s, b, nq, nkv, hn = 16, 2, 4, 2, 8
    q, k, v = torch.randn(s, b, nq, hn), torch.randn(s, b, nkv, hn), torch.randn(s, b, nkv, hn)
    starts = document_starts(_ids(rows))[:, None, None, :]
    out = varlen_flash_attention(_FlashLayer().eval(), q, k, v, starts)
    assert out.shape == (b, nq, s, hn)
    # each document alone, through plain causal attention
    for r, lens in enumerate(rows):
        pos = 0
        for n in lens:
            qs = q[pos : pos + n, r].transpose(0, 1)
            ks = k[pos : pos + n, r].repeat_interleave(2, dim=1).transpose(0, 1)
            vs = v[pos : pos + n, r].repeat_interleave(2, dim=1).transpose(0, 1)
            alone = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            torch.testing.assert_close(out[r, :, pos : pos + n], alone, rtol=1e-5, atol=1e-6)
            pos += n
    # the dense block-diagonal mask (the global-layer path, GPT-NeoX convention: True = masked)
    mask = block_causal_mask(starts)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k.repeat_interleave(2, dim=2)) / math.sqrt(hn)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    dense = torch.einsum("bhst,tbhd->bhsd", probs, v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)


def test_varlen_path_refuses_the_triton_alibi_fallback() -> None:
    layer = _FlashLayer()
    layer.use_triton = True
    x = torch.zeros(4, 1, 2, 4)
    with pytest.raises(RuntimeError, match="flash-attn >= 2.4.0.post1"):
        varlen_flash_attention(layer, x, x, x, torch.ones(1, 1, 1, 4, dtype=torch.bool))


class _Reader:
    def __init__(self, sizes: list[int]) -> None:
        self.sizes = np.array(sizes)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        end = self.sizes[idx] if length is None else offset + length
        return np.arange(offset, end) + 100 * idx


class _Packed:
    """Two samples of a packed dataset over sequences of sizes [5, 3, 9], like GPT2Dataset's sample_idx."""

    def __init__(self) -> None:
        self.indexed_dataset = _Reader([5, 3, 9])
        self.sample_idx = [(0, 0), (2, 1), (2, 8)]  # sample 0: 5 + 3 + 2 tokens, sample 1: 8 tokens of seq 2

    def getitem(self, i: int) -> dict:
        (df, of), (dl, ol) = self.sample_idx[i], self.sample_idx[i + 1]
        if df == dl:
            return {"text": self.indexed_dataset.get(df, of, ol - of + 1)}
        parts = [self.indexed_dataset.get(df, of)] + [self.indexed_dataset.get(j) for j in range(df + 1, dl)]
        parts.append(self.indexed_dataset.get(dl, 0, ol + 1))
        return {"text": np.concatenate(parts)}


def test_document_ids_follow_the_loaders_pieces() -> None:
    ds = _Packed()
    get = _Packed.getitem
    assert document_ids_sample(ds, 0, get).tolist() == [1] * 5 + [2] * 3 + [3] * 2
    assert document_ids_sample(ds, 1, get).tolist() == [1] * 8
    assert ds.indexed_dataset.get(0).tolist() == [0, 1, 2, 3, 4], "the dataset's own reader is untouched"


def test_recipe_like_config_is_accepted() -> None:
    cfg = config_from_args({**LLAMA, "nextlong_document_attention": True, "pipe_parallel_size": 2,
                            "sequence_parallel": True})
    assert cfg.document_attention and not cfg.enabled


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_config": [[["flash", "mamba"], "all"]]}, "'mamba' at layers 1, 3"),
        ({"attention_config": [[["bigbird"], 4]]}, "'bigbird' at layers 0-3"),
        ({"pos_emb": "learned"}, "pos_emb: learned"),
        ({"pos_emb": None}, "pos_emb: learned"),  # GPT-NeoX's default
        ({"te_mha": True}, "te_mha: true"),
        ({"attention_config": [[["global"], 4]], "scaled_upper_triang_masked_softmax_fusion": True},
         "scaled_upper_triang_masked_softmax_fusion"),
        ({"train_impl": "dpo"}, "train_impl: dpo"),
        ({"curriculum_learning": {"enabled": True}}, "curriculum_learning"),
    ],
)
def test_refused_where_it_cannot_be_honoured(change: dict, message: str) -> None:
    args = {**LLAMA, "nextlong_document_attention": True, **change}
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(NExtLongConfigError, match="nextlong_document_attention is true but cannot be honoured") as e:
        check_document_attention(args)
    assert message in str(e.value)


def test_key_must_be_a_bool() -> None:
    with pytest.raises(NExtLongConfigError, match="nextlong_document_attention must be true or false"):
        config_from_args({**LLAMA, "nextlong_document_attention": "yes"})


def test_sequential_path_keeps_the_carrier() -> None:
    """GPT-NeoX's get_batch_sequential rebuilds the mask from the tokens; with the carrier it is passed on."""
    import types

    from neox_plugin.neox import _patch_batch_sequential

    def get_batch_sequential(forward_input, neox_args):
        return (forward_input[0], forward_input[1], torch.ones(1, 1, 4, 4, dtype=torch.bool))

    module = types.SimpleNamespace(get_batch_sequential=get_batch_sequential)
    _patch_batch_sequential(module)
    tokens, pos = torch.zeros(2, 4, dtype=torch.long), torch.arange(4).expand(2, 4)
    carrier = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    assert module.get_batch_sequential((tokens, pos, carrier), None)[2] is carrier
    stock = module.get_batch_sequential((tokens, pos, torch.ones(1, 1, 1, 1, dtype=torch.bool)), None)
    assert stock[2].shape == (1, 1, 4, 4)
