"""The pipeline's stages, one module each, all of the same shape (see :mod:`nextlong.stages.base`), run by
:mod:`nextlong.stages.runner`.

======= ============================= ==============================================================
stage   unit                          writes
======= ============================= ==============================================================
chunk   one input file (shard-XXXXX)  ``<work>/pool/shard-XXXXX/``: chunks, tokens, hashing counts
embed   one input file (shard-XXXXX)  ``<work>/pool/shard-XXXXX/embeddings.npy``
gather  the pool (pool)               ``<work>/``: global chunk table, tokens, embeddings, doc tables
index   the pool (faiss)              ``<work>/index.faiss``
synth   --block-docs meta-documents   ``<work>/synth/block-XXXXX_*``: datasets and spans of the block
        (block-XXXXX)
merge   the output (dataset)          ``<prefix>.data/<version>/``: the complete new dataset, staged
publish the output (current)          the manifest, then ``<prefix>.data/current`` switched to it
======= ============================= ==============================================================

Markers: ``<work>/<stage>/done/<unit>.json``; logs: ``<work>/<stage>/logs/<unit>.log``.

The order and the registry of the stages are in :mod:`nextlong.stages.registry` (this package file
imports nothing, so that no stage module's import comes back to it).
"""
