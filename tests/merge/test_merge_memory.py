"""SLERP and Model Stock write their output in the output dtype piece by piece (no whole-tensor float32
result beside it): the same bits as computing in float32 and casting the whole tensor, piece boundaries
included; and a whole merge through the executor equals the float32-then-cast merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.merge import _tensorwise
from weightsmith.merge.della import della
from weightsmith.merge.model_stock import ModelStock, model_stock
from weightsmith.merge.recipe import Recipe, run
from weightsmith.merge.slerp import SLERP, slerp

torch.set_num_threads(1)


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tensorwise, "CPU_PIECE", 96)  # many pieces, ragged ends


def _inputs(dtype: torch.dtype, n: int, shape: tuple[int, ...] = (37, 29)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    return [(base + 0.3 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
def test_slerp_writes_the_output_dtype_as_the_cast_would(small_pieces: None, dtype, out) -> None:
    a, b = _inputs(dtype, 2)
    whole = slerp(a, b, 0.3)
    assert whole.dtype == torch.float32
    got = slerp(a, b, 0.3, out_dtype=out)
    assert got.dtype == out and torch.equal(got, whole.to(out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_writes_the_output_dtype_as_the_cast_would(
    small_pieces: None, dtype, filter_wise
) -> None:
    base, *thetas = _inputs(dtype, 4)
    whole = model_stock(base, thetas, filter_wise)
    got = model_stock(base, thetas, filter_wise, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, whole.to(torch.bfloat16))


def test_merge_as_equals_merge_then_cast() -> None:
    base, x, y = _inputs(torch.bfloat16, 3, (5, 7))
    for method, thetas in ((SLERP(t=0.7), [x]), (ModelStock(), [x, y])):
        want = method.merge(base, thetas).to(torch.bfloat16)
        assert torch.equal(method.merge_as(base, thetas, None, None, torch.bfloat16), want)


def test_slerp_of_two_directions_by_hand() -> None:
    """Shoemake 1985 on unit vectors 90 degrees apart: slerp(t) = cos(t pi/2) e0 + sin(t pi/2) e1."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    got = slerp(e0, e1, 1 / 3, out_dtype=torch.float64)
    assert torch.allclose(got, torch.tensor([3**0.5 / 2, 0.5], dtype=torch.float64), atol=1e-7)


def test_a_bf16_merge_through_the_executor_equals_the_float32_merge_cast(tmp_path: Path) -> None:
    dirs = []
    for i, t in enumerate(_inputs(torch.bfloat16, 3, (64, 48))):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": t, "v": t[0].clone()}, str(d / "model.safetensors"))
        dirs.append(d)
    r = Recipe(method=ModelStock(), models=[str(d) for d in dirs[1:]], base=str(dirs[0]))
    run(r, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ins = [load_file(str(d / "model.safetensors")) for d in dirs]
    for name in ("w", "v"):
        want = model_stock(ins[0][name], [ins[1][name], ins[2][name]]).to(torch.bfloat16)
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want)


