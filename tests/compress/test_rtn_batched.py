"""RTN on stacks of same-shaped weights (compress/_datafree.py ``_batched``, ``RTN.batched_quantize``).

Every result of a batched run (codes, scales, zeros, per-layer errors, written weights) must equal the
layer-by-layer loop's to the bit; the loop itself is checked against RTN worked from its definition."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import tiny_llama
from test_datafree import CopiesOf, reference

from weightsmith.compress import RTN
from weightsmith.compress import _datafree as df
from weightsmith.compress._core import target_layers
from weightsmith.compress._grid import QuantizedWeight, quantize_rtn

torch.set_num_threads(1)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()


def both_ways(base, cfg, dev: str, monkeypatch, budget: int):
    """(layers, results) of the layer-by-layer loop and of the batched one, each on a copy of ``base``."""
    monkeypatch.setattr(df, "BATCH_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(df, "FUSED_DEVICES", ())  # the batches themselves, not RTN's fused kernel
    monkeypatch.setattr(df, "BATCH_BYTES", budget)
    out = []
    for batched in (None, cfg.batched_quantize):
        model = copy.deepcopy(base).to(dev)
        layers = target_layers(model, cfg)
        q = lambda W: cfg.quantize(W, None)  # noqa: E731
        out.append((layers, list(df.compress_data_free(layers, q, torch.device(dev), False, batched))))
    return out


def assert_same(loop, batched) -> None:
    (la, r1), (lb, r2) = loop, batched
    assert [r.layer.name for r in r2] == [ly.name for ly in lb]  # in layer order, whatever the batches
    assert [r.rel_error for r in r1] == [r.rel_error for r in r2]
    for x, y, a, b in zip(la, lb, r1, r2, strict=True):
        assert torch.equal(x.module.weight, y.module.weight), x.name
        assert x.module.weight.dtype == y.module.weight.dtype
        qa, qb = a.compressed, b.compressed
        assert isinstance(qa, QuantizedWeight) and isinstance(qb, QuantizedWeight)
        for t in ("q", "scale", "zero"):
            ta, tb = getattr(qa, t), getattr(qb, t)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), (x.name, t)
        assert torch.equal(qa.dequantize(), qb.dequantize()), x.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("budget", [1 << 30, 3 * 8 * 64 * 64], ids=["one-run-a-shape", "runs-split"])
def test_batched_equals_the_layer_loop_to_the_bit(monkeypatch, dtype, budget):
    """Mixed shapes (q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128), errors read every 3 layers; with the
    small budget the 64x64 run is cut after 3 weights."""
    monkeypatch.setattr(df, "LOG_EVERY", 3)
    base = tiny_llama().to(dtype)
    cfg = RTN(bits=3, group_size=16, symmetric=False)
    before = {ly.name: ly.weight().detach().float().clone() for ly in target_layers(base, cfg)}
    loop, batched = both_ways(base, cfg, "cpu", monkeypatch, budget)
    assert_same(loop, batched)
    for r in batched[1]:
        assert r.rel_error > 0
    runs = df.batches(batched[0], budget)
    assert sorted(i for run in runs for i in run) == list(range(len(batched[0])))
    if budget < 1 << 20:
        sizes = sorted(len(r) for r in runs if batched[0][r[0]].shape == (64, 64))
        assert sizes == [1, 3] and len(runs) > 4  # four 64x64 weights cut 3 + 1
    # the loop against RTN from its definition (symmetric: the reference's grid)
    sym = RTN(bits=4, group_size=32)
    (_, r1), (lb, r2) = both_ways(base, sym, "cpu", monkeypatch, budget)
    for ly, a, b in zip(lb, r1, r2, strict=True):
        want = reference(before[ly.name], 4, 32)
        assert torch.equal(ly.weight(), want.to(dtype)), ly.name
        err = float((before[ly.name] - want).norm() / before[ly.name].norm())
        assert b.rel_error == a.rel_error == pytest.approx(err, rel=1e-5), ly.name


def test_conv1d_layout_in_batches(monkeypatch):
    base = gpt2()
    cfg = RTN(bits=4, group_size=16)
    loop, batched = both_ways(base, cfg, "cpu", monkeypatch, 1 << 30)
    assert {ly.kind for ly in batched[0]} == {"conv1d"}
    assert_same(loop, batched)
    for ly in batched[0]:
        W0 = base.get_parameter(ly.name).T
        assert torch.equal(ly.module.weight.T, reference(W0, 4, 16)), ly.name


def test_a_batch_reads_each_weight_once_and_writes_it_once_in_place(monkeypatch):
    monkeypatch.setattr(df, "BATCH_DEVICES", ("cpu",))
    model = tiny_llama().to(torch.bfloat16)
    cfg = RTN(bits=4, group_size=32)
    layers = target_layers(model, cfg)
    ptrs = [ly.weight().data_ptr() for ly in layers]
    watch = CopiesOf([ly.weight() for ly in layers])
    with watch:
        got = list(df.compress_data_free(layers, lambda W: cfg.quantize(W, None), torch.device("cpu"),
                                         batched=cfg.batched_quantize))  # fmt: skip
    assert watch.seen == []  # read by the stack kernel (a cast on the way), no per-weight copy or cast
    assert [ly.weight().data_ptr() for ly in layers] == ptrs
    assert len(got) == len(layers)


def test_batching_is_only_used_where_it_pays(monkeypatch):
    """On the CPU (not in BATCH_DEVICES) no stack is made: ``batched`` gets one weight a run (checked by a
    quantiser that records its stacks), and batch_quantizer finds the opt-in only on methods that have it."""
    from weightsmith.compress import HQQ

    assert df.BATCH_DEVICES == ("cuda",)
    model = tiny_llama()
    cfg = RTN(bits=4, group_size=32)
    sizes: list[int] = []

    def record(W: torch.Tensor) -> tuple[list[QuantizedWeight], torch.Tensor]:
        sizes.append(W.shape[0])
        return cfg.batched_quantize(W)

    got = list(df.compress_data_free(target_layers(model, cfg), lambda W: cfg.quantize(W, None),
                                     torch.device("cpu"), batched=record))  # fmt: skip
    assert len(got) == 14 and sizes == [1] * 14
    assert df.batch_quantizer(cfg) == cfg.batched_quantize
    assert df.batch_quantizer(HQQ(bits=4, group_size=32)) is None


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_the_cpu_a_weight_a_run_equals_the_loop_and_reads_float32_in_place(dtype, model):
    """The CPU's runs of one weight give the loop's weights, codes, scales and errors to the bit; a float32
    Linear weight is read through an alias (no copy of it is made); GPT-2's Conv1D weights (stored
    transposed) are copied contiguous first, as the loop does; every weight keeps its storage."""
    torch.set_num_threads(1)
    base = (tiny_llama() if model == "llama" else gpt2()).to(dtype)
    cfg = RTN(bits=3, group_size=16, symmetric=False)
    out = []
    for batched in (None, cfg.batched_quantize):
        model = copy.deepcopy(base)
        layers = target_layers(model, cfg)
        ptrs = [ly.weight().data_ptr() for ly in layers]
        watch = CopiesOf([ly.weight() for ly in layers])
        with watch:
            got = list(df.compress_data_free(layers, lambda W: cfg.quantize(W, None), torch.device("cpu"),
                                             batched=batched))  # fmt: skip
        if batched is not None and dtype == torch.float32 and model == "llama":
            assert watch.seen == []
        assert [ly.weight().data_ptr() for ly in layers] == ptrs
        out.append((layers, got))
    assert_same(*out)


def test_batches_respect_the_budget_and_group_by_shape_and_dtype():
    model = tiny_llama()
    model.model.layers[1].to(torch.bfloat16)
    layers = target_layers(model, RTN(group_size=32))
    runs = df.batches(layers, 2 * 8 * 64 * 64)
    for run in runs:
        keys = {(ly.shape, ly.weight().dtype) for ly in (layers[i] for i in run)}
        assert len(keys) == 1
        assert len(run) == 1 or len(run) * 8 * layers[run[0]].weight().numel() <= 2 * 8 * 64 * 64
    assert runs == sorted(runs)
    assert sorted(i for run in runs for i in run) == list(range(len(layers)))
    # bfloat16 and float32 weights of one shape never share a stack
    assert all(len({layers[i].weight().dtype for i in run}) == 1 for run in runs)


def test_stacked_quantisation_and_split_results():
    """quantize_rtn and dequantize over leading dims equal the per-weight ones; split results own their
    scales and zeros, so a safetensors file takes them all (it refuses tensors that share memory)."""
    from safetensors.torch import save

    torch.manual_seed(0)
    Ws = torch.randn(3, 8, 32)
    cfg = RTN(bits=3, group_size=8, symmetric=False)
    parts, W_hat = cfg.batched_quantize(Ws)
    stacked = quantize_rtn(Ws, 3, 8, False)
    assert torch.equal(stacked.dequantize(), W_hat)
    for W, p, Wh in zip(Ws, parts, W_hat, strict=True):
        one = quantize_rtn(W, 3, 8, False)
        assert torch.equal(one.q, p.q) and torch.equal(one.scale, p.scale) and torch.equal(one.zero, p.zero)
        assert torch.equal(one.dequantize(), Wh)
    blob = save({f"{i}.{t}": getattr(p, t) for i, p in enumerate(parts) for t in ("scale", "zero")})
    assert len(blob) > 0
    assert len({p.scale.untyped_storage().data_ptr() for p in parts}) == 3


def test_relative_error_of_a_stack_is_each_weights_own():
    """‖W − Ŵ‖_F / ‖W‖_F (float64 by hand) for each weight of a stack, the same bits alone or stacked."""
    torch.manual_seed(1)
    W, W_hat = torch.randn(4, 16, 48), torch.randn(4, 16, 48)
    stacked = df.relative_error(W, W_hat)
    for i in range(4):
        alone = df.relative_error(W[i], W_hat[i])
        assert alone.shape == () and alone.dtype == torch.float32
        assert torch.equal(alone, stacked[i])
        d = (W[i].double() - W_hat[i].double()).norm() / W[i].double().norm()
        assert float(alone) == pytest.approx(float(d), rel=1e-6)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_equals_the_layer_loop_on_cuda(monkeypatch, dtype):
    monkeypatch.setattr(df, "LOG_EVERY", 4)
    cfg = RTN(bits=4, group_size=32)
    for budget in (1 << 30, 3 * 8 * 64 * 64):
        assert_same(*both_ways(tiny_llama().to(dtype), cfg, "cuda", monkeypatch, budget))
    assert_same(*both_ways(gpt2(), cfg, "cuda", monkeypatch, 1 << 30))
