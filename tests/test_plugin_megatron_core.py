"""megatron-core: NExtLongGPTDataset built by BlendedMegatronDatasetBuilder carries the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# every test here builds datasets with megatron-core itself
pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder",
                    reason='megatron-core is not installed: pip install -e ".[megatron]"')

from nextlong.indexed import IndexedDatasetWriter  # noqa: E402

from neox_plugin.data import NExtLongDataError  # noqa: E402

EOD = 0


class TinyTokenizer:
    """The attributes megatron-core's GPT datasets read."""

    vocab_size = 1000
    eod = EOD
    pad = -1
    unique_identifiers = {"class": "TinyTokenizer"}


def write(tmp: Path, lengths: list[int], bad_value: bool = False) -> str:
    rng = np.random.default_rng(3)
    text = str(tmp / "nl_text_document")
    with IndexedDatasetWriter(text, np.uint16) as wt, \
            IndexedDatasetWriter(str(tmp / "nl_lossweight_document"), np.uint8) as wm:
        for n in lengths:
            toks = rng.integers(1, 1000, size=n)
            toks[-1] = EOD
            m = (toks % 2).astype(np.uint8)
            if bad_value:
                m[0] = 3
            wt.add_document(toks)
            wm.add_document(m)
    return text


def build(text: str, weight: float, **kw):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from neox_plugin.megatron_core import NExtLongGPTDataset, NExtLongGPTDatasetConfig

    config = NExtLongGPTDatasetConfig(
        random_seed=1234, sequence_length=48, blend=([text], None), split="80,20,0", tokenizer=TinyTokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=kw.pop("eod_mask_loss", False),
        path_to_cache=str(Path(text).parent / "cache"), nextlong_negative_loss_weight=weight, **kw,
    )
    return BlendedMegatronDatasetBuilder(NExtLongGPTDataset, [20, 5, None], lambda: True, config).build()


@pytest.mark.parametrize("eod_mask_loss", [False, True])
def test_loss_mask_carries_weights_in_lockstep(tmp_path: Path, eod_mask_loss: bool) -> None:
    text = write(tmp_path, [30, 80, 17, 64, 41, 100, 25, 55, 70, 12])
    train, valid, _ = build(text, 0.25, eod_mask_loss=eod_mask_loss)
    assert len(train) >= 20 and len(valid) >= 5
    for ds in (train, valid):
        for i in range(len(ds)):
            s = ds[i]
            labels, lm, raw = s["labels"], s["loss_mask"], s["nextlong_lossweight"]
            expected_class = (labels % 2).to(torch.uint8)  # the fixture's mask is token % 2
            np.testing.assert_array_equal(raw.numpy(), expected_class.numpy())
            w = torch.where(expected_class == 1, 1.0, 0.25)
            base = torch.ones_like(lm)
            if eod_mask_loss:
                base[s["tokens"] == EOD] = 0.0
            torch.testing.assert_close(lm, w * base)


def test_weighted_loss_through_megatron_lm_formula(tmp_path: Path) -> None:
    """Megatron-LM's loss_func: sum(losses * loss_mask) / loss_mask.sum() == weight_sum."""
    from neox_plugin.loss import weighted_cross_entropy

    text = write(tmp_path, [30, 80, 17, 64, 41, 100, 25, 55, 70, 12])
    train, _, _ = build(text, 0.0)
    s = train[0]
    logits = torch.randn(48, 1000, generator=torch.Generator().manual_seed(0))
    losses = torch.nn.functional.cross_entropy(logits, s["labels"], reduction="none")
    megatron_lm = (losses * s["loss_mask"]).sum() / s["loss_mask"].sum()
    ours = weighted_cross_entropy(logits, s["labels"], s["loss_mask"])
    torch.testing.assert_close(ours, megatron_lm, rtol=1e-6, atol=1e-6)


def test_bad_mask_refused_at_build(tmp_path: Path) -> None:
    text = write(tmp_path, [30, 80, 17, 64, 41, 100, 25, 55, 70, 12], bad_value=True)
    with pytest.raises(NExtLongDataError, match=r"mask value 3 .*lossweight_document.*"):
        build(text, 0.0)


def test_explicit_mask_path_mapping(tmp_path: Path) -> None:
    text = write(tmp_path, [30, 80, 17, 64, 41, 100, 25, 55, 70, 12])
    with pytest.raises(NExtLongDataError, match="elsewhere_lossweight_document.idx is missing"):
        build(text, 0.0, nextlong_lossweight_paths={text: str(tmp_path / "elsewhere_lossweight_document")})
