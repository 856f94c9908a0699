"""RTN's fused Triton kernel (compress/_rtn_triton.py) and its use by the data-free path on CUDA.

With a GPU the kernel is compiled and compared with the torch path on CUDA. Without one it runs under
Triton's interpreter on CPU tensors against the torch path on the CPU: Triton must be imported with
``TRITON_INTERPRET=1`` for that, so :func:`test_kernels_under_the_interpreter` runs this file again in a
child process with it set (the kernel tests are skipped in the parent). Skipped where Triton is missing
(CI)."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compress_fixtures import tiny_llama
from test_datafree import CopiesOf
from test_rtn_batched import gpt2

from weightsmith.compress import RTN
from weightsmith.compress import _datafree as df
from weightsmith.compress import _rtn_choice as rc
from weightsmith.compress import _rtn_triton as rt
from weightsmith.compress._core import target_layers
from weightsmith.compress._grid import QuantizedWeight, codes, grouped, qmax, rtn_with_dequant
from weightsmith.errors import WeightsmithError

pytest.importorskip("triton")
torch.set_num_threads(1)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set before Triton was imported: the child run
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runs_kernels = pytest.mark.skipif(
    DEV == "cpu" and not INTERPRETED, reason="runs in test_kernels_under_the_interpreter's child process"
)
KERNEL_TESTS = 20  # the tests marked runs_kernels, parameters counted


@pytest.fixture(autouse=True)
def fused_on_the_cpu(monkeypatch):
    """Under the interpreter the CPU stands for the GPU; on a GPU the kernel runs where these tests make it
    eligible, whatever its start-up costs (compress/_rtn_choice.py would pick the batches while cold)."""
    monkeypatch.setenv(rc.ENV, "triton")
    if INTERPRETED:
        monkeypatch.setattr(df, "FUSED_DEVICES", ("cpu", "cuda"))


@pytest.mark.skipif(DEV != "cpu" or INTERPRETED, reason="only a GPU-less parent process spawns the child")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    root = Path(__file__).parents[2]
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) == KERNEL_TESTS, run.stdout[-2000:]


def fused_one(W: torch.Tensor, bits: int, group: int, sym: bool) -> tuple[QuantizedWeight, torch.Tensor]:
    """rtn_fused on a run of one weight: its result and its error as a 0-d tensor."""
    results, rel = rt.rtn_fused([W], bits, group, sym)
    assert len(results) == 1 and rel.shape == (1,)
    return results[0], rel[0]


def weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few outliers and an all-zero group row (scale 1 there)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.05
    W[0, :2] = torch.tensor([0.9, -0.7])
    W[-1] = 0
    return W.to(dtype).to(DEV)


def check_against_torch(W0: torch.Tensor, bits: int, group: int, sym: bool) -> None:
    """rtn_fused on a copy of ``W0`` against rtn_with_dequant on ``W0`` (same device): codes, scales, zeros
    and the written Ŵ equal; the error equal up to summation order; W overwritten in place."""
    want, W_hat = rtn_with_dequant(W0, bits, group, sym)
    assert W_hat is not None
    W = W0.clone()
    ptr = W.data_ptr()
    got, rel = fused_one(W, bits, group, sym)
    case = (W0.dtype, tuple(W0.shape), bits, group, sym)
    for t in ("q", "scale", "zero"):
        a, b = getattr(got, t), getattr(want, t)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (case, t)
    assert (got.bits, got.group_size, got.symmetric) == (bits, group, sym)
    # no codes kept but where bfloat16 cannot give them back exactly (compress/_grid.py, exact_dtype); a
    # symmetric grid's zeros are one element
    assert got.holds_codes == (W0.dtype == torch.bfloat16 and bits == 8 and not sym), case
    assert (got.zero.untyped_storage().nbytes() == 4) == sym, case
    assert W.data_ptr() == ptr and torch.equal(W, W_hat.to(W0.dtype)), case
    assert torch.equal(got.dequantize(), W_hat), case
    assert rel.shape == () and rel.dtype == torch.float32 and rel.device == W0.device
    err = df.relative_error(W0.float(), W_hat)
    assert float(rel) == pytest.approx(float(err), rel=1e-6, abs=1e-12), case


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_fused_equals_the_torch_path_to_the_bit(dtype, sym):
    """Every bit width; groups of 32/64/128 and per channel (group_size 0); rows not a multiple of a
    program's rows and input sizes that are no power of two."""
    for bits in range(2, 9):
        check_against_torch(weight((24, 128), dtype, bits), bits, (32, 64, 128, 0)[bits % 4], sym)
    check_against_torch(weight((7, 96), dtype), 4, 32, sym)  # 21 group rows: a partial program
    check_against_torch(weight((5, 33), dtype), 3, 0, sym)  # per channel, 33 columns of a 64-wide chunk
    check_against_torch(weight((3, 96), dtype), 8, 96, sym)  # one group a row, given as its size


