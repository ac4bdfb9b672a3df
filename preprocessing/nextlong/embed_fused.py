"""bf16 inference on CPUs with native bf16 (AVX-512 BF16 / AMX): the transformer's linear layers as oneDNN
matmuls on weights packed once, with the bias, the exact GELU of a BERT-style intermediate layer and the residual
add of a BERT-style output layer fused into the matmul.

Why: eager bf16 ``nn.Linear`` on CPU copies the broadcast bias into every output before the matmul (13% of the
forward on all-MiniLM-L6-v2), and the separate GELU and residual add each read and write the largest activations
of the layer once more. The fused ops are the ones PyTorch's own compiler emits for CPU (``mkldnn::_linear_pointwise``);
here they are applied to the eager model without compiling. Only modules whose structure is recognised are fused;
the rest of the model (embeddings, attention, LayerNorm, pooling) runs unchanged.

:func:`fuse_cpu_bf16` reports what it changed; with no mkldnn ops in the torch build it changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

# output modules computing LayerNorm(dropout(dense(h)) + input_tensor), by class name (BERT family in transformers)
_RESIDUAL_OUTPUTS = frozenset({
    "BertSelfOutput", "BertOutput", "RobertaSelfOutput", "RobertaOutput", "XLMRobertaSelfOutput",
    "XLMRobertaOutput", "ElectraSelfOutput", "ElectraOutput", "CamembertSelfOutput", "CamembertOutput",
})
# intermediate modules computing act(dense(h)), by class name
_INTERMEDIATES = frozenset({"BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate",
                            "ElectraIntermediate", "CamembertIntermediate"})


# encoder self-attention modules with query/key/value linears and the SDPA attention function, by class name
_SELF_ATTENTIONS = frozenset({"BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention",
                              "ElectraSelfAttention", "CamembertSelfAttention"})


def fused_ops_available() -> bool:
    """Whether this torch build has the oneDNN packed-linear ops."""
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """``nn.Linear`` (+ optional exact GELU) in bf16 with the weight packed once for oneDNN."""

    def __init__(self, linear: nn.Linear, gelu: bool = False) -> None:
        super().__init__()
        w = linear.weight.detach().to(torch.bfloat16)
        self.out_features = linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(w, None), persistent=False)
        b = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", b, persistent=False)
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.gelu:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "gelu", [], "none")
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``linear(x) + other`` in one oneDNN call."""
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise.binary(x.reshape(-1, shape[-1]), other.reshape(-1, self.out_features),
                                                      self.packed_weight, self.bias, "add")
        return y.reshape(*shape[:-1], self.out_features)


class FusedIntermediate(nn.Module):
    """``gelu(dense(h))`` as one packed matmul with a GELU post-op."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.dense = PackedLinear(dense, gelu=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


class FusedResidualOutput(nn.Module):
    """``LayerNorm(dense(h) + input_tensor)`` (inference: dropout is the identity) with the add in the matmul."""

    def __init__(self, dense: nn.Linear, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.dense = PackedLinear(dense)
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense.forward_add(hidden_states, input_tensor.to(torch.bfloat16)))


class FusedSelfAttention(nn.Module):
    """Encoder self-attention: query, key and value as one packed matmul, then the CPU flash-attention kernel
    (``scaled_dot_product_attention``, called as the model's ``sdpa`` implementation calls it: same mask, same
    scale, no dropout, not causal)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        q, k, v = attn.query, attn.key, attn.value
        qkv = nn.Linear(q.in_features, 3 * q.out_features, bias=True)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]).float())
            qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]).float())
        self.qkv = PackedLinear(qkv)
        self.heads = attn.num_attention_heads
        self.head_size = attn.attention_head_size
        self.scaling = attn.scaling

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        if cache is not None:
            raise ValueError("FusedSelfAttention is for encoders (no cache)")
        b, n, _ = hidden_states.shape
        # [3, batch, heads, tokens, head_size] views of the one matmul's output (a contiguous copy was no faster)
        qkv = self.qkv(hidden_states).view(b, n, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attention_mask,
                                                         dropout_p=0.0, scale=self.scaling, is_causal=False)
        return out.transpose(1, 2).reshape(b, n, self.heads * self.head_size), None


def _is_plain_sdpa_encoder_attention(m: nn.Module) -> bool:
    cfg = getattr(m, "config", None)
    return (type(m).__name__ in _SELF_ATTENTIONS and all(isinstance(getattr(m, a, None), nn.Linear) and
                                                          getattr(m, a).bias is not None
                                                          for a in ("query", "key", "value"))
            and getattr(cfg, "_attn_implementation", None) == "sdpa" and not getattr(m, "is_decoder", True)
            and not getattr(m, "is_causal", True) and not getattr(m, "is_cross_attention", False)
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute")


def _is_exact_gelu(act: nn.Module) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu


def fuse_cpu_bf16(model: nn.Module) -> dict:
    """Swap ``model``'s recognised modules (already in bf16, on CPU, in eval mode) for fused ones, in place.
    Returns counts: ``attention`` (self-attention layers), ``linear`` (plain packed), ``gelu`` (intermediate
    layers), ``residual`` (output layers)."""
    counts = {"attention": 0, "linear": 0, "gelu": 0, "residual": 0}
    if not fused_ops_available():
        return counts

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            dense = getattr(child, "dense", None)
            if _is_plain_sdpa_encoder_attention(child):
                setattr(parent, name, FusedSelfAttention(child))
                counts["attention"] += 1
            elif kind in _INTERMEDIATES and isinstance(dense, nn.Linear) and _is_exact_gelu(
                    getattr(child, "intermediate_act_fn", None)):
                setattr(parent, name, FusedIntermediate(dense))
                counts["gelu"] += 1
            elif kind in _RESIDUAL_OUTPUTS and isinstance(dense, nn.Linear) and isinstance(
                    getattr(child, "LayerNorm", None), nn.LayerNorm):
                setattr(parent, name, FusedResidualOutput(dense, child.LayerNorm))
                counts["residual"] += 1
            elif type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear(child))
                counts["linear"] += 1
            else:
                visit(child)

    visit(model)
    return counts
