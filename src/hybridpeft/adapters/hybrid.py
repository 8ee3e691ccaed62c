"""The Hybrid: a LoRA-GA branch and an output-side BOFT branch mixed per layer by λ.

For a frozen ``h = W x`` (computed once),

    y = λ h + (1 − λ) R h + λ s (B A − B0 A0) x            (+ b, added by the host)
      = lerp(R h, h + lora(x), λ),

i.e. ``W' = W + λ ΔW_LoRA + (1 − λ)(R − I) W`` (the paper's Algorithm 2 with the
start point cancelled). ``R = I`` and ``ΔW_LoRA = 0`` at initialization, so the
output is unchanged for any λ. The two branches are a ``LoraGAAdapter`` and a
``BoftAdapter`` (composed, not copied); λ is a persistent buffer (at least float32) moved by
``after_optimizer_step`` according to ``hybridpeft.adapters.mixing``.

When the BOFT branch uses its composed form (``R`` block-diagonal with ``c × c`` blocks),
the whole layer is one block-diagonal map plus the low-rank term,

    y = blockdiag(M) h + u vᵀ,   M_g = λ I + (1 − λ) R_g,   u = A' x,   v = λ s B',

(``A' = [A; A0]``, ``B' = [B, −B0]``), run by ``blockdiag.BlockDiagonalFunction``: one
batched matmul and one GEMM accumulating into its output, no ``N × d_out`` lerp or λ
scaling. Backward keeps the output and ``x`` (which the LoRA branch keeps anyway) and
forms ``M``'s gradient from the output, ``Σ g hᵀ = (Σ g yᵀ − (gᵀu) vᵀ) M⁻ᵀ`` per block (``h``
itself is never rebuilt). ``M``, ``M⁻¹`` and the guard below are computed for every layer
at once by ``prepare_all`` (``hybridpeft.adapters.prepared``) at the start of each model
forward. ``M`` is normal with eigenvalues ``λ + (1 − λ) e^{iφ}``, so
``σ_min(M)² = 1 − λ(1 − λ) max|e^{iφ} − 1|² ≥ 1 − λ(1 − λ) max_g ‖R_g − I‖_F²``, and also
``≥ (2λ − 1)²``; where neither bound reaches ``¼`` (``cond(M) > 2``: a rotation near 180°
at λ near ½) backward recomputes ``h = W x`` instead (exact, one more base matmul).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .config import AdapterConfig
from .mixing import MixingRule, update_lambdas
from .base import Adapter, BaseMatmul
from .blockdiag import BlockDiagonalFunction, Keep, LateFlag, LateFlags, block_inverse
from .boft import BoftAdapter, BoftConfig, composed_bank
from .lora_ga import LoraGAAdapter, LoraGAConfig
from .prepared import offer, take

_FLOAT32_BUFFERS = ("mix_lambda", "grad_norm_lora", "grad_norm_boft")


@dataclass
class HybridConfig(AdapterConfig):
    """Args (flat; ``lora_*``/``ga_*`` feed the LoRA-GA branch, ``boft_*`` the BOFT branch):
        lora_r, lora_alpha, lora_dropout, lora_rslora: ``LoraGAConfig``'s ``r``, ``alpha``, ``dropout``, ``rslora``.
        ga_direction, ga_scale, ga_stable_gamma, ga_init_form, ga_num_batches, ga_svd_niter,
        ga_estimator, ga_sketch_size, ga_sketch_seed, ga_sketch_passes:
            ``LoraGAConfig``'s ``direction``, ``scale``, ``stable_gamma``, ``init_form``,
            ``num_batches``, ``svd_niter``, ``estimator``, ``sketch_size``, ``sketch_seed``, ``sketch_passes``. (The start point always stays in the adapter:
            subtracting it from the ``W`` that the BOFT branch also rotates would change the output.)
        boft_block_size, boft_n_factors: ``BoftConfig``'s ``block_size``, ``n_factors`` (output side).
        recompute_base: ``BoftConfig``'s ``recompute_base``. ``False`` (default): backward keeps
            ``x`` (for the LoRA branch) and ``h = W x`` (for the BOFT branch). ``True``: only ``x``;
            the BOFT branch recomputes ``h`` from it in backward. Memory: ``N × d_out`` less
            per module (``lora_dropout=0``; with dropout the LoRA branch keeps the dropped-out
            ``x``, so the BOFT branch's ``x`` is one more ``N × d_in``). Time: one more base
            matmul per module in backward.
        schedule: ``"adaptive"`` (default), ``"fixed"`` or ``"anneal"``; see ``hybridpeft.adapters.mixing``.
        lam_init: λ at the start of ``"adaptive"``.
        lam_fixed: λ of ``"fixed"``.
        anneal_start, anneal_end, anneal_steps: the ``"anneal"`` line, over ``anneal_steps``
            optimizer steps (``None``: set later, e.g. by the Trainer callback from ``max_steps``).
        ema: smoothing of ``"adaptive"`` (weight of the previous λ).
        lam_min, lam_max: clamp of ``"adaptive"``.
        norm_rule: ``"relative"`` (default: each branch's gradient norm divided by its
            coefficient, λ or 1 − λ) or ``"paper_literal"``.
    """

    method = "hybrid"
    # Branch fields: the defaults of the branch configs, which validate them (see _LORA_GA_FIELDS, _BOFT_FIELDS).
    lora_r: int = LoraGAConfig.r
    lora_alpha: float = LoraGAConfig.alpha
    lora_dropout: float = LoraGAConfig.dropout
    lora_rslora: bool = LoraGAConfig.rslora
    ga_direction: str = LoraGAConfig.direction
    ga_scale: str = LoraGAConfig.scale
    ga_stable_gamma: float = LoraGAConfig.stable_gamma
    ga_init_form: str = LoraGAConfig.init_form
    ga_num_batches: int = LoraGAConfig.num_batches
    ga_svd_niter: int = LoraGAConfig.svd_niter
    ga_estimator: str = LoraGAConfig.estimator
    ga_sketch_size: int | None = LoraGAConfig.sketch_size
    ga_sketch_seed: int = LoraGAConfig.sketch_seed
    ga_sketch_passes: int = LoraGAConfig.sketch_passes
    boft_block_size: int = BoftConfig.block_size
    boft_n_factors: int = BoftConfig.n_factors
    recompute_base: bool = BoftConfig.recompute_base
    # λ: the names and defaults of MixingRule, which validates them (one source for both).
    schedule: str = MixingRule.schedule
    lam_init: float = MixingRule.lam_init
    lam_fixed: float = MixingRule.lam_fixed
    anneal_start: float = MixingRule.anneal_start
    anneal_end: float = MixingRule.anneal_end
    anneal_steps: int | None = MixingRule.anneal_steps
    ema: float = MixingRule.ema
    lam_min: float = MixingRule.lam_min
    lam_max: float = MixingRule.lam_max
    norm_rule: str = MixingRule.norm_rule

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mixing_rule()  # validate λ fields now; the names are the same in both
        self.lora_ga_config()  # validate the branch fields now, under their hybrid names
        self.boft_config()

    def lora_ga_config(self) -> LoraGAConfig:
        """The LoRA-GA branch's config (read by ``lora_ga_init``)."""
        return self._sub(LoraGAConfig, _LORA_GA_FIELDS)

    def boft_config(self) -> BoftConfig:
        return self._sub(BoftConfig, _BOFT_FIELDS, side="output")

    def mixing_rule(self) -> MixingRule:
        # The rule's fields are the config's λ fields by name; one list to keep in step.
        return MixingRule(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MixingRule)})

    def _sub(self, cls: Callable[..., Any], names: dict[str, str], **fixed: Any) -> Any:
        values = {sub: getattr(self, hybrid) for sub, hybrid in names.items()}
        try:
            return cls(target_modules=self.target_modules, adapter_dtype=self.adapter_dtype, **values, **fixed)
        except ValueError as err:
            raise _renamed(err, names) from None