@pytest.mark.parametrize("elect", [True, False])
def test_della_without_widened_copies_equals_della_on_widened_inputs(small_pieces: None, elect: bool) -> None:
    """The bf16 base is widened piece by piece instead of whole: the same bits as widening every input
    first (what the kernel did before), and the output dtype written directly equals the cast."""
    base, *thetas = _inputs(torch.bfloat16, 4)

    def run_della(b: torch.Tensor, ts: list[torch.Tensor], out: torch.dtype | None = None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        w, d, e = [1.0, 0.5, 2.0], [0.5] * 3, [0.1] * 3
        return della(
            b,
            ts,
            w,
            d,
            e,
            elect=elect,
            normalize=True,
            rescale=True,
            scaling=0.9,
            generator=gen,
            out_dtype=out,
        )

    widened = run_della(base.float(), [t.float() for t in thetas])
    assert torch.equal(run_della(base, thetas), widened)
    assert torch.equal(run_della(base, thetas, torch.bfloat16), widened.to(torch.bfloat16))


@pytest.mark.parametrize(
    "dtype,out", [(torch.bfloat16, torch.bfloat16), (torch.float32, None), (torch.float32, torch.bfloat16)]
)
def test_slerp_into_v0_writes_the_same_bits_into_the_base_buffer(small_pieces: None, dtype, out) -> None:
    a, b = _inputs(dtype, 2)
    want = slerp(a, b, 0.3, out_dtype=out)
    v0 = a.clone()
    got = slerp(v0, b, 0.3, out_dtype=out, into_v0=True)
    assert torch.equal(got, want)
    # the base's buffer is the result when it has the result's dtype; else the base is left as it was
    assert (got.data_ptr() == v0.data_ptr()) == (want.dtype == dtype)
    if want.dtype != dtype:
        assert torch.equal(v0, a)
    # an input that shares the base's storage is never overwritten under it
    same = a.clone()
    assert torch.equal(
        slerp(same, same, 0.3, out_dtype=out, into_v0=True), slerp(a, a.clone(), 0.3, out_dtype=out)
    )
    assert torch.equal(same, a)


def test_slerp_through_the_executor_writes_into_the_base_only_for_files(tmp_path: Path, monkeypatch) -> None:
    """In a merge of safetensors files the executor's fresh base buffer receives the result (no third
    tensor-sized buffer); tensors of an in-memory store are never written into."""
    from weightsmith.merge import slerp as slerp_module
    from weightsmith.store import DictStore

    seen: list[bool] = []
    real = slerp_module.slerp

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append(bool(kw.get("into_v0")))
        return real(*args, **kw)

    monkeypatch.setattr(slerp_module, "slerp", spy)
    dirs = []
    ins = _inputs(torch.bfloat16, 2, (64, 48))
    for i, t in enumerate(ins):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": t}, str(d / "model.safetensors"))
        dirs.append(d)
    run(Recipe(method=SLERP(t=0.4), models=[str(dirs[1])], base=str(dirs[0])), tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    assert seen == [True] and torch.equal(got, real(ins[0], ins[1], 0.4, out_dtype=torch.bfloat16))
    with _tensorwise.owning_inputs([DictStore({"w": ins[0]})]):
        assert not _tensorwise.inputs_owned()
    assert not _tensorwise.inputs_owned()


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize(
    "dtype,out", [(torch.bfloat16, torch.bfloat16), (torch.float32, None), (torch.float32, torch.bfloat16)]
)
def test_model_stock_into_base_writes_the_same_bits_into_the_base_buffer(
    small_pieces: None, dtype, out, filter_wise: bool
) -> None:
    base, *thetas = _inputs(dtype, 4)
    want = model_stock(base, thetas, filter_wise, out_dtype=out)
    b = base.clone()
    got = model_stock(b, thetas, filter_wise, out_dtype=out, into_base=True)
    assert torch.equal(got, want)
    assert (got.data_ptr() == b.data_ptr()) == (want.dtype == dtype)
    if want.dtype != dtype:
        assert torch.equal(b, base)
    # a fine-tune sharing the base's storage is never overwritten under it
    same = base.clone()
    twin = model_stock(same, [same, *thetas[1:]], filter_wise, out_dtype=out, into_base=True)
    assert torch.equal(twin, model_stock(base, [base.clone(), *thetas[1:]], filter_wise, out_dtype=out))
    assert torch.equal(same, base)


def test_kept_scratch_is_reused_grown_and_gives_the_same_results(small_pieces: None) -> None:
    """Inside keeping_scratch the sum of offsets lives in one buffer from weight to weight (grown for a
    larger one); every result equals the one computed with fresh buffers."""
    shapes = [(37, 29), (8, 8), (60, 40), (37, 29)]
    inputs = [_inputs(torch.bfloat16, 3, s) for s in shapes]
    want = [model_stock(b, ts, out_dtype=torch.bfloat16) for b, *ts in inputs]
    ptrs = []
    with _tensorwise.keeping_scratch():
        for (b, *ts), w in zip(inputs, want, strict=True):
            assert torch.equal(model_stock(b, ts, out_dtype=torch.bfloat16), w)
            ptrs.append(
                _tensorwise.tensor_scratch("model_stock.total", (1,), torch.float32, b.device).data_ptr()
            )
    assert ptrs[0] == ptrs[1] and ptrs[2] == ptrs[3] and ptrs[1] != ptrs[2]  # kept; replaced once, when grown
    fresh = _tensorwise.tensor_scratch("model_stock.total", (4,), torch.float32, torch.device("cpu"))
    assert fresh.shape == (4,)  # outside the block: a new buffer each call


def test_model_stock_through_the_executor_writes_into_the_base_only_for_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightsmith.merge import model_stock as ms_module

    seen: list[bool] = []
    real = ms_module.model_stock

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append(bool(kw.get("into_base")))
        return real(*args, **kw)

    monkeypatch.setattr(ms_module, "model_stock", spy)
    ins = _inputs(torch.bfloat16, 3, (64, 48))
    dirs = []
    for i, t in enumerate(ins):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": t}, str(d / "model.safetensors"))
        dirs.append(d)
    run(Recipe(method=ModelStock(), models=[str(d) for d in dirs[1:]], base=str(dirs[0])), tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    assert seen == [True] and torch.equal(got, real(ins[0], ins[1:], out_dtype=torch.bfloat16))
