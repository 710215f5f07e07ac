"""Triton attention kernels: flash (fwd + bwd), flash-int8 and flash-lsh; the only package that imports triton."""
