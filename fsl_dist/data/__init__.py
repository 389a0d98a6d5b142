"""Data layer: Omniglot source -> WebDataset shards -> N-way K-shot meta-batches.

See ``omniglot`` (source and splits), ``shards`` (packing, verifying, loading) and ``episodes``
(task sampling in memory or stream mode).
"""
