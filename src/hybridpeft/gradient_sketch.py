"""A single-pass randomized sketch of each adapted weight's averaged gradient (LoRA-GA at any scale).

LoRA-GA's start needs only the top ``2r`` singular subspace of ``G = mean_b ∇_W L(b)``
(d_out × d_in). Instead of a dense accumulator (4 bytes per adapted parameter on the
host), each layer keeps two thin random projections of ``G`` (Halko, Martinsson and
Tropp 2011; Tropp, Yurtsever, Udell and Cevher 2017, "Practical sketching algorithms
for low-rank matrix approximation", §4):

    Y = G Ω    (d_out × k),   Ω (d_in × k)  — the range sketch
    Z = Ψ G    (l × d_in),    Ψ (l × d_out) — the co-range sketch,  l = min(2k + 1, d_out)

``Ω`` and ``Ψ`` are random signs (±1) drawn from a generator seeded by ``seed`` and the
layer's name, so every process draws the same ones bit for bit (integer sampling does not
depend on the CPU's vector width, unlike Gaussian sampling). A test matrix as wide as its
side (``k = d_in``, or ``l = d_out`` for layers with ``d_out ≤ 2k + 1``) is the identity
instead: that side is then kept exactly. Both sketches are linear in
``G``: the sketch of a sum of per-batch gradients is the sum of their sketches, so
batches, data-parallel ranks and FSDP shards combine by adding small matrices — one
all-reduce of every layer's ``[Y; Z]`` stacked in one buffer (``SketchBank.all_reduce``).

Updates, per batch:

* from a gradient ``G_b`` (d_out × d_in) that autograd produced:  ``Y += G_b Ω``, ``Z += Ψ G_b``;
* from activations, ``G_b = gᵀ x`` with ``g = ∂L/∂h`` (N × d_out), ``x`` (N × d_in):
  ``Y += gᵀ (x Ω)`` and ``Z += (Ψ gᵀ) x`` — never a d_out × d_in matrix, only N × k,
  l × N and the sketches themselves.

Recovery (single pass, Tropp et al. 2017, Algorithm 4 then a truncated SVD):

    Q = orth(Y)                     (d_out × k)
    X = argmin ‖(Ψ Q) X − Z‖_F      (k × d_in),  Ψ Q is l × k with l > k: well conditioned
    G ≈ Q X,   X = U_x Σ Vᵀ   ⇒   U = Q U_x,   G ≈ U Σ Vᵀ

The leading singular pairs of ``Q X`` approximate those of ``G`` when ``G``'s spectrum
decays past ``k`` (the error bound scales with the tail ``σ_{k+1}, σ_{k+2}, …``);
``docs/perf/lora-ga-scale.md`` measures the principal angles on real gradients.

Memory per layer: ``Y``, ``Z`` in float32 and ``Ω``, ``Ψ`` as int8 signs (kept, so that an
update costs two GEMMs and a cast) — ``4 (d_out k + l d_in) + (d_in k + l d_out)`` bytes,
against ``4 d_in d_out`` for the dense estimate.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def co_range_size(k: int, d_out: int) -> int:
    """``l``: the co-range sketch's rows, ``2k + 1`` (Tropp et al.'s choice for a well-posed
    least-squares step) but never more than ``d_out`` (then ``Ψ`` is square and ``Z`` is exact)."""
    return min(2 * k + 1, d_out)


def sketch_bytes(d_out: int, d_in: int, k: int) -> int:
    """Bytes one layer's sketch keeps: ``Y``, ``Z`` in float32, ``Ω``, ``Ψ`` in int8."""
    l = co_range_size(k, d_out)
    return 4 * (d_out * k + l * d_in) + (d_in * k + l * d_out)