@runs_kernels
def test_long_groups_run_in_chunks_across_programs(monkeypatch):
    """A per-channel group longer than a chunk (40 columns in chunks of 16: the last one partial) and groups
    of 32 in two chunks, over several programs of 4 rows."""
    monkeypatch.setattr(rt, "TILE", 64)
    monkeypatch.setattr(rt, "MAX_CHUNK", 16)
    assert rt.launch_shape(10, 40) == (4, 16, 3)
    for sym in (True, False):
        check_against_torch(weight((10, 40), torch.bfloat16, 3), 4, 0, sym)
        check_against_torch(weight((9, 64), torch.float32, 4), 3, 32, sym)


@runs_kernels
def test_rounding_and_error_worked_by_hand():
    """Asymmetric 2 bits on the row [−1, −0.5, 0.5, 2]: s = (2 − (−1)) / 3 = 1, z = round(1 / 1) = 1,
    q = round(w / s + z) = [0, round(0.5), round(1.5), 3] = [0, 0, 2, 3] (halves to even), ŵ = s (q − z) =
    [−1, −1, 1, 2]; ‖W − Ŵ‖ / ‖W‖ = √(0.5 / 5.5) = 1 / √11. The symmetric grid (z = 2, s = 2 / 1.5) of the row
    [−2, 2/3, 1, 2]: w / s + z = [0.5, 2.5, 2.75, 3.5] → q = [0, 2, 3, 4 → 3]."""
    W = torch.tensor([[-1.0, -0.5, 0.5, 2.0]], device=DEV)
    qw, rel = fused_one(W, 2, 0, False)
    assert qw.q.tolist() == [[0, 0, 2, 3]] and qw.scale.tolist() == [[1.0]] and qw.zero.tolist() == [[1.0]]
    assert W.tolist() == [[-1.0, -1.0, 1.0, 2.0]]
    assert float(rel) == pytest.approx(1 / math.sqrt(11), rel=1e-7)
    W = torch.tensor([[-2.0, 2 / 3, 1.0, 2.0]], device=DEV)
    qw, _ = fused_one(W, 2, 0, True)
    assert qw.q.tolist() == [[0, 2, 3, 3]] and qw.zero.tolist() == [[2.0]]


@runs_kernels
def test_the_reciprocal_branch_is_torchs_cuda_division(monkeypatch):
    """On CUDA torch divides the range by (2^b − 1) or (2^b − 1) / 2 as a product with the float32
    reciprocal; the kernel's branch for it, run here, equals that worked out with torch on the CPU, and the
    two divisions really differ on this weight (so the branch is needed for bit-identity on CUDA)."""
    monkeypatch.setattr(rt, "RECIPROCAL_DEVICES", ("cpu", "cuda"))
    W0 = weight((64, 128), torch.float32, 7).cpu()
    for bits, sym in ((4, True), (3, False), (8, True), (5, False)):
        Wg = grouped(W0, 32)
        lo, hi = Wg.amin(-1).clamp_max(0), Wg.amax(-1).clamp_min(0)
        d = qmax(bits) / 2 if sym else float(qmax(bits))
        span = torch.maximum(hi, -lo) if sym else hi - lo
        inv = torch.tensor(1.0) / torch.tensor(d)
        scale = torch.where(span * inv > 0, span * inv, 1.0)
        assert not torch.equal(scale, torch.where(span / d > 0, span / d, 1.0)), (bits, sym)
        zero = torch.full_like(scale, 1 << (bits - 1)) if sym else (-lo / scale).round().clamp(0, qmax(bits))
        c = codes(Wg, scale, zero, bits)
        W = W0.clone().to(DEV)
        qw, _ = fused_one(W, bits, 32, sym)
        assert torch.equal(qw.scale.cpu(), scale) and torch.equal(qw.zero.cpu(), zero), (bits, sym)
        assert torch.equal(qw.q.cpu(), c.to(torch.uint8).reshape(W0.shape)), (bits, sym)
        assert torch.equal(W.cpu(), ((c - zero[..., None]) * scale[..., None]).reshape(W0.shape))


