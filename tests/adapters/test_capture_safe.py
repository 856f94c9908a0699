"""PST and SaRA steps that a CUDA graph can capture (issue 14).

On the CPU: (1) the new paths equal the previous ones (PST's fixed-size mask against
``unstructured_mask`` at every level of the cubic ramp; SaRA's QDWH polar factor against the SVD, by
hand and on sparse updates), forward and every gradient; (2) a dispatch-level watch finds no
host-synchronising op in a step's forward, regularizer and backward (two steps, AdamW between them),
and does find the previous paths' ones; (3) on fake CUDA tensors (shapes only, no GPU) the forward
gives no op a host tensor (a host-to-device copy), with or without CUDA on the machine; (4) PST's path
has the same ops and shapes at every sparsity level, its level living in a device counter written in
place; (5) a CPU model of a CUDA graph (record the ATen ops of one captured step, replay exactly those
ops on exactly the tensors they touched: Python does not run again) gives the same training run as
eager steps while PST's level rises and SaRA re-selects its support. On a GPU: the same with real
graphs.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from weightsmith import adapters
from weightsmith.adapters import pst_adapter, sara
from weightsmith.adapters.pst_adapter import PST, straight_through
from weightsmith.adapters.sara import SaRA, nuclear_norm
from weightsmith.compress._sparse import unstructured_mask
from weightsmith.errors import WeightsmithError
from weightsmith.linalg import polar_nuclear
from weightsmith.train.cuda_graph import GraphedStep, prepare_optimizer, unpacked_sequences

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
    with HostSyncWatch() as watch:  # the mask as unstructured_mask built it before: keep[idx] = False, a
        keep = torch.ones(score.numel(), dtype=torch.bool)  # host scalar copied in
        keep[score.flatten().topk(24, largest=False).indices] = False
    assert watch.found == ["index_put_ of a scalar"]
    with HostSyncWatch() as watch:
        unstructured_mask(score, 0.5, "layer")  # now one fixed-shape scatter (compress/_sparse.ranked_mask)
    assert watch.found == []
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


class HostCopy(AssertionError):
    pass


class HostCopyWatch(TorchDispatchMode):
    """Raises ``HostCopy`` at an op that takes a host tensor into a CUDA one (mixed devices among its
    tensors, a copy to CUDA of a host tensor): a host-to-device copy, which a CUDA graph refuses to
    capture. Entered inside a ``FakeTensorMode``, it sees the op before the fake mode runs it, so it
    decides the same with CUDA on the machine (where fake CUDA ops accept a host 0-dim tensor) or without
    (where they fail for want of CUDA)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        to = kwargs.get("device")
        if "cpu" in devices and ("cuda" in devices or (to is not None and torch.device(to).type == "cuda")):
            raise HostCopy(f"{func}: a host tensor goes to the GPU")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(CAPTURABLE))
