"""Exact LoRA merging vs PEFT's add_weighted_adapter: PEFT's ``linear`` mode is not the weighted sum of
the updates (cross terms B_i A_j); rank concatenation (ours, and PEFT's ``cat``) is."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from weightsmith.merge.lora_merge import load_adapter, merge_adapters
from weightsmith.store import open_store

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 10)
        self.v = nn.Linear(12, 8)


def lora_pair(tmp_path):
    """Two saved PEFT LoRA adapters (different ranks/alphas, nonzero B) on one tiny base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Tiny()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i, (r, alpha) in enumerate([(2, 4), (3, 3)]):
        m = get_peft_model(Tiny(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"]))
        m.base_model.model.load_state_dict(base_state, strict=False)
        g = torch.Generator().manual_seed(10 + i)
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        m.save_pretrained(tmp_path / f"ad{i}")
        paths.append(tmp_path / f"ad{i}")
    return base_state, paths


def exact_sum(paths, weights):
    ads = [load_adapter(p) for p in paths]
    return {
        n: sum(w * a.modules[n].delta() for a, w in zip(ads, weights, strict=True)) for n in ads[0].modules
    }


def peft_combined_delta(base_state, paths, weights, combination):
    from peft import PeftModel

    base = Tiny()
    base.load_state_dict(base_state)
    model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0")
    model.load_adapter(str(paths[1]), adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type=combination)
    out = {}
    for mod in ("q", "v"):
        layer = getattr(model.base_model.model, mod)
        out[f"{mod}.weight"] = layer.get_delta_weight("mix").detach()
    return out


def test_peft_linear_is_not_the_weighted_sum_but_concat_is(tmp_path):
    base_state, paths = lora_pair(tmp_path)
    w = [0.6, 0.4]
    exact = exact_sum(paths, w)
    # PEFT's "linear" needs equal ranks: make the second adapter rank 2 too, then compare
    _, same_rank = lora_pair_equal_rank(tmp_path)
    lin = peft_combined_delta(base_state, same_rank, w, "linear")
    exact_same = exact_sum(same_rank, w)
    gap = max(float((lin[k] - exact_same[k]).abs().max()) for k in lin)
    assert gap > 1e-2  # cross terms: not the weighted sum of the adapters' updates
    cat = peft_combined_delta(base_state, paths, w, "cat")
    out = merge_adapters(paths, tmp_path / "merged", w, mode="concat")
    ours = load_adapter(out)
    for k in exact:
        torch.testing.assert_close(ours.modules[k].delta(), exact[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cat[k], exact[k], rtol=1e-5, atol=1e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5


def lora_pair_equal_rank(tmp_path):
    sub = tmp_path / "eq"
    sub.mkdir()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    paths = []
    for i in range(2):
        m = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
        g = torch.Generator().manual_seed(20 + i)
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        m.save_pretrained(sub / f"ad{i}")
        paths.append(sub / f"ad{i}")
    return base_state, paths


def test_our_concat_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    base_state, paths = lora_pair(tmp_path)
    out = merge_adapters(paths, tmp_path / "merged", [1.0, -0.5])
    base = Tiny()
    base.load_state_dict(base_state)
    model = PeftModel.from_pretrained(base, str(out))
    exact = exact_sum(paths, [1.0, -0.5])
    for mod in ("q", "v"):
        got = getattr(model.base_model.model, mod).get_delta_weight("default")
        torch.testing.assert_close(got, exact[f"{mod}.weight"], rtol=1e-5, atol=1e-6)


def test_dense_mode_merges_into_the_base(tmp_path):
    from safetensors.torch import save_file

    base_state, paths = lora_pair(tmp_path)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base_state, str(base_dir / "model.safetensors"))
    out = merge_adapters(paths, tmp_path / "dense", [0.5, 2.0], mode="dense", base=base_dir)
    got = open_store(out)
    exact = exact_sum(paths, [0.5, 2.0])
    for k in base_state:
        want = base_state[k] + exact[k] if k in exact else base_state[k]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
