"""Numerical settings shared by the feature extraction and the metrics."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def float32_mode(tf32: bool) -> Iterator[None]:
    """Run float32 matmuls and convolutions with TF32 (``tf32``: Ampere and newer GPUs) or in full
    float32, then restore the caller's settings. (PyTorch's own defaults differ: no TF32 for
    matmuls, TF32 for cuDNN convolutions.)"""
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def full_fp32():
    """Run float32 matmuls and convolutions in full float32, then restore the caller's settings.

    A trainer commonly enables TF32 (``set_float32_matmul_precision("high")``); TF32 keeps 10
    mantissa bits, enough to move FID in its second decimal and to flip k-NN memberships, so the
    evaluation turns it off for its own duration.
    """
    return float32_mode(tf32=False)
