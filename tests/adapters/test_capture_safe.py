"""PST and SaRA steps that a CUDA graph can capture (issue 14).

On the CPU: (1) the new paths equal the previous ones (PST's fixed-size mask against
``unstructured_mask`` at every level of the cubic ramp; SaRA's QDWH polar factor against the SVD, by
hand and on sparse updates), forward and every gradient; (2) a dispatch-level watch finds no
host-synchronising op in a step's forward, regularizer and backward (two steps, AdamW between them),
and does find the previous paths' ones; (3) on fake CUDA tensors (shapes only, no GPU) the forward
makes no host-to-device copy, which the previous PST mask did; (4) PST's captured path has the same
ops and shapes at every sparsity level, its level living in a device counter written in place. On a
GPU (skipped here): graphed steps equal eager ones.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith import adapters
from weightsmith.adapters import pst_adapter
from weightsmith.adapters.pst_adapter import PST, straight_through
from weightsmith.adapters.sara import SaRA, nuclear_norm
from weightsmith.compress._sparse import unstructured_mask
from weightsmith.errors import WeightsmithError
from weightsmith.linalg import polar_nuclear

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()

# ops that read the device on the host (values, data-dependent shapes, solver status checks)
SYNCING = {
    "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
    "_linalg_eigh", "_linalg_svd", "linalg_eig", "_linalg_check_errors", "is_nonzero", "equal",
}  # fmt: skip


class HostSyncWatch(TorchDispatchMode):
    """Notes every op that would wait for a GPU (``SYNCING``, a ``cholesky_ex`` that checks its status)
    or copy a host scalar to it (``index_put`` of a 0-dim value: Python's ``t[i] = 0`` on a CUDA tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING or (name == "linalg_cholesky_ex" and kwargs.get("check_errors")):
            self.found.append(name)
        if name in ("index_put", "index_put_") and args[2].dim() == 0:
            self.found.append(f"{name} of a scalar")
        out = func(*args, **kwargs)
        self.ops.append((name, tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return out


def step_model(cfg: Any) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 20))
    adapters.adapt(net, cfg, targets=None)
    with torch.no_grad():  # move the zero-initialised factors so every gradient is non-trivial
        for p in adapters.adapter_parameters(net):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return net


def forward_backward(net: nn.Module, x: torch.Tensor) -> None:
    loss = net(x).square().mean() + adapters.adapter_regularization(net)
    loss.backward()


CAPTURABLE = {
    "pst-layer": PST(sparsity=0.5, rank=2, score_rank=2, ramp=0.5),
    "pst-row": PST(sparsity=0.4, rank=2, score_rank=2, ramp=0.0, prune_scope="row"),
    "pst-magnitude": PST(sparsity=0.5, rank=2, ramp=0.0, data_driven=False),
    "sara-qdwh": SaRA(density=0.2, nuclear=1e-2, nuclear_solver="qdwh"),
}


@pytest.mark.parametrize("name", sorted(CAPTURABLE))
def test_a_whole_step_has_no_host_sync_candidate(name):
    net = step_model(CAPTURABLE[name])
    opt = torch.optim.AdamW(adapters.adapter_parameters(net), lr=1e-2)
    x = torch.randn(5, 24)
    for step in range(2):  # the second step runs at a non-zero level (PST's ramp)
        with HostSyncWatch() as watch:
            forward_backward(net, x)
        assert watch.found == [], f"{name}: {watch.found}"
        opt.step()  # (AdamW is capturable on a GPU only: its step count lives there)
        opt.zero_grad(set_to_none=False)
        adapters.adapter_step(net, step, 10)  # eager, between replays


def test_the_watch_finds_the_previous_paths_syncs():
    score = torch.randn(6, 8)
    with HostSyncWatch() as watch:
        unstructured_mask(score, 0.5, "layer")  # keep[idx] = False: a host scalar copied in
    assert watch.found == ["index_put_ of a scalar"]
    net = step_model(SaRA(density=0.2, nuclear=1e-2, nuclear_solver="svd"))
    with HostSyncWatch() as watch:
        adapters.adapter_regularization(net)
    assert "_linalg_svd" in watch.found


def fake_cuda(net: nn.Module) -> FakeTensorMode:
    """``net``'s tensors as fake CUDA tensors (metadata only): ops run with CUDA dispatch rules, no GPU."""
    mode = FakeTensorMode()
    net.requires_grad_(False)
    net._apply(lambda t: FakeTensor(mode, t.detach().to("meta"), torch.device("cuda")))
    return mode


@pytest.mark.parametrize("name", sorted(CAPTURABLE))
def test_forward_on_fake_cuda_copies_nothing_from_the_host(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    net = step_model(CAPTURABLE[name])
    mode = fake_cuda(net)
    with mode, torch.no_grad():
        y = net(torch.randn(3, 24, device="cuda")).sum() + adapters.adapter_regularization(net)
    assert y.device.type == "cuda"
    with mode, pytest.raises(RuntimeError, match="cuda"):  # the previous mask's host scalar
        unstructured_mask(torch.randn(6, 8, device="cuda"), 0.5, "layer")


@pytest.mark.parametrize("capturing", [False, True])
def test_sara_auto_solver_is_qdwh_only_inside_a_capture(capturing, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    net = step_model(SaRA(density=0.2, nuclear=1e-2))
    mode = fake_cuda(net)
    with mode, torch.no_grad(), HostSyncWatch() as watch:
        adapters.adapter_regularization(net)
    ops = {name for name, _ in watch.ops}
    assert ("linalg_cholesky_ex" in ops) == capturing  # QDWH
    assert ("_linalg_eigh" in ops) != capturing  # economy_svd's CUDA route: eager steps as before


def test_sara_svd_solver_is_refused_while_capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    net = step_model(SaRA(density=0.2, nuclear=1e-2, nuclear_solver="svd"))
    mode = fake_cuda(net)
    with mode, pytest.raises(WeightsmithError, match="nuclear_solver='svd'.*CUDA graph"):
        adapters.adapter_regularization(net)


# ---------------------------------------------------------------------------------- PST: exactness


def previous_pruned(a: pst_adapter.PSTAdapter, W0: torch.Tensor, level: float) -> torch.Tensor:
    """The previous implementation: ``unstructured_mask`` (a ``topk`` of the level's count)."""
    W = a.updated(W0)
    if level <= 0:
        return W
    S = a.importance(W, W0)
    return straight_through(unstructured_mask(S.detach(), level, a.scope), S) * W


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_pst_equals_the_previous_mask_at_every_level_of_the_ramp(scope):
    net = step_model(PST(sparsity=0.6, rank=2, score_rank=2, ramp=0.5, prune_scope=scope))
    ((_, layer), _) = adapters.adapted_layers(net)
    a = layer.adapters["default"]
    W0 = layer.base.weight.detach()
    x, g = torch.randn(7, 24), torch.randn(7, 16)
    for step in range(-1, 7):  # level 0 (before any step), the ramp, then the final sparsity
        if step >= 0:
            a.on_train_step(step, 10)
        params = list(a.parameters())
        got = a(x, W0, None)
        want = x @ previous_pruned(a, W0, a.level).T
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        g_got = torch.autograd.grad((got * g).sum(), params, allow_unused=True)
        g_want = torch.autograd.grad((want * g).sum(), params, allow_unused=True)
        for n, (u, v) in enumerate(zip(g_got, g_want, strict=True)):
            assert (u is None) == (v is None), (step, n)
            if u is not None:
                torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)
    assert a.level == 0.6
    torch.testing.assert_close(a.merge(W0), previous_pruned(a, W0, 0.6).detach(), rtol=0, atol=0)


def test_pst_level_is_a_device_counter_written_in_place():
    net = step_model(PST(sparsity=0.5, rank=2, score_rank=2, ramp=0.5))
    ((_, layer), _) = adapters.adapted_layers(net)
    a = layer.adapters["default"]
    where = a.drop.data_ptr()
    for step in range(6):
        a.on_train_step(step, 10)
        assert a.drop.data_ptr() == where and int(a.drop) == int(16 * 24 * a.level)
    with pytest.raises(WeightsmithError, match="level"):
        a.level = 0.7  # above the final sparsity: the fixed-size top-k would be too short


def test_pst_captured_path_has_the_same_ops_at_every_level(monkeypatch):
    """While capturing, the forward and backward launch the same ops with the same shapes at level 0,
    on the ramp and at the end (a replay reads the new level from ``drop``), and compute that level."""
    monkeypatch.setattr(pst_adapter, "capturing", lambda t: True)
    net = step_model(PST(sparsity=0.5, rank=2, score_rank=2, ramp=0.5))
    ((_, layer), _) = adapters.adapted_layers(net)
    a = layer.adapters["default"]
    W0 = layer.base.weight.detach()
    x = torch.randn(4, 24)
    traces = []
    for step in (None, 0, 1, 9):
        if step is not None:
            a.on_train_step(step, 10)
        with HostSyncWatch() as watch:
            y = a(x, W0, None)
            y.square().sum().backward()
        traces.append(watch.ops)
        kept = (a.pruned(W0).detach() != 0).sum()
        assert int(kept) == 16 * 24 - int(16 * 24 * a.level)
        a.zero_grad(set_to_none=True)
    assert all(t == traces[0] for t in traces[1:])


# -------------------------------------------------------------------------------- SaRA: exactness


def test_polar_nuclear_by_hand():
    # diag(3, -4, 0) padded: σ = (4, 3, 0); U Vᵀ = diag(1, -1, 0) (zero on the null direction), ‖A‖_* = 7
    A = torch.zeros(4, 3)
    A[0, 0], A[1, 1] = 3.0, -4.0
    want = torch.zeros(4, 3)
    want[0, 0], want[1, 1] = 1.0, -1.0
    for M, P in ((A, want), (A.T, want.T)):
        polar, value = polar_nuclear(M)
        torch.testing.assert_close(polar, P, rtol=0, atol=1e-7)
        assert float(value) == pytest.approx(7.0, rel=1e-7)
    polar, value = polar_nuclear(torch.zeros(5, 3))  # ΔW = 0 at the start of SaRA: subgradient 0
    assert float(value) == 0.0 and not polar.any()


def sparse_update(shape: tuple[int, int], seed: int, density: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(shape, generator=g)
    support = W0.abs().flatten().argsort()[: int(density * W0.numel())]  # SaRA's smallest |W0|
    dW = torch.zeros(W0.numel())
    dW[support] = torch.randn(support.numel(), generator=g) * 1e-3
    return dW.view(shape)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (64, 64)])
def test_qdwh_value_and_gradient_equal_the_svd(shape):
    A = sparse_update(shape, seed=shape[0] + shape[1])
    G = torch.randn(shape)
    a1, a2 = A.clone().requires_grad_(), A.clone().requires_grad_()
    v1, v2 = nuclear_norm(a1, "qdwh"), torch.linalg.svdvals(a2).sum()
    (v1 * (G * a1).sum()).backward()  # the product rule: value and U Vᵀ both enter the gradient
    (v2 * (G * a2).sum()).backward()
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-7)


