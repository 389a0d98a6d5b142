"""Data layer: Omniglot, an image folder or a standard benchmark -> WebDataset shards -> N-way
K-shot meta-batches.

See ``omniglot`` (source and splits), ``folder`` (image folders: resize, channels, splits),
``benchmarks`` (mini-/tiered-ImageNet, CIFAR-FS, FC100, CUB from local copies),
``shards`` (the shard format: packing, verifying, loading) and ``episodes`` (task sampling in
memory or stream mode).
"""
