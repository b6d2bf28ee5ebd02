"""Triton kernels, one file per family, each beside its launcher (see registry.py)."""
