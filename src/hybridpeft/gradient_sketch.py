"""Randomized sketches of each adapted weight's averaged gradient (LoRA-GA at any scale).

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

More passes (``SubspaceSketch``, ``passes = p ≥ 2``): when the spectrum decays slowly a single
pass cannot separate the top directions from the tail; randomized subspace iteration
(Halko et al. 2011, Algorithm 4.4) can, at the price of ``p`` sweeps over the same batches.
Each sweep sums one thin product over the batches — ``G M`` (d_out × k) or ``Gᵀ M`` (d_in × k)
with ``M`` the orthonormalized result of the sweep before (random signs for the first) —
streamed exactly like the single pass (``gᵀ (x M)``, ``xᵀ (g M)`` on the activation path).
The last sweep is a ``Gᵀ Q`` one, so ``B = Qᵀ G`` (k × d_in) is exact and ``G ≈ Q B``:

    p even:  Y = G Ω → Q,  Z = Gᵀ Q → P,  Y = G P → Q,  …,  B = (Gᵀ Q)ᵀ
    p odd:   Z = Gᵀ Ω' → P,  Y = G P → Q,  …,  B = (Gᵀ Q)ᵀ

``p = 2`` is the basic two-pass method; each further pair of sweeps is one power iteration
(``p = 2 + 2q`` matches ``torch.svd_lowrank(niter=q)``, which the exact estimator runs with
``q = 4``). Memory per layer: ``4 (d_in + d_out) k`` bytes (the basis and the sum).
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


def sketch_bytes(d_out: int, d_in: int, k: int, passes: int = 1) -> int:
    """Bytes one layer's sketch keeps at most: one pass, ``Y``, ``Z`` in float32 and ``Ω``, ``Ψ``
    in int8; several, the float32 basis and sum (``(d_in + d_out) k``) and the first sweep's signs."""
    if passes > 1:
        return 4 * (d_in + d_out) * k + max(d_in, d_out) * k
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
    """Single pass: ``Y = G Ω`` and ``Z = Ψ G`` of one layer's gradient ``G`` (d_out × d_in), float32.

    Args:
        d_out, d_in: the weight's shape (``W`` is d_out × d_in).
        k: range sketch size, ``rank_needed ≤ k ≤ min(d_out, d_in)``.
        seed, name: draw ``Ω`` and ``Ψ`` (the same ones for the same seed and name everywhere).
        device: where the sketch lives and its updates run (the weight's device).
        y, z: optional preallocated (d_out, k) and (l, d_in) float32 buffers; zeros are written
            into them. ``bind_later=True``: none now — a ``SketchBank`` binds views of its buffer.

    Raises:
        ValueError: ``k`` outside ``[1, min(d_out, d_in)]``.
    """

    def __init__(self, d_out: int, d_in: int, k: int, *, seed: int, name: str = "",
                 device: torch.device | str = "cpu", y: Tensor | None = None, z: Tensor | None = None,
                 bind_later: bool = False) -> None:
        if not (isinstance(k, int) and 1 <= k <= min(d_out, d_in)):
            raise ValueError(f"sketch_size={k!r} is invalid: expected 1 ≤ k ≤ min(d_out, d_in) = {min(d_out, d_in)} "
                             f"for {name or 'this layer'} ({d_out}×{d_in})")
        self.d_out, self.d_in, self.k = d_out, d_in, k
        self.l = co_range_size(k, d_out)
        self.device = device = torch.device(device)
        # A sketch as wide as its side is the identity: exact, and never a singular square sign matrix
        # (a random n × n ±1 matrix is singular with real probability: two equal or opposite rows, ~1% at n = 16).
        eye = lambda d: torch.eye(d, dtype=torch.int8)  # noqa: E731
        self.omega = (eye(d_in) if k == d_in else random_signs(d_in, k, seed, f"{name}:omega")).to(device)  # (d_in, k) int8
        self.psi = (eye(d_out) if self.l == d_out else random_signs(self.l, d_out, seed, f"{name}:psi")).to(device)  # (l, d_out) int8
        if bind_later:
            self.y = self.z = torch.empty(0, device=device)
            return
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

    passes = 1

    def sums(self) -> dict[str, Tensor]:
        """The tensors this pass sums over batches and ranks (and that the cache keeps)."""
        return {"Y": self.y, "Z": self.z}

    def sum_shapes(self) -> dict[str, tuple[int, int]]:
        return {"Y": (self.d_out, self.k), "Z": (self.l, self.d_in)}

    def bind(self, buffers: Mapping[str, Tensor]) -> None:
        """Use ``buffers`` (zeroed views into a ``SketchBank``'s flat buffer) as the sums."""
        self.y, self.z = buffers["Y"].zero_(), buffers["Z"].zero_()

    def end_pass(self) -> None:
        return None

    def nbytes(self) -> int:
        return 4 * (self.y.numel() + self.z.numel()) + self.omega.numel() + self.psi.numel()

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


