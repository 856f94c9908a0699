"""Methods beyond plain LoRA in the sibling group (weightsmith.adapters.lora_group, issue 14).

DoRA joins the grouped node through ``group_terms``: the grouped step must equal its per-layer step
(itself checked against PEFT in test_peft_reference.py) in loss, every adapter gradient (A, B and the
magnitude m) and the input gradient; an adapter's ``group_terms`` with computed factors is checked the
same way, and returning None keeps a layer per layer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_lora_group import assert_steps_close, count_group_runs, grouping, llama_step, tiny_llama
from torch import Tensor, nn

from weightsmith import adapters
from weightsmith.adapters.dora import DoRA, DoRAAdapter, row_norms
from weightsmith.adapters.lora import LoRAAdapter, lora_forward
from weightsmith.adapters.lora_group import GroupTerms

torch.set_num_threads(1)


def grouped_vs_per_layer(model: nn.Module, ids: Tensor, tol: float) -> list[int]:
    with grouping(False), count_group_runs() as runs:
        ref = llama_step(model, ids)
    assert runs == []
    llama_step(model, ids)  # learns the plan
    with count_group_runs() as runs:
        got = llama_step(model, ids)
    assert_steps_close(got, ref, tol)
    assert all(g.norm() > 0 for g in ref[1])
    return sorted(runs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_dora_grouped_step_equals_per_layer(dtype: torch.dtype, tol: float) -> None:
    model = tiny_llama(dtype, DoRA(rank=4, alpha=8.0))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    assert grouped_vs_per_layer(model, ids, tol) == [2, 2, 3, 3], "q/k/v and gate/up of both blocks"
    n_m = sum(1 for n, _ in model.named_parameters() if n.endswith(".m"))
    assert n_m == 14  # the magnitudes are among the compared gradients


def test_dora_grouped_under_autocast() -> None:
    model = tiny_llama(config=DoRA(rank=4, alpha=8.0))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert len(grouped_vs_per_layer(model, ids, 3e-2)) == 4
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.adapter_parameters(model)
    )


def test_dora_magnitude_change_is_seen_by_cached_siblings() -> None:
    model = tiny_llama(config=DoRA(rank=4, alpha=8.0))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    llama_step(model, ids)
    llama_step(model, ids)
    attn = model.model.layers[0].self_attn

    def bump(module: nn.Module, args: Any) -> None:  # after q ran grouped, before k takes its cached output
        with torch.no_grad():
            attn.k_proj.adapters["default"].m.mul_(1.5)

    handle = attn.q_proj.register_forward_hook(lambda mod, a, out: bump(mod, a))
    try:
        got = llama_step(model, ids)
    finally:
        handle.remove()
    with grouping(False):
        ref = llama_step(model, ids)  # m already bumped: the per-layer step sees the same weights
    assert_steps_close(got, ref, 1e-5)


class _Computed(LoRAAdapter):
    """A LoRA whose factor ``A`` is computed from its parameters (as AdaLoRA's ``Q ⊙ E``, NOLA's sums)."""

    def __init__(self, inner: LoRAAdapter, per_layer: bool = False) -> None:
        super().__init__(inner.A.data.clone(), inner.B.data.clone(), inner.scaling)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, inner.A.shape[0])[:, None])
        self.per_layer = per_layer

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        return lora_forward(base_out, x, self.A * self.gain, self.B, self.scaling, W0)

    def group_terms(self, x: Tensor, W0: Tensor) -> GroupTerms | None:
        return None if self.per_layer else GroupTerms(self.A * self.gain, self.B, self.scaling)


@pytest.mark.parametrize("per_layer", [False, True])
def test_computed_factors_join_the_group(per_layer: bool) -> None:
    model = tiny_llama()
    for layer in model.modules():
        if isinstance(layer, adapters.AdaptedLayer):
            layer.adapters["default"] = _Computed(layer.adapters["default"], per_layer)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    runs = grouped_vs_per_layer(model, ids, 1e-5)
    assert runs == ([] if per_layer else [2, 2, 3, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_row_norms_equal_dense_norms(dtype: torch.dtype) -> None:
    """Siblings' norms in one batch: ``||W0 + s B A||`` per row written out densely (the paper's eq. 5)."""
    g = torch.Generator().manual_seed(7)
    shapes, scales = [(12, 16), (4, 16), (4, 16)], [2.0, 0.5, 1.25]
    Ws = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    ads = [
        DoRAAdapter(torch.randn(3, s[1], generator=g), torch.randn(s[0], 3, generator=g), torch.rand(s[0]), c)
        for s, c in zip(shapes, scales, strict=True)
    ]
    got = row_norms(ads, Ws)
    for a, W, n in zip(ads, Ws, got, strict=True):
        dense = (W.double() + a.scaling * a.B.double() @ a.A.to(dtype).double()).norm(dim=1)
        assert n.dtype == torch.float32 and n.shape == (W.shape[0],)
        assert torch.allclose(n.double(), dense, rtol=1e-5 if dtype == torch.float32 else 1e-2)
        assert torch.allclose(n, a.row_norm(W), rtol=1e-6)
    mixed = [ads[0], DoRAAdapter(torch.randn(2, 16), torch.randn(4, 2), torch.rand(4), 1.0)]
    for a, n in zip(mixed, row_norms(mixed, Ws[:2]), strict=True):  # ranks differ: one by one
        assert torch.equal(n, a.row_norm(Ws[mixed.index(a)]))
