"""The injected optimizer: factories, the head's own rate, bit-exact resume of custom state, full
fine-tuning with a custom optimizer, and optimizers that update inside backward."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from weightsmith.adapters.lora import LoRA
from weightsmith.errors import WeightsmithError
from weightsmith.tasks import Task
from weightsmith.train import (
    OptimizerFactory,
    TrainingDiverged,
    UpdatesInBackward,
    adamw_factory,
    finetune,
    loop,
)
from weightsmith.train.optimizer import separate_head

torch.set_num_threads(1)
TINY = {"max_examples": 16, "eval_examples": 8, "max_len": 16, "batch_size": 8}


class NoisyMomentum(torch.optim.Optimizer):
    """SGD with momentum plus a seeded random tensor per parameter kept in the state (like a projector),
    a step counter tensor, integer indices, a float64 accumulator and a plain int: everything a checkpoint
    must give back bit for bit (torch's ``load_state_dict`` alone would cast the last two to float32)."""

    def __init__(self, params, lr: float, beta: float = 0.9, seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "seed": seed})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    gen = torch.Generator().manual_seed(group["seed"] + len(self.state))
                    st["noise"] = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
                    st["buf"] = torch.zeros_like(p)
                    st["t"] = torch.zeros((), dtype=torch.float32)
                    st["refreshes"] = 0
                    st["perm"] = torch.randperm(p.shape[0], generator=gen)
                    st["acc64"] = torch.zeros(p.shape, dtype=torch.float64)
                st["t"] += 1
                st["acc64"].add_(p.grad.double() / 3)
                st["perm"] = st["perm"].roll(1)
                st["buf"].mul_(group["beta"]).add_(
                    p.grad + st["noise"] * st["t"] + 1e-3 * st["acc64"].float()
                )
                st["buf"].add_(1e-4 * st["perm"][0].float())
                if int(st["t"]) % 2 == 0:
                    st["noise"] = st["noise"].roll(1, 0)
                    st["refreshes"] += 1
                p.add_(st["buf"], alpha=-group["lr"])


def noisy(named, lr):
    return NoisyMomentum([p for _, p in named], lr=lr)


def _interrupt_after(monkeypatch, calls: int) -> None:
    original = Task.loss
    count = {"n": 0}

    def loss(self, model, batch):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(Task, "loss", loss)


def test_factory_gets_named_trainable_params_and_lr_and_head_keeps_its_rate(tmp_path):
    seen = {}

    def factory(named, lr):
        seen["names"], seen["lr"] = [n for n, _ in named], lr
        opt = adamw_factory(named, lr)
        seen["opt"] = opt
        return opt

    finetune(
        "minilm",
        "rotten_tomatoes",
        LoRA(rank=2),
        optimizer=factory,
        lr=1e-3,
        head_lr=5e-3,
        max_steps=1,
        **TINY,
    )
    assert seen["lr"] == 1e-3
    assert "head.weight" in seen["names"] and all(
        n.endswith((".A", ".B")) or n.startswith("head.") for n in seen["names"]
    )
    groups = seen["opt"].param_groups
    assert len(groups) == 2 and [g["initial_lr"] for g in groups] == [1e-3, 5e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in seen["opt"].param_groups[1]["params"]}
    assert len(groups[1]["params"]) == 2  # head weight and bias


def test_separate_head_moves_only_shared_groups():
    body, head_w, head_b = (
        nn.Parameter(torch.zeros(2)),
        nn.Parameter(torch.zeros(2)),
        nn.Parameter(torch.zeros(1)),
    )
    opt = torch.optim.SGD(
        [{"params": [body, head_w], "momentum": 0.5}, {"params": [head_b], "lr": 0.3}], lr=0.1
    )
    separate_head(opt, [head_w, head_b], head_lr=0.7)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1]
    assert opt.param_groups[0]["params"][0] is body and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[1]["lr"] == 0.3  # a group of only head parameters is the factory's choice
    moved = opt.param_groups[2]
    assert moved["params"][0] is head_w and moved["lr"] == 0.7 and moved["momentum"] == 0.5


def test_default_optimizer_is_adamw_factory():
    a = finetune("minilm", "rotten_tomatoes", "head", max_steps=2, weight_decay=0.01, **TINY)
    b = finetune(
        "minilm",
        "rotten_tomatoes",
        "head",
        max_steps=2,
        optimizer=functools.partial(adamw_factory, weight_decay=0.01),
        **TINY,
    )
    assert a.loss_history == b.loss_history and a.metric == b.metric
    with pytest.raises(WeightsmithError, match="--weight-decay belongs to the default AdamW"):
        finetune("minilm", "rotten_tomatoes", "head", optimizer=noisy, weight_decay=0.1, **TINY)