def test_forward_on_fake_cuda_copies_nothing_from_the_host(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    net = step_model(CAPTURABLE[name])
    mode = fake_cuda(net)
    with mode, torch.no_grad(), HostCopyWatch():
        y = net(torch.randn(3, 24, device="cuda")).sum() + adapters.adapter_regularization(net)
    assert y.device.type == "cuda"


def test_the_host_copy_watch_finds_host_tensors_on_fake_cuda():
    """``keep[idx] = False`` (the previous mask) on a CUDA tensor hands ``index_put_`` a host 0-dim tensor
    (without CUDA the fake mode fails before that, inside the C++ setitem: written out here instead)."""
    mode = FakeTensorMode()
    with mode:
        keep = torch.ones(6, 8, dtype=torch.bool, device="cuda").view(-1)
        idx = torch.arange(4, device="cuda")
    with mode, HostCopyWatch(), pytest.raises(HostCopy, match="index_put"):
        keep.index_put_((idx,), torch.tensor(False))
    with mode, HostCopyWatch(), pytest.raises(HostCopy, match="_to_copy"):  # t.to("cuda") of a host t
        torch.ops.aten._to_copy.default(torch.ones(2), device=torch.device("cuda"))
    with mode, HostCopyWatch():
        keep.index_fill_(0, idx, False)  # the scalar as a kernel argument: no copy


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
    """The previous implementation (``unstructured_mask``: a ``topk`` of the level's count), taking the
    masked path at level 0 too (an all-ones mask: the straight-through gradient reaches the scores)."""
    W = a.updated(W0)
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


def test_pst_level_zero_is_the_unpruned_weight_and_trains_the_scores():
    """At level 0 the forward value is ``W0 + s B A`` exactly and the scores get ``∂L/∂W' ⊙ W`` (the
    eager step takes the masked path a replayed one takes: the same gradients, the same AdamW state)."""
    net = step_model(PST(sparsity=0.5, rank=2, score_rank=2, ramp=0.5))
    ((_, layer), _) = adapters.adapted_layers(net)
    a = layer.adapters["default"]
    W0 = layer.base.weight.detach()
    assert a.level == 0.0
    W = a.updated(W0)
    torch.testing.assert_close(a.pruned(W0), W, rtol=0, atol=0)
    G = torch.randn(W.shape)
    (a.pruned(W0) * G).sum().backward()
    dS = G * W.detach()  # ∂L/∂M with M = 1
    torch.testing.assert_close(a.score_R.grad, dS.sum(1))
    torch.testing.assert_close(a.score_C.grad, dS.sum(0))
    torch.testing.assert_close(a.score_B.grad, dS @ a.score_A.detach().T)


def test_pst_path_has_the_same_ops_at_every_level():
    """The forward and backward launch the same ops with the same shapes at level 0, on the ramp and at
    the end (a replay reads the new level from ``drop``), and compute that level."""
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


@pytest.mark.parametrize("solver", ["svd", "qdwh"])
def test_rank_deficient_subgradient_is_the_minimum_norm_one(solver):
    """A sparse ΔW of exact rank 2 of 3 with no empty row or column (SaRA's supports are like this):

        A = [[1, 1, 0], [1, 1, 0], [0, 0, 2], [0, 0, 2]],   σ = (2√2, 2, 0),   ‖A‖_* = 2 + 2√2,
        ∂‖A‖_* = U Vᵀ = [[½, ½, 0], [½, ½, 0], [0, 0, 1/√2], [0, 0, 1/√2]]   (nothing on the null pair),

    by hand, from both solvers: the SVD's own null vectors are arbitrary (cut at the numerical rank), so an
    eager SVD step and a captured QDWH step of a rank-deficient SaRA update agree."""
    A = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 2], [0, 0, 2]])
    r = 2**-0.5
    P = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, r], [0, 0, r]])
    for M, want in ((A, P), (A.T, P.T)):  # both orientations
        a = M.clone().requires_grad_()
        value = nuclear_norm(a, solver)
        value.backward()
        assert float(value.detach()) == pytest.approx(2 + 2 * 2**0.5, rel=1e-6)
        torch.testing.assert_close(a.grad, want, rtol=0, atol=1e-6)


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


@pytest.mark.parametrize("copied", [False, True], ids=["built", "deepcopied"])
def test_sara_reselection_zeroes_moments_at_once_for_a_seen_optimizer(copied):
    """With the optimizer step inside a CUDA graph no optimizer hook runs at replay: re-selection (eager,
    between replays) zeroes the entering slots' moments in place itself, once an eager step has shown
    which optimizer holds the values; nothing is left queued for a hook. A deep copy of the model (whose
    adapters ``__init__`` never built) is watched too."""
    net = step_model(SaRA(density=0.25, nuclear=0.0, reselect_every=1))
    if copied:
        net = copy.deepcopy(net)
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


# ------------------------------------------------------------- graphed against eager (CPU model, GPU)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, Any, Any, Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _RecordedStep:
    """The ATen ops of one step with the very tensors they read and wrote (kept alive, as a graph's pool
    keeps its memory). ``replay`` runs each op again on those tensors and writes its result into the
    tensor the op wrote at capture (in-place ops and views write there already): Python scalars, branches
    and attribute look-ups are those of the capture. The first replay is the capture's own step, which
    ran while recording (a CUDA capture runs nothing; ``GraphedStep`` replays right after it)."""

    def __init__(self, ops: list[tuple[Any, Any, Any, Any]]) -> None:
        self.ops, self.replays = ops, 0

    def replay(self) -> None:
        self.replays += 1
        if self.replays == 1:
            return
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                new = func(*args, **kwargs)
                if func.__name__.startswith(("empty", "new_empty")):
                    continue  # no kernel: memory as it is
                for was, now in zip(tree_leaves(out), tree_leaves(new), strict=True):
                    if not isinstance(was, torch.Tensor):
                        continue
                    if was.untyped_storage().data_ptr() != now.untyped_storage().data_ptr():
                        assert was.shape == now.shape, f"{func}: data-dependent shape"
                        was.copy_(now)