class SubspaceSketch:
    """Several passes: randomized subspace iteration on one layer's gradient (see the module docstring).

    Args:
        d_out, d_in, k, seed, name, device: as for ``GradientSketch``.
        passes: sweeps over the batches, at least 2.

    Between passes the caller sums ``sums()`` over batches and ranks, then calls ``end_pass``.
    """

    def __init__(self, d_out: int, d_in: int, k: int, *, seed: int, name: str = "",
                 device: torch.device | str = "cpu", passes: int = 2, bind_later: bool = False) -> None:
        if not (isinstance(k, int) and 1 <= k <= min(d_out, d_in)):
            raise ValueError(f"sketch_size={k!r} is invalid: expected 1 ≤ k ≤ min(d_out, d_in) = {min(d_out, d_in)} "
                             f"for {name or 'this layer'} ({d_out}×{d_in})")
        if not (isinstance(passes, int) and passes >= 2):
            raise ValueError(f"sketch_passes={passes!r} is invalid: SubspaceSketch needs at least 2")
        self.d_out, self.d_in, self.k, self.passes = d_out, d_in, k, passes
        self.device = torch.device(device)
        self.done = 0
        # even: start on the right (G Ω); odd: on the left (Gᵀ Ω'), so that the last sweep is Gᵀ Q
        self.right = passes % 2 == 0
        rows = d_in if self.right else d_out
        start = torch.eye(rows, dtype=torch.int8) if k == rows else random_signs(rows, k, seed, f"{name}:start")
        self.basis = start.to(self.device)  # (d_in or d_out, k): int8 signs, then float32 orthonormal
        self.owns_sums = not bind_later  # else a SketchBank binds each pass's sum into its buffer
        self.acc = torch.zeros(*self.sum_shapes()["S"], device=self.device) if self.owns_sums else torch.empty(0)

    def sum_shapes(self) -> dict[str, tuple[int, int]]:
        return {"S": (self.d_out if self.right else self.d_in, self.k)}

    def sums(self) -> dict[str, Tensor]:
        return {"S": self.acc}

    def bind(self, buffers: Mapping[str, Tensor]) -> None:
        self.acc = buffers["S"].zero_()

    @torch.no_grad()
    def add_matrix(self, g: Tensor) -> None:
        """Add ``G M`` (right sweep) or ``Gᵀ M`` (left sweep) for a gradient ``G`` (d_out, d_in)."""
        g = g.to(self.device, torch.promote_types(g.dtype, torch.float32))
        m = self.basis.to(g.dtype)
        self.acc.add_((g @ m if self.right else g.t() @ m).float())

    @torch.no_grad()
    def add_outer(self, g: Tensor, x: Tensor) -> None:
        """Add the sweep's product for ``G = gᵀ x`` without forming it: ``gᵀ (x M)`` or ``xᵀ (g M)``."""
        math_dtype = torch.promote_types(torch.promote_types(g.dtype, x.dtype), torch.float32)
        g = g.reshape(-1, g.shape[-1]).to(self.device, math_dtype)  # (N, d_out)
        x = x.reshape(-1, x.shape[-1]).to(self.device, math_dtype)  # (N, d_in)
        m = self.basis.to(math_dtype)
        self.acc.add_((g.t() @ (x @ m) if self.right else x.t() @ (g @ m)).float())  # (d_out, k) or (d_in, k)

    @torch.no_grad()
    def end_pass(self) -> None:
        """After a sweep's sums are complete: orthonormalize them into the next sweep's basis."""
        self.done += 1
        if self.done == self.passes:
            return
        self.basis = torch.linalg.qr(self.acc.double())[0].float()  # (d_out, k) after a right sweep, else (d_in, k)
        self.right = not self.right
        self.acc = torch.zeros(*self.sum_shapes()["S"], device=self.device) if self.owns_sums else torch.empty(0)

    def state_dict(self) -> dict[str, Tensor]:
        """The last basis ``Q`` and sum ``Gᵀ Q`` (what ``low_rank`` needs)."""
        return {"Q": self.basis, "S": self.acc}

    def load_final(self, q: Tensor, s: Tensor) -> None:
        self.basis, self.acc, self.done, self.right = q.to(self.device), s.to(self.device), self.passes, False

    @torch.no_grad()
    def low_rank(self, q: int) -> LowRankGradient:
        """The leading ``q ≤ k`` singular triplets of ``Q B``, ``B = Qᵀ G = (Gᵀ Q)ᵀ`` (after the last sweep)."""
        if not 1 <= q <= self.k:
            raise ValueError(f"q={q} is invalid: expected 1 ≤ q ≤ sketch_size = {self.k}")
        if self.done != self.passes:
            raise RuntimeError(f"the sketch has run {self.done} of its {self.passes} passes")
        basis = self.basis.double()  # (d_out, k): the Q of the last sweep
        u_b, s, vh = torch.linalg.svd(self.acc.double().t(), full_matrices=False)  # B = (k, d_in)
        return LowRankGradient((basis @ u_b[:, :q]).float(), s[:q].float(), vh[:q].t().float())

    def nbytes(self) -> int:
        return self.basis.numel() * self.basis.element_size() + 4 * self.acc.numel()