def test_resume_restores_custom_optimizer_state_bit_exactly(tmp_path, monkeypatch):
    kw = dict(max_steps=4, checkpoint_every=2, seed=1, optimizer=noisy, lr=1e-3, **TINY)
    whole = finetune("minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "a", **kw)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)  # killed in step 3, after the step-2 checkpoint
        with pytest.raises(KeyboardInterrupt):
            finetune("minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "b", **kw)
    saved = torch.load(tmp_path / "b" / "checkpoint" / "optim.pt", weights_only=True)["optimizer"]
    keys = {"noise", "buf", "t", "refreshes", "perm", "acc64"}
    assert saved["state"] and all(keys <= set(s) for s in saved["state"].values())

    restored = {}
    original_load = loop.load_checkpoint

    def spy(ckpt, model, keys, opt, sched):
        meta = original_load(ckpt, model, keys, opt, sched)
        restored["sd"] = copy.deepcopy(opt.state_dict())  # the live state changes as training goes on
        return meta

    monkeypatch.setattr(loop, "load_checkpoint", spy)
    resumed = finetune("minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "b", resume=True, **kw)
    got = restored["sd"]
    assert got["param_groups"] == saved["param_groups"]
    for i, st in saved["state"].items():
        for k, v in st.items():
            g = got["state"][i][k]
            assert (torch.equal(g, v) and g.dtype == v.dtype) if torch.is_tensor(v) else g == v, (i, k, g, v)
    assert resumed.loss_history == whole.loss_history and resumed.metric == whole.metric
    a = load_file(str(tmp_path / "a" / "adapter" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["optimizer"]["name"].endswith("NoisyMomentum") and run["optimizer"]["defaults"]["beta"] == 0.9


def test_resume_with_another_optimizer_is_refused(tmp_path, monkeypatch):
    kw = dict(max_steps=3, checkpoint_every=1, lr=1e-3, **TINY)
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            finetune("minilm", "rotten_tomatoes", "head", out=tmp_path / "r", optimizer=noisy, **kw)
    with pytest.raises(WeightsmithError, match="trained with optimizer .*NoisyMomentum"):
        finetune("minilm", "rotten_tomatoes", "head", out=tmp_path / "r", resume=True, **kw)


def test_full_fine_tuning_with_injected_optimizer(tmp_path, minilm):
    base, _ = minilm
    names = []

    def sgd(named, lr):
        names.extend(n for n, _ in named)
        return torch.optim.SGD([p for _, p in named], lr=lr)

    r = finetune(
        "minilm", "debates", "full", optimizer=sgd, out=tmp_path / "full", lr=0.05, max_steps=1, **TINY
    )
    assert r.method == "full" and len(names) == len(list(base.parameters())) + 2
    from transformers import AutoModel

    tuned = AutoModel.from_pretrained(tmp_path / "full" / "model").state_dict()
    ref = base.state_dict()
    assert any(not torch.equal(tuned[k], ref[k]) for k in ref), "the injected optimizer changed no weight"
    run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["optimizer"]["name"] == "torch.optim.sgd.SGD"


class InBackwardSGD(torch.optim.Optimizer):
    """Plain SGD applied from post-accumulate-grad hooks (per-layer updates inside backward)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.armed: list[bool] = []
        self.steps_called = 0
        for group in self.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(functools.partial(self._hook, group))

    def step_in_backward(self, enabled: bool) -> None:
        self.armed.append(enabled)

    @torch.no_grad()
    def _hook(self, group, p):
        if self.armed[-1]:
            p.add_(p.grad, alpha=-group["lr"])
            p.grad = None

    def step(self, closure=None):
        self.steps_called += 1


def test_updates_inside_backward_with_gradient_accumulation():
    made = {}

    def in_backward(named, lr):
        made["opt"] = InBackwardSGD([p for _, p in named], lr=lr)
        return made["opt"]

    def plain(named, lr):
        return torch.optim.SGD([p for _, p in named], lr=lr)

    assert isinstance(InBackwardSGD([nn.Parameter(torch.zeros(1))], 0.1), UpdatesInBackward)
    assert not isinstance(torch.optim.SGD([nn.Parameter(torch.zeros(1))], 0.1), UpdatesInBackward)
    kw = dict(lr=0.05, head_lr=0.05, grad_accum=2, epochs=1, max_grad_norm=None, **{**TINY, "batch_size": 4})
    a = finetune("minilm", "rotten_tomatoes", LoRA(rank=2), optimizer=in_backward, **kw)
    b = finetune("minilm", "rotten_tomatoes", LoRA(rank=2), optimizer=plain, **kw)
    opt = made["opt"]
    # 4 micro-batches, 2 steps; step() still called once a step, after the pass that consumed the gradients
    # (so that the learning-rate scheduler sees the usual order)
    assert opt.armed == [False, True, False, True] and opt.steps_called == 2
    assert a.steps == b.steps == 2 and a.loss_history == b.loss_history and a.metric == b.metric


def test_non_finite_weights_after_a_step_never_reach_a_checkpoint(tmp_path):
    class Poison(torch.optim.SGD):
        calls = 0

        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            Poison.calls += 1
            if Poison.calls == 2:
                self.param_groups[0]["params"][0].fill_(float("inf"))

    factory: OptimizerFactory = lambda named, lr: Poison([p for _, p in named], lr=lr)  # noqa: E731
    with pytest.raises(TrainingDiverged, match=r"step 2 .*not finite.*step 1\) is kept"):
        finetune(
            "minilm",
            "rotten_tomatoes",
            "head",
            out=tmp_path / "run",
            optimizer=factory,
            max_steps=4,
            checkpoint_every=1,
            **TINY,
        )
    meta = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 1
    state = load_file(str(tmp_path / "run" / "checkpoint" / "state.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
