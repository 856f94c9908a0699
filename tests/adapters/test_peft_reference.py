"""Reference numerics against Hugging Face PEFT 0.21 on the same initialisation.

LoRA / rsLoRA (Linear, GPT-2 Conv1D, Embedding), DoRA, PiSSA and AdaLoRA: copy PEFT's tensors into
ours, then compare outputs, gradients, merged weights, saved files and AdaLoRA's rank allocation.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from weightsmith import adapters
from weightsmith.adapters.adalora import AdaLoRA
from weightsmith.adapters.dora import DoRA
from weightsmith.adapters.lora import LoRA
from weightsmith.adapters.pissa import PiSSA

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 24)
        self.l1 = nn.Linear(24, 20)
        self.c1 = Conv1D(16, 20)
        self.l2 = nn.Linear(16, 12)
        with torch.no_grad():
            self.c1.weight.normal_(std=0.2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.c1(torch.tanh(self.l1(self.emb(ids))))))


IDS = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(1))
LINEAR = ("l1", "c1", "l2")


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def copy_lora_from_peft(pm, ours, names, dora=False):
    with torch.no_grad():
        for n in names:
            p, a = peft_layer(pm, n), ours.get_submodule(n).adapters["default"]
            if n == "emb":
                a.B.copy_(p.lora_embedding_A["default"].T)
                a.A.copy_(p.lora_embedding_B["default"].T)
            else:
                a.A.copy_(p.lora_A["default"].weight)
                a.B.copy_(p.lora_B["default"].weight)
            if dora:
                a.m.copy_(p.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_outputs_merge_and_files_match_peft(rslora, tmp_path):
    base = Toy()
    names = ("emb", *LINEAR)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(names), init_lora_weights=False, use_rslora=rslora
    )
    pm = get_peft_model(copy.deepcopy(base), cfg)
    ours = copy.deepcopy(base)
    adapters.adapt(ours, LoRA(rank=4, alpha=8, rslora=rslora), targets=",".join(names))
    copy_lora_from_peft(pm, ours, names)
    y = pm(IDS)
    assert torch.allclose(ours(IDS), y, atol=1e-6)
    # files: to_peft writes what save_pretrained writes, and PEFT loads ours to the same outputs
    pm.save_pretrained(tmp_path / "peft")
    adapters.to_peft(ours, tmp_path / "ours")
    theirs, mine = (
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
    )
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    c_theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    c_mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora"):
        assert c_mine[key] == c_theirs[key], key
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(loaded(IDS), y, atol=1e-6)
    # and ours imports PEFT's directory
    back = copy.deepcopy(base)
    adapters.from_peft(back, tmp_path / "peft")
    assert torch.allclose(back(IDS), y, atol=1e-6)
    # merged weights
    merged = pm.merge_and_unload().state_dict()
    adapters.merge_adapters(ours)
    mine_sd = adapters.base_state_dict(ours)
    assert merged.keys() == mine_sd.keys()
    for k in merged:
        assert torch.allclose(merged[k], mine_sd[k], atol=1e-6), k


def test_dora_outputs_gradients_and_merge_match_peft(tmp_path):
    base = Toy()
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=list(LINEAR), init_lora_weights=False, use_dora=True)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    ours = copy.deepcopy(base)
    adapters.adapt(ours, DoRA(rank=3, alpha=6), targets=",".join(LINEAR))
    copy_lora_from_peft(pm, ours, LINEAR, dora=True)
    y_p, y_o = pm(IDS), ours(IDS)
    assert torch.allclose(y_o, y_p, atol=1e-5)
    y_p.square().sum().backward()
    y_o.square().sum().backward()
    for n in LINEAR:
        p, a = peft_layer(pm, n), ours.get_submodule(n).adapters["default"]
        assert torch.allclose(a.A.grad, p.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
        assert torch.allclose(a.B.grad, p.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)
        assert torch.allclose(a.m.grad, p.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-5)
    adapters.to_peft(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(loaded(IDS), y_p, atol=1e-5)
    merged = pm.merge_and_unload().state_dict()
    adapters.merge_adapters(ours)
    mine = adapters.base_state_dict(ours)
    for k in merged:
        assert torch.allclose(merged[k], mine[k], atol=1e-5), k


def test_pissa_init_and_training_match_peft(tmp_path):
    base = Toy()
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=list(LINEAR), init_lora_weights="pissa")
    pm = get_peft_model(copy.deepcopy(base), cfg)
    ours = copy.deepcopy(base)
    adapters.adapt(ours, PiSSA(rank=3, alpha=6), targets=",".join(LINEAR))
    for n in LINEAR:
        p, a = peft_layer(pm, n), ours.get_submodule(n).adapters["default"]
        assert torch.allclose(a.A, p.lora_A["default"].weight, atol=1e-5)
        assert torch.allclose(a.B, p.lora_B["default"].weight, atol=1e-5)
    assert torch.allclose(ours(IDS), pm(IDS), atol=1e-5)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n in LINEAR:
            p, a = peft_layer(pm, n), ours.get_submodule(n).adapters["default"]
            dA, dB = torch.randn(a.A.shape, generator=g) * 0.1, torch.randn(a.B.shape, generator=g) * 0.1
            a.A.add_(dA)
            a.B.add_(dB)
            p.lora_A["default"].weight.add_(dA)
            p.lora_B["default"].weight.add_(dB)
    y = pm(IDS)
    assert torch.allclose(ours(IDS), y, atol=1e-5)
    # our export is plain rank-2r LoRA on the unmodified base, as PEFT's conversion on save
    adapters.to_peft(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(loaded(IDS), y, atol=1e-5)


class LossToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(16, 20)
        self.l2 = nn.Linear(20, 16)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        out = self.l2(torch.tanh(self.l1(x)))
        return SimpleNamespace(loss=(out - x.flip(1)).square().mean(), out=out)


def test_adalora_allocation_and_training_match_peft():
    T = 24
    base = LossToy()
    cfg = AdaLoraConfig(
        init_r=6, target_r=2, tinit=3, tfinal=4, deltaT=2, total_step=T, lora_alpha=8,
        target_modules=["l1", "l2"], orth_reg_weight=0.3,
    )  # fmt: skip
    pm = get_peft_model(copy.deepcopy(base), cfg)
    ours = copy.deepcopy(base)
    adapters.adapt(
        ours, AdaLoRA(init_rank=6, target_rank=2, tinit=3, tfinal=4, delta_t=2, alpha=8, orth_weight=0.3),
        targets="l1,l2",
    )  # fmt: skip
    with torch.no_grad():
        for n in ("l1", "l2"):
            p, a = peft_layer(pm, n), ours.get_submodule(n).adapters["default"]
            a.P.copy_(p.lora_B["default"])
            a.Q.copy_(p.lora_A["default"])
            a.E.copy_(p.lora_E["default"])
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.2)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.2)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    for step in range(T):
        loss_p = pm.base_model(x).loss  # AdaLoraModel.forward adds the orthogonality term
        loss_o = ours(x).loss + adapters.adapter_regularization(ours)
        assert torch.allclose(loss_o, loss_p, rtol=1e-5), step
        loss_p.backward()
        loss_o.backward()
        opt_p.step()
        opt_o.step()
        pm.base_model.update_and_allocate(step)
        adapters.adapter_step(ours, step, T)
        opt_p.zero_grad()
        opt_o.zero_grad()
        for n in ("l1", "l2"):
            e_p = peft_layer(pm, n).lora_E["default"]
            e_o = ours.get_submodule(n).adapters["default"].E
            assert torch.equal(e_o == 0, e_p == 0), (step, n)
    kept = sum(int((ours.get_submodule(n).adapters["default"].E != 0).sum()) for n in ("l1", "l2"))
    assert kept == 4
    assert torch.allclose(ours(x).out, pm.base_model(x).out, atol=1e-5)
