"""PST: a sparsity mask learned during fine-tuning from data-free and low-rank + structured data-driven
importance, next to a LoRA update; merging writes the pruned weight.

Li, Luo, Tan, Wang, Huang, Li & Bai, "Parameter-Efficient Sparsity for Large Language Models Fine-Tuning",
IJCAI 2022. The layer computes with

    W' = M ⊙ (W0 + s · B A),           B [out, r], A [r, in]      (the LoRA update, s = alpha / r)
    S  = |W0 + s B A| / mean|W0| + (B_s A_s + R 1ᵀ + 1 Cᵀ),   B_s [out, k], A_s [k, in], R [out], C [in]
    M  = Top_v(S)                      (the v = numel − ⌊sparsity · numel⌋ highest scores kept)

The data-free part is the magnitude of the current weight (detached: it follows the weights, it is not
learned; scaled to mean 1 per matrix, as in ``compress/pst.py``). The data-driven part replaces the
``out · in`` movement scores of movement pruning by a rank-``k`` product and a row and a column vector, so
only ``(out + in)(k + 1)`` importance parameters exist per matrix. The hard Top-v mask has no gradient;
PST passes it straight through, ``∂L/∂S := ∂L/∂M = ∂L/∂W' ⊙ (W0 + s B A)``, hence

    ∂L/∂B_s = (∂L/∂S) A_sᵀ,   ∂L/∂A_s = B_sᵀ (∂L/∂S),   ∂L/∂R = (∂L/∂S) 1,   ∂L/∂C = (∂L/∂S)ᵀ 1,

(``M + S − detach(S)``: forward value ``M`` exactly, gradient one). ``A`` and ``A_s`` are
Kaiming-uniform, ``B``, ``B_s``, ``R``, ``C`` zero, so at the start ``S`` is the magnitude score.
``data_driven=False`` is the paper's ablation without the data-driven part: gradual magnitude pruning of
``W0 + s B A`` next to the LoRA update (nothing is learned for the mask).

Sparsity follows the paper's cubic schedule (from movement pruning): after optimisation step ``t`` of ``T``
the level is ``sparsity · (1 − (1 − min(1, (t + 1) / (ramp · T)))³)``, so it reaches ``sparsity`` when a
``ramp`` fraction of the run is done and stays there. With ``ramp > 0`` the adapted model equals the base
model at the start (no pruning, ``B = 0``); with ``ramp = 0`` it is pruned from the first step. **Merging
always uses the final ``sparsity``** (the mask is fixed from the learned scores and ``W0 + s B A`` is pruned),
so merging a run that stopped before its ramp ended gives a sparser model than its last forward; a
restored adapter (``load_adapters``, ``export``) computes at the final sparsity too. Unmerging restores
``W0`` from a copy kept at merge time. Sparsity is per matrix (``prune_scope="layer"``) or per output row.

The step never reads the device from the host, so a CUDA graph can capture it and replay it while the
schedule moves: the number of dropped entries ``d_t = ⌊level_t · n⌋`` (``n``: the group size) lives in a
device counter that ``on_train_step`` overwrites in place, and the mask has one shape at every level. The
``d_max = ⌊sparsity · n⌋`` lowest scores of each group are found by one fixed-size ``topk`` (ascending), and
the first ``d_t`` of them are dropped (``rank < d_t``, compared on the device): the same entries as a
``topk`` of ``d_t`` (ties at the cut aside), since ``d_t ≤ d_max``. (An exact radix select reading ``d_t`` on
the device, with no sort, was tried: 196 ms a step on an H200 against 159 ms with ``topk``.) A training
forward takes this masked path at every level, level 0 included (``d_0 = 0``: every entry kept, ``M = 1``),
so eager and replayed steps run the same ops and the scores get their straight-through gradient
``∂L/∂W' ⊙ W`` from the first step, before the ramp prunes anything (as movement pruning's scores do during
its warm-up); the forward value at level 0 is ``W`` exactly.

The step is one autograd node (:class:`PrunedWeight`) that makes each weight-sized tensor once: forward
``W = W0 + s B A`` (one ``addmm``), ``S`` (``|W|``, its scale, then ``addmm`` of ``B_s A_s`` and the two
vector adds, in the order above, so ``S`` and the mask are bit-identical to the formula), the mask and
``W' = M ⊙ W`` written in the layer's dtype; ``mean|W0|`` is read from ``W0`` without a float32 copy.
Backward ``∂L/∂W ⊙ M`` and ``∂L/∂W' ⊙ W`` (each one pass) and the four small products, the row and column
sums riding in the ``B_s``/``A_s`` products (a column of ones). See docs/adapters-pst-step.md.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compress._sparse import check_scope, check_sparsity, dropped, ranked_mask
from ..config import register_config
from ..errors import WeightsmithError
from ..linalg import seeded_generator
from ._core import Adapter, AdapterConfig, AdapterContext, autocast_off, check_rank
from .lora import lora_init, lora_scaling


def cubic_level(sparsity: float, step: int, total: int, ramp: float) -> float:
    """The cubic sparsity schedule: ``sparsity · (1 − (1 − min(1, (step + 1) / (ramp · total)))³)``."""
    if ramp <= 0 or total <= 0:
        return sparsity
    done = min(1.0, (step + 1) / (ramp * total))
    return sparsity * (1.0 - (1.0 - done) ** 3)


def straight_through(mask: Tensor, score: Tensor) -> Tensor:
    """``mask`` in value, with gradient one to ``score`` (the straight-through estimator)."""
    return mask.to(score.dtype) + (score - score.detach())


def _with_ones(M: Tensor, dim: int) -> Tensor:
    """``M`` with a row (``dim=0``) or column (``dim=1``) of ones appended: a sum rides in a product."""
    shape = (1, M.shape[1]) if dim == 0 else (M.shape[0], 1)
    return torch.cat([M, M.new_ones(shape)], dim)


def plus_lowrank(W0: Tensor, B: Tensor, A: Tensor, scaling: float) -> Tensor:
    """``W0 + s B A`` in float32, contiguous, as one ``addmm`` (``W0.float()`` of a float32 ``W0`` is ``W0``
    itself, so it is never written in place)."""
    Bf, Af = B.float(), A.float()
    with torch.autocast(W0.device.type, enabled=False):  # the step chooses its dtypes itself
        if W0.dtype == torch.float32:
            return torch.addmm(W0, Bf, Af, alpha=scaling)
        return W0.to(torch.float32, memory_format=torch.contiguous_format).addmm_(Bf, Af, alpha=scaling)


class PrunedWeight(torch.autograd.Function):
    """``W' = M ⊙ W`` with ``W = W0 + s B A``, ``M`` the keep-mask of ``S`` (module docstring), in one
    node: forward values equal ``straight_through(M, S) * W``, and the backward gives

        ∂L/∂W = ∂L/∂W' ⊙ M  (to B, A, W0),        ∂L/∂S = ∂L/∂W' ⊙ W  (to B_s, A_s, R, C)

    with ``∂L/∂R = ∂L/∂S 1`` and ``∂L/∂C = (∂L/∂S)ᵀ 1`` computed inside ``∂L/∂S [A_s; 1ᵀ]ᵀ`` and
    ``[B_s, 1]ᵀ ∂L/∂S``. ``scale`` is ``mean|W0|`` (0-dim), ``drop`` the device count per group,
    ``out_dtype`` the dtype ``W'`` is written in."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        W0: Tensor,
        A: Tensor,
        B: Tensor,
        score_A: Tensor,
        score_B: Tensor,
        score_R: Tensor,
        score_C: Tensor,
        scale: Tensor,
        drop: Tensor,
        most: int,
        scaling: float,
        scope: str,
        driven: bool,
        out_dtype: torch.dtype,
    ) -> Tensor:
        W = plus_lowrank(W0, B, A, scaling)
        S = torch.abs(W).div_(scale)
        if driven:  # (the ablation's scores are zero: adding them changes no value)
            S.addmm_(score_B.float(), score_A.float())
            S.add_(score_R.float().unsqueeze(1)).add_(score_C.float().unsqueeze(0))
        keep = ranked_mask(S, most, drop, scope)
        del S
        out = torch.mul(W, keep, out=torch.empty(W.shape, dtype=out_dtype, device=W.device))
        ctx.save_for_backward(W, keep, A, B, score_A, score_B)
        ctx.scaling, ctx.dtypes = scaling, (W0.dtype, score_R.dtype, score_C.dtype)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """The products, in float32."""
        W, keep, A, B, score_A, score_B = ctx.saved_tensors
        need = ctx.needs_input_grad
        gW0 = gA = gB = gsA = gsB = gR = gC = None
        if need[0] or need[1] or need[2]:
            dW = torch.mul(g, keep, out=torch.empty(W.shape, dtype=torch.float32, device=W.device))
            if need[2]:
                gB = (dW @ A.float().T).mul_(ctx.scaling).to(B.dtype)
            if need[1]:
                gA = (B.float().T @ dW).mul_(ctx.scaling).to(A.dtype)
            if need[0]:
                gW0 = dW.to(ctx.dtypes[0])
            del dW
        if any(need[3:7]):
            dS = torch.mul(g, W)
            rows = dS @ _with_ones(score_A.float(), 0).T  # [∂L/∂B_s, ∂L/∂R]
            cols = _with_ones(score_B.float(), 1).T @ dS  # [∂L/∂A_s; ∂L/∂C]
            k = score_A.shape[0]
            gsB, gR = rows[:, :k].to(score_B.dtype), rows[:, k].to(ctx.dtypes[1])
            gsA, gC = cols[:k].to(score_A.dtype), cols[k].to(ctx.dtypes[2])
        return gW0, gA, gB, gsA, gsB, gR, gC, None, None, None, None, None, None, None