def test_qdwh_with_empty_rows_agrees_on_the_support():
    """A small support can leave rows of ΔW empty (SmolLM2's q_proj at rank_budget 8: 14 of 576): σ = 0
    there, where LAPACK's U Vᵀ has arbitrary unit directions and QDWH zero. Both are subgradients and
    they agree on the support, which is all SaRA's values see."""
    A = sparse_update((40, 30), seed=5)
    A[[3, 17]] = 0
    a1, a2 = A.clone().requires_grad_(), A.double().requires_grad_()  # against a float64 SVD
    nuclear_norm(a1, "qdwh").backward()
    torch.linalg.svdvals(a2).sum().backward()
    on = A != 0
    torch.testing.assert_close(a1.grad[on], a2.grad[on].float(), rtol=1e-5, atol=1e-7)
    assert not a1.grad[[3, 17]].any()


def test_qdwh_on_an_ill_conditioned_matrix():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))[0]
    A = (U * torch.logspace(0, -6, 40, dtype=torch.float64)) @ V.T  # condition number 1e6
    polar, value = polar_nuclear(A)
    torch.testing.assert_close(polar, U @ V.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(value, torch.logspace(0, -6, 40, dtype=torch.float64).sum(), rtol=1e-9, atol=0)


def test_sara_penalty_with_qdwh_equals_the_svd_penalty():
    nets = [step_model(SaRA(density=0.25, nuclear=0.3, nuclear_solver=s)) for s in ("svd", "qdwh")]
    grads = []
    for net in nets:
        reg = adapters.adapter_regularization(net)
        reg.backward()
        grads.append((reg.detach(), [p.grad for p in adapters.adapter_parameters(net)]))
    (r1, g1), (r2, g2) = grads
    torch.testing.assert_close(r1, r2, rtol=1e-6, atol=0)
    for u, v in zip(g1, g2, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


def test_sara_reselection_zeroes_moments_at_once_for_a_seen_optimizer():
    """With the optimizer step inside a CUDA graph no optimizer hook runs at replay: re-selection (eager,
    between replays) zeroes the entering slots' moments in place itself, once an eager step has shown
    which optimizer holds the values; nothing is left queued for a hook."""
    from weightsmith.adapters import sara

    net = step_model(SaRA(density=0.25, nuclear=0.0, reselect_every=1))
    ((_, layer), _) = adapters.adapted_layers(net)
    a = layer.adapters["default"]
    opt = torch.optim.AdamW(adapters.adapter_parameters(net), lr=1e-2)
    x = torch.randn(5, 24)
    for _ in range(2):  # eager steps (GraphedStep's warm-up and capture run the hooks too)
        forward_backward(net, x)
        opt.step()
        opt.zero_grad()
    state = opt.state[a.values]
    where = {k: t.data_ptr() for k, t in state.items()}
    slots = a.reselect(layer.base.weight.detach())
    assert slots.numel() > 0 and a not in sara._PENDING
    for name in ("exp_avg", "exp_avg_sq"):
        assert not state[name][slots].any() and state[name].data_ptr() == where[name]
    kept = torch.ones_like(a.values, dtype=torch.bool)
    kept[slots] = False
    assert state["exp_avg"][kept].all()


def test_sara_bad_nuclear_solver_names_the_option():
    net = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(WeightsmithError, match="nuclear_solver"):
        adapters.adapt(net, SaRA(nuclear_solver="eigh"), targets=None)
    with pytest.raises(WeightsmithError, match="nuclear_solver"):
        nuclear_norm(torch.ones(3, 2), "eigh")


# ----------------------------------------------------------------------------------- on a GPU


def tiny_llama_adapted(cfg: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)  # fmt: skip
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = nn.Module.to(LlamaForCausalLM(conf), "cuda")
    adapters.adapt(model, cfg, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith((".B", ".values")):
                p.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(1))
    return model.train()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "cfg",
    [
        PST(sparsity=0.5, rank=4, score_rank=2, ramp=0.5),
        SaRA(density=0.1, nuclear=1e-2),
        SaRA(density=0.1, nuclear=1e-2, reselect_every=2),
    ],
    ids=["pst-ramp", "sara-auto", "sara-reselect"],
)
def test_graphed_step_equals_eager_on_a_gpu(cfg):
    """The whole step captured once and replayed follows the eager run while PST's level rises and while
    SaRA re-selects its support between replays (fresh moments without an optimizer hook)."""
    from weightsmith.train.cuda_graph import GraphedStep, unpacked_sequences

    ref = tiny_llama_adapted(cfg)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g).cuda()} for _ in range(5)]

    def loss_of(m: nn.Module, b: dict[str, Any]) -> torch.Tensor:
        with unpacked_sequences():
            ids = b["input_ids"]
            out = m(input_ids=ids, labels=ids, use_cache=False).loss
        return out + adapters.adapter_regularization(m)  # type: ignore[no-any-return]

    def params(m: nn.Module) -> list[torch.Tensor]:
        return [p for p in m.parameters() if p.requires_grad]

    opt = torch.optim.AdamW(params(ref), lr=1e-2)
    for i, b in enumerate(data):
        loss_of(ref, b).backward()
        opt.step()
        adapters.adapter_step(ref, i, 10)
        opt.zero_grad(set_to_none=True)
    gopt = torch.optim.AdamW(params(model), lr=1e-2, capturable=True)
    step = GraphedStep(model, gopt, loss_of, data[0], warmup=1)
    for i, b in enumerate(data):
        step(b)
        adapters.adapter_step(model, i, 10)
        gopt.zero_grad(set_to_none=True)
    assert step.captured == 1
    for a, b in zip(params(ref), params(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
