"""The data-free path (compress/_datafree.py) wherever the model lives.

On the CPU the model is "resident" (it is where the arithmetic runs), which is the case of a model already on
the GPU compressed with ``device="cuda"``: no weight may be copied, only written once with ``Ŵ``. The
references are computed here from the min-max grid and the Frobenius norm, independently of the loop."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from compress_fixtures import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith.compress import RTN, compress
from weightsmith.compress import _datafree as df
from weightsmith.compress._core import target_layers

torch.set_num_threads(1)
COPIES = {"aten._to_copy.default", "aten.clone.default", "aten.copy_.default", "aten._copy_from.default"}


class CopiesOf(TorchDispatchMode):
    """Records every copy op whose source shares memory with one of ``weights``."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.ptrs = {w.untyped_storage().data_ptr() for w in weights}
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if name in COPIES:
            src = args[1] if name.startswith("aten.copy_") else args[0]
            if isinstance(src, torch.Tensor) and src.untyped_storage().data_ptr() in self.ptrs:
                self.seen.append(name)
        return func(*args, **(kwargs or {}))


def reference(W: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric min-max RTN worked from its definition: s = max|w| / ((2^b − 1) / 2), z = 2^(b−1),
    ŵ = s (clamp(round(w / s + z), 0, 2^b − 1) − z) per group of ``group`` input columns."""
    out_f, in_f = W.shape
    Wg = W.float().reshape(out_f, in_f // group, group)
    s = Wg.abs().amax(-1, keepdim=True) / ((2**bits - 1) / 2)
    z = 2 ** (bits - 1)
    q = (Wg / s + z).round().clamp(0, 2**bits - 1)
    return ((q - z) * s).reshape(out_f, in_f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resident_model_is_quantised_in_place_with_no_copy_of_a_weight(dtype):
    model = tiny_llama().to(dtype)
    cfg = RTN(bits=4, group_size=32)
    layers = target_layers(model, cfg)
    before = {ly.name: ly.weight().detach().clone() for ly in layers}
    ptrs = {ly.name: ly.weight().data_ptr() for ly in layers}
    watch = CopiesOf([ly.weight() for ly in layers])
    with watch:
        got = list(df.compress_data_free(layers, lambda W: cfg.quantize(W, None), torch.device("cpu")))
    # float32: the parameter is read through an alias; bfloat16: one cast to float32 (the operand), no clone
    assert watch.seen == ([] if dtype == torch.float32 else ["aten._to_copy.default"] * len(layers))
    assert [r.layer.name for r in got] == [ly.name for ly in layers]
    for r, ly in zip(got, layers, strict=True):
        W0 = before[ly.name].float()
        want = reference(W0, 4, 32)
        assert ly.weight().data_ptr() == ptrs[ly.name]  # written in place
        assert torch.equal(ly.weight(), want.to(dtype)), ly.name
        err = float(torch.linalg.matrix_norm(W0 - want) / torch.linalg.matrix_norm(W0))
        assert r.rel_error == pytest.approx(err, rel=1e-5), ly.name  # taken before Ŵ overwrote the alias
        assert r.rel_error > 0


def test_errors_are_read_back_in_groups(monkeypatch):
    """More layers than LOG_EVERY: every layer still gets its own error, in order."""
    monkeypatch.setattr(df, "LOG_EVERY", 3)
    model = tiny_llama()
    cfg = RTN(bits=3, group_size=16)
    layers = target_layers(model, cfg)
    before = [ly.weight().detach().clone() for ly in layers]
    got = list(df.compress_data_free(layers, lambda W: cfg.quantize(W, None), torch.device("cpu")))
    assert len(got) == len(layers) == 14
    for r, W0 in zip(got, before, strict=True):
        d = W0 - reference(W0, 3, 16)
        assert r.rel_error == pytest.approx(float(d.norm() / W0.norm()), rel=1e-5)


def test_conv1d_weights_are_written_back_in_their_layout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    cfg = RTN(bits=4, group_size=16)
    layers = target_layers(model, cfg)
    assert {ly.kind for ly in layers} == {"conv1d"}
    before = {ly.name: ly.weight().detach().clone() for ly in layers}
    got = list(df.compress_data_free(layers, lambda W: cfg.quantize(W, None), torch.device("cpu")))
    assert len(got) == len(layers)
    for ly in layers:
        assert torch.equal(ly.module.weight.T, reference(before[ly.name], 4, 16)), ly.name


def test_compress_of_a_resident_model_matches_a_host_copy_bit_for_bit():
    """compress() on the model in place equals quantising a separate copy; the report's errors agree."""
    base = tiny_llama()
    cfg = RTN(bits=4, group_size=32)
    m, rep = compress(copy.deepcopy(base), cfg, device="cpu")
    for ly, r in zip(target_layers(base, cfg), rep.layers, strict=True):
        W0 = ly.weight().detach()
        assert torch.equal(m.get_parameter(ly.name), reference(W0, 4, 32)), ly.name
        assert r.name == ly.name and r.rel_error > 0


class _SyncStream:
    """A CUDA stream stand-in on the CPU, where every copy is done when it returns."""

    def __init__(self, *_: object) -> None: ...

    def wait_event(self, _ev: object) -> None: ...

    def wait_stream(self, _s: object) -> None: ...


class _SyncEvent:
    def record(self, _s: object = None) -> None: ...

    def synchronize(self) -> None: ...


@pytest.fixture
def fake_cuda(monkeypatch):
    """The host pipeline's bookkeeping (ring slots, landing order, layouts) run on the CPU: CUDA's streams and
    events become synchronous stand-ins, pinned slots plain memory."""
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (imported before CUDA's names are replaced)
    import transformers.models.llama.modeling_llama  # noqa: F401

    monkeypatch.setattr(torch.cuda, "Stream", _SyncStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _SyncStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda _s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _SyncEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, _s: None)
    monkeypatch.setattr(df, "_pinned", lambda n: torch.full((n,), 255, dtype=torch.uint8))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_host_pipeline_bookkeeping_on_a_fake_device(fake_cuda, monkeypatch, arch):
    """Weights of several sizes (and Conv1D's transposed layout) through SLOTS ring slots, errors read every
    3 layers: the resident loop's weights and errors to the bit, in order."""
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setattr(df, "LOG_EVERY", 3)
    torch.manual_seed(0)
    if arch == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    else:
        base = tiny_llama()
    cfg = RTN(bits=3, group_size=16)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    la, lb = target_layers(a, cfg), target_layers(b, cfg)
    q = lambda W: cfg.quantize(W, None)  # noqa: E731
    r1 = list(df.compress_data_free(la, q, torch.device("cpu"), overlap=True))
    monkeypatch.undo()  # the resident loop with real torch
    r2 = list(df.compress_data_free(lb, q, torch.device("cpu"), overlap=False))
    assert [r.layer.name for r in r1] == [ly.name for ly in la]
    assert [r.rel_error for r in r1] == [r.rel_error for r in r2]
    for x, y in zip(la, lb, strict=True):
        assert torch.equal(x.module.weight, y.module.weight), x.name
        assert not torch.equal(x.module.weight, base.get_parameter(x.name)), x.name


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_resident_and_host_resident_agree_to_the_bit_and_the_model_stays_put(dtype):
    """A model already on the GPU (no copy of any weight, nothing to the host; RTN's fused kernel where
    Triton is installed) and a host model through the pinned ring give identical weights and codes, and
    errors equal up to their summation order."""
    cfg = RTN(bits=4, group_size=32)
    base = tiny_llama().to(dtype)
    on_host = copy.deepcopy(base)
    on_dev = copy.deepcopy(base).cuda()
    ptrs = {n: p.data_ptr() for n, p in on_dev.named_parameters()}
    _, rep_h = compress(on_host, cfg, device="cuda")
    layers = target_layers(on_dev, cfg)
    watch = CopiesOf([ly.weight() for ly in layers])
    with watch:
        _, rep_d = compress(on_dev, cfg, device="cuda")
    # layer by layer a bfloat16 weight is cast once; in RTN's batches (compress/_datafree.py ``_batched``, on
    # CUDA once compress() passes ``batched``) the stack kernel reads it, casting on the way: no copy at all
    cast = ["aten._to_copy.default"] * len(layers)
    assert watch.seen == [] or (dtype == torch.bfloat16 and watch.seen == cast)
    assert {n: p.data_ptr() for n, p in on_dev.named_parameters()} == ptrs
    assert all(p.device.type == "cuda" for p in on_dev.parameters())
    assert all(p.device.type == "cpu" for p in on_host.parameters())
    assert [r.rel_error for r in rep_d.layers] == pytest.approx([r.rel_error for r in rep_h.layers], rel=1e-6)
    for name, w in rep_h.weights.items():
        assert torch.equal(w.q.cpu(), rep_d.weights[name].q.cpu()), name  # type: ignore[attr-defined]
    for (k, v), (_, w) in zip(on_host.state_dict().items(), on_dev.state_dict().items(), strict=True):
        assert torch.equal(v, w.cpu()), k


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_host_path_handles_more_layers_than_slots_of_every_size(monkeypatch, dtype):
    """Weights of three sizes through a ring of SLOTS slots, errors read every 2 layers: the same weights and
    errors as the device-resident loop, and no weight left pinned."""
    monkeypatch.setattr(df, "LOG_EVERY", 2)
    cfg = RTN(bits=3, group_size=16)
    base = tiny_llama().to(dtype)
    host, dev = copy.deepcopy(base), copy.deepcopy(base).cuda()
    la, lb = target_layers(host, cfg), target_layers(dev, cfg)
    q = lambda W: cfg.quantize(W, None)  # noqa: E731
    r1 = list(df.compress_data_free(la, q, torch.device("cuda"), overlap=True))
    r2 = list(df.compress_data_free(lb, q, torch.device("cuda"), overlap=False))
    assert [r.rel_error for r in r1] == [r.rel_error for r in r2]
    for a, b in zip(la, lb, strict=True):
        assert torch.equal(a.weight(), b.weight().cpu()), a.name
        assert not a.weight().is_pinned(), a.name


@needs_cuda
def test_conv1d_weights_take_the_host_path_in_their_layout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    cfg = RTN(bits=4, group_size=16)
    host, dev = copy.deepcopy(base), copy.deepcopy(base).cuda()
    _, rep_h = compress(host, cfg, device="cuda")
    _, rep_d = compress(dev, cfg, device="cuda")
    assert [r.rel_error for r in rep_h.layers] == [r.rel_error for r in rep_d.layers]
    for (k, v), (_, w) in zip(host.state_dict().items(), dev.state_dict().items(), strict=True):
        assert torch.equal(v, w.cpu()), k
