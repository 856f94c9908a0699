"""VeRA: one pair of frozen random matrices shared by every layer, scaled per layer by two vectors.

Kopiczko, Blankevoort & Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv:2310.11454.

    ΔW = Λ_b B Λ_d A,   Λ_b = diag(b) [out],  Λ_d = diag(d) [r],  A [r, in],  B [out, r] frozen

Only ``d`` (init ``d_initial``) and ``b`` (init 0, so ``ΔW = 0``) train: ``r + out`` numbers per layer.
As in PEFT, ``A`` and ``B`` are drawn once at the largest in/out size among the adapted weights
(Kaiming-uniform) and each layer uses the top-left slice ``A[:, :in]``, ``B[:out, :]``. They come
from ``ctx.shared`` (seeded by the config's seed) and are never saved; PEFT saves them by default
(``save_projection=True``) and draws them from ``projection_prng_key`` with its own RNG sequence, so
bases agree with PEFT only when copied over, not when seeded alike. ``basis="orthogonal"`` draws
``A`` and ``B`` as scaled Haar-orthogonal matrices of the same entry variance instead (``_bases``); a
PEFT export (VeRA has no native one here: it is written as the LoRA ``low_rank()`` factors) is exact
with either basis.

The update is ``ΔW = B' A`` with ``A`` the shared slice (frozen; cast once per dtype for all layers)
and ``B' = Λ_b B Λ_d``, a weight-sized product whose gradient autograd reduces to ``∂b``, ``∂d``
(:class:`~weightsmith.adapters.randlora.ScaledBasis`). The two vectors then cost no pass over the
[N, r] or [N, out] activations (the per-layer form ``((x Aᵀ) ⊙ d) Bᵀ ⊙ b`` needs four, and two
reductions over N in backward). It runs on one of SVFit's two exact paths, chosen per call by counted
multiply-adds (``path``, :func:`~weightsmith.adapters.frozen_a.frozen_a_forward`): LoRA's fused node with
``A``, ``B'``, ``s = 1`` and the base product ``x W0ᵀ`` in the same node (``needs_base_out = False``),
or ``x (W0 + B' A)ᵀ`` with the weight built once per call. At the paper's rank 256 on 2048-wide layers
the weight path is the cheaper one for training batches (about ``N r (in + out) + out r in`` multiply-adds
beyond the frozen layer against ``N r (2 in + 3 out)``); for a few tokens the activation path is.
Sibling layers reading one input (q/k/v, gate/up) run the activation path as one node through
:meth:`VeRAAdapter.group_terms` (:mod:`.lora_group`); their stacked ``A`` is the same slice repeated,
since every layer of one input width uses ``A[:, :in]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ._bases import check_basis, draw_basis, refuse_unsaved_projection
from ._core import Adapter, AdapterConfig, AdapterContext, check_path, copy_peft, shared_cast
from .frozen_a import frozen_a_forward, frozen_a_group_terms
from .lora_group import GroupTerms
from .randlora import ScaledBasis


def kaiming_uniform(shape: tuple[int, int], g: torch.Generator) -> Tensor:
    """U(-b, b), ``b = sqrt(3) * sqrt(2) / sqrt(fan_in)``, fan_in = shape[1] (He et al.; PEFT's VeRA init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


class VeRAAdapter(Adapter):
    """Trainable ``vera_lambda_d`` (d) and ``vera_lambda_b`` (b); shared frozen ``vera_A``, ``vera_B``."""

    vera_A: Tensor
    vera_B: Tensor
    needs_base_out: ClassVar[bool] = False  # alone on a layer, x W0ᵀ runs inside LoRA's node

    def __init__(
        self, A: Tensor, B: Tensor, out_f: int, in_f: int, rank: int, d_initial: float, path: str = "auto"
    ) -> None:
        super().__init__()
        check_path(path, "VeRA")
        self.path = path
        self.hold(vera_A=A, vera_B=B)
        self.out_f, self.in_f, self.rank = out_f, in_f, rank
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), device=A.device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_f, device=A.device))

    def bases(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        A, B = self.vera_A, self.vera_B
        if dtype is not None:
            A, B = shared_cast(A, dtype), shared_cast(B, dtype)
        return A[: self.rank, : self.in_f], B[: self.out_f, : self.rank]

    def delta(self, W0: Tensor) -> Tensor:
        A, B = self.bases()
        return (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        A, B = self.bases()
        return self.vera_lambda_b[:, None] * B, self.vera_lambda_d[:, None] * A

    def peft_state(self) -> dict[str, Tensor] | None:
        return None  # our bases come from our seed; PEFT's file would need them written once, globally

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        """PEFT's ``vera_lambda_b``/``_d`` and its shared ``vera_A`` [r, max_in], ``vera_B`` [max_out, r]
        (sliced per layer as here). The shared bases are copied into the bases all layers share."""
        copy_peft(state, {"vera_lambda_b": self.vera_lambda_b.data, "vera_lambda_d": self.vera_lambda_d.data})
        copy_peft(state, {"vera_A": self.vera_A, "vera_B": self.vera_B})
        self.peft_bases = True  # not regenerable from our seed any more

    def scaled_B(self) -> Tensor:
        """``Λ_b B Λ_d`` [out, r] in the parameters' dtype (one autograd node, :class:`ScaledBasis`)."""
        B = self.vera_B[: self.out_f, : self.rank]
        B_eff: Tensor = ScaledBasis.apply(B, self.vera_lambda_b[None], self.vera_lambda_d[None])[0]
        return B_eff

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        return frozen_a_forward(x, W0, base_out, self.scaled_B(), self.vera_A, self.path)

    def group_terms(self, x: Tensor, W0: Tensor) -> GroupTerms | None:
        """The activation path's factors for sibling layers run as one node (:mod:`.lora_group`)."""
        return frozen_a_group_terms(self.path, x, W0, self.scaled_B(), self.vera_A)


@register_config("vera", kind="adapter")
class VeRA(AdapterConfig):
    """``rank`` r of the shared random matrices (PEFT default 256); ``d_initial`` starts every entry of d;
    ``basis``: "random" (Kaiming-uniform, PEFT's) or "orthogonal" (``_bases``). ``path``: "auto" (per call,
    the exact computation with fewer multiply-adds), "activation" (LoRA's node with ``A``, ``Λ_b B Λ_d``)
    or "weight" (``x (W0 + ΔW)ᵀ``, ΔW built once per call)."""

    default_lr: ClassVar[float] = 5e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=16)
    peft_type: ClassVar[str | None] = "VERA"

    rank: int = 256
    d_initial: float = 0.1
    basis: str = "random"
    seed: int = 0
    path: str = "auto"

    def __post_init__(self) -> None:
        check_basis(self.basis, "vera")
        check_path(self.path, "VeRA")

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> VeRA:
        refuse_unsaved_projection(peft_config, "VeRA", " (PEFT regenerates them with its own generator)")
        return cls(rank=int(peft_config["r"]), d_initial=float(peft_config.get("d_initial", 0.1)))

    def create(self, W0: Tensor, ctx: AdapterContext) -> VeRAAdapter:
        out_f, in_f = W0.shape
        if self.rank < 1:
            raise ctx.error(f"VeRA rank must be >= 1, got {self.rank}")
        shapes = ctx.shapes or ((out_f, in_f),)
        max_out = max(max(s[0] for s in shapes), out_f)
        max_in = max(max(s[1] for s in shapes), in_f)
        r = self.rank
        sh, bs = ctx.shared, self.basis  # Kaiming-uniform entries have variance 2 / fan_in
        A = draw_basis(sh, "vera.A", bs, (r, max_in), 2 / max_in, lambda g: kaiming_uniform((r, max_in), g))
        B = draw_basis(sh, "vera.B", bs, (max_out, r), 2 / r, lambda g: kaiming_uniform((max_out, r), g))
        return VeRAAdapter(A, B, out_f, in_f, r, self.d_initial, self.path)
