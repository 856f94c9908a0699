"""The serving-speed benchmark's pieces on the CPU: its low-rank layers are two plain GEMMs on contiguous
weights at ranks rounded to a multiple of 8 (at most half the parameters), its options are checked, and a
tiny run gives a row per variant and per compile mode (the GPU numbers come from the same code)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from weightsmith.compress import LowRankLinear

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_compress_speed.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compress_speed", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lowrank_layers_are_two_gemms_at_aligned_ranks(bench):
    torch.set_num_threads(1)
    model = bench.build("tiny", torch.float32, torch.device("cpu"))
    dense = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bench.lowrank_50(model, 8)
    thin = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(thin) == 14  # 7 Linears x 2 blocks; lm_head stays dense
    x = torch.randn(3, 128)
    for name, lr in thin.items():
        out_f, in_f = dense[name]
        r = lr.down.weight.shape[0]
        assert r % 8 == 0 and r * (out_f + in_f) <= 0.5 * out_f * in_f
        assert lr.down.weight.is_contiguous() and lr.up.weight.is_contiguous()
        if in_f == 128:
            torch.testing.assert_close(
                lr(x), F.linear(F.linear(x, lr.down.weight), lr.up.weight), rtol=0, atol=0
            )


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--prefill", "4x"], "--prefill"),
        (["--compile", "fast"], "--compile"),
        (["--rank-multiple", "0"], "multiple"),
    ],
)
def test_bad_options_are_refused(bench, argv, word, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--size", "tiny", *argv])
    assert word in capsys.readouterr().err


def test_tiny_run_gives_every_row(bench, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "speed.json"
    args = bench.parse_args(
        ["--device", "cpu", "--size", "tiny", "--prefill", "1x8,2x8", "--decode-batches", "1",
         "--new-tokens", "2", "--repeats", "1", "--variants", "dense,lowrank-50%,sparse-2:4",
         "--out", str(out)]
    )  # fmt: skip
    res = bench.run(args)
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert [(r["variant"], r["mode"]) for r in res["rows"]] == [
        ("dense", "eager"), ("lowrank-50%", "eager"), ("sparse-2:4-masked", "eager")
    ]  # fmt: skip
    assert all(r["prefill_2x8_tok_s"] > 0 and r["decode_b1_tok_s"] > 0 for r in res["rows"])
    assert res["rows"][1]["linear_params"] <= 0.5 * res["rows"][0]["linear_params"]
    assert "lowrank-50% | eager" in res["table"] and "x)" in res["table"]


def test_compiled_layers_are_put_back(bench):
    """Regional compilation swaps each decoder layer for its compiled wrapper and restores it (no forward
    here: compiling costs tens of seconds on the CPU; the GPU run records the graph count)."""
    model = bench.build("tiny", torch.float32, torch.device("cpu"))
    before = list(model.model.layers)
    with bench.compiled(model, "default", "layers") as cm:
        assert cm is model and all(type(ly).__name__ == "OptimizedModule" for ly in model.model.layers)
    assert list(model.model.layers) == before
    with bench.compiled(model, "default", "model") as cm:
        assert type(cm).__name__ == "OptimizedModule" and list(model.model.layers) == before
