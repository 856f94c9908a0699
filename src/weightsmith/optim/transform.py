"""Gradient transforms in the optax style: an ``init`` / ``update`` pair, composed by ``chain``.

A transform turns a gradient into an update direction, parameter by parameter. Its state is a dict of
tensors and plain Python values only (ints, floats, bools, strings, lists, dicts), so that an optimizer's
``state_dict()`` survives ``torch.load(weights_only=True)`` and a resumed run continues bit-exactly.
State tensors of the inner optimiser may be created lazily on the first ``update`` (their shape is that of
the gradient the transform receives, which for a projected optimiser is not the parameter's shape).

The learning rate and decoupled weight decay are applied by :class:`weightsmith.optim.TransformOptimizer`
(so ``torch.optim.lr_scheduler`` works); a transform returns the direction ``u`` in ``p <- p - lr * u``.

Adam is "Adam: A Method for Stochastic Optimization" (Kingma & Ba, 2015), Algorithm 1:
``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``, ``u = m_hat / (sqrt(v_hat) + eps)``; written, as in
galore-torch and transformers' AdamW, with ``eps`` added to ``sqrt(v)`` before the bias correction is folded
into the step size: ``u = sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..select import Selector
from .sharded import local

State = dict[str, Any]
# A mask: weight names (a Selector, or its string form) or a predicate on (name, parameter).
Where = Selector | str | Sequence[str] | Callable[[str, Tensor], bool]


@runtime_checkable
class Transform(Protocol):
    """``init(param, name) -> state``; ``update(grad, state, param) -> (update, state)``."""

    def init(self, param: Tensor, name: str = "") -> State: ...

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]: ...


@dataclass(frozen=True)
class Identity:
    """The update is the gradient (plain SGD once the optimizer applies the learning rate)."""

    elementwise = True  # works on a row shard (FSDP2) as on the whole tensor

    def init(self, param: Tensor, name: str = "") -> State:
        return {}

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        return grad, state


def identity() -> Identity:
    return Identity()


@dataclass(frozen=True)
class Chain:
    """Apply transforms one after another; the state is ``{"0": state_0, "1": state_1, ...}``."""

    transforms: tuple[Transform, ...]

    def init(self, param: Tensor, name: str = "") -> State:
        return {str(i): t.init(param, name) for i, t in enumerate(self.transforms)}

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        for i, t in enumerate(self.transforms):
            grad, state[str(i)] = t.update(grad, state[str(i)], param)
        return grad, state


def chain(*transforms: Transform) -> Chain:
    """Compose transforms left to right (``chain(clip(1.0), scale_by_adam())``)."""
    return Chain(tuple(transforms))


def is_matrix(name: str, param: Tensor) -> bool:
    """The usual mask for projected optimisers: 2-D weights (not biases, norms or embeddings of 1-D)."""
    return param.dim() == 2


def selects(where: Where, name: str, param: Tensor) -> bool:
    """Whether the mask ``where`` selects the parameter ``name``."""
    if callable(where) and not isinstance(where, Selector):
        return bool(where(name, param))
    if not isinstance(where, Selector):
        where = Selector.of(where)  # type: ignore[arg-type]
    return where.matches(name)


@dataclass(frozen=True)
class Masked:
    """``transform`` where ``where`` selects the parameter, ``otherwise`` (identity by default) elsewhere.

    The choice is made once, at ``init``, and kept in the state (``"on"``)."""

    transform: Transform
    where: Where
    otherwise: Transform = Identity()

    def init(self, param: Tensor, name: str = "") -> State:
        on = selects(self.where, name, param)
        return {"on": on, "inner": (self.transform if on else self.otherwise).init(param, name)}

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        t = self.transform if state["on"] else self.otherwise
        grad, state["inner"] = t.update(grad, state["inner"], param)
        return grad, state


def masked(transform: Transform, where: Where, otherwise: Transform | None = None) -> Masked:
    """Restrict ``transform`` to the parameters ``where`` selects (a Selector on names or a predicate)."""
    return Masked(transform, where, otherwise if otherwise is not None else Identity())


@dataclass(frozen=True)
class ScaleByAdam:
    """Adam's direction (Kingma & Ba, 2015) with bias correction folded into the step size.

    State: ``count`` (int) and, created on the first update with the gradient's shape and float32 (or the
    gradient's dtype when ``state_dtype`` is None), ``mu`` and ``nu``."""

    elementwise = True  # works on a row shard (FSDP2) as on the whole tensor

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    correct_bias: bool = True
    state_dtype: torch.dtype | None = None

    def init(self, param: Tensor, name: str = "") -> State:
        return {"count": 0}

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        if "mu" not in state:
            dtype = self.state_dtype or grad.dtype
            state["mu"] = torch.zeros_like(grad, dtype=dtype)
            state["nu"] = torch.zeros_like(grad, dtype=dtype)
        mu, nu = state["mu"], state["nu"]
        g = grad.to(mu.dtype)
        state["count"] += 1
        mu.mul_(self.b1).add_(g, alpha=1.0 - self.b1)
        nu.mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
        u = mu / nu.sqrt().add_(self.eps)
        if self.correct_bias:
            t = state["count"]
            u.mul_(math.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t))
        return u, state

    def update_many(self, items: list[tuple[Tensor, State, Tensor]]) -> list[Tensor]:
        """:meth:`update` of several ``(grad, state, param)`` at once with multi-tensor (foreach) kernels:
        the same arithmetic, op for op, in a few kernel launches instead of several per tensor. Sharded
        (DTensor) gradients get sharded moments, but the arithmetic runs on the local shards (one dispatch
        per kernel instead of DTensor's per-tensor one) and the directions returned are local."""
        if not items:
            return []
        grads = []
        for grad, state, _ in items:
            if "mu" not in state:
                dtype = self.state_dtype or grad.dtype
                state["mu"] = torch.zeros_like(grad, dtype=dtype)
                state["nu"] = torch.zeros_like(grad, dtype=dtype)
            state["count"] += 1
            grads.append(local(grad).to(state["mu"].dtype))
        mus, nus = [local(st["mu"]) for _, st, _ in items], [local(st["nu"]) for _, st, _ in items]
        torch._foreach_mul_(mus, self.b1)
        torch._foreach_add_(mus, grads, alpha=1.0 - self.b1)
        torch._foreach_mul_(nus, self.b2)
        torch._foreach_addcmul_(nus, grads, grads, value=1.0 - self.b2)
        denom = torch._foreach_sqrt(nus)
        torch._foreach_add_(denom, self.eps)
        us = list(torch._foreach_div(mus, denom))
        if self.correct_bias:
            counts = [st["count"] for _, st, _ in items]
            torch._foreach_mul_(us, [math.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t) for t in counts])
        return us


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, correct_bias: bool = True
) -> ScaleByAdam:
    return ScaleByAdam(b1, b2, eps, correct_bias)


@dataclass(frozen=True)
class ClipByNorm:
    """Rescale each parameter's update to a norm of at most ``max_norm``."""

    max_norm: float

    def init(self, param: Tensor, name: str = "") -> State:
        return {}

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        norm = float(torch.linalg.vector_norm(grad))
        if norm > self.max_norm:
            grad = grad * (self.max_norm / norm)
        return grad, state


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors in a (nested) optimizer state, in this process (a DTensor: its shard)."""
    if isinstance(state, Tensor):
        shard = local(state)
        return shard.numel() * shard.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0
