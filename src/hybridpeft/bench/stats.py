"""Summary statistics for the tables: mean ± s.d. over seeds and Welch's t-test.

For samples ``a`` (n₁ values) and ``b`` (n₂ values), Welch's unequal-variance test uses

    t  = (ā − b̄) / √(s₁²/n₁ + s₂²/n₂)
    ν  = (s₁²/n₁ + s₂²/n₂)² / [ (s₁²/n₁)²/(n₁−1) + (s₂²/n₂)²/(n₂−1) ]
    p  = 2 · P(T_ν > |t|)                                (two-sided)

with ``s²`` the sample variance (``ddof = 1``). ``p`` comes from
``scipy.stats.ttest_ind(a, b, equal_var=False)``; the hand-written ``t`` and ``ν``
are kept beside it so the report can show them and a test can check both.
The paper also mentions a *paired* t-test; seeds are not paired observations
across methods here (a seed fixes the data order and init, but the methods
differ), so the unpaired Welch test is the honest one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``ddof = 1``; 0 for a single value)."""

    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of ``a`` against ``b``: ``t > 0`` means ``a`` has the larger mean.

    ``p`` is None when the test is undefined (fewer than two values on a side, or
    both samples without any spread).
    """

    t: float | None
    df: float | None
    p: float | None

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def summarize(values: Sequence[float]) -> Summary:
    """Raises: ValueError if ``values`` is empty or holds a NaN."""
    if len(values) == 0:
        raise ValueError("values=[] is invalid: expected at least one value")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"values={list(values)!r} is invalid: expected no NaN")
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(n, mean, sd)


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Welch's two-sided t-test (see module docstring)."""
    if len(a) < 2 or len(b) < 2:
        return Welch(None, None, None)
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    if va + vb == 0.0:
        return Welch(None, None, None)
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    import warnings

    from scipy import stats

    with warnings.catch_warnings():  # scipy warns on near-identical samples; t and ν above are exact anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)
    return Welch(t, df, p)
