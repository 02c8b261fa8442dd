"""anml_fast: ANML (A Neuromodulated Meta-Learning algorithm) on Omniglot, fast.

Subpackages: `data` (Omniglot reader, prepared cache, samplers), `models` (ANML and OML),
`ops` (fused ops and their plain-PyTorch twins), `training` (meta-training),
`evaluation` (meta-testing protocol and reports); the `anml-fast` CLI lives in `cli`.
"""
__version__ = "0.1.0"
