"""Calibration precision: the Gram matrix of bf16/fp16 inputs, the ``tf32`` option, bf16 forwards."""

from __future__ import annotations

import pytest
import torch
from compress_fixtures import calib, tiny_llama
from torch import nn

from weightsmith import layers as L
from weightsmith.compress import GPTQ, compress
from weightsmith.compress._core import check_tf32
from weightsmith.config import config_from_dict
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rows(dtype: torch.dtype, n: int = 512, d: int = 24, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.logspace(-2, 2, d)  # channels over four decades
    return x.to(dtype).to(device)


def _within_fp32_rounding(gram: torch.Tensor, x: torch.Tensor) -> None:
    """|G − XᵀX| ≤ n u Σ_t |x_ti x_tj| (u = 2⁻²⁴; the products are exact, only the n − 1 additions
    round), against XᵀX in float64 (whose own rounding is 2²⁹ times finer)."""
    x64 = x.double().cpu()
    exact = x64.T @ x64
    bound = x64.shape[0] * 2.0**-24 * (x64.abs().T @ x64.abs())
    err = (gram.double().cpu() - exact).abs()
    assert gram.dtype == torch.float32
    assert bool((err <= bound).all()), float((err / bound.clamp_min(1e-300)).max())
    assert float(err.max()) > 0 or x.dtype == torch.float64  # sums of many terms do round somewhere


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_products_of_half_precision_inputs_are_exact_in_float32(dtype):
    """The premise of the reduced-precision Gram: a product of two bf16 (8-bit significand) or fp16
    (11-bit) numbers has at most 22 significant bits, so float32 (24) holds it exactly."""
    x = _rows(dtype)
    a, b = x[:, :12].float(), x[:, 12:].float()
    assert torch.equal((a * b).double(), a.double() * b.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_of_half_precision_inputs_matches_float64_within_fp32_rounding(dtype):
    x = _rows(dtype)
    gram = None
    for part in x.split(128):  # accumulated batch by batch, as the hooks do
        gram = L.accumulate_gram(gram, part)
    assert gram is not None
    _within_fp32_rounding(gram, x)


def test_gram_of_float32_inputs_is_the_float32_gemm_bit_for_bit():
    x = _rows(torch.float32)
    a, b = x[:256], x[256:]
    expected = (a.T @ a).addmm_(b.T, b)
    assert torch.equal(L.accumulate_gram(L.accumulate_gram(None, a), b), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wide_gram_multiplies_its_lower_triangle_only_and_is_symmetric(monkeypatch, dtype):
    """Inputs of TRIANGLE_MIN(_CPU) columns or more: one GEMM per lower row block, the upper triangle copied;
    the same sums of the same products, so within float32 rounding of the float64 Gram, batch by batch."""
    monkeypatch.setattr(L, "TRIANGLE_MIN_CPU", 256)
    monkeypatch.setattr(L, "TRIANGLE_ROWS_CPU", 100)
    x = _rows(dtype, n=384, d=400)
    assert L.row_blocks(400, 100, 64) == [(0, 128), (128, 256), (256, 384), (384, 400)]
    products: list[tuple[int, ...]] = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(
        torch.Tensor, "addmm_", lambda g, a, b: (products.append((*a.shape, b.shape[1])), real(g, a, b))[1]
    )
    gram = None
    for part in x.split(128):
        gram = L.accumulate_gram(gram, part)
    assert gram is not None and torch.equal(gram, gram.T)
    _within_fp32_rounding(gram, x)
    # per batch: rows 128 x 128, 128 x 256, 128 x 384, 16 x 400 (float32 inputs; bf16 ones upcast first)
    assert products[:4] == [(128, 128, 128), (128, 128, 256), (128, 128, 384), (16, 128, 400)]
    assert sum(a * c for a, _, c in products[:4]) == 104_704 < 0.66 * 400 * 400  # vs 400 x 400


def test_gram_in_float64_stats_upcasts_bf16_inputs():
    x = _rows(torch.bfloat16)
    gram = L.accumulate_gram(None, x, torch.float64)
    assert gram.dtype == torch.float64
    assert torch.equal(gram, x.double().T @ x.double())  # exact in float64


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gram_of_half_precision_inputs_matches_float64(dtype):
    x = _rows(dtype, device="cuda")
    gram = None
    for part in x.split(128):
        gram = L.accumulate_gram(gram, part)
    assert gram is not None
    _within_fp32_rounding(gram, x)
    with L.tf32_matmul():  # the fallback for a torch without mm(out_dtype=): TF32 holds bf16/fp16 exactly
        xf = x.float()
        _within_fp32_rounding(xf.T @ xf, x)


# ------------------------------------------------------------------------------------------ tf32 option


@pytest.mark.parametrize(
    "setup",
    [
        lambda: None,
        lambda: torch.set_float32_matmul_precision("highest"),
        lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False),
        lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"),
    ],
    ids=["default", "set_float32_matmul_precision", "legacy allow_tf32", "per-backend fp32_precision"],
)
def test_tf32_context_turns_tf32_on_inside_and_restores_the_setting(setup):
    setup()
    before = torch.backends.cuda.matmul.fp32_precision
    with L.tf32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before
    with L.tf32_matmul(False):
        assert torch.backends.cuda.matmul.fp32_precision == before
    torch.set_float32_matmul_precision("highest")


def test_tf32_context_restores_a_per_backend_tf32_setting():
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # set through the new API only: the global getter
    try:  # then refuses to read, so the context works on the per-backend setting
        with pytest.raises(ValueError, match="boom"), L.tf32_matmul():
            raise ValueError("boom")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.set_float32_matmul_precision("highest")


def test_walker_runs_the_forwards_in_tf32_and_the_callback_outside():
    torch.set_float32_matmul_precision("highest")  # float32 products outside, whatever ran before
    model = tiny_llama()
    seen: dict[str, set[str]] = {"forward": set(), "hooks": set(), "on_block": set()}
    blocks = L.decoder_blocks(model)[1]
    handles = [b.register_forward_hook(lambda *_: seen["forward"].add(_precision())) for b in blocks]
    real_add = L.InputStats.add

    def add(self, x):
        seen["hooks"].add(_precision())
        real_add(self, x)

    L.InputStats.add = add  # type: ignore[method-assign]
    try:
        L.walk_blocks(model, calib(), lambda *_: seen["on_block"].add(_precision()), tf32=True)
    finally:
        L.InputStats.add = real_add  # type: ignore[method-assign]
        for h in handles:
            h.remove()
    assert seen == {"forward": {"tf32"}, "hooks": {"tf32"}, "on_block": {"ieee"}}
    assert _precision() == "ieee"


def _precision() -> str:
    return str(torch.backends.cuda.matmul.fp32_precision).replace("none", "ieee")


def test_tf32_is_refused_on_cpu_naming_the_option():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsmithError, match=r"--tf32.*CUDA devices only.*'cpu'"):
        compress(model, GPTQ(bits=4, group_size=32, tf32=True), calib=calib(), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing done


@pytest.mark.parametrize(("method", "why"), [("rtn", "data-free"), ("fwsvd", "own calibration passes")])
def test_tf32_is_refused_for_a_method_it_does_not_reach(method, why):
    with pytest.raises(WeightsmithError, match=f"--tf32: '{method}' .*{why}"):
        config_from_dict({"method": method, "tf32": True}, "compress")
    check_tf32(config_from_dict({"method": method}, "compress"), torch.device("cpu"))  # off: no check
    check_tf32(GPTQ(tf32=True), torch.device("cuda"))  # the walker's methods take it
    with pytest.raises(WeightsmithError, match="tf32='yes': must be true or false"):
        GPTQ(tf32="yes")  # type: ignore[arg-type]


def test_cli_refuses_tf32_on_cpu_before_loading(tmp_path, monkeypatch, capsys):
    import weightsmith.cli.compress  # noqa: F401  (registers the command)
    import weightsmith.models
    from weightsmith.cli import main

    def no_load(*_a, **_k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(weightsmith.models, "load_model", no_load)
    out = tmp_path / "q"
    argv = ["weightsmith", "compress", "smollm2", "--method", "gptq", "--tf32", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "--tf32" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------- bf16 forwards


def test_bf16_model_calibrates_in_bf16():
    """Every Linear of a bf16 model gets bf16 inputs during the calibration forwards (nothing upcasts the
    block or the activations), the weights stay bf16, and GPTQ still quantises them."""
    model = tiny_llama().to(torch.bfloat16)
    seen: set[tuple[str, torch.dtype, torch.dtype]] = set()

    def record(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        w = mod.weight
        assert isinstance(w, torch.Tensor)
        seen.add((type(mod).__name__, args[0].dtype, w.dtype))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        _, report = compress(model, GPTQ(bits=4, group_size=32), calib=calib())
    finally:
        for h in handles:
            h.remove()
    assert seen == {("Linear", torch.bfloat16, torch.bfloat16)}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(report.layers) == 14 and all(0 < r.rel_error < 0.5 for r in report.layers)


def test_recipe_step_takes_tf32_as_an_option(tmp_path):
    from weightsmith.compress.step import recipe_step

    step = recipe_step({"method": "gptq", "tf32": True, "out": "q"}, tmp_path, False)
    assert step.config.tf32 is True
    with pytest.raises(WeightsmithError, match="--tf32: 'rtn' is data-free"):
        recipe_step({"method": "rtn", "tf32": True, "out": "q"}, tmp_path, False)
