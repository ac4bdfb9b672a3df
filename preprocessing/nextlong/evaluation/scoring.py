"""Per-token next-token losses of a causal LM, batched.

A *scorer* is any callable ``scorer(batch) -> losses`` that takes a list of 1-D integer token arrays and
returns, for each, a float array of length ``len(tokens) - 1``: element ``i`` is ``-log p(tokens[i + 1] |
tokens[: i + 1])`` in nats. :class:`HFScorer` is that callable for a HuggingFace causal LM; tests use
hand-written scorers whose answer is known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

Scorer = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """``(model, tokenizer)`` from a local HuggingFace directory; nothing is downloaded.

    ``dtype``: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``. The tokenizer is
    ``None`` when the directory has none (token-level probes do not need one).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a HuggingFace model directory (no config.json)")
    device = pick_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, local_files_only=True)
    model.to(device).eval()
    tokenizer = None
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return model, tokenizer


class HFScorer:
    """Scorer of a HuggingFace causal LM: right-padded batches of at most ``max_batch_tokens`` tokens
    (padding sits after every real token, so a causal model's losses on real tokens are unchanged).

    The loss is computed from the logits in float32 with ``torch.nn.functional.cross_entropy``.
    """

    def __init__(self, model, max_batch_tokens: int = 16384, device: str | None = None) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.device = device or str(next(model.parameters()).device)

    def logits(self, batch: Sequence[np.ndarray]):
        """Float32 logits ``[len(batch), max_len, vocab]`` of one padded batch (CPU tensor)."""
        import torch

        n = max(len(t) for t in batch)
        ids = torch.zeros((len(batch), n), dtype=torch.long)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        for r, t in enumerate(batch):
            ids[r, : len(t)] = torch.as_tensor(np.asarray(t, dtype=np.int64))
            att[r, : len(t)] = 1
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device))
        return out.logits.float().cpu()

    def __call__(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        order = sorted(range(len(batch)), key=lambda i: -len(batch[i]))
        out: list[np.ndarray | None] = [None] * len(batch)
        i = 0
        while i < len(order):
            width = len(batch[order[i]])
            j = i + 1
            while j < len(order) and (j - i + 1) * width <= self.max_batch_tokens:
                j += 1
            group = [batch[k] for k in order[i:j]]
            logits = self.logits(group)
            for r, k in enumerate(order[i:j]):
                t = torch.as_tensor(np.asarray(batch[k], dtype=np.int64))
                ce = torch.nn.functional.cross_entropy(logits[r, : len(t) - 1], t[1:], reduction="none")
                out[k] = ce.numpy().astype(np.float64)
            i = j
        return out  # type: ignore[return-value]
