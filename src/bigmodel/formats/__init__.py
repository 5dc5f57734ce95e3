"""Storage layer: how tensors are encoded in files. Nothing above this package parses bytes."""
