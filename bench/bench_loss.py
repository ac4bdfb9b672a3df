"""Microbenchmark: the plugin's weighted cross-entropy vs stock GPT-NeoX's cross-entropy math.

Same shapes for both (default: one sequence of 8192 tokens x vocabulary 32768, fp32 logits, CPU),
forward + backward of the loss only. "stock" is GPT-NeoX's ``cross_entropy``
(megatron/model/gpt2_model.py) over its ``_VocabParallelCrossEntropy`` (megatron/mpu/cross_entropy.py)
at one tensor-parallel rank, transcribed op by op. "plugin" is
``neox_plugin.loss.weighted_cross_entropy`` as the GPT-NeoX integration calls it (``inplace=True``,
weights with hard negatives at 0.5), unchunked and chunked.

Time: median over ``--repeats`` runs, variants interleaved. Memory: each variant runs in a fresh
process (Linux) that resets the kernel's peak-RSS mark once the inputs exist and reports the peak
above that point, i.e. what the loss and its gradient add on top of the logits. Run::

    python bench/bench_loss.py                 # seq 8192 x vocab 32768, fp32
    python bench/bench_loss.py --dtype bf16    # bf16 logits: stock makes a full fp32 copy
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from neox_plugin.loss import weighted_cross_entropy  # noqa: E402

logger = logging.getLogger("bench_loss")


class _StockVocabParallelCE(torch.autograd.Function):
    """GPT-NeoX's _VocabParallelCrossEntropy with a tensor-parallel world of 1 (all-reduces are no-ops)."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target):  # noqa: ANN001, ANN205
        logits_max = torch.max(vocab_parallel_logits, dim=-1)[0]
        vocab_parallel_logits.sub_(logits_max.unsqueeze(dim=-1))
        partition_vocab_size = vocab_parallel_logits.size()[-1]
        vocab_start_index, vocab_end_index = 0, partition_vocab_size
        target_mask = (target < vocab_start_index) | (target >= vocab_end_index)
        masked_target = target.clone() - vocab_start_index
        masked_target[target_mask] = 0
        logits_2d = vocab_parallel_logits.view(-1, partition_vocab_size)
        masked_target_1d = masked_target.view(-1)
        arange_1d = torch.arange(start=0, end=logits_2d.size()[0], device=logits_2d.device)
        predicted_logits_1d = logits_2d[arange_1d, masked_target_1d]
        predicted_logits_1d = predicted_logits_1d.clone().contiguous()
        predicted_logits = predicted_logits_1d.view_as(target)
        predicted_logits[target_mask] = 0.0
        exp_logits = vocab_parallel_logits
        torch.exp(vocab_parallel_logits, out=exp_logits)
        sum_exp_logits = exp_logits.sum(dim=-1)
        loss = torch.log(sum_exp_logits) - predicted_logits
        exp_logits.div_(sum_exp_logits.unsqueeze(dim=-1))
        ctx.save_for_backward(exp_logits, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_input = softmax
        partition_vocab_size = softmax.size()[-1]
        grad_2d = grad_input.view(-1, partition_vocab_size)
        arange_1d = torch.arange(start=0, end=grad_2d.size()[0], device=grad_2d.device)
        grad_2d[arange_1d, masked_target_1d] -= 1.0 - target_mask.view(-1).float()
        grad_input.mul_(grad_output.unsqueeze(dim=-1))
        return grad_input, None


def stock_loss(output: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX's cross_entropy(output, (labels, loss_mask)) without fp16_lm_cross_entropy."""
    losses = _StockVocabParallelCE.apply(output.float().contiguous(), labels)
    loss_mask = loss_mask.view(-1)
    return torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()


def make_inputs(seq: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, seq, vocab, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (1, seq), generator=g)
    weights = torch.where(torch.rand(1, seq, generator=g) < 0.6, 1.0, 0.5)  # 40 % hard negatives at 0.5
    return logits, labels, weights


def run_variant(name: str, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, chunk: int) -> float:
    """One forward + backward on a fresh copy of the logits; returns seconds (the copy is not timed)."""
    x = logits.clone().requires_grad_(True)
    t0 = time.perf_counter()
    if name == "stock":
        loss = stock_loss(x, labels, weights)
    else:
        loss = weighted_cross_entropy(x, labels, weights, chunk_size=chunk, inplace=True)
    (grad,) = torch.autograd.grad(loss, x)  # the gradient w.r.t. the logits, as a model's backward receives it
    dt = time.perf_counter() - t0
    del x, loss, grad
    return dt


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def memory_child(args: argparse.Namespace) -> None:
    """Child process: peak RSS added by one loss forward+backward (beyond logits and their copy)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    logits, labels, weights = make_inputs(args.seq, args.vocab, dtype)
    x = logits.clone()
    x.add_(0)  # touch every page
    x.requires_grad_(True)
    base = _reset_peak()
    if args.variant == "stock":
        loss = stock_loss(x, labels, weights)
    else:
        loss = weighted_cross_entropy(x, labels, weights, chunk_size=args.chunk, inplace=True)
    (grad,) = torch.autograd.grad(loss, x)
    print(json.dumps({"extra_bytes": max(0, _peak_bytes() - base), "loss": loss.item()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=8192, help="tokens (batch x sequence)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary (per tensor-parallel rank)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="logits dtype")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk size of the chunked plugin variant")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="stock", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    logits, labels, weights = make_inputs(args.seq, args.vocab, dtype)
    variants = {"stock": 0, "plugin": 0, f"plugin_chunk{args.chunk}": args.chunk}
    # correctness on these shapes: same loss with all weights 1
    ones = torch.ones_like(weights)
    ref = stock_loss(logits.clone(), labels, ones)
    ours = weighted_cross_entropy(logits.clone(), labels, ones, chunk_size=args.chunk)
    logger.info("all-ones loss: stock %.7f plugin %.7f (rel diff %.1e)", ref, ours, abs(ref - ours) / ref)

    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, chunk in variants.items():  # warm-up
        run_variant(name, logits, labels, weights, chunk)
    for _ in range(args.repeats):
        for name, chunk in variants.items():
            times[name].append(run_variant(name, logits, labels, weights, chunk))

    mem: dict[str, int] = {}
    for name, chunk in variants.items():
        cmd = [sys.executable, __file__, "--child", "--variant", "stock" if name == "stock" else "plugin",
               "--seq", str(args.seq), "--vocab", str(args.vocab), "--dtype", args.dtype, "--chunk", str(chunk)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        mem[name] = json.loads(out)["extra_bytes"]

    full = args.seq * args.vocab * 4
    result = {"seq": args.seq, "vocab": args.vocab, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "full_fp32_tensor_mib": full / 2**20, "variants": {}}
    t_stock = statistics.median(times["stock"])
    m_stock = mem["stock"]
    for name in variants:
        t = statistics.median(times[name])
        result["variants"][name] = {
            "median_s": t, "time_ratio_vs_stock": t / t_stock, "extra_peak_mib": mem[name] / 2**20,
            "extra_peak_in_full_fp32_tensors": mem[name] / full,
            "peak_ratio_vs_stock": (mem[name] + logits.numel() * logits.element_size())
            / (m_stock + logits.numel() * logits.element_size()),
        }
        logger.info("%-18s median %.3f s  time ratio %.3f  extra peak %7.1f MiB (%.2f full fp32 [tokens, vocab])",
                    name, t, t / t_stock, mem[name] / 2**20, mem[name] / full)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
