"""The adapter conformance suite: every registered method, through its ``example()`` config.

Shared behaviour is checked once for all methods: zero/identity init, merged == unmerged, exact
unmerge, fast path == dense delta, bit-exact save/load into a fresh model, only adapter parameters
train, trainable count == saved numel, and embeddings for the methods that declare support.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from weightsmith import adapters
from weightsmith.adapters import Adapter
from weightsmith.adapters._io import TENSORS_NAME
from weightsmith.errors import WeightsmithError

METHODS = sorted(adapters.registered_adapters())


class Toy(nn.Module):
    """Linear 64->48 (W 48x64), GPT-2 Conv1D 48->32 (W stored 48x32), Linear 32->64 (W 64x32)."""

    def __init__(self, embedding: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 64) if embedding else None
        self.l1 = nn.Linear(64, 48)
        self.c1 = Conv1D(32, 48)
        self.l2 = nn.Linear(32, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emb is not None:
            x = self.emb(x)
        return self.l2(torch.tanh(self.c1(torch.tanh(self.l1(x)))))


def toy(embedding: bool = False) -> Toy:
    torch.manual_seed(0)
    m = Toy(embedding)
    with torch.no_grad():
        m.c1.weight.normal_(std=0.15)  # Conv1D's default std 0.02 makes a near-degenerate layer
    return m


def inputs(embedding: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if embedding:
        return torch.randint(0, 40, (3, 5), generator=g)
    return torch.randn(3, 5, 64, generator=g)


def config(method: str):
    return adapters.registered_adapters()[method].example()


def attach(model: nn.Module, method: str, targets=None, name: str = "default") -> list[str]:
    cfg = config(method)
    calib = [inputs(model.emb is not None)] if cfg.needs_calibration() else None
    return adapters.adapt(model, cfg, targets=targets, name=name, calibration=calib)


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(2)
    for p in adapters.adapter_parameters(model):
        p.add_(torch.randn(p.shape, generator=g) * scale)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * (1 + b.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
    m = toy()
    x = inputs()
    y0 = m(x)
    names = attach(m, method)
    assert names == ["l1.weight", "c1.weight", "l2.weight"]
    if getattr(config(method), "identity_at_init", True):  # QAT runs on quantised weights from the start
        assert close(m(x), y0, 1e-5), f"{method}: adapted model differs from the base at init"
    with adapters.adapters_disabled(m):
        assert torch.equal(m(x), y0)


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_and_fast_path(method):
    m = toy()
    x = inputs()
    W0 = {k: v.clone() for k, v in adapters.base_state_dict(m).items()}
    attach(m, method)
    perturb(m)
    y = m(x)
    with adapters.adapters_disabled(m):
        assert not close(m(x), y, 1e-4), f"{method}: perturbing the adapter changed nothing"
    # fast path == dense delta, layer by layer (including the transposed Conv1D)
    for _, layer in adapters.adapted_layers(m):
        a = layer.adapters["default"]
        W = layer.weight()
        h = torch.randn(7, W.shape[1])
        base = F.linear(h, W)
        assert close(a(h, W, base), Adapter.forward(a, h, W, base)), f"{method}: fast path != dense delta"
    adapters.merge_adapters(m)
    assert close(m(x), y, 1e-5), f"{method}: merged output differs from unmerged"
    with pytest.raises(WeightsmithError, match="already merged"):
        adapters.merge_adapters(m)
    adapters.unmerge_adapters(m)
    after = adapters.base_state_dict(m)
    for k, v in W0.items():
        assert close(after[k], v, 1e-6), f"{method}: unmerge did not restore {k}"
    assert close(m(x), y, 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_bit_exact_in_fresh_model(method, tmp_path):
    m = toy()
    x = inputs()
    attach(m, method)
    perturb(m)
    y = m(x)
    adapters.save_adapters(m, tmp_path / "a")
    fresh = toy()
    assert adapters.load_adapters(fresh, tmp_path / "a") == ["default"]
    for (_, la), (_, lb) in zip(adapters.adapted_layers(m), adapters.adapted_layers(fresh), strict=True):
        sa, sb = la.adapters["default"].state_dict(), lb.adapters["default"].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        # regenerated (non-saved) buffers, e.g. shared random bases, are identical too
        ba = dict(la.adapters["default"].named_buffers())
        bb = dict(lb.adapters["default"].named_buffers())
        assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert torch.equal(fresh(x), y), f"{method}: loaded adapter computes differently"


@pytest.mark.parametrize("method", METHODS)
def test_training_step_changes_only_adapters_and_counts(method, tmp_path):
    m = toy()
    x = inputs()
    attach(m, method)
    base_before = {k: v.clone() for k, v in adapters.base_state_dict(m).items()}
    ad_before = {id(p): p.detach().clone() for p in adapters.adapter_parameters(m)}
    params = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in params} == set(ad_before), f"{method}: trainable set != adapter parameters"
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(2):
        loss = m(x).square().mean() + adapters.adapter_regularization(m)
        loss.backward()
        adapters.adapter_step(m, step, 10)
        opt.step()
        opt.zero_grad()
    after = adapters.base_state_dict(m)
    assert all(torch.equal(after[k], v) for k, v in base_before.items()), f"{method}: a base weight moved"
    changed = [not torch.equal(p.detach(), ad_before[id(p)]) for p in adapters.adapter_parameters(m)]
    assert any(changed), f"{method}: no adapter parameter changed in two SGD steps"
    adapters.save_adapters(m, tmp_path / "a")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / TENSORS_NAME), "pt") as fh:
        saved = sum(fh.get_tensor(k).numel() for k in fh.keys())  # noqa: SIM118
    assert adapters.trainable_parameters(m) == saved, f"{method}: trainable count != saved tensor numel"


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_forward_is_finite(method):
    m = toy()
    attach(m, method)
    perturb(m)
    m.to(torch.bfloat16)
    y = m(inputs().bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


EMBEDDING_METHODS = [n for n in METHODS if adapters.registered_adapters()[n].supports_embedding]


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_embedding(method):
    m = toy(embedding=True)
    ids = inputs(embedding=True)
    y0 = m(ids)
    attach(m, method, targets="emb")
    assert close(m(ids), y0)
    perturb(m)
    y = m(ids)
    assert not close(y, y0, 1e-4)
    ((_, layer),) = adapters.adapted_layers(m)
    a, W = layer.adapters["default"], layer.weight()
    base = F.embedding(ids, W)
    assert close(a.embed(ids, W, base), Adapter.embed(a, ids, W, base))
    W0 = m.emb.base.weight.detach().clone()
    adapters.merge_adapters(m)
    assert close(m(ids), y)
    adapters.unmerge_adapters(m)
    assert close(m.emb.base.weight, W0, 1e-6)


def test_every_method_is_covered():
    assert {"lora", "dora", "pissa", "eva", "adalora"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_equals_eager(method):
    """``torch.compile`` of the adapted model (graph capture and AOT autograd, without code generation)
    gives the eager outputs and gradients: the compiled path GPU benchmarks use is the tested eager path."""
    m = toy()
    attach(m, method)
    perturb(m)
    x = inputs()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    for net in (m, compiled):
        net.zero_grad(set_to_none=True)
    y = m(x)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in adapters.adapter_parameters(m)]
    m.zero_grad(set_to_none=True)
    yc = compiled(x)
    yc.square().mean().backward()
    assert close(yc, y, 1e-6), f"{method}: compiled forward differs"
    for g, p in zip(grads, adapters.adapter_parameters(m), strict=True):
        assert p.grad is not None and close(p.grad, g, 1e-5), f"{method}: compiled gradient differs"
