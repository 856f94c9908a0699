"""Fixtures for the analyze tests: WeightWatcher reference numbers cached on disk (WW is slow)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from analyze_ww_cases import WW_MINILM, WW_SMOLLM2  # noqa: E402

WW_COLUMNS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "xmin",
              "num_pl_spikes", "mp_softrank", "num_spikes", "D", "sigma", "log_alpha_norm")  # fmt: skip


def _cache_dir() -> Path:
    root = Path(
        os.environ.get("WEIGHTSMITH_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "weightsmith")
    )
    path = root / "tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_ww(mats: dict[str, torch.Tensor], mp_fit: bool) -> dict[str, dict[str, float]]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    names = list(mats)
    layers = []
    for n in names:
        W = mats[n].float()
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data.copy_(W)
        layers.append(lin)
    details = ww.WeightWatcher(model=torch.nn.Sequential(*layers)).analyze(mp_fit=mp_fit)
    out = {}
    for i, row in enumerate(details.itertuples()):
        out[names[i]] = {c: float(getattr(row, c)) for c in WW_COLUMNS if hasattr(row, c)}
    return out


@pytest.fixture(scope="session")
def ww_reference(minilm_dir: Path, smollm2_dir: Path) -> dict[str, dict[str, float]]:
    """WeightWatcher's per-layer numbers for WW_MINILM (with its MP fit) and WW_SMOLLM2 (without)."""
    import weightwatcher as ww

    from weightsmith.store import open_store

    key = f"ww-{ww.__version__}-v2"
    cache = _cache_dir() / "analyze_ww_reference.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["layers"]
    minilm, smol = open_store(minilm_dir), open_store(smollm2_dir)
    layers = _run_ww({n: minilm[n] for n in WW_MINILM}, mp_fit=True)
    layers.update(_run_ww({n: smol[n] for n in WW_SMOLLM2}, mp_fit=False))
    cache.write_text(json.dumps({"key": key, "layers": layers}))
    return layers
