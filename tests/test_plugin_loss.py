"""The weighted next-token loss: hand-computed values, stock equality, zero weights, chunking."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from neox_plugin.config import MASK_PADDING  # noqa: E402
from neox_plugin.loss import mask_to_weights, normalize_weights, weighted_cross_entropy  # noqa: E402


def neox_reference_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX's ``cross_entropy`` (megatron/model/gpt2_model.py) with its vocab-parallel kernel
    (megatron/mpu/cross_entropy.py) at one tensor-parallel rank, transcribed op by op."""
    x = logits.float().clone()
    logits_max = torch.max(x, dim=-1)[0]
    x.sub_(logits_max.unsqueeze(dim=-1))
    vp = x.size(-1)
    target_mask = (labels < 0) | (labels >= vp)
    masked_target = labels.clone()
    masked_target[target_mask] = 0
    logits_2d = x.view(-1, vp)
    predicted = logits_2d[torch.arange(logits_2d.size(0)), masked_target.view(-1)].clone().view_as(labels)
    predicted[target_mask] = 0.0
    exp_logits = torch.exp(x)
    sum_exp = exp_logits.sum(dim=-1)
    losses = torch.log(sum_exp) - predicted
    lm = loss_mask.view(-1)
    return torch.sum(losses.view(-1) * lm) / lm.sum()


def _case(seed: int = 0, b: int = 2, s: int = 9, v: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, v, generator=g) * 3, torch.randint(0, v, (b, s), generator=g)


def test_hand_computed_two_tokens() -> None:
    # vocab 2, token 0 has logits (0, 0) -> CE = ln 2 for either label; token 1 has logits (ln 3, 0)
    # with label 0 -> CE = ln(4/3). Weights 1 and 0.5, weight_sum: (ln2 + 0.5 ln(4/3)) / 1.5.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    labels = torch.tensor([[1, 0]])
    w = torch.tensor([[1.0, 0.5]])
    expected = (math.log(2) + 0.5 * math.log(4 / 3)) / 1.5
    assert weighted_cross_entropy(logits, labels, w).item() == pytest.approx(expected, rel=1e-6)
    # nonzero_tokens and all_tokens divide by 2 here
    for norm in ("nonzero_tokens", "all_tokens"):
        got = weighted_cross_entropy(logits, labels, w, normalization=norm).item()
        assert got == pytest.approx((math.log(2) + 0.5 * math.log(4 / 3)) / 2, rel=1e-6)


def test_normalizations_differ_with_zero_weights() -> None:
    logits, labels = _case()
    w = torch.ones(labels.shape)
    w[:, ::3] = 0.0
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    total = (ce * w.reshape(-1)).sum()
    valid = torch.ones(labels.shape)
    valid[0, -1] = 0.0  # e.g. an EOD-masked position: not a token for all_tokens
    got = {n: weighted_cross_entropy(logits, labels, w, normalization=n, valid_mask=valid).item()
           for n in ("weight_sum", "nonzero_tokens", "all_tokens")}
    assert got["weight_sum"] == pytest.approx((total / w.sum()).item(), rel=1e-6)
    assert got["nonzero_tokens"] == pytest.approx((total / (w != 0).sum()).item(), rel=1e-6)
    assert got["all_tokens"] == pytest.approx((total / valid.sum()).item(), rel=1e-6)


@pytest.mark.parametrize("chunk", [0, 1, 5, 7, 1000])
def test_all_ones_equals_neox(chunk: int) -> None:
    logits, labels = _case(seed=1, b=3, s=17, v=50)
    ones = torch.ones(labels.shape)
    ref_in = logits.clone().requires_grad_(True)
    ref = neox_reference_loss(ref_in, labels, ones)
    ref.backward()
    x = logits.clone().requires_grad_(True)
    got = weighted_cross_entropy(x, labels, ones, chunk_size=chunk)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


def test_float_loss_mask_equals_neox_weight_sum() -> None:
    """GPT-NeoX with a float loss_mask divides by its sum: the same as weight_sum."""
    logits, labels = _case(seed=2)
    w = torch.rand(labels.shape)
    ref = neox_reference_loss(logits, labels, w)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, w), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["weight_sum", "nonzero_tokens", "all_tokens"])
