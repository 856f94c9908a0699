"""Loss/accuracy barrier (Ainsworth et al. 2023, after Frankle et al. 2020), checked by hand."""

from __future__ import annotations

import torch
from torch import nn

from weightsmith.analyze.barrier import barrier, barrier_curve, classification_eval, interpolate, plot_barrier
from weightsmith.merge.permute import apply_permutation, mlp_spec, random_permutation


class Scalar(nn.Module):
    """A 'model' whose loss at parameter w is w^2 and accuracy 1 - w^2 (for hand-made curves)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


def _evaluate(m: Scalar) -> tuple[float, float]:
    v = float(m.w.detach()) ** 2
    return v, 1 - v


def test_barrier_of_a_parabola_by_hand():
    # w(alpha) = -1 + 2 alpha; loss = w^2 is 1 at both ends and 0 in the middle: no barrier (a valley).
    # The accuracy barrier is max of (1 - 1) - (1 - w^2) = -w^2 at the ends... = 0 at alpha 0 and 1.
    c = barrier_curve(Scalar(), {"w": torch.tensor(-1.0)}, {"w": torch.tensor(1.0)}, _evaluate, k=5)
    assert c.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert c.loss == [1.0, 0.25, 0.0, 0.25, 1.0]
    assert c.loss_barrier == 0.0 and c.acc_barrier == 0.0
    # From w=0 to w=2: loss 0 -> 4, linear reference 4 alpha, curve (2 alpha)^2: below the chord, barrier 0.
    # Reverse sign: evaluate -loss: the gap at alpha=1/2 is 1 (= max of 4a - 4a^2).
    c2 = barrier_curve(
        Scalar(),
        {"w": torch.tensor(0.0)},
        {"w": torch.tensor(2.0)},
        lambda m: (-(float(m.w.detach()) ** 2), 0.0),
        k=3,
    )
    assert c2.loss_barrier == 1.0 and c2.midpoint_acc == 0.0


def test_interpolate_keeps_integer_buffers():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(9)}
    out = interpolate(a, b, 0.25)
    assert out["w"].tolist() == [1.0, 3.0] and int(out["n"]) == 3


def test_permuted_copy_has_zero_barrier_after_alignment_only():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    a = {k: v.detach().clone() for k, v in m.state_dict().items()}
    spec = mlp_spec(a, ["0", "2", "4"])
    b = apply_permutation(a, spec, random_permutation(spec, a, 1))
    x = torch.randn(200, 5)
    with torch.no_grad():
        y = m(x).argmax(-1)
    curves = barrier(m, a, b, classification_eval(x, y), spec, k=5)
    assert curves["naive"].loss_barrier > 0.01
    assert abs(curves["aligned"].loss_barrier) < 1e-6 and curves["aligned"].acc_barrier == 0.0
    fig = plot_barrier(curves)
    assert len(fig.axes) == 2
    added = []

    class FakeReport:  # the real Report is tested by its owner; here only the call shape matters
        def figure(self, f, caption):
            added.append((f, caption))

    plot_barrier(curves, report=FakeReport(), caption="test")
    assert added and added[0][1] == "test"
