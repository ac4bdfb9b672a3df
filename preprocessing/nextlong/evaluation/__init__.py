"""Long-context evaluation that runs on any HuggingFace causal-LM directory (or any scoring function).

* :mod:`.scoring`: per-token next-token losses of a model, batched (CPU or GPU).
* :mod:`.longrange`: the long-range gain probe: on NExtLong-style samples, the loss of meta-chunks 2..p with
  the earlier meta-chunks of the same document in place, against the same with those meta-chunks replaced by
  unrelated text of the same token length.
* :mod:`.passkey`: passkey / needle-in-a-haystack retrieval over context lengths x needle depths.

Nothing here imports the synthesis pipeline's heavy stages; torch and transformers are imported lazily.
"""
