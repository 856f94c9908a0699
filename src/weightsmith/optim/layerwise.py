"""Per-layer updates inside backward: each weight is updated, and its gradient freed, once it is complete.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., 2024), Sec. 4.3
("per-layer weight updates"): with a ``register_post_accumulate_grad_hook`` hook on every parameter the
optimizer step runs inside ``backward``, so the full set of gradients never exists at once, only the
gradients of the layers still in flight.

``layerwise(GaLoreAdamW)(groups, ...)`` is the same optimizer with that behaviour, implementing the train
loop's ``UpdatesInBackward`` protocol: before every backward pass the loop calls
``step_in_backward(enabled)``, with ``enabled`` True on the pass that ends an optimizer step. Passes with
``enabled=False`` leave the gradients to accumulate as usual, so gradient accumulation gives exactly the
result of ordinary stepping (the saving then holds on the last micro-batch only: the earlier ones need every
gradient kept). In a plain loop call ``opt.step_in_backward(True)`` once and then ``loss.backward()``;
``opt.step()`` afterwards finds no gradient and does nothing, and calling it keeps
``torch.optim.lr_scheduler``'s check that the optimizer stepped first quiet.

Limits, stated rather than hidden: no global gradient-norm clipping (no full set of gradients to take the
norm of); not under DistributedDataParallel, whose all-reduce of a gradient bucket completes after the
parameter's hook has run (the update would use the local gradient), so it refuses a multi-process group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import WeightsmithError
from .optimizer import TransformOptimizer


class StepsInBackward:
    """Mixin for a :class:`TransformOptimizer`: hooks that step each parameter inside backward."""

    def _install_hooks(self: Any) -> None:
        self._in_backward = False
        self._hooks = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self: Any, p: Tensor) -> None:
        if self._in_backward:
            self.step_param(p)
            p.grad = None

    def step_in_backward(self, enabled: bool) -> None:
        """Whether the next backward pass ends an optimizer step (and so updates each weight in its hook)."""
        if enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise WeightsmithError(
                "per-layer updates inside backward do not work under DistributedDataParallel (a parameter's "
                "hook runs before its gradient is all-reduced); train without --layerwise"
            )
        self._in_backward = enabled

    def remove_hooks(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []


_CLASSES: dict[type, type] = {}


def layerwise(cls: type[TransformOptimizer]) -> type[TransformOptimizer]:
    """``cls`` with per-layer updates inside backward (a subclass implementing ``step_in_backward``)."""
    if cls not in _CLASSES:

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            cls.__init__(self, *args, **kwargs)
            self._install_hooks()

        _CLASSES[cls] = type(f"Layerwise{cls.__name__}", (StepsInBackward, cls), {"__init__": __init__})
    return _CLASSES[cls]


def is_layerwise(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, StepsInBackward)