def test_zero_weight_micro_batch_is_zero_not_nan(norm: str) -> None:
    logits, labels = _case(seed=3)
    x = logits.clone().requires_grad_(True)
    loss = weighted_cross_entropy(x, labels, torch.zeros(labels.shape), normalization=norm,
                                  valid_mask=torch.zeros(labels.shape), chunk_size=4)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_zero_weight_token_has_exactly_zero_gradient() -> None:
    logits, labels = _case(seed=4, b=1, s=6, v=11)
    w = torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0, 1.0]])
    for chunk in (0, 2):
        x = logits.clone().requires_grad_(True)
        weighted_cross_entropy(x, labels, w, chunk_size=chunk).backward()
        assert torch.all(x.grad[0, 1] == 0) and torch.all(x.grad[0, 3] == 0)
        assert torch.count_nonzero(x.grad[0, 0]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(dtype: torch.dtype) -> None:
    logits, labels = _case(seed=5, b=2, s=33, v=40)
    logits = logits.to(dtype)
    w = torch.rand(labels.shape)
    results = []
    for chunk in (0, 1, 8, 33, 65, 66):
        x = logits.clone().requires_grad_(True)
        loss = weighted_cross_entropy(x, labels, w, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), x.grad.float()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_inplace_reuses_logits_and_matches() -> None:
    logits, labels = _case(seed=6, b=2, s=10, v=21)
    w = torch.rand(labels.shape)
    leaf = logits.clone().requires_grad_(True)
    expected = weighted_cross_entropy(leaf, labels, w, chunk_size=3)
    expected.backward()
    leaf2 = logits.clone().requires_grad_(True)
    out = leaf2 * 1.0  # a non-leaf, like a model output
    got = weighted_cross_entropy(out, labels, w, chunk_size=3, inplace=True)
    (2.0 * got).backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(leaf2.grad, 2.0 * leaf.grad)


def test_no_grad_leaves_logits_untouched() -> None:
    logits, labels = _case(seed=7)
    before = logits.clone()
    with torch.no_grad():
        weighted_cross_entropy(logits, labels, torch.ones(labels.shape), chunk_size=4, inplace=True)
    assert torch.equal(logits, before)


def test_vocab_shard_targets_outside_contribute_no_predicted_logit() -> None:
    """One rank's shard: targets outside [start, end) take no predicted logit, as in GPT-NeoX."""
    logits = torch.zeros(1, 2, 4)
    labels = torch.tensor([[5, 1]])  # 5 lives on another rank (start=0, end=4); 1 is local
    loss = weighted_cross_entropy(logits, labels, torch.ones(1, 2), normalization=None)
    assert loss.item() == pytest.approx(2 * math.log(4), rel=1e-6)  # log-sum-exp only, predicted = 0


def test_mask_to_weights_mapping_and_rejection() -> None:
    m = torch.tensor([0, 1, MASK_PADDING, 1], dtype=torch.uint8)
    assert mask_to_weights(m, 0.25).tolist() == [0.25, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"outside \{0, 1\}"):
        mask_to_weights(torch.tensor([0, 2], dtype=torch.uint8), 0.0)


def test_normalize_weights_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="normalization"):
        normalize_weights(torch.ones(3), "mean")


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        weighted_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))


TP_SCRIPT = r'''
import os, sys
import torch
import torch.distributed as dist

def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from neox_plugin.loss import weighted_cross_entropy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 12, generator=g) * 3
    labels = torch.randint(0, 12, (2, 7), generator=g)
    w = torch.rand(2, 7, generator=g)
    w[0, :3] = 0.0
    shard = 12 // world
    x = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
    loss = weighted_cross_entropy(x, labels, w, chunk_size=5, group=dist.group.WORLD,
                                  vocab_start_index=rank * shard, normalization="nonzero_tokens")
    loss.backward()
    full = logits.clone().requires_grad_(True)
    ref = weighted_cross_entropy(full, labels, w, normalization="nonzero_tokens")
    ref.backward()
    ok = torch.allclose(loss, ref, rtol=1e-6, atol=1e-6) and torch.allclose(
        x.grad, full.grad[..., rank * shard:(rank + 1) * shard], rtol=1e-5, atol=1e-7)
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{int(ok)} {loss.item()} {ref.item()}")
    dist.destroy_process_group()

if __name__ == "__main__":
    world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.multiprocessing.spawn(worker, args=(world, port, out), nprocs=world)
'''


def test_vocab_parallel_two_ranks_equals_full_vocab(tmp_path: Path) -> None:
    """Tensor parallelism 2 over gloo: each rank holds half the vocabulary; loss and gradients
    equal the single-rank computation."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "result"
    r = subprocess.run([sys.executable, str(script), "2", str(port), str(out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        ok, loss, ref = (tmp_path / f"result.{rank}").read_text().split()
        assert ok == "1", (rank, loss, ref)
