"""NExtLong loss-weighted training for GPT-NeoX and megatron-core.

Public API (heavy modules are imported lazily):

* :mod:`neox_plugin.config`: YAML key names, defaults, the mask-path rule, value checks.
* :mod:`neox_plugin.loss`: :func:`~neox_plugin.loss.weighted_cross_entropy` (chunked,
  vocab-parallel), :func:`~neox_plugin.loss.mask_to_weights`, :func:`~neox_plugin.loss.normalize_weights`.
* :mod:`neox_plugin.data`: start-up validation of mask datasets against their text datasets and
  lock-step slicing of the mask with GPT-NeoX's ``GPT2Dataset``.
* :mod:`neox_plugin.megatron_core`: ``NExtLongGPTDataset``, a megatron-core ``GPTDataset`` whose
  ``loss_mask`` carries the weights.
* :mod:`neox_plugin.neox`: the GPT-NeoX integration (patches applied when GPT-NeoX modules are
  imported; see ``docs/neox_plugin.md``).
"""

__version__ = "0.1.0"
