"""analyze_weights / compare_weights over stores: batching by shape, skipping with reasons, JSON."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.analyze import analyze_weights, compare_weights
from weightsmith.errors import WeightsmithError
from weightsmith.store import DictStore

KEYS = {"name", "shape", "alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank",
        "effective_rank", "mp_softrank", "num_spikes", "farms_alpha"}  # fmt: skip


def _store() -> DictStore:
    g = torch.Generator().manual_seed(0)

    def mat(m: int, n: int) -> torch.Tensor:
        return torch.randn(m, n, generator=g) / n**0.5 + 0.3 * torch.randn(m, 1, generator=g) @ torch.randn(
            1, n, generator=g
        )

    nan = mat(96, 48)
    nan[3, 4] = float("nan")
    nan[5, 6] = float("inf")
    return DictStore({
        "layers.0.q.weight": mat(96, 48),
        "layers.0.bias": torch.zeros(96),
        "layers.1.q.weight": mat(48, 96),  # transposed shape: batched with the first
        "layers.1.conv.weight": torch.randn(8, 4, 3, 3),
        "layers.2.q.weight": nan,
        "layers.2.ids": torch.arange(96 * 48).reshape(96, 48),
        "layers.3.q.weight": mat(96, 48).to(torch.bfloat16),
        "layers.3.tiny.weight": mat(5, 64),
        "layers.4.big.weight": mat(128, 64),
    }, source="toy")  # fmt: skip


def test_every_tensor_is_analysed_or_skipped_with_a_reason() -> None:
    res = analyze_weights(_store(), device="cpu")
    out = json.loads(json.dumps(res.to_json(), allow_nan=False))
    names = [m["name"] for m in out["matrices"]]
    assert names == ["layers.0.q.weight", "layers.1.q.weight", "layers.1.conv.weight", "layers.3.q.weight",
                     "layers.4.big.weight"]  # fmt: skip
    assert all(set(m) >= KEYS for m in out["matrices"])
    reasons = {s["name"]: s["reason"] for s in out["skipped"]}
    assert "2 NaN/Inf" in reasons["layers.2.q.weight"]
    assert "1-D" in reasons["layers.0.bias"]
    conv = out["matrices"][2]  # a Conv2d kernel: 9 slices of 8 x 4, 36 pooled eigenvalues
    view = (conv["layer_type"], conv["N"], conv["M"], conv["rf"], conv["num_evals"])
    assert view == ("conv2d", 8, 4, 9, 36)
    assert conv["farms_alpha"] is None and conv["alpha"] is not None
    assert [m["layer_id"] for m in out["matrices"]] == [1, 2, 3, 4, 5]
    assert "non-floating" in reasons["layers.2.ids"]
    assert "smaller side 5" in reasons["layers.3.tiny.weight"]
    assert len(names) + len(reasons) == len(_store())
    assert out["summary"]["num_matrices"] == 5 and out["summary"]["num_skipped"] == 4
    assert out["matrices"][1]["shape"] == [48, 96]


def test_batching_does_not_change_the_numbers() -> None:
    store = _store()
    together = {m["name"]: m for m in analyze_weights(store, device="cpu").matrices}
    for name in ("layers.0.q.weight", "layers.1.q.weight"):
        alone = analyze_weights(DictStore({name: store[name]}), device="cpu").matrices[0]
        for key in KEYS - {"name", "shape"}:
            assert alone[key] == pytest.approx(together[name][key], rel=1e-9), key


def test_select_and_empty_selection() -> None:
    res = analyze_weights(_store(), select="layers.4.*", device="cpu", farms=False)
    assert [m["name"] for m in res.matrices] == ["layers.4.big.weight"]
    assert res.matrices[0]["farms_alpha"] is None
    with pytest.raises(WeightsmithError, match="matches none"):
        analyze_weights(_store(), select="nothing.*")


def test_compare_names_missing_and_mismatched_tensors() -> None:
    base = _store()
    other_state = {n: base[n].clone() for n in base}
    other_state["layers.0.q.weight"] = other_state["layers.0.q.weight"][:90]
    del other_state["layers.4.big.weight"]
    other_state["extra.weight"] = torch.zeros(4, 4)
    res = compare_weights(base, DictStore(other_state, source="other"), device="cpu")
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert reasons["layers.0.q.weight"] == "shape mismatch: base [96, 48] vs other [90, 48]"
    assert "missing in other" in reasons["layers.4.big.weight"]
    assert "missing in toy" in reasons["extra.weight"]
    compared = {m["name"]: m for m in res.matrices}
    assert compared["layers.1.q.weight"]["num_intruders"] == 0
    assert compared["layers.1.q.weight"]["relative_norm"] == 0.0
    assert len(compared["layers.1.q.weight"]["max_cos"]) == 10
    json.dumps(res.to_json(), allow_nan=False)


def test_mp_fit_off_and_float32_precision_keep_the_power_law_numbers() -> None:
    store = _store()
    ref = {m["name"]: m for m in analyze_weights(store, device="cpu", farms=False).matrices}
    no_mp = {m["name"]: m for m in analyze_weights(store, device="cpu", farms=False, mp_fit=False).matrices}
    f32_run = analyze_weights(store, device="cpu", farms=False, precision="float32")
    f32 = {m["name"]: m for m in f32_run.matrices}
    for name, m in ref.items():
        assert no_mp[name]["mp_softrank"] is None and no_mp[name]["num_spikes"] is None
        assert no_mp[name]["alpha"] == m["alpha"] and no_mp[name]["xmin"] == m["xmin"]
        # float32 Gram + eigensolver: eigenvalues to ~1e-7 of lambda_max, the same tail and xmin here
        assert f32[name]["num_pl_spikes"] == m["num_pl_spikes"]
        assert f32[name]["alpha"] == pytest.approx(m["alpha"], rel=1e-3)
        assert f32[name]["log_norm"] == pytest.approx(m["log_norm"], rel=1e-5)
    with pytest.raises(ValueError, match="precision"):
        analyze_weights(store, device="cpu", precision="half")
