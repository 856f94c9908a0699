"""A gradient transform as an ordinary ``torch.optim.Optimizer``.

``TransformOptimizer(model.named_parameters(), chain(...), lr=1e-3)`` works in weightsmith's trainer, in a
plain loop and in the transformers ``Trainer`` (``optimizers=(opt, sched)``): param groups, ``state_dict`` /
``load_state_dict`` and learning-rate schedulers behave as for ``torch.optim.AdamW``.

A step is ``p <- p - lr * (u + wd * p)`` written as decoupled weight decay ("Decoupled Weight Decay
Regularization", Loshchilov & Hutter, 2019): ``p <- (1 - lr*wd) p - lr*u`` where ``u`` is the transform's
update. ``decay_after_update=True`` applies the decay to the updated weight instead
(``p <- (1 - lr*wd)(p - lr*u)``), the order galore-torch and transformers' legacy AdamW use.

Under FSDP2 (``fully_shard``) parameters and gradients are DTensors sharded by rows. Element-wise transforms
(``elementwise = True``: Adam, identity) run on the local shard, so their state is sharded too. A projected
transform that can work on rows (``shards_rows(shape)``: GaLore's ``LowRank`` with the randomized SVD,
random projections, or DCT) runs on the local rows, its projector computed from all-reduced small products
(:mod:`weightsmith.optim.sharded`); no full gradient exists. Transforms with ``update_many`` (Adam, and
``LowRank`` around it) step all such parameters of a group at once on their ``.to_local()`` shards
(multi-tensor kernels, the small all-reduces of a step or a refresh batched), so no arithmetic goes through
DTensor's per-tensor dispatch; their state tensors stay row-sharded DTensors. The others (the
exact SVD, INT4 projectors, APOLLO, GradNormLoRP) gather the parameter's full gradient, one parameter at a
time, compute the update identically on every process (per-layer seeds do not depend on the process) and
keep their low-rank state replicated; each process then takes its own rows of the update.

The state is loaded back without casting: ``torch.optim.Optimizer.load_state_dict`` casts every floating
state tensor to its parameter's dtype, which would round float32 moments of a bf16 model and break a
bit-exact resume; here each tensor keeps the dtype it was saved with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from itertools import chain as iter_chain
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from .sharded import local, rows_of, use
from .transform import State, Transform


def _shards_rows(t: Transform, shape: tuple[int, ...]) -> bool:
    check = getattr(t, "shards_rows", None)
    return bool(check(shape)) if check is not None else False


class TransformOptimizer(torch.optim.Optimizer):
    """Run ``transform`` on each parameter's gradient, then apply the learning rate and weight decay.

    ``params`` may be parameters, ``(name, parameter)`` pairs (names reach masks and seeds), or param-group
    dicts. Subclasses build the transform from the group's hyperparameters (``transform_for``), so values
    changed in a group (by a scheduler or by hand) take effect on the next step."""

    decay_after_update: bool = False

    def __init__(
        self,
        params: Iterable[Any],
        transform: Transform | None = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        **defaults: Any,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        self._transform = transform
        self._names: dict[int, str] = {}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, **defaults})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or []
        if len(names) == len(group["params"]):  # names travel by parameter, not by position in a group
            self._names.update({id(p): str(n) for p, n in zip(group["params"], names, strict=True)})

    # ------------------------------------------------------------------ what subclasses may override

    def transform_for(self, group: dict[str, Any]) -> Transform:
        """The transform applied to the parameters of ``group``."""
        if self._transform is None:
            raise TypeError(f"{type(self).__name__} needs a transform (or must override transform_for)")
        return self._transform

    # ------------------------------------------------------------------------------------ stepping

    def param_name(self, p: Tensor) -> str:
        """The name the parameter was given (``""`` when the optimizer got bare parameters)."""
        return self._names.get(id(p), "")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            transform = self.transform_for(group)
            self._refresh_batched(group, transform)
            if self._update_batched(group, transform):
                continue
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group, transform)
        return loss

    def _on_rows(self, t: Transform, grad: Tensor) -> bool:
        """Whether a sharded (DTensor) gradient can be updated by ``t`` on its local rows: an element-wise
        transform, or a projected one that computes its projector from sums over rows (FSDP2's layout)."""
        if getattr(t, "elementwise", False):
            return True
        return _shards_rows(t, tuple(grad.shape)) and rows_of(grad) is not None

    def _update_batched(self, group: dict[str, Any], t: Transform) -> bool:
        """Update every parameter of ``group`` through the transform's ``update_many`` (multi-tensor kernels)
        when it has one and every gradient is dense and whole or updatable on its rows; False when it does
        not apply. Sharded (FSDP2) parameters are updated through their local shards: one kernel launch per
        multi-tensor op instead of DTensor's dispatch per tensor and op."""
        update_many = getattr(t, "update_many", None)
        if update_many is None:
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not params:  # nothing to update (e.g. the gradients were consumed inside backward)
            return True
        for p in params:
            g = p.grad
            if g.is_sparse or (isinstance(g, DTensor) and not self._on_rows(t, g)):  # type: ignore[union-attr]
                return False
        for p in params:
            if not self.state[p]:
                self.state[p].update(t.init(p, self.param_name(p)))
        updates = update_many([(p.grad, self.state[p], p) for p in params])
        if updates is None:
            return False
        self._apply_many(params, updates, group)
        return True

    def _refresh_batched(self, group: dict[str, Any], t: Transform) -> None:
        """Let a projected transform refresh the subspaces that are due, same-shaped gradients batched
        (``refresh_many``), before the per-parameter updates (dense gradients, whole or updatable on their
        rows: a batch of row shards then sums its small products with one all-reduce per stage)."""
        refresh_many = getattr(t, "refresh_many", None)
        if refresh_many is None:
            return
        items = []
        for p in group["params"]:
            g = p.grad
            if g is None or g.is_sparse or (isinstance(g, DTensor) and not self._on_rows(t, g)):
                continue
            st = self.state[p]
            if not st:
                st.update(t.init(p, self.param_name(p)))
            items.append((g, st))
        refresh_many(items)

    @torch.no_grad()
    def step_param(self, p: Tensor, grad: Tensor | None = None) -> None:
        """Update one parameter now (used by per-layer updates inside backward)."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                g = grad if grad is not None else p.grad
                if g is not None:
                    self._update(p, g, group, self.transform_for(group))
                return
        raise KeyError("parameter is not in this optimizer")

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], t: Transform) -> None:
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients ({self.param_name(p)})"
            )
        st: State = self.state[p]
        name = self.param_name(p)
        split = isinstance(grad, DTensor) and not getattr(t, "elementwise", False)
        where = rows_of(grad) if split and _shards_rows(t, tuple(grad.shape)) else None
        if where is not None:  # FSDP2, on the row shard (see the module docstring)
            p, grad = p.to_local(), grad.to_local()  # type: ignore[attr-defined]
            with use(where):
                update = self._transform_update(p, grad, st, t, name)
        elif split:  # FSDP2, gathered: the transform sees the whole gradient
            whole_p, whole_g = p.full_tensor(), grad.full_tensor()  # type: ignore[attr-defined]
            full = self._transform_update(whole_p, whole_g, st, t, name)
            update = distribute_tensor(full.to(p.dtype), grad.device_mesh, grad.placements)  # type: ignore[attr-defined]
        else:
            update = self._transform_update(p, grad, st, t, name)
        self._apply(p, update, group)

    def _apply(self, p: Tensor, update: Tensor, group: dict[str, Any]) -> None:
        """``p <- p - lr * update`` with decoupled weight decay (before or after: see the module doc), on
        this process's shard of a sharded parameter."""
        self._apply_many([p], [update], group)

    def _apply_many(self, params: list[Tensor], updates: list[Tensor], group: dict[str, Any]) -> None:
        """:meth:`_apply` of several parameters with multi-tensor kernels, on local shards."""
        lr, wd = group["lr"], group["weight_decay"]
        ps = [local(p) for p in params]
        us = [local(u).to(p.dtype) for p, u in zip(ps, updates, strict=True)]
        if wd and not self.decay_after_update:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_add_(ps, us, alpha=-lr)
        if wd and self.decay_after_update:
            torch._foreach_add_(ps, ps, alpha=-lr * wd)

    def _transform_update(self, p: Tensor, grad: Tensor, st: State, t: Transform, name: str) -> Tensor:
        if not st:
            st.update(t.init(p, name))
        update, new = t.update(grad, st, p)
        if new is not st:
            st.clear()
            st.update(new)
        return update

    # --------------------------------------------------------------------------- state round trip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = iter_chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = iter_chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params, strict=True):
            if pid in saved:
                self.state[p] = _to_device(saved[pid], p.device)


def _to_device(value: Any, device: torch.device) -> Any:
    """A deep copy of ``value`` with tensors moved to ``device``, dtypes kept."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return copy.deepcopy(value)
