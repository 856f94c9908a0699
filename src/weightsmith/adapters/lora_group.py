"""Grouped LoRA: sibling layers that read one input (q/k/v, gate/up) in one autograd node.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685) gives
each adapted layer ``y_i = x W_iᵀ + s_i (x A_iᵀ) B_iᵀ``. When layers ``i = 1..m`` read the same ``x``,
with ``A = [A_1; …; A_m]`` stacked by rows (rank ``R = Σ r_i``):

    forward    h = x Aᵀ  (one GEMM, [N, R]),   y_i = h_i (s_i B_i)ᵀ + x W_iᵀ
    backward   G = [g_1 s_1 B_1, …, g_m s_m B_m]  ([N, R])
               dx = G A + Σ_i g_i W_i           (one buffer: one GEMM then an ``addmm_`` chain)
               dA = Gᵀ x                        (one GEMM, split by rows into dA_i)
               dB_i = s_i g_iᵀ h_i

so ``x`` is read once for the A-products instead of ``m`` times and autograd's ``m - 1`` additions of
the input gradients disappear. :class:`SiblingGroup` decides at run time which siblings share an input
(by the tensor's identity and version, never by names) and hands the later siblings the outputs the
first one computed. Anything unusual (another input, dropout in training, another adapter, an
in-place change, ``torch.compile``, saved-tensor hooks as activation checkpointing installs them)
takes the per-layer path of :mod:`weightsmith.adapters.lora`.

Other methods join through :class:`GroupTerms`: an adapter whose ``group_terms(x, W0)`` returns the
``(A, B, s)`` its per-layer path hands LoRA's node, plus an optional ``finish`` applied to that
node's output, runs in the group too. DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank
Adaptation", 2024) does: the group gives ``z_i = x W_iᵀ + s_i (x A_iᵀ) B_iᵀ`` and ``finish`` is its
row scale ``y_i = z_i ⊙ m_i / ||W_i + s_i B_i A_i||`` (:mod:`weightsmith.adapters.dora`), so the
grouped result is the per-layer one up to the order of the GEMMs' sums.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from ._core import amp_apply, amp_dtype, autocast_off
from .lora import LoRAAdapter, _cast, _mm_to

if TYPE_CHECKING:
    from ._attach import AdaptedLayer

GROUP_SIBLINGS = True  # set False to run every LoRA layer on its own (the per-layer path)


class GroupTerms(NamedTuple):
    """What an adapter on a linear layer gives the group: its output is ``finish(x W0ᵀ + s (x Aᵀ) Bᵀ)``
    (``finish`` None: the identity). ``A``, ``B`` may be computed (with gradients) from the adapter's
    parameters; they must be exactly what the adapter's own forward hands LoRA's node. Given by the
    adapter's ``group_terms(x, W0)`` (None: this call runs per layer); its type may add a static
    ``group_terms_batch(x, [(adapter, W0), …])`` that prepares several siblings at once."""

    A: Tensor
    B: Tensor
    s: float
    finish: Callable[[Tensor], Tensor] | None = None


class _LoRAGroup(torch.autograd.Function):
    """``(y_1, …, y_m)`` for ``m`` LoRA layers reading one ``x``; ``tensors`` is ``W0_1, A_1, B_1, W0_2, …``.

    ``base_out`` is always None (the signature :func:`amp_apply` expects). Parameters may be float32
    while activations are 16-bit; gradients come back in the parameters' dtypes (equal across members).
    """

    @staticmethod
    def forward(ctx: Any, base_out: None, x: Tensor, scales: tuple[float, ...], *tensors: Tensor) -> Any:
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        Ws, As, Bs = tensors[0::3], tensors[1::3], tensors[2::3]
        ranks = [A.shape[0] for A in As]
        A_c = torch.cat(As, out=torch.empty(sum(ranks), x2.shape[1], dtype=dt, device=x.device))
        h = torch.mm(x2, A_c.t())
        W_c, B_s, outs = [], [], []
        start = 0
        for W0, B, s, r in zip(Ws, Bs, scales, ranks, strict=True):
            W, Bs_i = W0.to(dt), _cast(B, dt, s)
            y = torch.mm(h[:, start : start + r], Bs_i.t()).addmm_(x2, W.t())
            outs.append(y.view(*x.shape[:-1], W.shape[0]))
            W_c.append(W)
            B_s.append(Bs_i)
            start += r
        ctx.save_for_backward(x2, h, A_c, *W_c, *B_s)
        ctx.set_materialize_grads(False)
        ctx.scales, ctx.ranks, ctx.x_shape = scales, ranks, x.shape
        ctx.dtypes = (Ws[0].dtype, As[0].dtype, Bs[0].dtype)
        return tuple(outs)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x2, h, A_c, *rest = ctx.saved_tensors
        m = len(ctx.ranks)
        Ws, B_s = rest[:m], rest[m:]
        need = ctx.needs_input_grad
        need_x = need[1]
        need_W, need_A, need_B = need[3::3], need[4::3], need[5::3]
        gs = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        G_t = None  # Gᵀ [R, N]: row block i is (g_i s_i B_i)ᵀ, written in place
        if need_x or any(need_A):
            G_t = torch.empty(A_c.shape[0], x2.shape[0], dtype=x2.dtype, device=x2.device)
            start = 0
            for g, Bs_i, r in zip(gs, B_s, ctx.ranks, strict=True):
                block = G_t[start : start + r]
                if g is None:
                    block.zero_()
                else:
                    torch.mm(Bs_i.t(), g.t(), out=block)
                start += r
        dx = None
        if need_x:
            assert G_t is not None
            dx = torch.mm(G_t.t(), A_c)
            for g, W in zip(gs, Ws, strict=True):
                if g is not None:
                    dx.addmm_(g, W)
            dx = dx.view(ctx.x_shape)
        dA_all = _mm_to(G_t, x2, ctx.dtypes[1]).split(ctx.ranks) if G_t is not None and any(need_A) else None
        out: list[Tensor | None] = [None, dx, None]
        start = 0
        for i, (g, r) in enumerate(zip(gs, ctx.ranks, strict=True)):
            dW = _mm_to(g.t(), x2, ctx.dtypes[0]) if need_W[i] and g is not None else None
            dA = dA_all[i] if dA_all is not None and need_A[i] and g is not None else None  # unused: no grad
            dB = None
            if need_B[i] and g is not None:
                dB = _mm_to(g.t(), h[:, start : start + r], ctx.dtypes[2], ctx.scales[i])
            out += [dW, dA, dB]
            start += r
        return tuple(out)


def group_adapter(layer: AdaptedLayer) -> Any:
    """The layer's one active adapter when the group may run it (a linear layer, plain LoRA without
    dropout in training, or an adapter with ``group_terms``), else None."""
    if layer.kind != "linear":
        return None
    active = layer.active()
    if len(active) != 1:
        return None
    a = active[0]
    if type(a) is LoRAAdapter:
        if a.embedding or (isinstance(a.dropout, nn.Dropout) and a.dropout.training):
            return None
        return a
    return a if callable(getattr(a, "group_terms", None)) else None


def group_terms(a: Any, x: Tensor, W0: Tensor) -> GroupTerms | None:
    """``a``'s terms for the grouped node (None: this call takes the per-layer path)."""
    if type(a) is LoRAAdapter:
        return GroupTerms(a.A, a.B, a.scaling)
    terms: GroupTerms | None = a.group_terms(x, W0)
    return terms


