"""megatron-core / Megatron-LM: a ``GPTDataset`` whose ``loss_mask`` carries the NExtLong weights.

Megatron-LM's ``pretrain_gpt.py`` computes ``sum(losses * loss_mask)`` (divided by
``loss_mask.sum()``), so with :class:`NExtLongGPTDataset` the next-token loss is weighted with no
further change (``weight_sum`` normalization). Example::

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from neox_plugin.megatron_core import NExtLongGPTDataset, NExtLongGPTDatasetConfig

    config = NExtLongGPTDatasetConfig(
        random_seed=1234, sequence_length=131072, blend=(["/data/nl_text_document"], None),
        split="99,1,0", tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, nextlong_negative_loss_weight=1.0,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        NExtLongGPTDataset, [num_train, num_valid, num_test], lambda: True, config
    ).build()

Each sample's mask is cut by megatron-core's own ``_query_document_sample_shuffle_indices`` run
on a copy of the dataset whose reader is the mask (lock-step by construction), shifted like the
labels, mapped to weights (1 -> 1.0, 0 -> ``nextlong_negative_loss_weight``) and multiplied into
``loss_mask`` (so EOD masking and padding still zero it). The raw uint8 mask is also returned
under ``nextlong_lossweight`` for custom loss functions (e.g. ``nonzero_tokens`` or
``all_tokens`` normalization with :func:`neox_plugin.loss.normalize_weights`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from neox_plugin.config import DEFAULT_NEGATIVE_LOSS_WEIGHT, MASK_PADDING, derive_lossweight_prefix
from neox_plugin.data import BATCH_KEY, make_mask_view, unshift_mask, validate_lossweight_dataset
from neox_plugin.loss import mask_to_weights

logger = logging.getLogger(__name__)

__all__ = ["NExtLongGPTDataset", "NExtLongGPTDatasetConfig"]


@dataclass
class NExtLongGPTDatasetConfig(GPTDatasetConfig):
    """``GPTDatasetConfig`` plus the NExtLong mask settings."""

    nextlong_negative_loss_weight: float = DEFAULT_NEGATIVE_LOSS_WEIGHT
    """Weight of hard-negative tokens (mask value 0); mask value 1 has weight 1.0."""

    nextlong_lossweight_paths: dict[str, str] | None = None
    """Text prefix -> mask prefix. Prefixes not listed use the rule
    ``<x>_text_document`` -> ``<x>_lossweight_document``."""

    nextlong_validate_values: bool = True
    """Scan every mask value at construction (rejects values outside {0, 1})."""

    def lossweight_prefix(self, dataset_path: str) -> str:
        """Mask prefix of a text prefix (explicit mapping first, then the naming rule)."""
        if self.nextlong_lossweight_paths and dataset_path in self.nextlong_lossweight_paths:
            return self.nextlong_lossweight_paths[dataset_path]
        return derive_lossweight_prefix(dataset_path)


class NExtLongGPTDataset(GPTDataset):
    """megatron-core ``GPTDataset`` with NExtLong loss weights in ``loss_mask``.

    Works with ``BlendedMegatronDatasetBuilder`` exactly like ``GPTDataset``; the config must be a
    :class:`NExtLongGPTDatasetConfig`. The mask dataset is validated against the text (sizes,
    document index, uint8, values) when the dataset is built; errors name both files.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str | None,
        indexed_indices: numpy.ndarray,
        num_samples: int | None,
        index_split: Any,
        config: NExtLongGPTDatasetConfig,
    ) -> None:
        if not isinstance(config, NExtLongGPTDatasetConfig):
            raise TypeError(f"NExtLongGPTDataset needs a NExtLongGPTDatasetConfig, got {type(config).__name__}")
        if dataset_path is None:
            raise ValueError("NExtLongGPTDataset needs a dataset path (mock datasets have no mask)")
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.lossweight_path = config.lossweight_prefix(dataset_path)
        validate_lossweight_dataset(dataset_path, self.lossweight_path, scan_values=config.nextlong_validate_values)
        self.lossweight_dataset = IndexedDataset(self.lossweight_path, multimodal=False, mmap=config.mmap_bin_files)
        self._mask_view = make_mask_view(self, self.lossweight_dataset, reader_attr="dataset", clear_attrs=())

    def _mask_sample(self, idx: int) -> numpy.ndarray:
        view = self._mask_view
        # The index arrays may be loaded lazily; share whatever the dataset has now.
        view.shuffle_index, view.sample_index, view.document_index = (
            self.shuffle_index, self.sample_index, self.document_index
        )
        raw, _ = GPTDataset._query_document_sample_shuffle_indices(view, idx)
        # megatron-core pads with its pad id (not 0); anything that is not a shifted mask value is padding.
        raw = numpy.where((raw >= 1) & (raw <= 2), raw, 0)
        return unshift_mask(raw)

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        mask = torch.from_numpy(self._mask_sample(0 if idx is None else idx))
        if self.config.add_extra_token_to_sequence:
            shifted = mask[1:]
        else:
            shifted = torch.roll(mask, shifts=-1, dims=0)
            shifted[-1] = MASK_PADDING
        weights = mask_to_weights(shifted, self.config.nextlong_negative_loss_weight)
        sample["loss_mask"] = sample["loss_mask"] * weights.to(sample["loss_mask"].dtype)
        sample[BATCH_KEY] = shifted.clone()
        return sample
