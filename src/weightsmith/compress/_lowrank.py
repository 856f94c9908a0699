"""Shared pieces of the low-rank compressors: weighted truncated SVD, global rank allocation, thin layers.

Every method here minimises a weighted reconstruction error ``‖L (W − Ŵ) R‖_F`` over rank-``r`` ``Ŵ``: plain
SVD (``L = R = I``), Fisher-weighted SVD (``L = diag(√I_row)``), activation-aware SVD (``R`` = a Cholesky
factor or a diagonal scale of the input statistics). With ``W̃ = L W R = U Σ Vᵀ`` the optimum is the
truncation (Eckart-Young, "The approximation of one matrix by another of lower rank", 1936),

    Ŵ = L⁻¹ U_r Σ_r V_rᵀ R⁻¹,   error² = Σ_{k>r} σ_k²(W̃)

stored as ``A = L⁻¹ U_r Σ_r`` [out, r] and ``B = V_rᵀ R⁻¹`` [r, in]: ``r (out + in)`` parameters instead of
``out · in``. **Global allocation** spends a parameter budget over all layers greedily by singular-value
energy per parameter: direction ``k`` of layer ``ℓ`` gains ``σ_k²(W̃_ℓ) / ‖W̃_ℓ‖_F²`` of that layer's (weighted)
energy and costs ``out_ℓ + in_ℓ`` parameters; since each layer's gains fall with ``k``, taking directions in
order of gain per parameter until the budget is spent is optimal for this separable objective.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec, collect_stats
from ..linalg import svd, svdvals
from ..progress import log
from ._core import CompressConfig, CompressReport, LayerReport, PlanJob, target_layers

ALLOCATIONS = ("global", "uniform")


@dataclass
class LowRankWeight:
    """``Ŵ = A @ B`` with ``A`` [out, r] and ``B`` [r, in]."""

    A: Tensor
    B: Tensor

    def dequantize(self) -> Tensor:
        """The dense weight the model runs with (the name matches :class:`QuantizedWeight`)."""
        return self.A @ self.B

    @property
    def rank(self) -> int:
        return int(self.B.shape[0])

    @property
    def params(self) -> int:
        return self.A.numel() + self.B.numel()


@dataclass
class Weighting:
    """``W̃ = diag(left) W R``; ``R`` is ``right`` (a diagonal [in] or a lower-triangular [in, in]) or None."""

    left: Tensor | None = None
    right: Tensor | None = None

    def apply(self, W: Tensor) -> Tensor:
        if self.left is not None:
            W = self.left.unsqueeze(1) * W
        if self.right is not None:
            W = W * self.right.unsqueeze(0) if self.right.dim() == 1 else W @ self.right
        return W

    def unweight(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        if self.left is not None:
            A = A / self.left.unsqueeze(1)
        if self.right is not None:
            if self.right.dim() == 1:
                B = B / self.right.unsqueeze(0)
            else:  # B R = V_rᵀ  ->  B = V_rᵀ R⁻¹
                B = torch.linalg.solve_triangular(self.right, B, upper=False, left=False)
        return A, B


def weighted_svd(W: Tensor, weighting: Weighting, rank: int) -> LowRankWeight:
    """The rank-``rank`` minimiser of ``‖L (W − AB) R‖_F`` (module docstring)."""
    U, S, Vh = svd(weighting.apply(W.float()))
    A, B = weighting.unweight(U[:, :rank] * S[:rank], Vh[:rank])
    return LowRankWeight(A.contiguous(), B.contiguous())


def max_rank(shape: tuple[int, int]) -> int:
    """The largest rank whose factors are no larger than the dense matrix: ``r (out + in) <= out · in``."""
    out_f, in_f = shape
    return max(1, (out_f * in_f) // (out_f + in_f))


def allocate_ranks(
    spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], keep: float
) -> dict[str, int]:
    """Ranks spending ``keep`` of the layers' dense parameters by relative energy per parameter (greedy).

    Every layer gets at least rank 1 and at most :func:`max_rank`.
    """
    budget = keep * sum(o * i for o, i in shapes.values())
    ranks = {n: 1 for n in spectra}
    spent = sum(o + i for o, i in shapes.values())
    gains, costs, owners = [], [], []
    names = list(spectra)
    for idx, name in enumerate(names):
        e = spectra[name].double().square()
        e = e / e.sum().clamp_min(1e-300)
        top = min(max_rank(shapes[name]), e.numel())
        cost = float(sum(shapes[name]))
        gains.append(e[1:top] / cost)
        costs.append(torch.full((max(top - 1, 0),), cost, dtype=torch.float64))
        owners.append(torch.full((max(top - 1, 0),), idx, dtype=torch.int64))
    if not names:
        return ranks
    g, c, o = torch.cat(gains), torch.cat(costs), torch.cat(owners)
    order = torch.argsort(g, descending=True, stable=True)
    for cost, owner in zip(c[order].tolist(), o[order].tolist(), strict=True):
        if spent + cost <= budget:
            ranks[names[owner]] += 1
            spent += cost
    return ranks


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float, rank: int = 0) -> dict[str, int]:
    """The same fraction ``keep`` of each layer's parameters (or the fixed ``rank``)."""
    if rank:
        return {n: rank for n in shapes}
    return {n: min(max_rank(s), max(1, int(keep * s[0] * s[1] / (s[0] + s[1])))) for n, s in shapes.items()}