_LORA_GA_FIELDS = {
    "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "lora_rslora",
    "direction": "ga_direction", "scale": "ga_scale", "stable_gamma": "ga_stable_gamma",
    "init_form": "ga_init_form", "num_batches": "ga_num_batches", "svd_niter": "ga_svd_niter",
    "estimator": "ga_estimator", "sketch_size": "ga_sketch_size", "sketch_seed": "ga_sketch_seed",
    "sketch_passes": "ga_sketch_passes",
}
_BOFT_FIELDS = {"block_size": "boft_block_size", "n_factors": "boft_n_factors", "recompute_base": "recompute_base"}


def _renamed(err: ValueError, names: dict[str, str]) -> ValueError:
    """A branch's "field=value is invalid" error, re-worded with the hybrid's field name."""
    message = str(err)
    for sub, hybrid in names.items():
        if message.startswith(f"{sub}="):
            return ValueError(hybrid + message[len(sub):])
    return ValueError(f"{'/'.join(names.values())}: {message}")


class HybridAdapter(Adapter):
    """``W' x = lerp(R (W x), W x + lora(x), λ)``; see the module docstring.

    Attributes:
        lora: the ``LoraGAAdapter`` branch (``lora_ga_init`` starts it).
        boft: the output-side ``BoftAdapter`` branch.
        rule: the ``MixingRule`` that moves λ.

    Buffers: ``mix_lambda`` (λ, at least float32, saved), ``mix_step`` (optimizer steps seen, saved),
    ``grad_norm_lora`` / ``grad_norm_boft`` (last norms, for logging; not saved).

    Raises:
        ValueError: a branch does not fit the layer (the message names the hybrid field).
    """

    method = "hybrid"

    def __init__(self, d_in: int, d_out: int, config: HybridConfig) -> None:
        super().__init__(d_in, d_out)
        try:
            self.lora = LoraGAAdapter(d_in, d_out, config.lora_ga_config())
        except ValueError as err:
            raise _renamed(err, _LORA_GA_FIELDS) from None
        try:
            self.boft = BoftAdapter(d_in, d_out, config.boft_config())
        except ValueError as err:
            raise _renamed(err, _BOFT_FIELDS) from None
        self.rule = config.mixing_rule()
        self.register_buffer("mix_lambda", torch.tensor(self.rule.initial(), dtype=torch.float32))
        self.register_buffer("mix_step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("grad_norm_lora", torch.tensor(float("nan")), persistent=False)
        self.register_buffer("grad_norm_boft", torch.tensor(float("nan")), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # λ and the logged norms stay at least float32 when the adapter is cast (e.g. to bf16):
        # an EMA step of 1e-3 would vanish in bf16's 8-bit mantissa. A float64 cast is followed.
        kept = {name: self._buffers[name] for name in _FLOAT32_BUFFERS}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            source = new if old.is_meta else old  # to_empty() from meta: nothing to keep but the dtype
            self._buffers[name] = source.to(device=new.device, dtype=torch.promote_types(new.dtype, torch.float32))
        return out

    @property
    def lora_ga_adapter(self) -> LoraGAAdapter:
        return self.lora

    def branch_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        """The LoRA-GA branch's ``A``, ``B`` and the BOFT branch's ``Q`` blocks (η_LoRA, η_BOFT)."""
        return {"lora": list(self.lora.parameters()), "boft": list(self.boft.parameters())}

    def forward(self, x: Tensor, base: BaseMatmul) -> Tensor:
        h = base(x)  # (..., d_out), the only base matmul
        if self.boft.form != "composed":
            return self._forward_factored(x, h, base)
        lora, dtype = self.lora, h.dtype
        a, b = lora.factors(dtype)  # (2r, d_in), (d_out, 2r)
        u = lora.dropout(x.reshape(-1, self.d_in)) @ a.t()  # (N, 2r)
        lam = self.mix_lambda  # float32 or wider, no grad
        v = b * (lam * lora.scaling).to(dtype)  # (d_out, 2r)
        if self.boft.recompute_base or not torch.is_grad_enabled():
            m, inverse, guard = self._mixed_blocks(with_guard=False)
            keep = Keep("base", base=base)  # (without grad nothing is kept: no guard to compute)
        else:
            m, inverse, guard = self._mixed_blocks(with_guard=True)
            keep = Keep("output", inverse="solve", base=base, guard=guard, inverse_blocks=inverse)
        y = BlockDiagonalFunction.apply(h.reshape(-1, self.d_out), m.to(dtype), u.to(dtype), v, x.detach(), keep)
        return y.view(h.shape)

    def _mixed_blocks(self, with_guard: bool) -> tuple[Tensor, Tensor | None, Any]:
        """``M = λ I + (1 − λ) R`` as (d_out / c, c, c) blocks, ``M⁻¹`` or ``None``, and the guard
        (``None`` without ``with_guard``): from the model's batched preparation when valid."""
        prepared = take(self, self.boft.boft_Q, self.mix_lambda)
        if prepared is not None and (prepared[2] is not None or not with_guard):
            return prepared  # type: ignore[return-value]
        r = self.boft.composed_blocks()  # (d_out / c, c, c), float32 or wider
        lam = self.mix_lambda.to(r.dtype)
        m = torch.lerp(r, torch.eye(r.shape[-1], dtype=r.dtype, device=r.device), lam)  # λ I + (1 − λ) R
        return m, None, LateFlag(rebuild_is_accurate(r, lam)) if with_guard else None

    @classmethod
    def prepare_all(cls, adapters: Sequence["HybridAdapter"]) -> None:
        """Every composed layer's ``M``, ``M⁻¹`` and guard, batched: one Cayley transform and
        composition (``composed_bank``), one lerp, one batched inverse, one flag vector."""
        owners = {id(a.boft): a for a in adapters}
        for group, r in composed_bank([a.boft for a in adapters]):  # r: (K, c, c), K blocks of all layers
            hybrids = [owners[id(b)] for b in group]
            counts = [b.dim // b.composed_size for b in group]
            layer_of_block = _layer_index(counts, r.device)  # (K,)
            lam = torch.stack([a.mix_lambda for a in hybrids]).to(r.dtype)[layer_of_block]  # (K,) λ of each block's layer
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
            m = torch.lerp(r, eye, lam[:, None, None])  # (K, c, c)
            pieces = m.split(counts)
            if r.requires_grad:  # the backward's needs: M⁻¹ and whether the output rebuild is accurate
                accurate = rebuild_is_accurate_per_block(r, lam)  # (K,)
                bad = torch.zeros(len(hybrids), dtype=torch.int32, device=r.device)
                flags = LateFlags(bad.index_add_(0, layer_of_block, (~accurate).int()) == 0)
                inverses = block_inverse(m.detach()).split(counts)
                values = [(piece, inv, flags.view(i)) for i, (piece, inv) in enumerate(zip(pieces, inverses))]
            else:
                values = [(piece, None, None) for piece in pieces]
            offer(hybrids, values, [(a.boft.boft_Q, a.mix_lambda) for a in hybrids], r)

    def _forward_factored(self, x: Tensor, h: Tensor, base: BaseMatmul) -> Tensor:
        """``lerp(R h, h + lora(x), λ)`` with the butterfly's factored form (large composed blocks)."""
        rh = self.boft.rotate_base_output(x, h, base)  # (..., d_out); keeps h, or x with recompute_base
        a, b = self.lora.factors(x.dtype)
        u = self.lora.dropout(x) @ a.t() * self.lora.scaling  # (..., 2r)
        h_lora = torch.addmm(h.reshape(-1, self.d_out), u.reshape(-1, u.shape[-1]), b.t()).view_as(h)  # h + lora(x)
        # Neither addmm (saves u and B) nor lerp with a grad-free weight (saves only λ) keeps h,
        # so with recompute_base no N × d_out tensor of this module outlives the forward.
        return torch.lerp(rh, h_lora.to(h.dtype), self.mix_lambda.to(h.dtype))  # R h + λ (h + lora − R h)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """``λ W + (1 − λ) R W + λ ΔW_LoRA`` (``R W`` by rotating columns; no dense ``R``)."""
        lam = self.mix_lambda.to(weight.dtype)
        rotated = self.boft.merged_weight(weight)  # (d_out, d_in)
        return lam * (weight + self.lora.delta_weight().to(weight.dtype)) + (1 - lam) * rotated

    def unmerged_weight(self, merged: Tensor) -> Tensor:
        """``W = M⁻¹ (W' − λ ΔW_LoRA)``, ``M = λ I + (1 − λ) R`` (invertible unless R has an
        eigenvalue −1 and λ = ½; Cayley blocks exclude −1 but their butterfly product need not)."""
        lam = self.mix_lambda.to(merged.dtype)
        eye = torch.eye(self.d_out, dtype=merged.dtype, device=merged.device)
        m = lam * eye + (1 - lam) * self.boft.dense_rotation().to(merged.dtype)  # (d_out, d_out)
        return torch.linalg.solve(m, merged - lam * self.lora.delta_weight().to(merged.dtype))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Read both branches' gradient norms (all-reduced across ranks) and move λ one step."""
        update_lambdas([self])

    @classmethod
    @torch.no_grad()
    def after_optimizer_step_all(cls, adapters: Sequence["HybridAdapter"]) -> None:
        """Move λ of every layer at once: one fused norm, one all-reduce, one vectorized rule step."""
        update_lambdas(adapters)

    def extra_repr(self) -> str:
        return f"schedule={self.rule.schedule}, norm_rule={self.rule.norm_rule}"


_LAYER_INDEX: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _layer_index(counts: list[int], device: torch.device) -> Tensor:
    """(Σ counts,): ``i`` repeated ``counts[i]`` times, cached (made once per model layout and device)."""
    key = (tuple(counts), torch.device(device))
    index = _LAYER_INDEX.get(key)
    if index is None:
        with torch.inference_mode(False):  # a normal tensor even if first made under inference mode
            index = _LAYER_INDEX[key] = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
    return index


@torch.no_grad()
def rebuild_is_accurate_per_block(rotation: Tensor, lam: Tensor) -> Tensor:
    """``rebuild_is_accurate`` per block, with λ per block: (g, c, c), (g,) -> (g,) bool.
    A layer passes when all its blocks do (the bound is monotone in ``D``)."""
    c = rotation.shape[-1]
    distance2 = (2 * c - 2 * rotation.diagonal(dim1=-2, dim2=-1).sum(-1)).clamp(max=4.0)  # min(D_g, 4)
    lam = lam.to(rotation.dtype)
    return (lam - lam.square()) * distance2 <= 0.75


@torch.no_grad()
def rebuild_is_accurate(rotation: Tensor, lam: Tensor) -> Tensor:
    """Whether ``M = λ I + (1 − λ) R`` has ``σ_min ≥ ½`` by the bounds in the module docstring.

    With ``t = λ(1 − λ)`` and ``D = max_g ‖R_g − I‖_F² = 2c − 2 min_g tr R_g`` (R_g orthogonal),
    ``σ_min² ≥ max(1 − t D, 1 − 4t) = 1 − t min(D, 4)``, so the rebuild is accepted when
    ``t min(D, 4) ≤ ¾``. rotation: (g, c, c); returns a 0-dim bool tensor on its device (no host sync).
    """
    return rebuild_is_accurate_per_block(rotation, lam.expand(rotation.shape[0])).all()