def _all_terms(x: Tensor, items: list[tuple[Any, Tensor]]) -> list[GroupTerms | None]:
    """:func:`group_terms` of each ``(adapter, W0)``; adapters of one type with a ``group_terms_batch``
    (DoRA: the row norms in one batch) give theirs together."""
    out: list[GroupTerms | None] = [None] * len(items)
    by_type: dict[type, list[int]] = {}
    for i, (a, _) in enumerate(items):
        by_type.setdefault(type(a), []).append(i)
    for kind, idx in by_type.items():
        batch = getattr(kind, "group_terms_batch", None)
        if batch is not None and len(idx) > 1:
            for i, t in zip(idx, batch(x, [items[i] for i in idx]), strict=True):
                out[i] = t
        else:
            for i in idx:
                out[i] = group_terms(items[i][0], x, items[i][1])
    return out


class _Key:
    """What a cached output was computed from: the input object and version, grad mode and matmul dtype."""

    __slots__ = ("ref", "version", "grad", "dtype")

    def __init__(self, x: Tensor) -> None:
        self.ref, self.version = weakref.ref(x), x._version
        self.grad, self.dtype = torch.is_grad_enabled(), amp_dtype(x)

    def matches(self, x: Tensor) -> bool:
        return (
            self.ref() is x
            and self.version == x._version
            and self.grad == torch.is_grad_enabled()
            and self.dtype == amp_dtype(x)
        )