def check_at_least(method: str, low: int, note: str = "", **options: int) -> None:
    """Refuse any integer option below ``low``, naming it (``note``: what the lowest value means)."""
    for key, value in options.items():
        if value < low:
            raise WeightsmithError(f"{method} option {key}={value}: must be >= {low}{note}")


def check_keep(keep: float, method: str) -> None:
    if not 0.0 < float(keep) <= 1.0:
        raise WeightsmithError(f"{method} option keep={keep}: the kept parameter fraction must be in (0, 1]")


@dataclass(frozen=True)
class FactoredConfig(CompressConfig):
    """Output rules every factored compressor shares (low-rank, shared atoms, Monarch): the weights keep
    their dtype and ``--format weightsmith`` stores the factors themselves (:mod:`._format`), so the loaded
    model has fewer parameters; ``--format dense`` stores their products. ``held`` names the factors in
    messages, ``stored_as`` says what ``--format weightsmith`` rebuilds and ``dense_as`` what ``dense``
    holds. ``bits``/``group_size`` are inherited and unused."""

    default_format: ClassVar[str] = "dense"
    held: ClassVar[str] = "factors"
    stored_as: ClassVar[str] = "two thin Linears per layer"
    dense_as: ClassVar[str] = "the product A B"
    group_size: int = 0

    def stored_params(self, weights: dict[str, Any]) -> int:
        """Numbers the factors store (every weight with a ``params`` count)."""
        return sum(int(w.params) for w in weights.values() if hasattr(w, "params"))

    def describe(self, report: CompressReport) -> str:
        """The factors' parameters as a fraction of the factored layers' dense parameters."""
        dense = sum(r.shape[0] * r.shape[1] for r in report.layers)
        kept = 100 * self.stored_params(report.weights) / max(dense, 1)
        return f"{self.held} hold {kept:.1f} % of the layers' parameters"

    def check_format(self, fmt: str) -> None:
        if fmt == "compressed-tensors":
            raise WeightsmithError(
                f"--format compressed-tensors has no layout for {self.held}; use --format weightsmith "
                f"({self.stored_as}, read by ws.load_compressed) or --format dense ({self.dense_as})"
            )


