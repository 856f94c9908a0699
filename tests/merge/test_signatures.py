"""Robust Weight Signatures (Cai et al., ICML 2023): extraction by hand, storage, exact removal."""

from __future__ import annotations

import pytest
import torch

from weightsmith import zoo
from weightsmith.errors import WeightsmithError
from weightsmith.merge.signatures import (
    apply_signature,
    extract_signature,
    load_signature,
    remove_signature,
    save_signature,
    shallow_names,
)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    m = zoo.CNN(8, 2, channels=(6, 8), hidden=16)
    clean = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    robust = {
        k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
        for k, v in clean.items()
    }
    return clean, robust


def test_shallow_names_takes_first_layers_with_their_norms():
    clean, _ = _pair()
    assert shallow_names(clean, 1) == [
        "conv1.weight",
        "conv1.bias",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
    ]
    assert "conv2.weight" in shallow_names(clean, 2) and "fc1.weight" not in shallow_names(clean, 2)


def test_full_rank_8bit_signature_matches_hand_delta():
    clean, robust = _pair()
    sig = extract_signature(robust, clean, layers=["conv1.weight", "bn1.bias"], rank=100, bits=8)
    dense = sig.dense()
    for name in ("conv1.weight", "bn1.bias"):
        delta = robust[name] - clean[name]
        # 8-bit rounding error is at most half a step of the per-component scale
        assert (dense[name] - delta).abs().max() < 0.02 * delta.abs().max() + 1e-7
    assert set(dense) == {"conv1.weight", "bn1.bias"}


def test_projected_mode_is_orthogonal_to_clean_task_vector():
    clean, robust = _pair()
    g = torch.Generator().manual_seed(5)
    base = {
        k: v - 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in clean.items()
    }
    sig = extract_signature(robust, clean, layers=["fc2.bias"], rank=4, bits=8, base=base)
    tc, ts = robust["fc2.bias"] - base["fc2.bias"], clean["fc2.bias"] - base["fc2.bias"]
    hand = tc - (tc @ ts) / (ts @ ts) * ts  # Gram-Schmidt worked out directly
    assert abs(float(hand @ ts)) < 1e-5
    torch.testing.assert_close(sig.dense()["fc2.bias"], hand, atol=float(hand.abs().max()) / 100, rtol=0)


def test_low_rank_is_the_truncated_svd():
    clean, robust = _pair()
    sig = extract_signature(robust, clean, layers=["conv2.weight"], rank=2, bits=8)
    d = (robust["conv2.weight"] - clean["conv2.weight"]).reshape(8, -1)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    best2 = (U[:, :2] * S[:2]) @ Vh[:2]
    got = sig.dense()["conv2.weight"].reshape(8, -1)
    assert (got - best2).norm() < 0.02 * best2.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strength", [0.5, 1.0, 0.3])
def test_apply_then_remove_is_bit_exact(tmp_path, dtype, strength):
    clean, robust = _pair(3)
    clean = {k: v.to(dtype) if v.is_floating_point() else v for k, v in clean.items()}
    sig = extract_signature(
        robust,
        {k: v.float() if v.is_floating_point() else v for k, v in clean.items()},
        layers=2,
        rank=3,
        bits=4,
    )
    path = save_signature(sig, tmp_path / "sig")
    loaded = load_signature(path)
    for name in sig.tensors:
        for k in sig.tensors[name]:
            assert torch.equal(loaded.tensors[name][k], sig.tensors[name][k])
    patched, undo = apply_signature(clean, loaded, strength)
    assert not torch.equal(patched["conv1.weight"], clean["conv1.weight"])
    naive = remove_signature(patched, loaded, strength)  # without the undo record: off by rounding
    exact = remove_signature(patched, loaded, strength, undo)
    for k in clean:
        assert torch.equal(exact[k], clean[k]), k
    if dtype == torch.float32:  # float32 rounding leaves at most a few ulps to undo
        assert all(u.dtype == torch.int8 for u in undo.values())
    assert max(float((naive[k].float() - clean[k].float()).abs().max()) for k in undo) < 1e-2


def test_four_bit_storage_is_half_of_eight_bit(tmp_path):
    clean, robust = _pair()
    s8 = extract_signature(robust, clean, ["fc1.weight"], rank=8, bits=8)
    s4 = extract_signature(robust, clean, ["fc1.weight"], rank=8, bits=4)
    assert s4.nbytes() < 0.6 * s8.nbytes()
    f8 = save_signature(s8, tmp_path / "s8") / "signature.safetensors"
    f4 = save_signature(s4, tmp_path / "s4") / "signature.safetensors"
    assert f4.stat().st_size < 0.75 * f8.stat().st_size
    with pytest.raises(WeightsmithError, match="already exists"):
        save_signature(s4, tmp_path / "s4")


def test_bad_layer_name_raises():
    clean, robust = _pair()
    with pytest.raises(WeightsmithError, match="nope.weight"):
        extract_signature(robust, clean, layers=["nope.weight"])