class KernelSpy:
    """Stands for the jitted kernel: records the number of elements of each launch's codes argument ``Q``."""

    def __init__(self, real) -> None:
        self.real, self.codes = real, []

    def __getitem__(self, grid):
        launch = self.real[grid]

        def run(*args, **kwargs):
            self.codes.append(args[1].numel())
            return launch(*args, **kwargs)

        return run


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep", [True, False], ids=["codes", "no-codes"])
def test_a_run_of_weights_is_one_launch_each_weight_as_alone(monkeypatch, dtype, keep):
    """Five separate weights (parameters of their own, one of them starting 2 bytes off a 16-byte boundary,
    so the run takes the unaligned branch) quantised by one launch of a (programs, 5) grid: each weight's
    codes, scales, zeros, Ŵ and error as when quantised alone; scales and zeros each in storage of its
    own; with ``codes=True`` the codes views of one [5, out, in] allocation, with ``codes=False`` no codes
    tensor at all (a 1-element placeholder for the kernel's unused argument) and each result's codes
    recovered from its own weight."""
    spy = KernelSpy(rt._kernel())
    monkeypatch.setattr(rt, "_kernel", lambda: spy)
    for aligned in (True, False):
        W0s = [weight((12, 64), dtype, seed) for seed in range(5)]
        Ws = [W.clone() for W in W0s]
        if not aligned:
            buf = torch.empty(1 + Ws[2].numel(), dtype=dtype, device=DEV)
            Ws[2] = buf[1:].view(12, 64).copy_(Ws[2])
        assert (Ws[2].data_ptr() % 16 == 0) == aligned
        spy.codes.clear()
        got, rel = rt.rtn_fused(Ws, 4, 16, False, codes=keep)
        assert spy.codes == [5 * 12 * 64 if keep else 1] and rel.shape == (5,) and rel.dtype == torch.float32
        assert all(qw.holds_codes == keep for qw in got)
        for W0, W, qw, e in zip(W0s, Ws, got, rel, strict=True):
            one = W0.clone()
            want, e1 = fused_one(one, 4, 16, False)
            for t in ("q", "scale", "zero"):
                assert torch.equal(getattr(qw, t), getattr(want, t)), (aligned, t)
            # the run's launch may take the unaligned branch, compiled with another summation order
            assert torch.equal(W, one) and float(e) == pytest.approx(float(e1), rel=1e-6)
            check_against_torch(W0, 4, 16, False)
        storages = {t.untyped_storage().data_ptr() for qw in got for t in (qw.scale, qw.zero)}
        assert len(storages) == 10
        if keep:
            assert len({qw.q.untyped_storage().data_ptr() for qw in got}) == 1