class SketchBank:
    """The sketches of many layers, each pass's sums stacked in one flat float32 buffer per device.

    One buffer means one all-reduce across ranks per pass (``finish_pass``) — for the single
    pass, every layer's ``[Y; Z]`` in one call.

    Args:
        shapes: name → (d_out, d_in, device) of each layer's weight, in a fixed order
            (the same on every rank).
        k: name → range sketch size (one int for all layers is accepted too).
        seed: draws every test matrix (with each name).
        passes: 1 (``GradientSketch``) or more (``SubspaceSketch``).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int, torch.device]], k: Mapping[str, int] | int,
                 *, seed: int, passes: int = 1) -> None:
        sizes = {name: k if isinstance(k, int) else k[name] for name in shapes}
        self.seed, self.passes, self.done = seed, passes, 0
        self.sketches: dict[str, GradientSketch | SubspaceSketch] = {}
        for name, (d_out, d_in, device) in shapes.items():
            if passes == 1:
                self.sketches[name] = GradientSketch(d_out, d_in, sizes[name], seed=seed, name=name, device=device,
                                                     bind_later=True)
            else:
                self.sketches[name] = SubspaceSketch(d_out, d_in, sizes[name], seed=seed, name=name, device=device,
                                                     passes=passes, bind_later=True)
        self.buffers: dict[torch.device, Tensor] = {}
        self._stack()

    def _stack(self) -> None:
        """Allocate this pass's flat buffer per device and point every sketch's sums into it."""
        totals: dict[torch.device, int] = {}
        for sk in self.sketches.values():
            totals[sk.device] = totals.get(sk.device, 0) + sum(r * c for r, c in sk.sum_shapes().values())
        self.buffers = {}  # the last pass's buffers go first
        self.buffers = {device: torch.zeros(total, device=device) for device, total in totals.items()}
        offsets = dict.fromkeys(totals, 0)
        for sk in self.sketches.values():
            device = sk.device
            views = {}
            for part, (rows, cols) in sk.sum_shapes().items():
                start = offsets[device]
                views[part] = self.buffers[device][start:start + rows * cols].view(rows, cols)
                offsets[device] = start + rows * cols
            sk.bind(views)

    def __getitem__(self, name: str) -> GradientSketch | SubspaceSketch:
        return self.sketches[name]

    def __iter__(self):
        return iter(self.sketches)

    def __len__(self) -> int:
        return len(self.sketches)

    def scale_(self, factor: float) -> None:
        """Multiply every sum of this pass by ``factor`` (e.g. ``1 / batches`` for the mean)."""
        for flat in self.buffers.values():
            flat.mul_(factor)

    def all_reduce(self) -> int:
        """Sum this pass over the ranks with one ``all_reduce`` per buffer (one buffer per device,
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

    def finish_pass(self, batches: int) -> int:
        """The pass's sums are complete on this rank: mean over ``batches`` and over the ranks (one
        all-reduce per device buffer), then each sketch prepares its next pass. Returns the
        number of all-reduce calls."""
        self.scale_(1.0 / batches)
        calls = self.all_reduce()
        if calls:
            self.scale_(1.0 / dist.get_world_size())
        for sk in self.sketches.values():
            sk.end_pass()
        self.done += 1
        if self.done < self.passes:
            self._stack()
        return calls

    def state_dict(self) -> dict[str, Tensor]:
        """The final tensors of every sketch as ``{name}.{part}`` CPU tensors (for safetensors)."""
        out = {}
        for name, sk in self.sketches.items():
            parts = sk.sums() if isinstance(sk, GradientSketch) else sk.state_dict()
            for part, tensor in parts.items():
                out[f"{name}.{part}"] = tensor.detach().to("cpu", copy=True).contiguous()
        return out

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Take every sketch's final tensors from ``state_dict`` output (all passes done).

        Raises:
            ValueError: a name is missing or a shape differs (e.g. another sketch size).
        """
        for name, sk in self.sketches.items():
            if isinstance(sk, GradientSketch):
                for part, target in sk.sums().items():
                    value = tensors.get(f"{name}.{part}")
                    if value is None or value.shape != target.shape:
                        raise ValueError(f"cached sketch of {name!r} is missing or has another shape")
                    target.copy_(value)
            else:
                q, s = tensors.get(f"{name}.Q"), tensors.get(f"{name}.S")
                if q is None or s is None or q.shape != (sk.d_out, sk.k) or s.shape != (sk.d_in, sk.k):
                    raise ValueError(f"cached sketch of {name!r} is missing or has another shape")
                sk.load_final(q, s)
        self.done = self.passes

    def expected_keys(self) -> set[str]:
        parts = ("Y", "Z") if self.passes == 1 else ("Q", "S")
        return {f"{n}.{part}" for n in self.sketches for part in parts}

    def nbytes(self) -> int:
        """Bytes held now: the stacked float32 sums plus each sketch's test matrices or basis."""
        flat = sum(b.numel() * b.element_size() for b in self.buffers.values())
        own = 0
        for sk in self.sketches.values():
            if isinstance(sk, GradientSketch):
                own += sk.omega.numel() + sk.psi.numel()  # int8
            else:
                own += sk.basis.numel() * sk.basis.element_size()
        return flat + own

    def low_rank(self, names: Iterable[str] | None = None, *, q: Mapping[str, int]) -> dict[str, LowRankGradient]:
        return {name: self.sketches[name].low_rank(q[name]) for name in (names or self.sketches)}
