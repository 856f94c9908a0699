"""Loss and accuracy barriers along the linear path between two models, before and after alignment.

Linear mode connectivity as measured in Git Re-Basin (Ainsworth, Hayase, Srinivasa, ICLR 2023,
arXiv:2209.04836) after Frankle et al. (2020) and Entezari et al. (2022): for
``theta(alpha) = (1 - alpha) theta_A + alpha theta_B`` the loss barrier is
``max_alpha L(theta(alpha)) - [(1 - alpha) L(theta_A) + alpha L(theta_B)]`` and the accuracy barrier is the
same gap with accuracy, sign flipped. Networks with BatchNorm suffer variance collapse on the path
(Jordan et al., REPAIR, ICLR 2023), so ``prepare`` may re-estimate the running statistics at every point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # merge (and SciPy's optimize) is imported only when a curve is aligned
    from ..merge.permute import PermutationSpec

Evaluate = Callable[[nn.Module], tuple[float, float]]  # model -> (loss, accuracy)


@dataclass(frozen=True)
class BarrierCurve:
    alphas: list[float]
    loss: list[float]
    acc: list[float]
    loss_barrier: float
    acc_barrier: float

    @property
    def midpoint_acc(self) -> float:
        return self.acc[min(range(len(self.alphas)), key=lambda i: abs(self.alphas[i] - 0.5))]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "midpoint_acc": self.midpoint_acc}


def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) a + alpha b`` for floating tensors; integer buffers (BN step counts) come from A."""
    return {k: torch.lerp(a[k], b[k].to(a[k].dtype), alpha) if a[k].is_floating_point() else a[k] for k in a}


def classification_eval(x: Tensor, y: Tensor) -> Evaluate:
    """Mean cross-entropy and accuracy of ``model(x)`` against labels ``y`` (eval mode, no grad)."""

    @torch.no_grad()
    def run(model: nn.Module) -> tuple[float, float]:
        model.eval()
        logits = model(x)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())

    return run


def barrier_curve(
    model: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    evaluate: Evaluate,
    k: int = 11,
    prepare: Callable[[nn.Module], Any] | None = None,
) -> BarrierCurve:
    """Evaluate ``k`` evenly spaced points of the segment A -> B (``model`` is a template; it is
    overwritten)."""
    alphas = [i / (k - 1) for i in range(k)]
    loss, acc = [], []
    for t in alphas:
        model.load_state_dict(interpolate(a, b, t))
        if prepare is not None:
            prepare(model)
        lo, ac = evaluate(model)
        loss.append(lo)
        acc.append(ac)
    lb = max(loss[i] - ((1 - t) * loss[0] + t * loss[-1]) for i, t in enumerate(alphas))
    ab = max((1 - t) * acc[0] + t * acc[-1] - acc[i] for i, t in enumerate(alphas))
    return BarrierCurve(alphas, loss, acc, lb, ab)


def barrier(
    model: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    evaluate: Evaluate,
    spec: PermutationSpec | None = None,
    k: int = 11,
    prepare: Callable[[nn.Module], Any] | None = None,
    seed: int = 0,
) -> dict[str, BarrierCurve]:
    """The ``naive`` curve, and with a ``spec`` also the ``aligned`` one (B weight-matched to A)."""
    curves = {"naive": barrier_curve(model, a, b, evaluate, k, prepare)}
    if spec is not None:
        from ..merge.permute import apply_permutation, weight_matching

        b_aligned = apply_permutation(b, spec, weight_matching(spec, a, b, seed=seed))
        curves["aligned"] = barrier_curve(model, a, b_aligned, evaluate, k, prepare)
    return curves


def plot_barrier(
    curves: Mapping[str, BarrierCurve],
    title: str = "Linear interpolation A -> B",
    report: Any = None,
    caption: str | None = None,
) -> Any:
    """Loss and accuracy along the path, one line per curve; added to ``report`` (a weightsmith
    ``Report``) with ``caption`` when given. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for name, c in curves.items():
        ax_loss.plot(c.alphas, c.loss, marker="o", ms=3, label=f"{name} (barrier {c.loss_barrier:.3f})")
        ax_acc.plot(
            c.alphas,
            [100 * v for v in c.acc],
            marker="o",
            ms=3,
            label=f"{name} (barrier {100 * c.acc_barrier:.1f} pp)",
        )
    for ax, label in ((ax_loss, "test loss"), (ax_acc, "test accuracy (%)")):
        ax.set_xlabel("alpha  (0 = model A, 1 = model B)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    if report is not None:
        report.figure(fig, caption or title)
    return fig
