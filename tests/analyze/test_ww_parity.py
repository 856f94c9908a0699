"""WeightWatcher parity on a tiny model with Linear, Conv2d and Conv1d layers: same layers, same columns,
same numbers (the MP fit to its grid, the rest to round-off)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from weightsmith.analyze import analyze_weights, describe
from weightsmith.analyze.run import warning_label
from weightsmith.store import DictStore

EXACT = ("D", "M", "N", "Q", "alpha", "alpha_weighted", "log_alpha_norm", "log_norm", "log_spectral_norm",
         "stable_rank", "xmin", "xmax", "sigma", "num_pl_spikes", "num_evals", "rf", "lambda_max", "norm",
         "spectral_norm")  # fmt: skip
MP = ("mp_softrank", "sigma_mp")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 48),  # 48 eigenvalues: the standard fit
        torch.nn.Conv2d(16, 24, 3),  # 9 slices 24 x 16: 144 pooled eigenvalues
        torch.nn.Conv1d(16, 32, 9),  # WW's 3-D SVD: the 9 largest of 32 x 9 singular values
        torch.nn.Linear(12, 40),  # 12 eigenvalues: the small-sample fit
        torch.nn.Conv2d(8, 16, 2),  # 4 slices: 32 eigenvalues
        torch.nn.Conv2d(24, 8, 3),  # c_out < c_in: the slices are transposed
        torch.nn.Conv1d(16, 32, 5),  # M = 5 < min_evals = 8: skipped by both
        torch.nn.Linear(6, 30),  # M = 6 < 8: skipped by both
    )


@pytest.fixture(scope="module")
def frames() -> tuple[Any, Any, Any, Any]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = _model()
    watcher = ww.WeightWatcher(model=model)
    ref = watcher.analyze(mp_fit=True)
    store = DictStore({k: v.detach().clone() for k, v in model.state_dict().items()})
    ours = analyze_weights(store, device="cpu", farms=False).to_pandas()
    return ref, ours, watcher.describe(), describe(store)


def test_the_same_layers_are_analysed(frames: tuple) -> None:
    ref, ours, _, _ = frames
    assert list(ours["name"]) == [str(n) for n in ref["name"]] == ["0", "1", "2", "3", "4", "5"]
    assert list(ours["layer_type"]) == list(ref["layer_type"])
    assert list(ours["layer_id"]) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("column", EXACT)
def test_deterministic_columns_match_to_round_off(frames: tuple, column: str) -> None:
    ref, ours, _, _ = frames
    np.testing.assert_allclose(ours[column].astype(float), ref[column].astype(float), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("column", MP)
def test_mp_columns_match_to_the_fit_grid(frames: tuple, column: str) -> None:
    ref, ours, _, _ = frames
    np.testing.assert_allclose(ours[column].astype(float), ref[column].astype(float), rtol=5e-3)
    assert list(ours["num_spikes"]) == list(ref["num_spikes"])


def test_warning_labels_match(frames: tuple) -> None:
    ref, ours, _, _ = frames
    assert list(ours["warning"]) == list(ref["warning"])
    assert "under-trained" in list(ours["warning"])
    assert [warning_label(a) for a in (1.5, 2.0, 4.0, 6.0, 6.5, None)] == [
        "over-trained", "", "", "", "under-trained", ""]  # fmt: skip


def test_weightwatcher_column_names_are_all_there(frames: tuple) -> None:
    ref, ours, _, _ = frames
    shared = {"layer_id", "name", "D", "M", "N", "Q", "alpha", "alpha_weighted", "log_norm",
              "log_spectral_norm", "stable_rank", "xmin", "xmax", "sigma", "num_spikes", "mp_softrank",
              "longname", "warning", "num_pl_spikes", "layer_type", "rf", "num_evals", "status",
              "has_esd"}  # fmt: skip
    assert shared <= set(ref.columns) and shared <= set(ours.columns)
    assert list(ours["status"]) == list(ref["status"])


def test_describe_matches_without_an_svd(frames: tuple) -> None:
    _, _, ref, ours = frames
    for column in ("M", "N", "Q", "num_evals", "rf", "layer_type"):
        assert list(ours[column]) == list(ref[column]), column
    assert list(ours["name"]) == [str(n) for n in ref["name"]]


RAND_EXACT = ("rand_W_scale", "max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist")
RAND_MP = ("rand_sigma_mp", "rand_mp_softrank", "rand_bulk_max", "rand_bulk_min")


@pytest.fixture(scope="module")
def randomized() -> tuple[Any, Any]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = _model()
    np.random.seed(7)  # WeightWatcher shuffles with numpy's global RNG
    ref = ww.WeightWatcher(model=model).analyze(randomize=True)
    store = DictStore({k: v.detach().clone() for k, v in model.state_dict().items()})
    ours = analyze_weights(store, device="cpu", farms=False, mp_fit=False, randomize=True, seed=7)
    return ref, ours.to_pandas()


def test_randomized_esd_uses_the_same_shuffles_as_weightwatcher(randomized: tuple) -> None:
    ref, ours = randomized
    for column in RAND_EXACT:
        np.testing.assert_allclose(ours[column], ref[column].astype(float), rtol=1e-6, err_msg=column)
    for column in RAND_MP:
        np.testing.assert_allclose(ours[column], ref[column].astype(float), rtol=5e-3, err_msg=column)
    assert list(ours["num_traps"]) == list(ref["num_traps"]) == list(ours["rand_num_spikes"])


def test_a_planted_large_entry_is_a_correlation_trap() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 128, generator=g) / 16
    trapped = W.clone()
    trapped[3, 7] = 40.0  # one huge entry survives any shuffle: a spike in the randomised ESD
    res = analyze_weights(DictStore({"clean": W, "trapped": trapped}), device="cpu", farms=False,
                          randomize=True, seed=1)  # fmt: skip
    traps = {m["name"]: m["num_traps"] for m in res.matrices}
    assert traps == {"clean": 0, "trapped": 1}
    again = analyze_weights(DictStore({"clean": W, "trapped": trapped}), device="cpu", farms=False,
                            randomize=True, seed=1)  # fmt: skip
    assert [m["rand_distance"] for m in again.matrices] == [m["rand_distance"] for m in res.matrices]