def _saved_tensor_hooks() -> bool:
    """Saved-tensor hooks are on (activation checkpointing, offloading): a recomputed forward must save
    exactly what the first one saved, and the first forward of a plan runs per layer, so do not group."""
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None


def _state(layer: AdaptedLayer, a: Any) -> tuple[Any, ...]:
    return a, tuple(p._version for p in a.parameters()), layer.weight()._version


class SiblingGroup:
    """The adapted linear children of one module; learns which of them read one input, and groups those.

    Each call of a member with input ``x`` either returns the output a group run cached for it (same
    ``x`` object and version, grad mode, dtype, adapter and parameter versions), or, when it leads a
    learned plan, runs :class:`_LoRAGroup` for the plan's members not yet called on ``x``, or returns
    None (the caller takes the per-layer path) and records the call so that members called in a row
    with one ``x`` form a plan for the next forward. The parent's forward pre-hook (:meth:`reset`)
    clears cached outputs and the record, so nothing outlives one forward of the parent.
    """

    def __init__(self, members: list[AdaptedLayer]) -> None:
        self.members = members
        self.plan: dict[int, tuple[int, ...]] = {}  # leader -> members in call order
        self.cache: dict[int, tuple[Tensor, tuple[Any, ...]]] = {}  # member -> (output, state it assumed)
        self.cache_key: _Key | None = None
        self.cache_leader = -1
        self.runs: list[tuple[_Key, list[int]]] = []  # members called on each input (per-layer path)

    def reset(self, *_: Any) -> None:
        if self.cache:  # a member skipped in the last forward: learn the plan again
            self.plan.pop(self.cache_leader, None)
        self.cache = {}
        self.cache_key, self.cache_leader = None, -1
        self.runs = []

    def __getstate__(self) -> dict[str, Any]:  # weak references do not pickle; cached outputs never travel
        return {"members": self.members, "plan": self.plan}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.members, self.plan = state["members"], state["plan"]
        self.cache, self.cache_key, self.cache_leader, self.runs = {}, None, -1, []

    def _index(self, layer: AdaptedLayer) -> int:
        return next(i for i, m in enumerate(self.members) if m is layer)

    def _drop(self) -> None:
        """A plan did not hold (a member skipped, called on another input or changed): learn it again."""
        self.plan.pop(self.cache_leader, None)
        self.cache.clear()
        self.cache_key, self.cache_leader = None, -1

    def __call__(self, layer: AdaptedLayer, x: Tensor) -> Tensor | None:
        if not GROUP_SIBLINGS or x.is_inference() or _saved_tensor_hooks():
            return None
        i = self._index(layer)
        hit = self.cache.pop(i, None)
        if hit is not None:
            a = group_adapter(layer)
            key = self.cache_key
            if key is not None and key.matches(x) and a is not None and _state(layer, a) == hit[1]:
                if not self.cache:
                    self.cache_key, self.cache_leader = None, -1
                return hit[0]
            self._drop()
        elif i in self.plan:
            if self.cache:
                self._drop()  # the last run's outputs were not all taken
            else:
                y = self._run_group(i, x)
                if y is not None:
                    return y
        self._record(i, x)
        return None

    def _called_on(self, x: Tensor) -> list[int]:
        return next((run for key, run in self.runs if key.matches(x)), [])

    def _record(self, i: int, x: Tensor) -> None:
        run = self._called_on(x)
        if not run or i in run:  # a new input, or a member called twice on one: start again
            self.runs = [(k, r) for k, r in self.runs if r is not run]
            self.runs.append((_Key(x), [i]))
        else:
            run.append(i)
            self.plan[run[0]] = tuple(run)

    def _run_group(self, leader: int, x: Tensor) -> Tensor | None:
        done = self._called_on(x)
        lead = self.members[leader]
        a_lead, W_lead = group_adapter(lead), lead.weight()
        if a_lead is None or W_lead.device != x.device or W_lead.shape[1] != x.shape[-1]:
            return None
        sig = (W_lead.dtype, W_lead.device, W_lead.shape[1])
        found: list[tuple[int, AdaptedLayer, Any]] = [(leader, lead, a_lead)]
        for j in self.plan[leader]:
            layer = self.members[j]
            a = group_adapter(layer)
            if j == leader or a is None or j in done:
                continue
            W = layer.weight()
            if (W.dtype, W.device, W.shape[1]) == sig:
                found.append((j, layer, a))
        if len(found) < 2:
            return None
        terms = _all_terms(x, [(a, layer.weight()) for _, layer, a in found])
        if terms[0] is None:
            return None
        tsig = (terms[0].A.dtype, terms[0].B.dtype)
        chosen = [
            (*f, t)
            for f, t in zip(found, terms, strict=True)
            if t is not None and (t.A.dtype, t.B.dtype) == tsig
        ]
        if len(chosen) < 2:
            return None
        tensors: list[Tensor] = []
        for _, layer, _, t in chosen:
            tensors += [layer.weight(), t.A, t.B]
        zs = amp_apply(_LoRAGroup, None, x, tuple(t.s for *_, t in chosen), *tensors)
        outs = [z if t.finish is None else t.finish(z) for (*_, t), z in zip(chosen, zs, strict=True)]
        self.cache = {
            j: (y, _state(layer, a)) for (j, layer, a, _), y in zip(chosen[1:], outs[1:], strict=True)
        }
        self.cache_key, self.cache_leader = _Key(x), leader
        return outs[0]