def random_signs(rows: int, cols: int, seed: int, salt: str) -> Tensor:
    """A (rows, cols) int8 matrix of ±1 drawn from a CPU generator seeded by ``seed`` and ``salt``.

    Identical on every machine: ``torch.randint`` on a seeded CPU generator is integer
    arithmetic on the Mersenne twister's output."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(salt.encode())) % (2**63))
    return torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8).mul_(2).sub_(1)


@dataclass
class LowRankGradient:
    """A gradient's leading singular triplets: ``G ≈ u diag(s) vᵀ``.

    Attributes:
        u: (d_out, q) orthonormal columns.  s: (q,) descending.  v: (d_in, q) orthonormal columns.
    """

    u: Tensor
    s: Tensor
    v: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.v.shape[0]

    def dense(self) -> Tensor:
        """``u diag(s) vᵀ`` (d_out, d_in): for tests and inspection of small layers only."""
        return (self.u * self.s) @ self.v.t()


class GradientSketch:
    """``Y = G Ω`` and ``Z = Ψ G`` of one layer's gradient ``G`` (d_out × d_in), float32.

    Args:
        d_out, d_in: the weight's shape (``W`` is d_out × d_in).
        k: range sketch size, ``rank_needed ≤ k ≤ min(d_out, d_in)``.
        seed, name: draw ``Ω`` and ``Ψ`` (the same ones for the same seed and name everywhere).
        device: where the sketch lives and its updates run (the weight's device).
        y, z: optional preallocated (d_out, k) and (l, d_in) float32 buffers (views into a
            ``SketchBank``'s flat buffer); zeros are written into them.

    Raises:
        ValueError: ``k`` outside ``[1, min(d_out, d_in)]``.
    """

    def __init__(self, d_out: int, d_in: int, k: int, *, seed: int, name: str = "",
                 device: torch.device | str = "cpu", y: Tensor | None = None, z: Tensor | None = None) -> None:
        if not (isinstance(k, int) and 1 <= k <= min(d_out, d_in)):
            raise ValueError(f"sketch_size={k!r} is invalid: expected 1 ≤ k ≤ min(d_out, d_in) = {min(d_out, d_in)} "
                             f"for {name or 'this layer'} ({d_out}×{d_in})")
        self.d_out, self.d_in, self.k = d_out, d_in, k
        self.l = co_range_size(k, d_out)
        device = torch.device(device)
        # A sketch as wide as its side is the identity: exact, and never a singular square sign matrix
        # (a random n × n ±1 matrix is singular with real probability: two equal or opposite rows, ~1% at n = 16).
        eye = lambda d: torch.eye(d, dtype=torch.int8)  # noqa: E731
        self.omega = (eye(d_in) if k == d_in else random_signs(d_in, k, seed, f"{name}:omega")).to(device)  # (d_in, k) int8
        self.psi = (eye(d_out) if self.l == d_out else random_signs(self.l, d_out, seed, f"{name}:psi")).to(device)  # (l, d_out) int8
        self.y = torch.zeros(d_out, k, device=device) if y is None else y.zero_()  # (d_out, k)
        self.z = torch.zeros(self.l, d_in, device=device) if z is None else z.zero_()  # (l, d_in)

    @torch.no_grad()
    def add_matrix(self, g: Tensor) -> None:
        """``Y += G Ω``, ``Z += Ψ G`` for a gradient ``G`` (d_out, d_in) (any float dtype, any layout)."""
        g = g.to(self.y.device, torch.promote_types(g.dtype, torch.float32))
        self.y.add_((g @ self.omega.to(g.dtype)).float())  # (d_out, k)
        self.z.add_((self.psi.to(g.dtype) @ g).float())  # (l, d_in)

    @torch.no_grad()
    def add_outer(self, g: Tensor, x: Tensor) -> None:
        """Add the sketch of ``G = gᵀ x`` without forming it.

        Args:
            g: ∂L/∂h, (..., d_out) — tokens in the leading dims.
            x: the base matmul's input, (..., d_in), the same leading dims.
        """
        math_dtype = torch.promote_types(torch.promote_types(g.dtype, x.dtype), torch.float32)
        g = g.reshape(-1, g.shape[-1]).to(self.y.device, math_dtype)  # (N, d_out)
        x = x.reshape(-1, x.shape[-1]).to(self.y.device, math_dtype)  # (N, d_in)
        self.y.add_((g.t() @ (x @ self.omega.to(math_dtype))).float())  # (d_out, N) @ (N, k)
        self.z.add_(((self.psi.to(math_dtype) @ g.t()) @ x).float())  # (l, N) @ (N, d_in)

    def add_sketch(self, y: Tensor, z: Tensor) -> None:
        """Add another sketch of the same shape drawn with the same ``Ω``, ``Ψ`` (e.g. a cached one)."""
        self.y.add_(y.to(self.y))
        self.z.add_(z.to(self.z))

    @torch.no_grad()
    def low_rank(self, q: int) -> LowRankGradient:
        """The leading ``q ≤ k`` singular triplets of the sketched ``G`` (float32, on the sketch's device).

        ``Q = orth(Y)``; ``X = (Ψ Q)⁺ Z`` by least squares; ``X = U_x Σ Vᵀ``; ``U = Q U_x``.
        The small factorizations run in float64 (k × k and k × d_in).
        """
        if not 1 <= q <= self.k:
            raise ValueError(f"q={q} is invalid: expected 1 ≤ q ≤ sketch_size = {self.k}")
        y, z, psi = self.y.double(), self.z.double(), self.psi.double()
        basis, _ = torch.linalg.qr(y)  # (d_out, k)
        core = torch.linalg.lstsq(psi @ basis, z).solution  # (l, k) \ (l, d_in) -> (k, d_in)
        u_x, s, vh = torch.linalg.svd(core, full_matrices=False)  # (k, k), (k,), (k, d_in)
        u = basis @ u_x[:, :q]  # (d_out, q)
        return LowRankGradient(u.float(), s[:q].float(), vh[:q].t().float())


class SketchBank:
    """The sketches of many layers, their ``Y`` and ``Z`` stacked in one flat float32 buffer per device.

    One buffer means one all-reduce across ranks (``all_reduce``) and one write to the cache.

    Args:
        shapes: name → (d_out, d_in, device) of each layer's weight, in a fixed order
            (the same on every rank).
        k: name → range sketch size (one int for all layers is accepted too).
        seed: draws every ``Ω`` and ``Ψ`` (with each name).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int, torch.device]], k: Mapping[str, int] | int,
                 *, seed: int) -> None:
        sizes = {name: k if isinstance(k, int) else k[name] for name in shapes}
        self.seed = seed
        self.buffers: dict[torch.device, Tensor] = {}
        offsets: dict[str, tuple[torch.device, int]] = {}
        totals: dict[torch.device, int] = {}
        for name, (d_out, d_in, device) in shapes.items():
            device = torch.device(device)
            numel = d_out * sizes[name] + co_range_size(sizes[name], d_out) * d_in
            offsets[name] = (device, totals.get(device, 0))
            totals[device] = totals.get(device, 0) + numel
        for device, total in totals.items():
            self.buffers[device] = torch.zeros(total, device=device)
        self.sketches: dict[str, GradientSketch] = {}
        for name, (d_out, d_in, _) in shapes.items():
            device, start = offsets[name]
            k_i, l_i = sizes[name], co_range_size(sizes[name], d_out)
            flat = self.buffers[device]
            y = flat[start:start + d_out * k_i].view(d_out, k_i)
            z = flat[start + d_out * k_i:start + d_out * k_i + l_i * d_in].view(l_i, d_in)
            self.sketches[name] = GradientSketch(d_out, d_in, k_i, seed=seed, name=name, device=device, y=y, z=z)

    def __getitem__(self, name: str) -> GradientSketch:
        return self.sketches[name]

    def __iter__(self):
        return iter(self.sketches)

    def __len__(self) -> int:
        return len(self.sketches)

    def scale_(self, factor: float) -> None:
        """Multiply every sketch by ``factor`` (e.g. ``1 / batches`` for the mean)."""
        for flat in self.buffers.values():
            flat.mul_(factor)

    def all_reduce(self) -> int:
        """Sum every rank's sketches with one ``all_reduce`` per buffer (one buffer per device,
        usually one), if a default process group is running. Returns the number of calls made.

        NCCL needs a CUDA tensor: a CPU buffer is reduced through a CUDA copy then.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        on_cpu = dist.get_backend() == "gloo"
        calls = 0
        for device in sorted(self.buffers, key=str):  # the same order on every rank
            flat = self.buffers[device]
            buf = flat if on_cpu or flat.is_cuda else flat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not flat:
                flat.copy_(buf)
            calls += 1
        return calls

    def state_dict(self) -> dict[str, Tensor]:
        """``{name}.Y`` and ``{name}.Z`` as separate CPU tensors (for safetensors)."""
        out = {}
        for name, sk in self.sketches.items():
            out[f"{name}.Y"] = sk.y.detach().to("cpu", copy=True)
            out[f"{name}.Z"] = sk.z.detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Overwrite every sketch from ``state_dict`` output.

        Raises:
            ValueError: a name is missing or a shape differs (e.g. another sketch size).
        """
        for name, sk in self.sketches.items():
            y, z = tensors.get(f"{name}.Y"), tensors.get(f"{name}.Z")
            if y is None or z is None or y.shape != sk.y.shape or z.shape != sk.z.shape:
                raise ValueError(f"cached sketch of {name!r} is missing or has another shape")
            sk.y.copy_(y)
            sk.z.copy_(z)

    def expected_keys(self) -> set[str]:
        return {f"{n}.{part}" for n in self.sketches for part in ("Y", "Z")}

    def nbytes(self) -> int:
        """Bytes held: the stacked float32 ``Y``/``Z`` buffers plus every int8 ``Ω`` and ``Ψ``."""
        flat = sum(b.numel() * b.element_size() for b in self.buffers.values())
        tests = sum(sk.omega.numel() + sk.psi.numel() for sk in self.sketches.values())  # int8
        return flat + tests

    def low_rank(self, names: Iterable[str] | None = None, *, q: Mapping[str, int]) -> dict[str, LowRankGradient]:
        return {name: self.sketches[name].low_rank(q[name]) for name in (names or self.sketches)}
