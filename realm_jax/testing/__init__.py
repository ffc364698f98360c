"""Helpers for tests and benchmarks. Modules here may import torch / transformers lazily;
nothing in the runtime package imports them."""
