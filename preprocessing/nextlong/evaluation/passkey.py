"""Passkey / needle-in-a-haystack retrieval over context lengths x needle depths.

A prompt is ``haystack[:cut] + needle + haystack[cut:] + question`` where the needle states a random numeric
key (``The pass key is 48213. Remember it. 48213 is the pass key.``), the haystack is distractor text cut to
the wanted length, ``cut`` puts the needle at the wanted depth (0 = start, 1 = just before the question), and
the question is ``What is the pass key? The pass key is``. The answer is the key's tokens.

Scored in one teacher-forced forward pass per prompt: **exact match** = the model's argmax equals the key at
every key position (what greedy decoding of the key's length produces), and the **mean log-probability** of
the key's tokens (a graded signal for models far from solving the task). Prompts are built in token space, so
a length is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
#: default haystack: the repetitive filler of the original passkey test (Mohtashami & Jaggi, 2023)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class PasskeyPrompt:
    """One prompt: ``tokens`` (prompt + key) and where the key's tokens are."""

    length: int  # context length requested (tokens of prompt + key)
    depth: float  # needle position as a fraction of the haystack
    key: str  # the digits
    tokens: np.ndarray  # int64 ids: prompt followed by the key tokens
    key_start: int  # index of the first key token in ``tokens``


def build_prompts(encode: Callable[[str], list[int]], haystack_ids: np.ndarray, lengths: Sequence[int],
                  depths: Sequence[float], trials: int, seed: int = 0, key_digits: int = 5,
                  bos: int | None = None) -> list[PasskeyPrompt]:
    """Prompts for every (length, depth, trial). ``haystack_ids`` is a token stream at least as long as the
    longest haystack (it is repeated when shorter); ``encode`` turns text into ids without special tokens."""
    if len(haystack_ids) == 0:
        raise ValueError("empty haystack")
    rng = np.random.default_rng(seed)
    q = np.asarray(encode(QUESTION), dtype=np.int64)
    out = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth {depth} is not in [0, 1]")
            for _ in range(trials):
                key = str(int(rng.integers(10 ** (key_digits - 1), 10**key_digits)))
                needle = np.asarray(encode(NEEDLE.format(key=key)), dtype=np.int64)
                answer = np.asarray(encode(" " + key), dtype=np.int64)
                head = [] if bos is None else [bos]
                n_hay = length - len(head) - len(needle) - len(q) - len(answer)
                if n_hay < 0:
                    raise ValueError(f"length {length} is shorter than the needle and question")
                start = int(rng.integers(0, max(1, len(haystack_ids))))
                hay = np.resize(np.roll(haystack_ids, -start), n_hay).astype(np.int64)
                cut = int(round(depth * n_hay))
                toks = np.concatenate([np.asarray(head, dtype=np.int64), hay[:cut], needle, hay[cut:], q, answer])
                out.append(PasskeyPrompt(length, float(depth), key, toks, len(toks) - len(answer)))
    return out


def score_prompts(prompts: list[PasskeyPrompt], logits_fn: Callable[[list[np.ndarray]], object],
                  batch_size: int = 4) -> list[dict]:
    """``logits_fn(batch)`` returns float logits ``[batch, max_len, vocab]`` (right-padded batch, e.g.
    :meth:`nextlong.evaluation.scoring.HFScorer.logits`). One row per prompt."""
    import torch

    rows = []
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].tokens))
    res: dict[int, dict] = {}
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        logits = torch.as_tensor(logits_fn([prompts[i].tokens[:-1] for i in idx]))
        for r, i in enumerate(idx):
            p = prompts[i]
            target = torch.as_tensor(p.tokens[p.key_start :])
            lg = logits[r, p.key_start - 1 : len(p.tokens) - 1].float()
            logp = torch.log_softmax(lg, dim=-1).gather(1, target[:, None])[:, 0]
            res[i] = {"length": p.length, "depth": p.depth, "key": p.key,
                      "exact": bool(torch.equal(lg.argmax(-1), target)), "key_logprob": float(logp.mean())}
    rows = [res[i] for i in range(len(prompts))]
    return rows


def grid(rows: list[dict]) -> dict[tuple[int, float], dict]:
    """(length, depth) -> accuracy and mean key log-probability over trials."""
    cells: dict[tuple[int, float], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["length"], r["depth"]), []).append(r)
    return {k: {"accuracy": float(np.mean([r["exact"] for r in v])),
                "key_logprob": float(np.mean([r["key_logprob"] for r in v])), "trials": len(v)}
            for k, v in sorted(cells.items())}


def plot_heatmap(cells: dict[tuple[int, float], dict], path, title: str, value: str = "accuracy") -> None:
    """Depth (rows) x length (columns) heatmap PNG of ``value``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    m = np.array([[cells[(L, d)][value] for L in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    vmin, vmax = (0.0, 1.0) if value == "accuracy" else (float(np.nanmin(m)), float(np.nanmax(m)))
    im = ax.imshow(m, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=value.replace("_", " "))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
