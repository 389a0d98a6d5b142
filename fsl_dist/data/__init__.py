"""Data layer: Omniglot or an image folder -> WebDataset shards -> N-way K-shot meta-batches.

See ``omniglot`` (source and splits), ``folder`` (image folders: resize, channels, splits),
``shards`` (the shard format: packing, verifying, loading) and ``episodes`` (task sampling in
memory or stream mode).
"""