@runs_kernels
def test_codes_are_written_only_where_the_weight_cannot_give_them_back(monkeypatch):
    """``codes=None`` (the default): the kernel writes codes only for bfloat16 at 8 bits asymmetric, the one
    case of these where ``Ŵ`` cannot give them back exactly (compress/_grid.py, exact_dtype); elsewhere its
    codes argument is a 1-element placeholder, and the codes read back from ``Ŵ`` equal the torch path's.
    ``codes=False`` where the rule fails is refused; a weight changed after the kernel wrote it is refused
    when its codes are read, naming it."""
    spy = KernelSpy(rt._kernel())
    monkeypatch.setattr(rt, "_kernel", lambda: spy)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bits, sym in ((8, False), (8, True), (7, False), (2, True)):
            W0 = weight((8, 64), dtype, bits)
            want = rtn_with_dequant(W0, bits, 32, sym, dequant=False)[0]
            spy.codes.clear()
            got, _ = fused_one(W0.clone(), bits, 32, sym)
            exact = not (dtype == torch.bfloat16 and bits == 8 and not sym)
            assert spy.codes == [1 if exact else W0.numel()], (dtype, bits, sym)
            assert got.holds_codes != exact and torch.equal(got.q, want.q), (dtype, bits, sym)
    W = weight((8, 64), torch.bfloat16)
    with pytest.raises(WeightsmithError, match="8-bit asymmetric codes cannot be recovered exactly from"):
        rt.rtn_fused([W], 8, 32, False, codes=False)
    got, _ = fused_one(W, 4, 32, True)
    W[3, 5] += 0.25
    with pytest.raises(WeightsmithError, match="'weight 0 of a fused RTN run': the weight no longer holds"):
        got.q  # noqa: B018 (the read is the test)


@runs_kernels
def test_bad_input_is_refused_with_the_option_named():
    W = weight((8, 64), torch.float32)
    with pytest.raises(WeightsmithError, match="--bits 9"):
        rt.rtn_fused([W], 9, 32, True)
    with pytest.raises(WeightsmithError, match="group size 48 does not divide the input size 64"):
        rt.rtn_fused([W], 4, 48, True)
    with pytest.raises(WeightsmithError, match="contiguous"):
        rt.rtn_fused([W.T], 4, 8, True)
    with pytest.raises(WeightsmithError, match="torch.float64"):
        rt.rtn_fused([W.double()], 4, 32, True)
    with pytest.raises(WeightsmithError, match=r"one shape, dtype and device.*\(8, 32\)"):
        rt.rtn_fused([W, W[:, :32].contiguous()], 4, 32, True)
    with pytest.raises(WeightsmithError, match="torch.bfloat16"):
        rt.rtn_fused([W, W.bfloat16()], 4, 32, True)
    with pytest.raises(WeightsmithError, match="1 to 65535 weights at once, got 0"):
        rt.rtn_fused([], 4, 32, True)
    assert not rt.fusable(W.T, W.device) and not rt.fusable(W.double(), W.device)
    assert rt.fusable(W, W.device) and rt.fusable(W.half(), torch.device(DEV))