def link_siblings(model: nn.Module, layer_type: type[nn.Module]) -> None:
    """Give every module's adapted linear children (``layer_type``, two or more) one :class:`SiblingGroup`.

    The group's :meth:`SiblingGroup.reset` runs as the parent's forward pre-hook. Earlier groups and
    their hooks are replaced, so call it again whenever layers are wrapped or unwrapped.
    """
    for parent in model.modules():
        hooks = parent._forward_pre_hooks
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), SiblingGroup)]:
            del hooks[key]
        kids = [c for c in parent.children() if isinstance(c, layer_type)]
        for c in kids:
            c.siblings = None  # type: ignore[assignment]
        linear = [c for c in kids if c.kind == "linear"]
        if len(linear) < 2:
            continue
        group = SiblingGroup(linear)  # type: ignore[arg-type]
        for c in linear:
            c.siblings = group  # type: ignore[assignment]
        parent.register_forward_pre_hook(group.reset)


def learn_siblings(model: nn.Module, forward: Callable[[], object]) -> bool:
    """Run ``forward()`` (one forward of ``model``) only so that the sibling groups learn which layers read
    one input: eval mode, no gradients, random states kept. A training loop calls it before its first step,
    so every process, a fresh run or one resumed from a checkpoint, groups the same layers from its first
    step on (the learning forward itself runs per layer, and its sums are ordered differently): resumed
    runs stay bit-exact. Returns whether any group formed."""
    groups = {id(g): g for m in model.modules() if (g := getattr(m, "siblings", None)) is not None}
    if not GROUP_SIBLINGS or not groups:
        return False
    for g in groups.values():
        g.plan.clear()
        g.reset()
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            forward()
    finally:
        model.train(was_training)
        for g in groups.values():
            g.reset()
    return any(g.plan for g in groups.values())
