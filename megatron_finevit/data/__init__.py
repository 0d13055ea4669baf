"""Data pipeline: WebDataset shards, zarr index, native-resolution resize, decoders, packing."""
