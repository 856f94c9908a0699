"""The optimizer a fine-tune runs with: injected as a factory, AdamW by default.

An :data:`OptimizerFactory` is called once per run with the trainable ``(name, parameter)`` pairs and the
learning rate, and returns any ``torch.optim.Optimizer``. The loop then owns the optimizer: it steps it,
schedules its ``lr`` with ``LambdaLR``, and checkpoints ``state_dict()`` (read back with
``torch.load(weights_only=True)``, so the state must be tensors and plain Python types).

AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
``θ ← θ − lr · (m̂ / (√v̂ + ε) + λ θ)``.

Per-layer updates inside backward (GaLore's layer-wise updates: Zhao et al., "GaLore: Memory-Efficient LLM
Training by Gradient Low-Rank Projection", ICML 2024, §4.3) need the loop's cooperation: an optimizer that
implements :class:`UpdatesInBackward` updates each parameter from its post-accumulate-grad hook and frees
the gradient, so no full set of gradients ever exists. The loop tells it before every backward pass
whether that pass ends an optimizer step (gradient accumulation), and then does not clip gradients; it still
calls ``step()`` after that pass, when the hooks have consumed every gradient, so ``step()`` must then do
nothing (a ``TransformOptimizer`` skips parameters without a gradient) and learning-rate schedulers see the
usual order. An optimizer without that method is stepped the ordinary way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..distributed import is_dtensor

OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]], float], torch.optim.Optimizer]
"""``factory(named_trainable_parameters, lr) -> optimizer``."""


def adamw_factory(
    params: list[tuple[str, nn.Parameter]], lr: float, *, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The default :data:`OptimizerFactory`: AdamW over every trainable parameter in one group
    (``functools.partial(adamw_factory, weight_decay=0.01)`` sets the decay). Under FSDP2 (sharded, DTensor
    parameters) it is torch's fused AdamW: one DTensor dispatch for the whole step, where the default
    multi-tensor (foreach) implementation dispatches each of its dozen list operations through DTensor."""
    sharded = bool(params) and all(is_dtensor(p) for _, p in params)
    return torch.optim.AdamW(
        [{"params": [p for _, p in params], "lr": lr}],
        lr=lr,
        weight_decay=weight_decay,
        fused=True if sharded else None,
    )


@runtime_checkable
class UpdatesInBackward(Protocol):
    """An optimizer that applies its update to each parameter inside ``backward`` (from a
    ``register_post_accumulate_grad_hook`` hook) instead of in ``step()``."""

    def step_in_backward(self, enabled: bool) -> None:
        """Called by the loop before every backward pass. ``enabled`` is True when that pass ends an
        optimizer step (the last micro-batch of a gradient-accumulation group): the hooks then update each
        parameter as soon as its gradient is complete and free the gradient. When False the gradients must
        be left to accumulate."""


def updates_in_backward(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, UpdatesInBackward)


def separate_head(opt: torch.optim.Optimizer, head: Iterable[nn.Parameter], head_lr: float) -> None:
    """Give the task head its own learning rate: head parameters that share a parameter group with other
    parameters move into a copy of that group with ``lr = head_lr``. Groups holding only head parameters
    are left as the factory made them (a factory that groups the head itself chooses its rate)."""
    head_ids = {id(p) for p in head}
    if not head_ids:
        return
    for group in list(opt.param_groups):
        moved = [p for p in group["params"] if id(p) in head_ids]
        if not moved or len(moved) == len(group["params"]):
            continue
        group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        options: dict[str, Any] = {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
        opt.add_param_group({**options, "params": moved, "lr": head_lr})


def describe(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What the run was trained with, for ``run.json`` and the resume check: the optimizer class and its
    plain-valued defaults (the learning rate excluded: it is recorded with the training options)."""

    def plain(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (bool, int, float, str))

    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in opt.defaults.items()}
    kept = {k: v for k, v in sorted(defaults.items()) if k != "lr" and plain(v)}
    return {"name": f"{type(opt).__module__}.{type(opt).__qualname__}", "defaults": kept}
