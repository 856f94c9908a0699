"""(IA)³: learned rescaling of a layer's outputs (or, for feed-forward layers, of its inputs).

Liu, Tam, Muqeeth, Mohta, Huang, Bansal & Raffel, "Few-Shot Parameter-Efficient Fine-Tuning is Better
and Cheaper than In-Context Learning", NeurIPS 2022, arXiv:2205.05638 (section 3.3): keys and values
become ``l_k ⊙ K``, ``l_v ⊙ V`` and the feed-forward activation ``(l_ff ⊙ γ(W1 x)) W2``. As a
reparameterisation of one weight ``W0`` [out, in]:

    output scaling:  W' = diag(l) W0          (l ∈ R^out, ``ia3_l`` [out, 1])
    input scaling:   W' = W0 diag(l)          (l ∈ R^in,  ``ia3_l`` [1, in]; "feedforward" modules)

so ``ΔW = (l - 1) ⊙ W0`` and ``l = 1`` at init. Which weights scale their input is decided as in
PEFT's ``feedforward_modules``: each entry is a module-name suffix, or, written ``re:<regex>``, a
regular expression that must match the whole module name (PEFT's string form). Merging multiplies
``W0`` and unmerging divides it (exact unless some ``l_i = 0``, which ``unmerge`` refuses).

An output-scaled layer's bias is scaled too, ``y = l ⊙ (W0 x + b)`` (PEFT's form; the paper's T5
layers have no biases): ``bias_scale`` returns ``l`` and merging multiplies the bias as well. An
input-scaled layer keeps its bias, ``y = W0 (l ⊙ x) + b``, and never computes ``W0 x`` (no
``base_out``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ._core import Adapter, AdapterConfig, AdapterContext, load_peft_tensors


def is_feedforward(module: str, feedforward: tuple[str, ...]) -> bool:
    """PEFT's rule: ``re:<regex>`` entries must match the whole module name, others are name suffixes."""
    return any(
        bool(re.fullmatch(e[3:], module)) if e.startswith("re:") else module.endswith(e) for e in feedforward
    )


class IA3Adapter(Adapter):
    """Trainable ``ia3_l``: [out, 1] (output scaling) or [1, in] (input scaling, :class:`IA3InputAdapter`),
    broadcast over ``W0``."""

    def __init__(self, scale: Tensor, scales_input: bool) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(scale)
        self.scales_input = scales_input

    def delta(self, W0: Tensor) -> Tensor:
        return W0 * (self.ia3_l - 1)

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        return base_out * self.ia3_l.view(-1).to(base_out.dtype)

    def bias_scale(self) -> Tensor | None:
        return None if self.scales_input else self.ia3_l.view(-1)

    def merge(self, W0: Tensor) -> Tensor:
        return W0 * self.ia3_l

    def unmerge(self, W_merged: Tensor) -> Tensor:
        if bool((self.ia3_l == 0).any()):
            raise WeightsmithError(
                "(IA)3 unmerge: a scale is exactly 0, so the merged weight cannot be undone"
            )
        return W_merged / self.ia3_l

    def peft_state(self) -> dict[str, Tensor]:
        return {"ia3_l": self.ia3_l.detach()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        load_peft_tensors(self, state, {"ia3_l": "ia3_l"})


class IA3InputAdapter(IA3Adapter):
    """Input scaling ``W0 diag(l)``: ``forward`` scales ``x`` and never needs ``x W0ᵀ``."""

    needs_base_out: ClassVar[bool] = False

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        return torch.nn.functional.linear(x * self.ia3_l.view(-1).to(x.dtype), W0.to(x.dtype))


@register_config("ia3", kind="adapter")
class IA3(AdapterConfig):
    """``feedforward``: the modules that scale their input instead of their output (PEFT's
    ``feedforward_modules``): name suffixes, or ``re:<regex>`` matching the whole module name."""

    peft_type: ClassVar[str | None] = "IA3"
    # the paper trains (IA)³ with Adafactor at 3e-3; vectors near 1 take large steps
    default_lr: ClassVar[float] = 3e-3
    example_opts: ClassVar[dict[str, Any]] = dict(feedforward=("l2",))

    feedforward: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.feedforward, str):  # one name given without a list
            object.__setattr__(self, "feedforward", (self.feedforward,))
        for e in self.feedforward:
            try:
                re.compile(e[3:] if e.startswith("re:") else "")
            except re.error as exc:
                raise WeightsmithError(
                    f"(IA)3 feedforward entry {e!r}: not a regular expression: {exc}"
                ) from exc

    def create(self, W0: Tensor, ctx: AdapterContext) -> IA3Adapter:
        if ctx.kind == "embedding":
            raise ctx.error("(IA)3 adapts linear layers only, not embeddings")
        module = ctx.name[: -len(".weight")] if ctx.name.endswith(".weight") else ctx.name
        out_f, in_f = W0.shape
        ff = is_feedforward(module, self.feedforward)
        if ff:
            return IA3InputAdapter(torch.ones(1, in_f, device=W0.device), True)
        return IA3Adapter(torch.ones(out_f, 1, device=W0.device), False)

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> IA3:
        ff = peft_config.get("feedforward_modules")
        if ff is None:
            raise WeightsmithError(
                f"{module}: PEFT (IA)3 config has no 'feedforward_modules' (PEFT fills it in on save)"
            )
        return cls(feedforward=("re:" + ff,) if isinstance(ff, str) else tuple(sorted(ff)))

    def to_peft(self) -> dict[str, Any]:
        # PEFT requires a *list* of feedforward modules to be a subset of target_modules (written as
        # full module names), so the entries are written as one equivalent full-match regex.
        parts = [e[3:] if e.startswith("re:") else ".*" + re.escape(e) for e in self.feedforward]
        ff: str | list[str] = parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)
        return {"peft_type": "IA3", "feedforward_modules": ff or [], "init_ia3_weights": True}
