"""Tolerances for comparing two *different* computation paths.

Two paths that are equal in exact arithmetic (bias added inside the GEMM or after it,
a rotation by an exact identity, a recomputed activation) may round differently on
another CPU vendor, vector width or BLAS kernel. Tests assert bitwise equality only
where the *same* computation repeats (resume, reload, a retried forward); between
different paths they use ``assert_close_ulps``: a bound stated in units of the dtype's
machine epsilon, scaled by the largest magnitude of the expected tensor.
"""
from __future__ import annotations

import torch


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 16, msg: str = "") -> None:
    """``|actual − expected| ≤ ulps · eps(dtype) · max|expected|`` elementwise.

    16 ulps of the largest entry covers the reordering of a dot product of a few
    dozen terms (each reordering changes a sum by at most ~1 ulp of its largest
    partial sum) while still failing on any real bug, which shows up at ≥ 1e-8
    relative in float64 (≈ 4.5e7 ulps).
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    eps = torch.finfo(expected.dtype).eps
    scale = expected.detach().abs().max().double().item() if expected.numel() else 0.0
    bound = ulps * eps * max(scale, torch.finfo(expected.dtype).tiny)
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0
    assert err <= bound, f"{msg} max |difference| {err:.3g} exceeds {ulps} ulps of max|expected| ({bound:.3g})"
