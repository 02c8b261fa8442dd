"""Triton kernels of anml_fast, installed as `anml_fast.kernels` (added with the compiled ops)."""