class CpuGraphs:
    """A ``GraphBackend`` for :class:`GraphedStep` on the CPU that replays like a CUDA graph: the same
    kernels on the same addresses, no Python. ``recording`` is what ``capturing()`` says meanwhile."""

    def __init__(self) -> None:
        self.recording = False

    def check(self, device: torch.device) -> None:
        pass

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        prepare_optimizer(optimizer)  # capturable: AdamW's step count and bias correction as tensors

    def eager(self, fn: Any, watch: bool = False) -> Any:
        return fn()

    def capture(self, fn: Any) -> _RecordedStep:
        recorder, self.recording = _Recorder(), True
        try:
            with recorder:
                fn()
        finally:
            self.recording = False
        return _RecordedStep(recorder.ops)


@pytest.fixture
def cpu_graphs(monkeypatch: pytest.MonkeyPatch) -> CpuGraphs:
    import importlib

    backend = CpuGraphs()
    monkeypatch.setattr(sara, "capturing", lambda t: backend.recording)
    adam = importlib.import_module("torch.optim.adam")  # capturable AdamW on CPU tensors (as on CUDA)
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", "cuda"])
    return backend


def test_the_cpu_graph_replays_kernels_not_python(cpu_graphs):
    """The model can fail: after capture an in-place write is followed, a new Python float or a rebound
    buffer is not (the graph keeps the captured ones), exactly as with a CUDA graph."""

    class Toy(nn.Module):
        shift: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.scale = 1.0
            self.register_buffer("shift", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return ((self.w * self.scale + self.shift) * x).sum()

    toy, x = Toy(), {"x": torch.tensor([1.0, 2.0, 3.0])}
    step = GraphedStep(toy, None, lambda m, b: m(b["x"]), x, warmup=1, backend=cpu_graphs)
    assert [float(step(x)) for _ in range(3)] == [6.0, 6.0, 6.0]  # eager, capture, replay
    toy.shift.fill_(1.0)
    assert float(step(x)) == 12.0 and float(toy(x["x"]).detach()) == 12.0
    toy.scale = 2.0
    assert float(step(x)) == 12.0 and float(toy(x["x"]).detach()) == 18.0
    toy.shift = torch.full((3,), 5.0)
    assert float(step(x)) == 12.0 and float(toy(x["x"]).detach()) == 42.0


def tiny_llama_adapted(cfg: Any, device: str, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(hidden_size=32, num_hidden_layers=layers, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)  # fmt: skip
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = nn.Module.to(LlamaForCausalLM(conf), device)
    adapters.adapt(model, cfg, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith((".B", ".values")):
                p.normal_(0, 0.02, generator=torch.Generator(device).manual_seed(1))
    return model.train()


def graphed_equals_eager(cfg: Any, device: str, backend: Any = None, layers: int = 2) -> None:
    """Five AdamW steps of a tiny adapted Llama, eager against one graph captured at the second step and
    replayed after it, ``adapter_step`` between steps (PST's level rises, SaRA re-selects at steps 2, 4).
    The graphed model is a ``deepcopy`` of the eager one, as a user's copy would be."""
    ref = tiny_llama_adapted(cfg, device, layers)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g).to(device)} for _ in range(5)]

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
    step = GraphedStep(model, gopt, loss_of, data[0], warmup=1, backend=backend)
    for i, b in enumerate(data):
        step(b)
        adapters.adapter_step(model, i, 10)
        gopt.zero_grad(set_to_none=True)
    assert step.captured == 1
    for want, got in zip(params(ref), params(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


GRAPHED = {
    "pst-ramp": PST(sparsity=0.5, rank=4, score_rank=2, ramp=0.5),
    "sara-auto": SaRA(density=0.1, nuclear=1e-2),
    "sara-reselect": SaRA(density=0.1, nuclear=1e-2, reselect_every=2),
}


@pytest.mark.parametrize("name", sorted(GRAPHED))
def test_graphed_step_equals_eager_on_the_cpu_graph_model(name, cpu_graphs):
    """Before the fixes this failed as the H200 did: PST's eager level-0 step gave the scores no gradient,
    so AdamW built their state inside the capture, whose zero-fill every replay repeats (max 0.043); a
    deep-copied SaRA adapter was not watched for its optimizer, so re-selection left its moments (0.022)."""
    graphed_equals_eager(GRAPHED[name], "cpu", cpu_graphs, layers=1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(GRAPHED))
def test_graphed_step_equals_eager_on_a_gpu(name):
    """The whole step captured once and replayed follows the eager run while PST's level rises and while
    SaRA re-selects its support between replays (fresh moments without an optimizer hook)."""
    graphed_equals_eager(GRAPHED[name], "cuda")
