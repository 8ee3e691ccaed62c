"""LoRA-GA (Wang et al. 2024, arXiv 2407.05000): LoRA whose factors start along the full-weight gradient.

The adapter is a ``LoraAdapter`` plus a frozen copy of the start point:

    ΔW = s (B A − B0 A0),   A0: (r, d_in),  B0: (d_out, r),  s = α / r,

computed on activations as one rank-2r product ``[B, −B0] ([A; A0] x)``. At
initialization ``A = A0`` and ``B = B0`` so ``ΔW = 0`` and the model is unchanged,
while the gradients of ``A`` and ``B`` are those of a LoRA that starts at the
gradient's top singular directions. Keeping ``B0 A0`` inside the adapter leaves
``W`` untouched (quantized or sharded bases work; merging lands on the original
``W``). ``A0``, ``B0`` are persistent buffers: saved and loaded with the adapter.

Before ``hybridpeft.lora_ga_init`` runs, ``A0 = B0 = 0`` and ``A``, ``B`` start as
plain LoRA (``B = 0``), so the output is unchanged then too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from ..checks import check, is_int, is_number
from .lora import LoraAdapter, LoraConfig

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "unit", "gd", "weight_svd")
INIT_FORMS = ("lora_ga", "paper_eq8")
OFFSETS = ("adapter", "subtract")
ESTIMATORS = ("auto", "exact", "sketch")
DEFAULT_SKETCH_FACTOR = 2  # default k = 2 × rank_needed() = 4r (measured in docs/perf/lora-ga-scale.md)


@dataclass
class LoraGAConfig(LoraConfig):
    """LoRA fields (``r``, ``alpha``, ``dropout``, ``rslora``) plus the gradient start.

    With ``U Σ Vᵀ ≈ G`` the rank-``q`` SVD of the estimated gradient ``G`` (d_out, d_in),
    ``q = min(4r, d_out, d_in)``, and ``c`` the scale below:

    Args:
        direction: which singular vectors start ``A0`` (rows, from ``V``) and ``B0`` (columns, from ``U``):
            ``"ArB2r"`` (default) ``A0 = V[:, :r]ᵀ``, ``B0 = U[:, r:2r]``;
            ``"A2rBr"`` ``A0 = V[:, r:2r]ᵀ``, ``B0 = U[:, :r]``;
            ``"ArBr"`` interleaved: ``A0`` takes the odd indices ``1, 3, …, 2r−1``, ``B0`` the even ``0, 2, …, 2r−2``;
            ``"random"`` a random permutation of ``0 … 2r−1`` (torch's global RNG): first ``r`` to ``A0``, rest to ``B0``.
        scale: the factor ``c`` multiplying both ``A0`` and ``B0``:
            ``"stable"`` (default) ``c = d_out^{1/4} / √γ``; ``"unit"`` ``c = 1``;
            ``"gd"`` ``c = 1 / s``; ``"weight_svd"`` ``c = mean_{i<r} √(σ_i(W) / s)``
            (the top-``r`` singular values of the frozen weight).
        stable_gamma: ``γ`` of the ``"stable"`` scale.
        init_form: ``"lora_ga"`` (default, the official form above) or ``"paper_eq8"``:
            ``B0 = U_r Σ_r^{1/2}``, ``A0 = Σ_r^{1/2} V_rᵀ`` (so ``B0 A0`` is the best rank-r
            approximation of ``G``; the paper's eq. 8 with shapes made consistent), then times ``c``.
            ``direction`` is ignored by ``"paper_eq8"``.
        offset: ``"adapter"`` (default) keeps ``B0 A0`` frozen in the adapter; ``"subtract"``
            (the official implementation) writes ``W ← W − s B0 A0`` at init and computes
            only ``s B A x``. Saving and merging still describe ``W_orig + s(BA − B0A0)``:
            a saved adapter loaded onto the original base applies the offset itself. Caveat:
            with ``"subtract"``, ``hybridpeft.disabled(model)`` runs the shifted ``W``, not the
            original base.
        num_batches: batches averaged by ``lora_ga_init`` for ``G``.
        svd_niter: power iterations of ``torch.svd_lowrank`` (the exact estimator's SVD).
        estimator: how ``lora_ga_init`` keeps ``G`` while it averages batches:
            ``"exact"`` a dense float32 accumulator per adapted weight on the host (4 bytes per
            adapted parameter: ~28 GB for an 8B model with every projection adapted);
            ``"sketch"`` a randomized sketch ``Y = G Ω``, ``Z = Ψ G`` per layer on the weight's
            device, ``4 (k + l)(d_in + d_out)`` bytes, from which the top singular vectors are
            recovered in one pass (``hybridpeft.gradient_sketch``); ``"auto"`` (default) exact
            while the accumulators total at most ``hybridpeft.lora_ga.AUTO_EXACT_MAX_BYTES``,
            else the sketch.
        sketch_size: ``k``, the sketch's range columns (its co-range rows are ``l = min(2k + 1, d_out)``);
            at least ``rank_needed()`` and at most ``min(d_in, d_out)`` of every adapted layer.
            ``None`` (default): ``DEFAULT_SKETCH_FACTOR × rank_needed()``, capped at ``min(d_in, d_out)``.
        sketch_seed: draws the sketch's random sign matrices (identical on every rank and machine).
        sketch_passes: sweeps over the estimate's batches: 1 the single-pass sketch; ``p ≥ 2``
            randomized subspace iteration, ``p`` times the forward/backward passes for a better
            separation of the top directions when the spectrum decays slowly (``p = 2 + 2q``
            equals ``svd_lowrank(niter=q)``; the exact estimator uses ``q = svd_niter``). Default
            2: on SmolLM2's GSM8K gradients one pass lost 0.013 of first-step alignment, two
            passes 0.002 (docs/perf/lora-ga-scale.md).

    ``norm_bound`` is refused: rescaling ``A`` and ``B`` does not rescale ``BA − B0A0``.
    """

    method = "lora_ga"
    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    init_form: str = "lora_ga"
    offset: str = "adapter"
    num_batches: int = 8
    svd_niter: int = 4
    estimator: str = "auto"
    sketch_size: int | None = None
    sketch_seed: int = 0
    sketch_passes: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.norm_bound is None, "norm_bound", self.norm_bound, "None for LoRA-GA (ΔW = s(BA − B0A0) does not scale with A, B)")
        check(self.direction in DIRECTIONS, "direction", self.direction, f"one of {list(DIRECTIONS)}")
        check(self.scale in SCALES, "scale", self.scale, f"one of {list(SCALES)}")
        check(is_number(self.stable_gamma) and self.stable_gamma > 0, "stable_gamma", self.stable_gamma, "a positive number")
        check(self.init_form in INIT_FORMS, "init_form", self.init_form, f"one of {list(INIT_FORMS)}")
        check(self.offset in OFFSETS, "offset", self.offset, f"one of {list(OFFSETS)}")
        check(is_int(self.num_batches) and self.num_batches > 0, "num_batches", self.num_batches, "a positive integer")
        check(is_int(self.svd_niter) and self.svd_niter >= 0, "svd_niter", self.svd_niter, "a non-negative integer")
        check(self.estimator in ESTIMATORS, "estimator", self.estimator, f"one of {list(ESTIMATORS)}")
        need = self.rank_needed()
        check(self.sketch_size is None or (is_int(self.sketch_size) and self.sketch_size >= need),
              "sketch_size", self.sketch_size,
              f"None or an integer ≥ {need} (the start uses {need} singular directions: "
              f"{'r' if need == self.r else '2r'} with r={self.r})")
        check(is_int(self.sketch_seed) and self.sketch_seed >= 0, "sketch_seed", self.sketch_seed, "a non-negative integer")
        check(is_int(self.sketch_passes) and self.sketch_passes >= 1,
              "sketch_passes", self.sketch_passes, "a positive integer (1: single pass)")

    def lora_ga_config(self) -> "LoraGAConfig":
        """The LoRA-GA options of this config (the Hybrid returns its sub-config here)."""
        return self

    def rank_needed(self) -> int:
        """How many singular directions the start uses: ``2r`` (disjoint A/B sets) or ``r`` (eq. 8)."""
        return self.r if self.init_form == "paper_eq8" else 2 * self.r

    def sketch_size_for(self, d_in: int, d_out: int) -> int:
        """``k`` for a d_out × d_in layer: ``sketch_size`` or the default, capped at ``min(d_in, d_out)``.

        Raises:
            ValueError: an explicit ``sketch_size`` exceeds ``min(d_in, d_out)``.
        """
        if self.sketch_size is not None:
            check(self.sketch_size <= min(d_in, d_out), "sketch_size", self.sketch_size,
                  f"at most min(d_in, d_out) = {min(d_in, d_out)} for a {d_out}×{d_in} layer")
            return self.sketch_size
        return min(DEFAULT_SKETCH_FACTOR * self.rank_needed(), d_in, d_out)


class LoraGAAdapter(LoraAdapter):
    """``W' x = W x + s · [B, −B0] ([A; A0] x)``, i.e. ``ΔW = s (B A − B0 A0)``.

    ``LoraAdapter`` supplies the parameters, dropout, the forward (through ``factors``,
    here the rank-2r pair) and merge/unmerge (through ``delta_weight``); this class adds
    the frozen start.

    ``offset_in_base`` is ``True`` only in this process after ``lora_ga_init`` with
    ``offset="subtract"`` shifted the host's ``W`` by ``−s B0 A0``; then the branch is
    plain ``s B A x`` and ``merged_weight`` adds ``s B A``. It is not saved, so an
    adapter loaded onto an unshifted base cancels the offset itself.

    Raises:
        ValueError: the layer is too small for ``rank_needed()`` singular directions.
    """

    method = "lora_ga"

    def __init__(self, d_in: int, d_out: int, config: LoraGAConfig) -> None:
        need = config.rank_needed()
        check(need <= min(d_in, d_out), "r", config.r,
              f"at most {min(d_in, d_out) // (need // config.r)} for this layer (init_form={config.init_form!r} "
              f"uses {need // config.r}r singular directions of a {d_out}×{d_in} gradient)")
        config.sketch_size_for(d_in, d_out)  # an explicit sketch_size must fit this layer
        super().__init__(d_in, d_out, config)
        self.ga_config = config
        self.offset_in_base = False
        self.register_buffer("lora_A0", torch.zeros(config.r, d_in))  # frozen start of A
        self.register_buffer("lora_B0", torch.zeros(d_out, config.r))  # frozen start of B

    @property
    def lora_ga_adapter(self) -> "LoraGAAdapter":
        """The part that ``lora_ga_init`` initializes (the Hybrid exposes its LoRA-GA branch here)."""
        return self

    def factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``([A; A0], [B, −B0])`` of shapes (2r, d_in), (d_out, 2r) — or ``(A, B)`` once the
        offset lives in the base — cast to ``dtype`` (the small factors, not the activations)."""
        if self.offset_in_base:
            a, b = self.lora_A, self.lora_B
        else:
            a = torch.cat([self.lora_A, self.lora_A0])  # (2r, d_in)
            b = torch.cat([self.lora_B, -self.lora_B0], dim=1)  # (d_out, 2r)
        return a.to(dtype), b.to(dtype)

    def start_delta(self) -> Tensor:
        """``s B0 A0`` (d_out, d_in): the frozen start point that the branch cancels."""
        return self.scaling * self.lora_B0 @ self.lora_A0

    def delta_weight(self) -> Tensor:
        delta = self.scaling * self.lora_B @ self.lora_A  # (d_out, d_in)
        return delta if self.offset_in_base else delta - self.start_delta()

    @torch.no_grad()
    def set_start(self, a0: Tensor, b0: Tensor) -> None:
        """Start both the trainable and the frozen factors at ``(A0, B0)``: ``ΔW = 0`` afterwards.

        Args:
            a0: (r, d_in). b0: (d_out, r).
        """
        for target, value in ((self.lora_A, a0), (self.lora_A0, a0), (self.lora_B, b0), (self.lora_B0, b0)):
            if value.shape != target.shape:
                raise ValueError(f"start factor shape {tuple(value.shape)} != adapter shape {tuple(target.shape)}")
            distributed.assign(target, value)  # sharded (FSDP) A, B keep this rank's rows

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}, offset_in_base={self.offset_in_base}"