class PSTAdapter(Adapter):
    """LoRA factors ``A`` [r, in], ``B`` [out, r]; importance factors ``score_A`` [k, in], ``score_B``
    [out, k], ``score_R`` [out], ``score_C`` [in]; the current sparsity ``level`` (not saved) and its
    count of dropped entries per group, ``drop`` (a device scalar, so a captured step follows it)."""

    needs_base_out: ClassVar[bool] = False
    score_A: Tensor
    score_B: Tensor
    score_R: Tensor
    score_C: Tensor
    drop: Tensor

    def __init__(self, A: Tensor, B: Tensor, score_A: Tensor, scaling: float, cfg: PST, level: float) -> None:
        super().__init__()
        out_f, in_f = B.shape[0], A.shape[1]
        dev = A.device
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        scores = dict(
            score_A=score_A,
            score_B=torch.zeros(out_f, score_A.shape[0], device=dev),
            score_R=torch.zeros(out_f, device=dev),
            score_C=torch.zeros(in_f, device=dev),
        )
        if cfg.data_driven:
            for name, t in scores.items():
                setattr(self, name, nn.Parameter(t))
        else:  # the ablation: magnitude of W0 + s B A alone decides, nothing is learned for the mask
            self.hold(**scores)
        self.sparsity, self.scope, self.ramp = cfg.sparsity, cfg.prune_scope, cfg.ramp
        self.shape = (out_f, in_f)
        self.hold(drop=torch.zeros((), dtype=torch.long, device=dev))
        self.scaling, self.level = scaling, level
        self.data_driven = cfg.data_driven
        self._premerge: Tensor | None = None

    @property
    def level(self) -> float:
        """The current sparsity (a host float; ``drop`` holds its count on the device)."""
        return self._level

    @level.setter
    def level(self, value: float) -> None:
        if not 0.0 <= value <= self.sparsity:
            raise WeightsmithError(f"pst level={value}: must be in [0, sparsity={self.sparsity}]")
        self._level = value
        self.drop.fill_(dropped(self.shape, value, self.scope))

    def updated(self, W0: Tensor) -> Tensor:
        """``W0 + s B A`` in float32."""
        return plus_lowrank(W0, self.B, self.A, self.scaling)

    def free_scale(self, W0: Tensor) -> Tensor:
        """``mean|W0|`` (0-dim float32, at least 1e-30): ``|W0|`` in ``W0``'s own dtype (``abs`` commutes
        with the cast), averaged with a float32 accumulator, without a float32 copy of ``W0``."""
        return torch.mean(W0.detach().abs(), dtype=torch.float32).clamp_min(1e-30)

    def importance(self, W: Tensor, W0: Tensor) -> Tensor:
        """``S = |W| / mean|W0| + (B_s A_s + R 1ᵀ + 1 Cᵀ)``, the magnitude term detached."""
        free = W.detach().abs() / self.free_scale(W0)
        driven = self.score_B.float() @ self.score_A.float()
        return free + driven + self.score_R.float().unsqueeze(1) + self.score_C.float().unsqueeze(0)

    def pruned(self, W0: Tensor, sparsity: float | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``M ⊙ (W0 + s B A)`` at ``sparsity`` (None: the current level, counted on the device) in
        ``dtype``, with the straight-through gradient to the scores, at level 0 too (no host branch on the
        level: a CUDA graph captured at one level replays every other, and eager steps take the same path)."""
        if sparsity is not None and not 0.0 <= sparsity <= self.sparsity:
            raise WeightsmithError(f"pst: pruned at sparsity={sparsity}, outside [0, {self.sparsity}]")
        if self.sparsity <= 0:
            return self.updated(W0).to(dtype)
        if sparsity is None:
            drop = self.drop
        else:
            drop = torch.full(
                (), dropped(self.shape, sparsity, self.scope), dtype=torch.long, device=W0.device
            )
        with torch.autocast(W0.device.type, enabled=False):
            out: Tensor = PrunedWeight.apply(
                W0, self.A, self.B, self.score_A, self.score_B, self.score_R, self.score_C,
                self.free_scale(W0), drop, dropped(self.shape, self.sparsity, self.scope), self.scaling,
                self.scope, self.data_driven, dtype,
            )  # fmt: skip
        return out

    def delta(self, W0: Tensor) -> Tensor:
        return self.pruned(W0) - W0.float()

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:  # type: ignore[override]
        return F.linear(x, self.pruned(W0, dtype=x.dtype))

    def on_train_step(self, step: int, total_steps: int) -> None:
        self.level = cubic_level(self.sparsity, step, total_steps, self.ramp)

    def merge(self, W0: Tensor) -> Tensor:
        self._premerge = W0.clone()
        return self.pruned(W0, self.sparsity).detach()

    def unmerge(self, W_merged: Tensor) -> Tensor:
        if self._premerge is None:
            raise WeightsmithError(
                "pst: unmerge without a merge in this session (the pruned weights are lost)"
            )
        W0, self._premerge = self._premerge, None
        return W0


@register_config("pst", kind="adapter")
class PST(AdapterConfig):
    """``sparsity`` (final, per matrix or per row: ``prune_scope``), ``rank``/``alpha`` of the LoRA update,
    ``score_rank`` k of the importance factors, ``ramp``: fraction of the run over which the sparsity rises
    (cubic; 0: pruned from the start); ``data_driven=False``: no learned importance (the mask is the magnitude
    of ``W0 + s B A``: gradual magnitude pruning with LoRA, the paper's ablation)."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(sparsity=0.5, rank=4, alpha=8.0, score_rank=2, ramp=0.0)

    sparsity: float = 0.5
    rank: int = 8
    alpha: float = 16.0
    score_rank: int = 8
    ramp: float = 0.5
    prune_scope: str = "layer"
    data_driven: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "pst")
        check_scope(self.prune_scope, "pst")
        if not 0.0 <= self.ramp <= 1.0:
            raise WeightsmithError(f"pst option ramp={self.ramp}: must be in [0, 1]")
        if self.score_rank < 0:
            raise WeightsmithError(f"pst option score_rank={self.score_rank}: must be >= 0")

    @property
    def identity_at_init(self) -> bool:
        """The adapted model is the base model at the start only when the sparsity ramps up from 0."""
        return self.ramp > 0 or self.sparsity == 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> PSTAdapter:
        check_rank(self.rank, W0, ctx, "PST")
        if self.score_rank > min(W0.shape):
            raise ctx.error(
                f"PST score_rank {self.score_rank} is larger than the matrix allows", tuple(W0.shape)
            )
        A, B = lora_init(W0, self.rank, ctx)
        score_A = torch.zeros(self.score_rank if self.data_driven else 0, W0.shape[1])
        if score_A.numel():
            g = seeded_generator(ctx.shared.key_seed(f"pst-score:{ctx.name}"))
            nn.init.kaiming_uniform_(score_A, a=math.sqrt(5), generator=g)
        # a restored adapter is the end of a run: it computes at the final sparsity
        level = self.sparsity if (ctx.restoring or self.ramp == 0) else 0.0
        return PSTAdapter(
            A, B, score_A.to(W0.device), lora_scaling(self.alpha, self.rank, False), self, level
        )