def run_data_free(base, cfg, fused: bool, monkeypatch):
    """(layers, results) of the data-free path on a copy of ``base`` on DEV, with RTN's batches opted in;
    ``fused``: the kernel where it applies (else the float32 stacks)."""
    monkeypatch.setattr(df, "BATCH_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(df, "FUSED_DEVICES", ("cpu", "cuda") if fused else ())
    model = copy.deepcopy(base).to(DEV)
    layers = target_layers(model, cfg)
    q = lambda W: cfg.quantize(W, None)  # noqa: E731
    return layers, list(df.compress_data_free(layers, q, torch.device(DEV), False, cfg.batched_quantize))


def assert_same_but_error_order(a, b) -> None:
    (la, r1), (lb, r2) = a, b
    assert [r.layer.name for r in r1] == [ly.name for ly in la] == [r.layer.name for r in r2]
    for x, y, p, q in zip(la, lb, r1, r2, strict=True):
        a, b = x.module.weight, y.module.weight
        assert a.dtype == b.dtype and torch.equal(a, b), x.name
        assert isinstance(p.compressed, QuantizedWeight) and isinstance(q.compressed, QuantizedWeight)
        for t in ("q", "scale", "zero"):
            assert torch.equal(getattr(p.compressed, t), getattr(q.compressed, t)), (x.name, t)
        assert q.rel_error == pytest.approx(p.rel_error, rel=1e-6), x.name


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_data_free_path_runs_the_kernel_in_place(monkeypatch, dtype):
    """With the kernel, a model on the device gives the batches' weights, codes and scales (errors up to
    summation order), every weight read and written in place with no copy, the kernel run once a run of
    same-shaped weights (q/o, k/v, gate/up, down: 4 shapes), cut at MAX_RUN weights."""
    monkeypatch.setattr(df, "LOG_EVERY", 3)
    monkeypatch.setattr(df, "MAX_RUN", 3)
    base = tiny_llama().to(dtype)
    cfg = RTN(bits=3, group_size=16, symmetric=False)
    calls = []
    real = rt.rtn_fused
    monkeypatch.setattr(
        rt, "rtn_fused", lambda Ws, *a: calls.append([W.data_ptr() for W in Ws]) or real(Ws, *a)
    )
    stacks = run_data_free(base, cfg, False, monkeypatch)
    assert calls == []
    model = copy.deepcopy(base).to(DEV)
    layers = target_layers(model, cfg)
    ptrs = [ly.weight().data_ptr() for ly in layers]
    watch = CopiesOf([ly.weight() for ly in layers])
    monkeypatch.setattr(df, "FUSED_DEVICES", ("cpu", "cuda"))
    with watch:
        got = list(df.compress_data_free(layers, lambda W: cfg.quantize(W, None), torch.device(DEV), False,
                                         cfg.batched_quantize))  # fmt: skip
    runs = df.batches(layers, df.BATCH_BYTES)  # one run a shape (the model is small)
    assert len(runs) == 4 and [len(r) for r in runs] == [4, 4, 4, 2]
    runs = [r[k : k + 3] for r in runs for k in range(0, len(r), 3)]  # MAX_RUN = 3
    assert calls == [[ptrs[i] for i in run] for run in runs]
    assert watch.seen == [] or INTERPRETED  # the interpreter itself copies a kernel's tensors in and out
    assert [ly.weight().data_ptr() for ly in layers] == ptrs
    assert_same_but_error_order(stacks, (layers, got))
    for r in got + stacks[1]:  # the codes kept by neither path: read from the layer itself when needed
        qw = r.compressed
        assert not qw.holds_codes and qw.written is not None and qw.written.name == r.layer.name


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_checkpoints_from_the_kernel_are_the_batches_bytes(tmp_path, monkeypatch, dtype):
    """``compress`` through the kernel (no codes kept, a symmetric grid's zeros one element) and through
    the batches, saved in both formats, symmetric and asymmetric: every saved tensor equal."""
    from safetensors.torch import load_file

    from weightsmith.compress import compress, save_compressed
    from weightsmith.compress._format import WEIGHTS

    monkeypatch.setattr(df, "BATCH_DEVICES", ("cpu", "cuda"))
    monkeypatch.setenv("WEIGHTSMITH_RTN_KERNEL", "triton")  # the kernel even where its start-up would not pay
    calls = []
    real = rt.rtn_fused
    monkeypatch.setattr(rt, "rtn_fused", lambda Ws, *a: calls.append(len(Ws)) or real(Ws, *a))
    for sym in (True, False):
        cfg = RTN(bits=4, group_size=16, symmetric=sym)
        saved = []
        for fused in (False, True):
            monkeypatch.setattr(df, "FUSED_DEVICES", ("cpu", "cuda") if fused else ())
            calls.clear()
            model, report = compress(tiny_llama().to(dtype).to(DEV), cfg, device=DEV)
            assert sum(calls) == (len(report.weights) if fused else 0)
            assert not any(w.holds_codes for w in report.weights.values())  # type: ignore[attr-defined]
            for fmt in ("compressed-tensors", "weightsmith"):
                save_compressed(model, report, tmp_path / f"{sym}{fused}{fmt}", format=fmt)
                saved.append(load_file(str(tmp_path / f"{sym}{fused}{fmt}" / WEIGHTS)))
        for a, b in zip(saved[:2], saved[2:], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sym


@runs_kernels
def test_weights_the_kernel_cannot_take_go_through_the_loop(monkeypatch):
    """GPT-2's Conv1D weights are stored transposed: the loop quantises them (same results as the batches);
    the kernel is chosen only for a method that has one, on a device of FUSED_DEVICES."""
    cfg = RTN(bits=4, group_size=16)
    assert_same_but_error_order(run_data_free(gpt2(), cfg, False, monkeypatch),
                                run_data_free(gpt2(), cfg, True, monkeypatch))  # fmt: skip
    assert df.fused_quantizer(cfg.batched_quantize, torch.device(DEV)) == cfg.fused_quantize
    assert df.fused_quantizer(lambda W: ([], W), torch.device(DEV)) is None
    monkeypatch.setattr(df, "FUSED_DEVICES", ())
    assert df.fused_quantizer(cfg.batched_quantize, torch.device(DEV)) is None


def hopper_ptx_specialised(const: dict[str, object]) -> str:
    """The kernel's PTX for sm_90 as a launch on a GPU specialises it: the pointers and the group size
    divisible by 16 (``hopper_ptx`` without the ``tt.divisibility`` attributes that let loads vectorise)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rtn = rt._kernel()
    sig = {"T": "*i64", "Q": "*u8", "P": "*fp32", "rows": "i32", "g": "i32", "div": "fp32", "top": "fp32",
           "zsym": "fp32", **dict.fromkeys(const, "constexpr")}  # fmt: skip
    attrs = {(rtn.arg_names.index(k),): [["tt.divisibility", 16]] for k in ("T", "Q", "P", "g")}
    src = ASTSource(fn=rtn, signature=sig, constexprs=const, attrs=attrs)
    try:
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    except (ImportError, FileNotFoundError) as exc:  # no ptxas in this Triton build
        pytest.skip(f"Triton cannot compile for sm_90 here: {exc}")
    return str(out.asm["ptx"])


@pytest.mark.skipif(INTERPRETED, reason="compiles: not under the interpreter")
def test_compiled_for_hopper_with_exact_division_and_no_fma():
    """The kernel as the GPU runs it (PTX for sm_90, compiled here without a GPU): IEEE divisions only, no
    fused multiply-add, no flush of subnormals, the rounding additions in place, 16-byte loads of the
    weights when they are aligned, no code stores without ``CODES``. Includes float32 asymmetric per
    channel in chunks of 2048, which Triton 3.6 refused
    ("loopResult.hasOneUse()" in TritonGPUOptimizeThreadLocality) while an accumulator had two uses after
    its loop."""
    tl = pytest.importorskip("triton.language")
    cases = ((tl.bfloat16, True, True, 32, 128, True), (tl.float32, False, True, 2, 2048, False),
             (tl.float16, False, False, 4, 1024, False),
             (tl.bfloat16, True, True, 32, 128, False))  # fmt: skip
    stores = []
    for elt, sym, aligned, block_r, chunk, keep in cases:
        const = {"ELT": elt, "CODES": keep, "SYM": sym, "RCP": True, "ALIGNED": aligned, "BLOCK_R": block_r,
                 "CHUNK": chunk}  # fmt: skip
        ptx = hopper_ptx_specialised(const)
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
        assert "fma." not in ptx and "mul.rn.f32" in ptx and ".ftz" not in ptx  # subnormals kept, as torch
        assert "0f4B400000" in ptx  # 1.5 * 2^23, the round-half-to-even addition
        assert ("ld.global.v4.b32" in ptx) == aligned, const
        stores.append(len(re.findall(r"st\.global\.v4", ptx)))
    assert stores[3] == stores[0] - 2  # the same kernel without CODES: its two 16-byte code stores gone


@needs_cuda
def test_llama_shapes_on_cuda():
    """1.1B-Llama-shaped rows (2048 wide, 5632 wide per channel) on the GPU against torch's CUDA path."""
    for shape, group in (((256, 2048), 128), ((64, 5632), 0), ((128, 5632), 128)):
        for sym in (True, False):
            check_against_torch(weight(shape, torch.bfloat16), 4, group, sym)