@dataclass(frozen=True)
class LowRankConfig(FactoredConfig):
    """Options every low-rank compressor shares.

    ``keep``: fraction of the targeted layers' parameters kept by the factors; ``allocation``: "global"
    (ranks by energy per parameter over all layers) or "uniform" (the same fraction per layer); ``rank``:
    a fixed rank for every layer (overrides ``keep``). ``bits``/``group_size`` are inherited and unused.
    """

    verb: ClassVar[str] = "factored"
    held: ClassVar[str] = "low-rank factors"
    keep: float = 0.5
    allocation: str = "global"
    rank: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        method = getattr(type(self), "method", type(self).__name__)
        check_keep(self.keep, method)
        if self.allocation not in ALLOCATIONS:
            raise WeightsmithError(
                f"{method} option allocation={self.allocation!r}: use one of {', '.join(ALLOCATIONS)}"
            )
        check_at_least(method, 0, " (0: use keep)", rank=self.rank)

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=False, channels=False)

    def context(
        self, model: nn.Module, layers: Sequence[Layer], calib: Sequence[Any] | None
    ) -> dict[str, Any]:
        """Per-layer data the weighting needs (input statistics by default; nothing if data-free)."""
        if not self.needs_calibration():
            return {}
        if not calib:
            raise WeightsmithError(f"'{type(self).method}' needs calibration data: pass calib=")  # type: ignore[attr-defined]
        return dict(collect_stats(model, layers, calib, self.stats_spec()))

    def check_layers(self, layers: Sequence[Layer]) -> None:
        """Refuse a fixed ``rank`` larger than some selected layer allows (no group size to check)."""
        if self.rank:
            for ly in layers:
                check_rank(self.rank, ly.shape, f"'{ly.name}'")

    def plan(self, job: PlanJob) -> CompressReport:
        """Global rank allocation must see every layer first: the whole job runs here."""
        model, layers, calib, device = job.model, job.layers, job.calib, job.device
        return _compress_layers(model, self, layers, calib, device)

    def weighting(self, W: Tensor, ctx: Any) -> Weighting:
        """The ``L``, ``R`` of the weighted error this method minimises (identity: plain SVD)."""
        return Weighting()

    def factor(self, W: Tensor, weighting: Weighting, rank: int, index: int) -> LowRankWeight:
        """Rank-``rank`` factors of layer number ``index``'s ``W`` (default: the weighted truncated SVD)."""
        return weighted_svd(W, weighting, rank)

    def needs_spectra(self) -> bool:
        """Whether :meth:`choose_ranks` reads every layer's (weighted) singular values."""
        return self.allocation == "global" and not self.rank

    def choose_ranks(
        self, spectra: dict[str, Tensor] | None, shapes: dict[str, tuple[int, int]]
    ) -> dict[str, int]:
        """The rank of every layer to factor (``spectra``: singular values of ``W̃``, when
        :meth:`needs_spectra`). A layer left out of the result stays dense and untouched."""
        if spectra is not None:
            return allocate_ranks(spectra, shapes, self.keep)
        return uniform_ranks(shapes, self.keep, self.rank)

    def new_report(self, ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> CompressReport:
        """The report :func:`compress_lowrank` fills for these ranks (a method may return a subclass
        with more fields)."""
        return CompressReport(self)

    def quantize(self, W: Tensor, stats: InputStats | None) -> LowRankWeight:  # type: ignore[override]
        """One layer at the uniform rank (``compress()``'s per-layer path; use :func:`compress_lowrank`
        for global allocation)."""
        r = uniform_ranks({"w": (int(W.shape[0]), int(W.shape[1]))}, self.keep, self.rank)["w"]
        check_rank(r, W.shape, "")
        return self.factor(W, self.weighting(W, stats), r, 0)


def check_rank(rank: int, shape: Any, name: str) -> None:
    if rank > min(shape):
        raise WeightsmithError(
            f"rank={rank} is larger than the matrix {name} {tuple(shape)} allows (at most {min(shape)})"
        )


def compress_lowrank(
    model: nn.Module,
    config: LowRankConfig,
    calib: Sequence[Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, CompressReport]:
    """Replace ``model``'s selected weights by their low-rank approximations, in place.

    Statistics come from one pass of ``calib`` through the unchanged model; ranks are allocated over all
    layers together (``allocation="global"``) before any layer is changed. ``report.weights`` holds the
    :class:`LowRankWeight` factors (for :func:`thin_linears` and the writers).
    """
    t0 = time.perf_counter()
    report = _compress_layers(model, config, target_layers(model, config), calib, torch.device(device))
    report.seconds = time.perf_counter() - t0
    return model, report


def _compress_layers(
    model: nn.Module,
    config: LowRankConfig,
    layers: Sequence[Layer],
    calib: Sequence[Any] | None,
    dev: torch.device,
) -> CompressReport:
    shapes = {ly.name: ly.shape for ly in layers}
    ctx = config.context(model, layers, calib)

    def weighting(ly: Layer) -> tuple[Tensor, Weighting]:
        W = ly.weight().detach().to(dev, torch.float32, copy=True)
        return W, config.weighting(W, ctx.get(ly.name))

    spectra = None
    if config.needs_spectra():
        spectra = {}
        for ly in layers:
            W, wt = weighting(ly)
            spectra[ly.name] = svdvals(wt.apply(W)).cpu()
    ranks = config.choose_ranks(spectra, shapes)
    report = config.new_report(ranks, shapes)
    for i, ly in enumerate(layers):
        if ly.name not in ranks:
            continue
        W, wt = weighting(ly)
        f = config.factor(W, wt, ranks[ly.name], i)
        ly.write(f.dequantize())
        err = float((W - f.dequantize()).norm() / W.norm().clamp_min(1e-30))
        report.layers.append(LayerReport(ly.name, ly.shape, err))
        report.weights[ly.name] = LowRankWeight(f.A.cpu(), f.B.cpu())
        log(f"  {ly.name} {ly.shape[0]}x{ly.shape[1]}: rank {f.rank}, relative error {err:.4f}")
    return report


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a Linear [out, in] as two thin Linears, ``down`` [r, in] and ``up`` [out, r]."""

    def __init__(self, A: Tensor, B: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.down = nn.Linear(B.shape[1], B.shape[0], bias=False, dtype=B.dtype, device=B.device)
        self.up = nn.Linear(A.shape[1], A.shape[0], bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            self.down.weight.copy_(B)
            self.up.weight.copy_(A)
            if bias is not None:
                self.up.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        # two plain GEMMs (nn.Linear: F.linear on contiguous weights); called as modules so that hooks and
        # adapters attached to ``down`` / ``up`` see them
        return self.up(self.down(x))  # type: ignore[no-any-return]


def swap_linears(
    model: nn.Module, spec: dict[str, Any], make: Callable[[str, nn.Linear, Any], nn.Module], what: str
) -> nn.Module:
    """Replace every ``nn.Linear`` named (by weight name) in ``spec`` by ``make(name, linear, spec[name])``,
    in place; ``what`` completes the refusal ``only nn.Linear layers can ...`` for any other module."""
    modules = dict(model.named_modules())
    for name, value in spec.items():
        path = name[: -len(".weight")]
        lin = modules.get(path)
        if not isinstance(lin, nn.Linear):
            raise WeightsmithError(f"'{name}': only nn.Linear layers can {what}")
        parent_path, _, child = path.rpartition(".")
        setattr(modules[parent_path] if parent_path else model, child, make(name, lin, value))
    return model


def thin_linears(model: nn.Module, factors: dict[str, LowRankWeight | int]) -> nn.Module:
    """Swap every factored ``nn.Linear`` (by weight name) for a :class:`LowRankLinear`, in place.

    A factor gives the thin layers their weights; a bare rank makes zero-filled ones of that rank (to load
    a saved state dict into: the state dict of a thinned model names ``P.down.weight`` and ``P.up.weight``).
    """

    def make(name: str, lin: nn.Linear, f: LowRankWeight | int) -> nn.Module:
        dtype, device = lin.weight.dtype, lin.weight.device
        if isinstance(f, int):
            check_rank(f, lin.weight.shape, f"'{name}'")
            A = torch.zeros(lin.out_features, f, dtype=dtype, device=device)
            B = torch.zeros(f, lin.in_features, dtype=dtype, device=device)
        else:
            A, B = f.A.to(device, dtype), f.B.to(device, dtype)
        return LowRankLinear(A, B, None if lin.bias is None else lin.bias.detach())

    return swap_linears(model, factors, make, "become two thin Linears")
