#!/usr/bin/env python3
"""Per-GPU memory and step-time plan for a GPT-NeoX training config.

Reads one or more GPT-NeoX YAML/JSON configs, merged the way ``deepy.py`` merges them (a key may appear in only
one file; ``-`` in keys means ``_``), and prints every memory term of the busiest GPU with its formula:
weights, gradients, optimizer states under the ZeRO stage, activation checkpoints, the recompute working set of
one layer under sequence parallelism, the flash-attention workspace, the LM-head logits and loss buffers (chunked
when ``nextlong_loss_chunk_size`` > 0), plus tokens per step and the step time at a stated MFU. The last line is
``total per GPU: <N> GiB``.

Model of the step (assumptions are printed too):

* bf16 training with an fp32 master copy and Adam moments (12 bytes per parameter), sharded over data-parallel
  ranks for ZeRO stage >= 1; gradients in ``data_types.grad_accum_dtype`` (fp32 here), sharded for ZeRO >= 2.
* Full activation checkpointing keeps one bf16 [s, b, h] input per layer and per in-flight micro-batch, divided by
  the tensor-parallel size under sequence parallelism (or DeepSpeed ``partition_activations``).
* The backward pass recomputes one layer at a time; that layer's activations and their gradients (x2) form the
  working set. With flash attention no [s, s] score matrix exists.
* The logits phase (end of forward / start of backward on the last pipeline stage) and the layer-recompute phase
  do not overlap: the peak is persistent memory + checkpoints + the larger of the two phases.
* GPT-NeoX's stock ``get_attn_mask`` builds a dense [s, s] mask for every batch (counted as 9 s^2 bytes: fp32 ones,
  fp32 tril, bool result). With ``nextlong_compact_attention_mask: true`` the plugin returns a (1, 1, 1, 1) bool
  placeholder instead (flash attention never reads the mask), counted as 1 byte; ``--stock-attention-mask``
  counts the stock mask anyway, to show what the key saves.

Only the standard library, pyyaml and numpy-free arithmetic are used, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch/ as a script directory, also when imported
from neox_configs import merge_configs  # noqa: E402

LOG = logging.getLogger("plan_memory")

GIB = float(1 << 30)
LLAMA3_VOCAB = 128256
H100_BF16_DENSE_TFLOPS = 989.0
#: bytes of the (1, 1, 1, 1) bool placeholder neox_plugin returns with nextlong_compact_attention_mask: true
PLACEHOLDER_MASK_BYTES = 1


# --------------------------------------------------------------------------------------------------------------
# config loading
# --------------------------------------------------------------------------------------------------------------


def load_configs(paths: list[str | Path]) -> dict[str, Any]:
    """Merge GPT-NeoX config files like ``NeoXArgs.from_ymls``: duplicate keys are an error, ``-`` becomes ``_``
    (:func:`neox_configs.merge_configs`, which the JSON variants are generated with)."""
    return merge_configs(paths)


# --------------------------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------------------------


def mlp_sizes(cfg: dict[str, Any]) -> tuple[int, int]:
    """(linear1 output, linear2 input) exactly as GPT-NeoX's ParallelMLP sizes them (megatron/model/transformer.py)."""
    hidden = int(cfg["hidden_size"])
    multiple = int(cfg.get("mlp_multiple_of", 1))
    if cfg.get("intermediate_size"):
        ffn = int(cfg["intermediate_size"])
    elif cfg.get("expansion_factor"):
        ffn = int(float(cfg["expansion_factor"]) * hidden)
    else:
        ffn = 4 * hidden
    ffn_in = ffn
    if str(cfg.get("activation", "gelu")) in {"swiglu", "geglu", "reglu"}:
        ffn = int(ffn * 2 / 3)
        ffn_in = ffn // 2
    ffn = (2 * multiple) * ((ffn + 2 * multiple - 1) // (2 * multiple))
    ffn_in = multiple * ((ffn_in + multiple - 1) // multiple)
    return ffn, ffn_in


def padded_vocab(vocab: int, cfg: dict[str, Any]) -> int:
    """GPT-NeoX's ``_vocab_size_with_padding``: round up to make_vocab_size_divisible_by x model_parallel_size."""
    multiple = int(cfg.get("make_vocab_size_divisible_by", 128)) * tensor_parallel(cfg)
    return multiple * ((vocab + multiple - 1) // multiple)


def tensor_parallel(cfg: dict[str, Any]) -> int:
    return max(1, int(cfg.get("model_parallel_size", 1)))


def pipeline_parallel(cfg: dict[str, Any]) -> int:
    return max(1, int(cfg.get("pipe_parallel_size", 0)))


@dataclass
class ParamCount:
    """Parameter counts (elements) of the model; ``*_tp`` are the parts split by tensor parallelism."""

    embedding: int
    lm_head: int
    final_norm: int
    layer_tp: int  # split over tensor-parallel ranks
    layer_replicated: int  # norms (replicated on every rank)
    num_layers: int

    @property
    def layer(self) -> int:
        return self.layer_tp + self.layer_replicated

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.final_norm + self.num_layers * self.layer

    @property
    def matmul(self) -> int:
        """Parameters that take part in a matrix multiply per token (everything but the embedding lookup and norms)."""
        return self.lm_head + self.num_layers * self.layer_tp + (self.embedding if self.lm_head == 0 else 0)


def count_parameters(cfg: dict[str, Any], vocab: int = LLAMA3_VOCAB) -> ParamCount:
    """Count parameters of a GPT-NeoX decoder built from ``cfg`` (rotary, no learned positions)."""
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_kv_heads") or heads)
    head_dim = h // heads
    ffn, ffn_in = mlp_sizes(cfg)
    v = padded_vocab(vocab, cfg)
    qkv_out = h + 2 * kv * head_dim
    attn = h * qkv_out + h * h
    if cfg.get("use_bias_in_attn_linear", True):
        attn += qkv_out + h
    mlp = h * ffn + ffn_in * h
    if cfg.get("use_bias_in_mlp", True):
        mlp += ffn + h
    norm_params = h * (2 if (cfg.get("norm", "layernorm") == "layernorm" and cfg.get("use_bias_in_norms", True)) else 1)
    return ParamCount(
        embedding=v * h,
        lm_head=v * h if cfg.get("no_weight_tying", False) else 0,
        final_norm=norm_params,
        layer_tp=attn + mlp,
        layer_replicated=2 * norm_params,
        num_layers=int(cfg["num_layers"]),
    )


# --------------------------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    global_batch: int  # sequences per optimizer step
    micro_batch: int  # sequences per GPU per forward/backward
    grad_accum: int
    data_parallel: int
    num_gpus: int
    seq_length: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length


def batch_layout(cfg: dict[str, Any], num_gpus: int | None = None) -> Batch:
    """Resolve micro batch x grad accumulation x data-parallel size = global batch, like GPT-NeoX does."""
    tp, pp = tensor_parallel(cfg), pipeline_parallel(cfg)
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps")
    glob = cfg.get("train_batch_size")
    if num_gpus is None:
        if glob is None or micro is None or accum is None:
            raise ValueError(
                "give --num-gpus or set train_batch_size, train_micro_batch_size_per_gpu and "
                "gradient_accumulation_steps"
            )
        if glob % (micro * accum):
            raise ValueError(f"train_batch_size {glob} is not a multiple of micro batch {micro} x accumulation {accum}")
        dp = glob // (micro * accum)
        num_gpus = dp * tp * pp
    if num_gpus % (tp * pp):
        raise ValueError(f"{num_gpus} GPUs are not a multiple of tensor x pipeline parallel = {tp} x {pp}")
    dp = num_gpus // (tp * pp)
    micro = int(micro or 1)
    accum = int(accum or 1)
    if glob is None:
        glob = micro * accum * dp
    if glob != micro * accum * dp:
        raise ValueError(
            f"batch mismatch: train_batch_size {glob} != micro {micro} x accumulation {accum} x "
            f"data-parallel {dp} (on {num_gpus} GPUs)"
        )
    return Batch(int(glob), micro, accum, dp, num_gpus, int(cfg["seq_length"]))


# --------------------------------------------------------------------------------------------------------------
# memory plan
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Term:
    name: str
    nbytes: float
    formula: str


@dataclass
class StagePlan:
    stage: int
    params: int
    persistent: list[Term] = field(default_factory=list)
    checkpoints: list[Term] = field(default_factory=list)
    logits_phase: list[Term] = field(default_factory=list)
    layer_phase: list[Term] = field(default_factory=list)
    fixed: list[Term] = field(default_factory=list)

    @staticmethod
    def _sum(terms: list[Term]) -> float:
        return float(sum(t.nbytes for t in terms))

    @property
    def peak_phase(self) -> float:
        return max(self._sum(self.logits_phase), self._sum(self.layer_phase))

    @property
    def total(self) -> float:
        return self._sum(self.persistent) + self._sum(self.checkpoints) + self.peak_phase + self._sum(self.fixed)

    @property
    def overlap_bound(self) -> float:
        return (
            self._sum(self.persistent)
            + self._sum(self.checkpoints)
            + self._sum(self.logits_phase)
            + self._sum(self.layer_phase)
            + self._sum(self.fixed)
        )


@dataclass
class Options:
    vocab_size: int = LLAMA3_VOCAB
    num_gpus: int | None = None
    overhead_gib: float = 4.0
    stock_attention_mask: bool = False


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Transformer layers per pipeline stage (GPT-NeoX's default partition balances transformer layers)."""
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def plan_stage(cfg: dict[str, Any], batch: Batch, stage: int, opts: Options) -> StagePlan:
    """Memory terms of one GPU of pipeline stage ``stage``."""
    tp, pp = tensor_parallel(cfg), pipeline_parallel(cfg)
    dp = batch.data_parallel
    pc = count_parameters(cfg, opts.vocab_size)
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_kv_heads") or heads)
    head_dim = h // heads
    _, ffn_in = mlp_sizes(cfg)
    v = padded_vocab(opts.vocab_size, cfg)
    s = batch.seq_length
    b = batch.micro_batch
    layers = stage_layers(pc.num_layers, pp)[stage]
    first, last = stage == 0, stage == pp - 1
    sp = bool(cfg.get("sequence_parallel", False)) and tp > 1
    split_act = sp or (bool(cfg.get("partition_activations", False)) and tp > 1)
    precision = str(cfg.get("precision", "fp32"))
    pbytes = 2 if precision in {"bfloat16", "fp16"} else 4
    grad_dtype = (cfg.get("data_types") or {}).get("grad_accum_dtype")
    gbytes = 4 if grad_dtype == "fp32" else pbytes
    zero = int((cfg.get("zero_optimization") or {}).get("stage", 0))
    in_flight = min(pp - stage, batch.grad_accum) if pp > 1 else 1

    params = layers * (pc.layer_tp // tp + pc.layer_replicated)
    if first:
        params += pc.embedding // tp
    if last:
        params += pc.lm_head // tp + pc.final_norm
    sp_out = StagePlan(stage=stage, params=params)

    # ---- persistent: weights, gradients, optimizer ----
    sp_out.persistent.append(
        Term("weights", pbytes * params, f"{pbytes} B x P_gpu = {pbytes} x {_fmt_int(params)} params ({precision})")
    )
    if zero >= 2:
        sp_out.persistent.append(
            Term(
                "gradients",
                gbytes * params / dp,
                f"{gbytes} B x P_gpu / DP = {gbytes} x {_fmt_int(params)} / {dp} (ZeRO-{zero})",
            )
        )
    else:
        sp_out.persistent.append(
            Term(
                "gradients",
                gbytes * params,
                f"{gbytes} B x P_gpu = {gbytes} x {_fmt_int(params)} "
                f"({'fp32' if gbytes == 4 else 'bf16'} accumulation, ZeRO-{zero} keeps them whole)",
            )
        )
    obytes = 12 if pbytes == 2 else 8
    what = "fp32 master + Adam m + v" if obytes == 12 else "Adam m + v"
    if zero >= 1:
        sp_out.persistent.append(
            Term(
                "optimizer states",
                obytes * params / dp,
                f"{obytes} B x P_gpu / DP = {obytes} x {_fmt_int(params)} / {dp} ({what}, ZeRO-{zero})",
            )
        )
    else:
        sp_out.persistent.append(
            Term(
                "optimizer states",
                obytes * params,
                f"{obytes} B x P_gpu = {obytes} x {_fmt_int(params)} ({what}, ZeRO-0)",
            )
        )
    if zero >= 1:
        zcfg = cfg.get("zero_optimization") or {}
        rb = int(zcfg.get("reduce_bucket_size", 500_000_000))
        ab = int(zcfg.get("allgather_bucket_size", 500_000_000))
        sp_out.persistent.append(
            Term(
                "ZeRO buckets",
                2 * (rb + ab),
                f"2 B x (reduce_bucket + allgather_bucket) = 2 x ({_fmt_int(rb)} + {_fmt_int(ab)})",
            )
        )

    # ---- activation checkpoints ----
    div = tp if split_act else 1
    how = "/ TP (sequence parallel)" if sp else ("/ TP (partition_activations)" if split_act else "(not split)")
    if cfg.get("checkpoint_activations", False):
        every = max(1, int(cfg.get("checkpoint_num_layers", 1)))
        kept = math.ceil(layers / every)
        sp_out.checkpoints.append(
            Term(
                "activation checkpoints",
                2 * s * b * h * kept * in_flight / div,
                f"2 B x s x b x h x ckpts x in-flight {how} = "
                f"2 x {_fmt_int(s)} x {b} x {h} x {kept} x {in_flight} / {div}",
            )
        )
    # per-layer activations kept for backward (elements per token), see module docstring
    sharded = (h + 2 * kv * head_dim) + h + 3 * ffn_in  # q,k,v ; attention out ; linear1 out (2 ffn) + swiglu out
    seq_terms = 4 * h  # norm1 in/out, norm2 in/out
    per_tok = 2 * (sharded / tp + seq_terms / (tp if sp else 1))
    layer_acts = per_tok * s * b
    formula_layer = (
        f"2 B x s x b x [(h + 2 kv d + h + 3 f_in) / TP + 4h{' / TP' if sp else ''}] "
        f"= 2 x {_fmt_int(s)} x {b} x [({h} + {2 * kv * head_dim} + {h} + {3 * ffn_in}) / {tp} + {4 * h}"
        f"{' / ' + str(tp) if sp else ''}]"
    )
    if not cfg.get("checkpoint_activations", False):
        sp_out.checkpoints.append(
            Term(
                "stored activations (no checkpointing)",
                layer_acts * layers * in_flight,
                f"[layer activations] x layers x in-flight; layer = {formula_layer}",
            )
        )
    else:
        sp_out.layer_phase.append(
            Term("recompute working set", 2 * layer_acts, f"2 (activations + their grads) x {formula_layer}")
        )
    flash = "flash" in str(cfg.get("attention_config", ""))
    if flash:
        gqa_extra = 4 if kv < heads else 0
        fa = s * b * (h / tp) * (4 + gqa_extra) + s * b * (heads / tp) * 4
        sp_out.layer_phase.append(
            Term(
                "flash-attention workspace",
                fa,
                f"s x b x (h/TP) x (4 B fp32 dq{' + 2 x 2 B expanded dk,dv (GQA)' if gqa_extra else ''})"
                f" + s x b x heads/TP x 4 B lse = {_fmt_int(s)} x {b} x {h // tp} x {4 + gqa_extra}"
                f" + {_fmt_int(s)} x {b} x {heads // tp} x 4",
            )
        )
    else:
        scores = 2 * s * s * b * heads / tp * 2
        sp_out.layer_phase.append(
            Term(
                "attention scores (no flash)",
                scores,
                f"2 B x s^2 x b x heads/TP x 2 (scores + probs) = 2 x {_fmt_int(s)}^2 x {b} x {heads // tp} x 2",
            )
        )
    sp_out.fixed.append(
        Term("rotary cos/sin cache", 2 * 4 * s * head_dim, f"2 x 4 B x s x head_dim = 8 x {_fmt_int(s)} x {head_dim}")
    )
    if pp > 1:
        p2p = 2 * 2 * s * b * h / (tp if sp else 1)
        sp_out.fixed.append(
            Term(
                "pipeline send/recv buffers",
                p2p,
                f"2 (send+recv) x 2 B x s x b x h{' / TP' if sp else ''} = 4 x {_fmt_int(s)} x {b} x {h}"
                f"{' / ' + str(tp) if sp else ''}",
            )
        )

    # ---- logits and loss (last stage) ----
    if last:
        vt = v // tp
        sp_out.logits_phase.append(
            Term("LM-head input (gathered)", 2 * s * b * h, f"2 B x s x b x h = 2 x {_fmt_int(s)} x {b} x {h}")
        )
        chunk = int(cfg.get("nextlong_loss_chunk_size", 0) or 0)
        if chunk > 0 and chunk < s:
            sp_out.logits_phase.append(
                Term(
                    "logits bf16 + their grad",
                    4 * s * b * vt,
                    f"(2 + 2) B x s x b x V/TP = 4 x {_fmt_int(s)} x {b} x {_fmt_int(vt)}",
                )
            )
            sp_out.logits_phase.append(
                Term(
                    "loss chunk fp32 buffers",
                    12 * chunk * b * vt,
                    f"(4 logits + 4 softmax + 4 grad) B x chunk x b x V/TP = 12 x {_fmt_int(chunk)}"
                    f" x {b} x {_fmt_int(vt)}",
                )
            )
        else:
            sp_out.logits_phase.append(
                Term(
                    "logits + stock cross-entropy",
                    12 * s * b * vt,
                    f"(2 bf16 + 4 fp32 copy + 4 fp32 softmax + 2 bf16 grad) B x s x b x V/TP = "
                    f"12 x {_fmt_int(s)} x {b} x {_fmt_int(vt)}",
                )
            )
        sp_out.logits_phase.append(
            Term(
                "labels, loss mask, loss weights",
                16 * s * b,
                f"(8 int64 labels + 4 mask + 4 weights) B x s x b = 16 x {_fmt_int(s)} x {b}",
            )
        )
    compact_mask = bool(cfg.get("nextlong_compact_attention_mask", False))
    if compact_mask and not opts.stock_attention_mask:
        sp_out.fixed.append(
            Term(
                "attention mask placeholder",
                PLACEHOLDER_MASK_BYTES,
                "1 B bool x (1, 1, 1, 1) (nextlong_compact_attention_mask: flash never reads the mask)",
            )
        )
    else:
        why = "--stock-attention-mask" if compact_mask else "nextlong_compact_attention_mask off"
        sp_out.fixed.append(
            Term(
                "stock [s, s] attention mask",
                9 * s * s,
                f"(4 B fp32 ones + 4 B tril + 1 B bool) x s^2 = 9 x {_fmt_int(s)}^2 ({why})",
            )
        )
    if cfg.get("nextlong_document_attention"):
        sp_out.fixed.extend(document_attention_terms(cfg, s, b, in_flight, pp))
    sp_out.fixed.append(
        Term("CUDA context, NCCL, allocator reserve", opts.overhead_gib * GIB, f"fixed {opts.overhead_gib:g} GiB")
    )
    return sp_out


def _strings(value: Any) -> set[str]:
    """Every string inside a nested list (the layer types of an ``attention_config``)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, (list, tuple)):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def document_attention_terms(cfg: dict[str, Any], s: int, b: int, in_flight: int, pp: int) -> list[Term]:
    """What ``nextlong_document_attention: true`` adds (neox_plugin.document_attention), per micro-batch.

    Document ids int64 [b, s+1] (broadcast like the tokens), the bool start carrier [b, 1, 1, s] (per in-flight
    micro-batch; sent between pipeline stages as fp16 like GPT-NeoX's mask), and for flash layers ``cu_seqlens``
    (int32) with the int64 ``nonzero`` index it is built from, bounded by one document per token. ``global`` layers
    also build a [b, 1, s, s] bool block-diagonal mask plus an int32 [b, s] cumulative sum.
    """
    ids = 8 * b * (s + 1)
    carrier = (1 + (2 if pp > 1 else 0)) * b * s * in_flight
    cu = 12 * (b * s + 1)
    terms = [Term(
        "document attention ids, starts, cu_seqlens",
        ids + carrier + cu,
        f"8 B x b x (s+1) ids + (1 B bool{' + 2 B fp16 pipeline buffer' if pp > 1 else ''}) x b x s x in-flight "
        f"+ (4 B int32 + 8 B int64) x (b x s + 1) upper bound = 8 x {b} x {_fmt_int(s + 1)} + "
        f"{1 + (2 if pp > 1 else 0)} x {b} x {_fmt_int(s)} x {in_flight} + 12 x {_fmt_int(b * s + 1)}",
    )]
    if "global" in _strings(cfg.get("attention_config") or ["global"]):  # GPT-NeoX's default layer type
        terms.append(Term(
            "block-diagonal mask (global layers)",
            b * s * s + 4 * b * s,
            f"1 B bool x b x s^2 + 4 B int32 x b x s = {b} x {_fmt_int(s)}^2 + 4 x {b} x {_fmt_int(s)}",
        ))
    return terms


def plan(cfg: dict[str, Any], opts: Options) -> tuple[Batch, list[StagePlan]]:
    batch = batch_layout(cfg, opts.num_gpus)
    return batch, [plan_stage(cfg, batch, st, opts) for st in range(pipeline_parallel(cfg))]


def step_flops(cfg: dict[str, Any], batch: Batch, vocab: int = LLAMA3_VOCAB) -> tuple[float, float, float]:
    """(total, dense, attention) model FLOPs of one optimizer step, causal attention, no recompute."""
    pc = count_parameters(cfg, vocab)
    tokens = batch.tokens_per_step
    dense = 6.0 * pc.matmul * tokens
    attn = 6.0 * pc.num_layers * int(cfg["hidden_size"]) * float(batch.seq_length) ** 2 * batch.global_batch
    return dense + attn, dense, attn


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def _line(term: Term) -> str:
    return f"  {term.name:<40s} {term.nbytes / GIB:8.2f} GiB   = {term.formula}"


def render(
    cfg: dict[str, Any], opts: Options, mfu: float, peak_tflops: float, gpu_gib: float, config_names: list[str]
) -> tuple[str, float]:
    batch, stages = plan(cfg, opts)
    tp, pp = tensor_parallel(cfg), pipeline_parallel(cfg)
    pc = count_parameters(cfg, opts.vocab_size)
    worst = max(stages, key=lambda st: st.total)
    out: list[str] = []
    out.append(f"configs: {' '.join(config_names)}")
    out.append(
        f"model: {_fmt_int(pc.total)} parameters ({pc.total / 1e9:.3f} B), padded vocab "
        f"{_fmt_int(padded_vocab(opts.vocab_size, cfg))}, MLP {mlp_sizes(cfg)[1]}"
    )
    zero = int((cfg.get("zero_optimization") or {}).get("stage", 0))
    out.append(
        f"layout: {batch.num_gpus} GPUs = TP {tp} x PP {pp} x DP {batch.data_parallel}; sequence parallel "
        f"{bool(cfg.get('sequence_parallel', False)) and tp > 1}; activation checkpointing "
        f"{bool(cfg.get('checkpoint_activations', False))}; ZeRO-{zero}"
    )
    out.append(
        f"batch: {batch.global_batch} sequences = micro {batch.micro_batch} x accumulation {batch.grad_accum} "
        f"x DP {batch.data_parallel}; tokens per step = {batch.global_batch} x {_fmt_int(batch.seq_length)} = "
        f"{_fmt_int(batch.tokens_per_step)}"
    )
    if pp > 1:
        out.append(
            "per-stage totals: "
            + ", ".join(f"stage {st.stage} {st.total / GIB:.2f} GiB" for st in stages)
            + f"; shown: stage {worst.stage}"
        )
    out.append(f"memory of one GPU (pipeline stage {worst.stage}, {_fmt_int(worst.params)} parameters):")
    out.append(" persistent")
    out.extend(_line(t) for t in worst.persistent)
    out.append(" activation checkpoints")
    out.extend(_line(t) for t in worst.checkpoints)
    lp, yp = StagePlan._sum(worst.logits_phase), StagePlan._sum(worst.layer_phase)
    out.append(f" logits phase (end of forward / start of backward): {lp / GIB:.2f} GiB")
    out.extend(_line(t) for t in worst.logits_phase)
    out.append(f" layer-recompute phase (backward through each layer): {yp / GIB:.2f} GiB")
    out.extend(_line(t) for t in worst.layer_phase)
    out.append(f"  {'peak phase':<40s} {worst.peak_phase / GIB:8.2f} GiB   = max(logits phase, layer-recompute phase)")
    out.append(" fixed")
    out.extend(_line(t) for t in worst.fixed)
    total_flops, dense, attn = step_flops(cfg, batch, opts.vocab_size)
    bubble = (pp - 1) / (batch.grad_accum + pp - 1) if pp > 1 else 0.0
    seconds = total_flops / (batch.num_gpus * peak_tflops * 1e12 * mfu * (1.0 - bubble))
    iters = int(cfg.get("train_iters") or 0)
    out.append(
        f"step FLOPs: {total_flops:.3e} = 6 x N_matmul x tokens ({dense:.3e}) + 6 x L x h x s^2 x sequences "
        f"(causal attention, {attn:.3e})"
    )
    out.append(
        f"step time: {seconds:.1f} s = FLOPs / (GPUs x {peak_tflops:g} TFLOP/s x MFU {mfu:g} x (1 - pipeline "
        f"bubble {bubble:.2f})); {iters} steps = {seconds * iters / 3600:.1f} h; "
        f"{_fmt_int(batch.tokens_per_step * iters)} tokens"
    )
    out.append(f"upper bound if the two phases overlapped: {worst.overlap_bound / GIB:.2f} GiB")
    margin = gpu_gib - worst.total / GIB
    out.append(f"{'fits' if margin > 0 else 'DOES NOT FIT'} in {gpu_gib:g} GiB with {margin:.2f} GiB margin")
    out.append(f"total per GPU: {worst.total / GIB:.2f} GiB")
    return "\n".join(out), worst.total / GIB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("configs", nargs="+", help="GPT-NeoX YAML/JSON config files, merged in order like deepy.py")
    p.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="total GPUs (count); default: derived from train_batch_size / (micro batch x accumulation) "
        "x TP x PP, and a mismatch with the config's batch is an error",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=LLAMA3_VOCAB,
        help="tokenizer vocabulary before padding (tokens); Llama-3 tokenizer.json has 128256",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=0.2,
        help="model FLOPs utilisation of a busy GPU (fraction of peak) used for the step time; the paper's "
        "15 h for 1000 steps of the 128K recipe on 64 H100 corresponds to about 0.18",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense bf16 TFLOP/s per GPU; default: peak_theoretical_tflops of the config, else 989 (H100 SXM)",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=79.6,
        help="usable memory per GPU in GiB (H100 80GB: nvidia-smi reports 81559 MiB = 79.6 GiB)",
    )
    p.add_argument(
        "--overhead-gib",
        type=float,
        default=4.0,
        help="fixed per-GPU reserve in GiB for the CUDA context, NCCL buffers and allocator fragmentation",
    )
    p.add_argument(
        "--stock-attention-mask",
        action="store_true",
        help="count the dense [s, s] causal mask that stock GPT-NeoX get_attn_mask builds (bytes = 9 s^2) even when "
        "nextlong_compact_attention_mask is true (without the key it is always counted)",
    )
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
    )
    cfg = load_configs(args.configs)
    LOG.info("merged %d keys from %d files", len(cfg), len(args.configs))
    peak = args.peak_tflops or float(cfg.get("peak_theoretical_tflops") or H100_BF16_DENSE_TFLOPS)
    opts = Options(
        vocab_size=args.vocab_size,
        num_gpus=args.num_gpus,
        overhead_gib=args.overhead_gib,
        stock_attention_mask=args.stock_attention_mask,
    )
    text, _ = render(cfg, opts, args.mfu, peak, args.gpu_memory_gib, [str(c) for c in args.configs])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
