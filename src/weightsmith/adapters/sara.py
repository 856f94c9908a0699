"""SaRA: train the smallest-magnitude ("temporarily ineffective") weights as a sparse update, kept
low-rank by a nuclear-norm penalty, with progressive re-selection of that support.

Hu, Zhang, Yi, Huang, Wang & Ma, "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive
Sparse Low-Rank Adaptation", ICLR 2025, arXiv:2409.06633.

    I  = the k entries of smallest |W0|     (k = ⌈density · out · in⌉, or rank_budget · (out + in))
    ΔW = scatter_I(V),   V ∈ R^k trainable, V = 0 at the start
    L  = L_task + λ Σ_layers ‖ΔW‖_*          (nuclear norm: the sum of ΔW's singular values)
    ∂‖ΔW‖_*/∂ΔW = U Vᵀ                      (ΔW = U Σ Vᵀ, the economy SVD; a subgradient where σ_i = 0)

The paper finds that the smallest 10-20 % of a pre-trained model's weights by magnitude barely affect
its output, so re-training exactly those entries adds task knowledge while the effective weights (and
the model's prior) stay untouched. ``rank_budget`` sizes the support like a LoRA of that rank
(``r (out + in)`` entries), for comparisons at equal trainable parameters. Without re-selection the
support is a function of ``W0`` (ties broken by position), so a saved adapter holds only ``V`` and is
rebuilt on load.

The penalty costs one economy SVD per adapted matrix per step (``nuclear_norm``: value and gradient
from the same decomposition, taken on the tall orientation, where LAPACK is faster; on CUDA from the
float64 Gram eigendecomposition of ``linalg.economy_svd``). On a CPU that SVD dominates a SmolLM2 step, so
``nuclear_every`` = k > 1 (default 1: every step) applies the penalty only at every k-th optimizer step,
scaled by k: the same total penalty gradient over k steps (for plain SGD, the same sum of updates when
ΔW moves little within k steps), at 1/k of the SVDs. It is an approximation, off by default.

``nuclear_solver`` picks how ``U Vᵀ`` and ``Σ σ_i`` are computed: ``"svd"`` is the decomposition above
(LAPACK on the CPU, the Gram eigendecomposition on CUDA, whose solver checks its status on the host: a
synchronisation that a CUDA graph cannot capture); ``"qdwh"`` is ``linalg.polar_nuclear``, the QDWH
polar iteration (Nakatsukasa, Bai & Gygi, 2010) with fixed weights, in float64, which never reads the
device: ``‖ΔW‖_* = tr((U Vᵀ)ᵀ ΔW)`` from the same polar factor, equal to the SVD's to float32 round-off
(zero singular values get zero, as in ``svd``, which cuts at the numerical rank). ``"auto"`` (the
default): ``qdwh`` while a CUDA graph is being captured, ``svd`` otherwise (eager steps keep the
decomposition; on a 2-core CPU QDWH is 3-6x slower than LAPACK's SVD).

Progressive re-selection (``reselect_every`` = T > 0; the paper's progressive parameter adjustment):
after every T-th optimizer step within the first ``reselect_until`` fraction of training, with
``W = W0 + ΔW`` the current weight and ``ΔW = F + scatter_I(V)`` (``F``: learned and frozen),

    I'       = the k entries of smallest |W|
    released = I \\ I'   their learned ΔW moves into F and stays (no longer trained)
    entering = I' \\ I   trained from their current ΔW (F's entry, usually 0), with fresh optimizer moments
    kept     = I ∩ I'   keep their slot in V, hence their value and optimizer state

so k (the trainable-parameter budget) is fixed and ``ΔW`` (the layer's function) is unchanged exactly.
The optimizer is not visible to an adapter: a torch optimizer step pre-hook notes which optimizer
holds ``V`` (once per optimizer), and re-selection zeroes the entering slots' element-wise state (Adam's
moments, SGD's momentum) there at once; it runs between optimizer steps, so this is the same as just
before the next step, and it also holds when that step is replayed in a CUDA graph, where no hook runs.
Slots of an adapter whose optimizer has not stepped yet are queued for the next step's pre-hook. The
support then depends on the training trajectory, so with re-selection on, ``I`` and ``F`` (dense,
``out × in``) are saved beside ``V``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ..config import register_config
from ..errors import WeightsmithError
from ..linalg import economy_svd, polar_nuclear
from ._core import Adapter, AdapterConfig, AdapterContext


def capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s device."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def ineffective_support(W0: Tensor, k: int) -> Tensor:
    """Flat indices of the ``k`` entries of smallest |W0| (ties broken by position), sorted."""
    order = torch.argsort(W0.detach().abs().flatten().float(), stable=True)
    return order[:k].sort().values


def reset_moments(optimizer: torch.optim.Optimizer, param: Tensor, slots: Tensor) -> bool:
    """Zero ``optimizer``'s element-wise state of ``param`` (every state tensor of ``param``'s shape:
    Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``) at ``slots``; False when ``optimizer``
    does not hold ``param``. Scalar state (Adam's step count) is shared by all entries and left as is."""
    if not any(p is param for g in optimizer.param_groups for p in g["params"]):
        return False
    for t in optimizer.state.get(param, {}).values():
        if isinstance(t, Tensor) and t.shape == param.shape:
            t.index_fill_(0, slots.to(t.device), 0)  # = t[slots] = 0 without a host scalar copy
    return True


# Adapters whose re-selected slots still need fresh moments, and the global hook that gives them.
_PENDING: weakref.WeakKeyDictionary[SaRAAdapter, Tensor] = weakref.WeakKeyDictionary()
_HOOK: list[RemovableHandle] = []


def _fresh_moments(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if any(capturing(adapter.values) for adapter in list(_PENDING)):
        return  # a reset recorded into a CUDA graph would repeat at every replay: at the next eager step
    for adapter, slots in list(_PENDING.items()):
        if reset_moments(optimizer, adapter.values, slots):
            del _PENDING[adapter]
    if not _PENDING and _HOOK:
        _HOOK.pop().remove()


# Re-selecting adapters, the optimizers seen holding their values, and the hook that notes them.
_RESELECTING: weakref.WeakSet[SaRAAdapter] = weakref.WeakSet()
_HOLDERS: weakref.WeakKeyDictionary[SaRAAdapter, weakref.WeakSet[torch.optim.Optimizer]] = (
    weakref.WeakKeyDictionary()
)
_NOTED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_NOTER: list[RemovableHandle] = []


def _note_holders(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _NOTED:
        return
    _NOTED.add(optimizer)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for adapter in list(_RESELECTING):
        if id(adapter.values) in held:
            _HOLDERS.setdefault(adapter, weakref.WeakSet()).add(optimizer)


def _watch_holders(adapter: SaRAAdapter) -> None:
    _RESELECTING.add(adapter)
    _NOTED.clear()  # look at every optimizer again at its next step
    if not _NOTER:
        _NOTER.append(register_optimizer_step_pre_hook(_note_holders))


def _queue_fresh(adapter: SaRAAdapter, slots: Tensor) -> None:
    prev = _PENDING.get(adapter)
    _PENDING[adapter] = slots if prev is None else torch.cat([prev, slots]).unique()
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_fresh_moments))


SOLVERS = ("auto", "svd", "qdwh")


class _NuclearNorm(torch.autograd.Function):
    """‖A‖_* with the gradient U Vᵀ kept from the forward's decomposition (no second one)."""

    @staticmethod
    def forward(ctx: Any, A: Tensor, solver: str) -> Tensor:
        if solver == "qdwh":
            polar, value = polar_nuclear(A)
            ctx.save_for_backward(polar)
            return value
        tall = A.shape[0] >= A.shape[1]
        U, S, Vh = economy_svd(A if tall else A.mT)
        cut = S.amax() * max(A.shape) * torch.finfo(S.dtype).eps  # the numerical rank's (as matrix_rank)
        polar = (U * S.gt(cut)) @ Vh  # null directions get zero: the minimum-norm subgradient, QDWH's
        ctx.save_for_backward(polar if tall else polar.mT)
        return S.sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (polar,) = ctx.saved_tensors
        return grad * polar, None


def nuclear_norm(A: Tensor, solver: str = "svd") -> Tensor:
    """‖A‖_* = Σ_i σ_i(A) of a 2-D float32 matrix, differentiable: ∂‖A‖_*/∂A = U Vᵀ from the same SVD.

    The SVD is of the tall orientation (``Aᵀ`` when A is wide: the same σ, LAPACK's gesdd is faster);
    equal to ``torch.linalg.svdvals(A).sum()`` in value and gradient (to float32 round-off where the
    σ_i are non-zero). Directions of zero singular value (σ_i ≤ σ_max · max(out, in) · eps, the
    numerical rank's cut) get zero: the minimum-norm subgradient, the same as QDWH's, so eager and
    captured steps of a rank-deficient ΔW agree (an SVD's own null directions are arbitrary, and
    SaRA's re-selection with Adam turns that into lr-sized differences). ``solver="qdwh"``: the polar
    factor from the synchronisation-free QDWH iteration (``linalg.polar_nuclear``; zero where σ_i = 0
    exactly, as on SaRA's sparse supports); ``"auto"``: ``qdwh`` while a CUDA graph is being captured,
    ``svd`` otherwise."""
    if solver not in SOLVERS:
        raise WeightsmithError(f"SaRA nuclear_solver={solver!r}: use one of {', '.join(SOLVERS)}")
    recording = capturing(A)
    if solver == "auto":
        solver = "qdwh" if recording else "svd"
    if solver == "svd" and recording:
        raise WeightsmithError(
            "SaRA nuclear_solver='svd' synchronises with the host (the eigensolver checks its status) and "
            "cannot be captured in a CUDA graph: use nuclear_solver='qdwh' or 'auto'"
        )
    return _NuclearNorm.apply(A, solver)


class SaRAAdapter(Adapter):
    """Trainable ``values`` [k] on the support ``flat`` [k] of the ``[out, in]`` weight; with re-selection,
    ``fixed`` [out, in] holds the learned update of released entries (zero on the support)."""

    flat: Tensor
    fixed: Tensor | None

    def __init__(
        self,
        flat: Tensor,
        shape: tuple[int, int],
        nuclear: float,
        reselect_every: int = 0,
        reselect_until: float = 0.5,
        nuclear_every: int = 1,
        nuclear_solver: str = "auto",
    ) -> None:
        super().__init__()
        self.shape = shape
        self.values = nn.Parameter(torch.zeros(flat.numel(), device=flat.device))
        self.nuclear = nuclear
        self.nuclear_every = nuclear_every
        self.nuclear_solver = nuclear_solver
        self._next_step = 0  # the optimizer step the next regularizer() call belongs to
        self.reselect_every = reselect_every
        self.reselect_until = reselect_until
        if reselect_every:  # trajectory-dependent: saved beside the values
            self.register_buffer("flat", flat)
            self.register_buffer("fixed", torch.zeros(shape, device=flat.device))
            _watch_holders(self)
        else:
            self.hold(flat=flat)
            self.fixed = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``, unpickling) re-selects too: watch which optimizer holds its values
        (``__init__`` does not run for it), else its entering slots would keep their moments."""
        super().__setstate__(state)
        if self.reselect_every:
            _watch_holders(self)

    def _dense(self, dtype: torch.dtype) -> Tensor:
        if self.fixed is None:
            dW = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype, device=self.values.device)
        else:
            dW = self.fixed.to(dtype).flatten()  # index_put below is out of place: fixed is not written
        return dW.index_put((self.flat,), self.values.to(dtype)).view(self.shape)

    def delta(self, W0: Tensor) -> Tensor:
        return self._dense(self.values.dtype)

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        if self.reselect_every and self.training:
            self.__dict__["_w0"] = W0.detach()  # a reference (no copy) for on_train_step's re-selection
        return base_out + F.linear(x, self._dense(x.dtype))

    def regularizer(self) -> Tensor | None:
        if self.nuclear == 0:
            return None
        k = self.nuclear_every
        if k > 1:
            if capturing(self.values):
                raise WeightsmithError(
                    "SaRA nuclear_every > 1 changes the step's graph every step; train without --cuda-graphs"
                )
            if self._next_step % k:
                return None
        return self.nuclear * k * nuclear_norm(self._dense(torch.float32), self.nuclear_solver)

    def on_train_step(self, step: int, total_steps: int) -> None:
        done = step + 1
        self._next_step = done
        if not self.reselect_every or done % self.reselect_every or done >= total_steps:
            return
        if done > self.reselect_until * total_steps:
            return
        W0: Tensor | None = self.__dict__.get("_w0")
        if W0 is None:  # no training forward seen yet
            return
        if W0.untyped_storage().size() == 0:
            raise WeightsmithError(
                "SaRA reselect_every: the base weight was freed after forward (FSDP2 sharding); "
                "train without re-selection or without --parallel fsdp2"
            )
        self.reselect(W0)

    @torch.no_grad()
    def reselect(self, W0: Tensor) -> Tensor:
        """Move the support to the ``k`` entries of smallest ``|W0 + ΔW|`` without changing ``ΔW``.

        Released entries keep their learned update in ``fixed``; entering ones take slots of released
        ones (kept entries keep theirs). Returns those slots; their optimizer moments are zeroed now in
        the optimizers seen holding ``values`` (else before the next optimizer step). Call it between
        optimizer steps (not between backward and step)."""
        if self.fixed is None:
            raise WeightsmithError("SaRA reselect() needs the adapter created with reselect_every > 0")
        dW = self._dense(torch.float32).flatten()
        new = ineffective_support(W0.detach().float().flatten().to(dW.device) + dW, self.flat.numel())
        slots = (~torch.isin(self.flat, new)).nonzero().flatten()
        flat = self.flat.clone()
        flat[slots] = new[~torch.isin(new, self.flat)]
        fixed = dW.clone()
        fixed[flat] = 0
        self.flat.copy_(flat)
        self.fixed.copy_(fixed.view(self.shape))
        self.values.copy_(dW[flat])
        if slots.numel() and not [o for o in _HOLDERS.get(self, ()) if reset_moments(o, self.values, slots)]:
            _queue_fresh(self, slots)
        return slots


@register_config("sara", kind="adapter")
class SaRA(AdapterConfig):
    """``density``: fraction of each matrix trained (the smallest |W0|); ``rank_budget`` > 0 instead trains
    ``r (out + in)`` entries (a LoRA of rank r's count); ``nuclear``: λ of the nuclear-norm penalty;
    ``reselect_every`` > 0: re-select the support every that many optimizer steps during the first
    ``reselect_until`` fraction of training (0: never, the support stays the smallest |W0|);
    ``nuclear_every`` k > 1: the penalty only at every k-th optimizer step, scaled by k (1/k of the SVDs;
    an approximation, see the module docstring); ``nuclear_solver``: ``"svd"``, ``"qdwh"`` (no host
    synchronisation: CUDA graphs can capture it) or ``"auto"`` (``qdwh`` inside a CUDA-graph capture,
    ``svd`` otherwise)."""

    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(density=0.1, nuclear=1e-3)

    density: float = 0.1
    rank_budget: int = 0
    nuclear: float = 1e-4
    reselect_every: int = 0
    reselect_until: float = 0.5
    nuclear_every: int = 1
    nuclear_solver: str = "auto"

    def create(self, W0: Tensor, ctx: AdapterContext) -> SaRAAdapter:
        out_f, in_f = W0.shape
        if self.rank_budget < 0:
            raise ctx.error(f"SaRA rank_budget must be >= 0, got {self.rank_budget}")
        if self.rank_budget == 0 and not 0.0 < self.density <= 1.0:
            raise ctx.error(f"SaRA density must be in (0, 1], got {self.density}")
        if self.nuclear < 0:
            raise ctx.error(f"SaRA nuclear (λ) must be >= 0, got {self.nuclear}")
        if self.nuclear_every < 1:
            raise ctx.error(f"SaRA nuclear_every must be >= 1 (1: every step), got {self.nuclear_every}")
        if self.nuclear_solver not in SOLVERS:
            raise ctx.error(
                f"SaRA nuclear_solver must be one of {', '.join(SOLVERS)}, got {self.nuclear_solver!r}"
            )
        if self.reselect_every < 0:
            raise ctx.error(f"SaRA reselect_every must be >= 0 (0: off), got {self.reselect_every}")
        if not 0.0 < self.reselect_until <= 1.0:
            raise ctx.error(f"SaRA reselect_until must be in (0, 1], got {self.reselect_until}")
        numel = out_f * in_f
        k = self.rank_budget * (out_f + in_f) if self.rank_budget else math.ceil(self.density * numel)
        if k > numel:
            raise ctx.error(
                f"SaRA rank_budget {self.rank_budget} asks for {k} entries of {numel}", (out_f, in_f)
            )
        flat = ineffective_support(W0, k).to(W0.device)
        return SaRAAdapter(
            flat,
            (out_f, in_f),
            self.nuclear,
            self.reselect_every,
            self.reselect_until,
            self.nuclear_every,
            self.nuclear_solver,
        )
