"""Triton attention kernels, the only package that imports triton.

`flash` (forward, `flash_attention`) with `flash_bwd` (its backward), `int8` (flash-int8) and `lsh`
(flash-lsh); each kernel has its own inner loop over key tiles, built from the shared steps in `common`.
"""
