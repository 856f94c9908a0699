"""RTN's first call in a process (compress/_rtn_choice.py): the cost-based choice between the fused Triton
kernel and the torch batches, the forced modes, and the priming thread (on compress's one warm-up mechanism,
compress/_warmup.py ``WarmUp``).

The choice and the thread are tested with the kernel replaced by a fake (a torch RTN that overwrites each
weight with its Ŵ, as the kernel does), so they run where Triton is missing (CI). One test runs the real
kernel's priming under Triton's interpreter in a child process (skipped without Triton)."""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path

import pytest
import torch
from compress_fixtures import run_under_triton_interpreter, tiny_llama
from test_compress_cli import _run

from weightsmith.compress import RTN
from weightsmith.compress import _datafree as df
from weightsmith.compress import _rtn_choice as rc
from weightsmith.compress import _rtn_triton as rt
from weightsmith.compress._core import target_layers
from weightsmith.compress._grid import rtn_with_dequant
from weightsmith.compress._warmup import WarmUp
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)
CPU = torch.device("cpu")


class FakeRTN:
    """RTN's three entry points with the fused kernel faked in torch: ``fused_quantize`` overwrites each
    weight with the batches' Ŵ (bit-identical, as the kernel's is) and counts its calls. ``broken``: it
    raises; ``wrong``: it writes a Ŵ off by one step."""

    def __init__(self, group_size: int = 16, broken: bool = False, wrong: bool = False, **extra: object):
        self.bits, self.group_size, self.symmetric = 4, group_size, False
        self.broken, self.wrong, self.calls = broken, wrong, 0
        self.during: list[int] = []
        self.__dict__.update(extra)

    def quantize(self, W, stats=None):
        return rtn_with_dequant(W, self.bits, self.group_size, self.symmetric)[0]

    def batched_quantize(self, W):
        self.during.append(self.calls)  # the kernel calls so far, at each batch
        qw, W_hat = rtn_with_dequant(W, self.bits, self.group_size, self.symmetric)
        return qw.split(), W_hat

    def fused_quantize(self, Ws):
        self.calls += 1
        if self.broken:
            raise RuntimeError("no kernel here")
        results, errs = [], []
        for W in Ws:
            qw, W_hat = rtn_with_dequant(W.float(), self.bits, self.group_size, self.symmetric)
            errs.append(df.relative_error(W.float(), W_hat))
            W.copy_(W_hat + (1.0 if self.wrong else 0.0))
            results.append(qw)
        return results, torch.stack(errs)


@pytest.fixture
def fake_kernel(monkeypatch):
    """The CPU stands for a GPU with Triton: the fused path and the cost model apply to it, Triton counts as
    installed and importable (the fake needs none), and every test starts cold and unforced."""
    monkeypatch.setattr(df, "FUSED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(df, "BATCH_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(rc, "COSTED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(rc, "triton_installed", lambda: True)
    monkeypatch.setattr(rt, "available", lambda: True)
    monkeypatch.setattr(rt, "fusable", lambda W, dev: W.dim() == 2 and W.is_contiguous())
    monkeypatch.setattr(rc, "variant", lambda W, g, sym, bits: (W.dtype, g, sym))  # a variant a dtype
    monkeypatch.setattr(rc, "_probe", lambda g, dtype, dev: torch.randn(4, 32).to(dev, dtype))
    monkeypatch.delenv(rc.ENV, raising=False)
    monkeypatch.setattr(rc, "WARM_UP", WarmUp("rtn"))


def huge(n: int) -> torch.Tensor:
    """A float32 [n / 1024, 1024] weight that takes no memory (an expanded scalar): only its size counts."""
    return torch.zeros(1).expand(n // 1024, 1024)


@pytest.mark.usefixtures("fake_kernel")
def test_break_even_of_a_cold_start_worked_by_hand():
    """kernel = start + B / KERNEL_GBPS, batches = B / TORCH_GBPS: cold, the kernel pays from
    B = 0.45 / (1/119 − 1/760) = 0.45 / 0.0070876 = 63.49 GB of float32 weight, 15.9 G weights."""
    cfg = FakeRTN()
    gb = rc.COLD_START_S / (1 / rc.TORCH_GBPS - 1 / rc.KERNEL_GBPS)
    assert gb == pytest.approx(63.49, abs=0.01)
    n = int(gb * 1e9 / 4)
    assert not rc.kernel_pays([huge(n - 4096)], cfg)
    assert rc.kernel_pays([huge(n + 4096)], cfg)
    assert rc.start_seconds([huge(1024)], cfg) == rc.COLD_START_S


@pytest.mark.usefixtures("fake_kernel")
def test_warm_runs_the_kernel_and_a_cold_variant_costs_its_load():
    cfg = FakeRTN()
    small = [torch.randn(8, 32), torch.randn(8, 32).bfloat16()]
    assert not rc.choose(cfg, CPU, small)  # cold and small: the batches
    rc.WARM_UP.mark_warm([(torch.float32, 16, False)])
    assert rc.start_seconds(small, cfg) == rc.VARIANT_START_S  # Triton warm, the bf16 variant not yet
    assert not rc.choose(cfg, CPU, small)
    assert rc.choose(cfg, CPU, small[:1])  # every variant warm: the kernel at any size
    assert rc.start_seconds(small[:1], cfg) == 0.0


@pytest.mark.usefixtures("fake_kernel")
def test_cold_and_huge_runs_the_kernel():
    assert rc.choose(FakeRTN(), CPU, [huge(1 << 34)])  # 17 G weights


@pytest.mark.usefixtures("fake_kernel")
def test_forced_modes_and_bad_values_name_the_option(monkeypatch):
    cfg, small = FakeRTN(), [torch.randn(8, 32)]
    monkeypatch.setenv(rc.ENV, "triton")
    assert rc.choose(cfg, CPU, small)
    monkeypatch.setenv(rc.ENV, " Torch ")
    rc.WARM_UP.mark_warm([(torch.float32, 16, False)])
    assert not rc.choose(cfg, CPU, small) and not rc.choose(cfg, CPU, [huge(1 << 34)])
    monkeypatch.setenv(rc.ENV, "cuda")
    with pytest.raises(
        WeightsmithError, match="WEIGHTSMITH_RTN_KERNEL='cuda': use one of auto, triton, torch"
    ):
        rc.choose(cfg, CPU, small)
    monkeypatch.delenv(rc.ENV)
    with pytest.raises(WeightsmithError, match="option kernel='fast'"):
        rc.choose(FakeRTN(kernel="fast"), CPU, small)
    assert not rc.choose(FakeRTN(kernel="torch"), CPU, small)  # the config's option wins over the variable
    monkeypatch.setattr(rc, "triton_installed", lambda: False)
    assert not rc.choose(cfg, CPU, [huge(1 << 34)])
    monkeypatch.setenv(rc.ENV, "triton")
    with pytest.raises(WeightsmithError, match="WEIGHTSMITH_RTN_KERNEL=triton needs triton"):
        rc.choose(cfg, CPU, small)


@pytest.mark.usefixtures("fake_kernel")
def test_rtn_kernel_option_forces_a_path_and_auto_defers_to_the_variable(monkeypatch, tmp_path, capsys):
    """``RTN(kernel=...)`` (``--opt kernel=...``): ``torch``/``triton`` win over the variable, ``auto`` (the
    default) defers to it; an unknown value is refused when the config is made, naming the option."""
    small = [torch.randn(8, 32)]
    monkeypatch.setenv(rc.ENV, "triton")
    assert rc.choose(RTN(), CPU, small) and not rc.choose(RTN(kernel="torch"), CPU, small)
    monkeypatch.setenv(rc.ENV, "torch")
    assert not rc.choose(RTN(), CPU, small) and rc.choose(RTN(kernel="triton"), CPU, small)
    with pytest.raises(WeightsmithError, match="RTN option kernel='gpu': use one of auto, triton, torch"):
        RTN(kernel="gpu")
    out = tmp_path / "q"
    args = ["compress", "smollm2", "--method", "rtn", "--opt", "kernel=gpu", "--out", str(out)]
    assert _run(args) == 2 and "kernel='gpu'" in capsys.readouterr().err and not out.exists()


@pytest.mark.usefixtures("fake_kernel")
def test_the_cost_model_only_where_it_was_measured(monkeypatch):
    """Off COSTED_DEVICES (the CPU under Triton's interpreter) and with no weights given, auto is the kernel
    wherever it runs (the old rule, which test_rtn_triton.py relies on)."""
    cfg = FakeRTN()
    assert rc.choose(cfg, CPU, None)
    monkeypatch.setattr(rc, "COSTED_DEVICES", ("cuda",))
    assert rc.choose(cfg, CPU, [torch.randn(8, 32)])


def quantise(model, cfg):
    layers = target_layers(model, RTN(bits=4, group_size=16))
    q = lambda W: cfg.quantize(W)  # noqa: E731
    return layers, list(df.compress_data_free(layers, q, CPU, False, cfg.batched_quantize))


@pytest.mark.usefixtures("fake_kernel")
def test_data_free_path_takes_the_batches_cold_and_the_kernel_once_warm(monkeypatch):
    """A tiny model in a cold process: the batches (the fake kernel is not called during them), then the
    kernel primed in the background, after the batches; primed: the kernel, with the same Ŵ; once the
    kernel has run, its variants are warm (a later call skips the start-up)."""
    base = tiny_llama()
    cfg = FakeRTN()
    layers_b, res_b = quantise(copy.deepcopy(base), cfg)
    assert cfg.during and set(cfg.during) == {0}  # no kernel call (nor priming) beside the batches
    primers = rc.WARM_UP.threads()
    assert len(primers) == 1  # started once they were done
    primers[0].join()
    assert cfg.calls == 1 and rc.WARM_UP.is_warm((torch.float32, 16, False))
    layers_k, res_k = quantise(copy.deepcopy(base), cfg)
    # a launch a run of one shape (q/o, k/v, gate/up, down), and no second priming
    assert cfg.calls == 1 + 4 and rc.WARM_UP.threads() == primers
    for a, b, p, q in zip(layers_b, layers_k, res_b, res_k, strict=True):
        assert torch.equal(a.weight(), b.weight()) and p.rel_error == pytest.approx(q.rel_error, rel=1e-6)
    monkeypatch.setattr(rc, "WARM_UP", WarmUp("rtn"))  # cold again
    quantise(copy.deepcopy(base), FakeRTN(kernel="triton"))  # forced: the kernel, and then it is warm
    assert rc.WARM_UP.is_warm((torch.float32, 16, False)) and rc.WARM_UP.threads() == []


@pytest.mark.usefixtures("fake_kernel")
def test_priming_never_raises_and_sets_warm_only_on_success(monkeypatch, caplog):
    seen: list[object] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    for cfg in (FakeRTN(broken=True), FakeRTN(wrong=True)):
        thread = rc.prime(cfg, CPU, (torch.float32, torch.bfloat16))
        assert thread is not None and thread.daemon
        thread.join()
        assert cfg.calls == 1 and not rc.WARM_UP.any_warm()
    monkeypatch.setattr(rc, "_probe", lambda g, dtype, dev: 1 / 0)  # fails before any launch
    with caplog.at_level(logging.DEBUG, logger="weightsmith.compress._warmup"):
        thread = rc.prime(FakeRTN(), CPU)
        assert thread is not None
        thread.join()
    assert "rtn warm-up failed: division by zero" in caplog.text
    assert not rc.WARM_UP.any_warm() and seen == []
    monkeypatch.setattr(rc, "_probe", lambda g, dtype, dev: torch.randn(4, 32).to(dev, dtype))
    cfg = FakeRTN()
    thread = rc.prime(cfg, CPU, (torch.float32, torch.bfloat16))
    assert thread is not None
    thread.join()
    assert cfg.calls == 2 and seen == []
    assert rc.WARM_UP.is_warm((torch.float32, 16, False)) and rc.WARM_UP.is_warm((torch.bfloat16, 16, False))
    assert not rc.WARM_UP.is_warm((torch.float16, 16, False))
    assert thread in rc.WARM_UP.threads()  # joined at exit (bounded) if still compiling


@pytest.mark.usefixtures("fake_kernel")
def test_launches_take_turns_with_a_running_prime():
    """The prime launches holding the warm-up's turn; while it runs, the main thread's kernel entry
    (``serialised``, what ``_datafree.fused_quantizer`` returns) waits for that launch; with no priming
    alive it is the kernel itself (the generic turn-taking: test_warmup.py)."""

    def kernel(Ws):
        return len(Ws)

    assert rc.serialised(kernel) is kernel  # no priming thread: called as it is
    launching, go = threading.Event(), threading.Event()
    cfg = FakeRTN()
    fake = cfg.fused_quantize

    def slow_launch(Ws):
        launching.set()
        go.wait(5)
        return fake(Ws)

    cfg.fused_quantize = slow_launch
    primer = rc.prime(cfg, CPU, (torch.float32,))
    assert primer is not None and launching.wait(5) and rc.WARM_UP.turn.locked()  # inside its launch
    turned = rc.serialised(kernel)
    got: list[int] = []
    caller = threading.Thread(target=lambda: got.append(turned([1])))
    caller.start()
    caller.join(0.2)
    assert turned is not kernel and caller.is_alive() and got == []  # waits for the prime's launch
    go.set()
    caller.join()
    primer.join()
    assert got == [1] and not rc.WARM_UP.turn.locked() and rc.serialised(kernel) is kernel


@pytest.mark.usefixtures("fake_kernel")
def test_priming_is_keyed_by_grid_device_and_dtypes_and_never_beside_a_priming(monkeypatch):
    """One priming a (method, device, grid, dtypes) at a time, others beside it; a call that ran the
    batches cold primes nothing while a priming runs (it would run beside it), and once none runs it does."""
    go = threading.Event()
    probe = rc._probe
    monkeypatch.setattr(rc, "_probe", lambda g, dtype, dev: go.wait(5) and probe(g, dtype, dev))
    first = rc.prime(FakeRTN(), CPU, (torch.float32,))
    assert first is not None and first.is_alive()
    assert rc.prime(FakeRTN(), CPU, (torch.float32,)) is None  # the same priming is running
    others = [rc.prime(FakeRTN(group_size=32), CPU, (torch.float32,)), rc.prime(FakeRTN(), CPU)]
    assert all(t is not None for t in others) and len(rc.WARM_UP.threads()) == 3
    assert list(rc.primed_after(iter([1, 2]), [torch.randn(8, 32)], FakeRTN(), CPU)) == [1, 2]
    assert len(rc.WARM_UP.threads()) == 3  # busy: nothing started after the batches
    go.set()
    rc.WARM_UP.wait()
    assert not rc.WARM_UP.running() and rc.WARM_UP.is_warm((torch.bfloat16, 16, False))
    assert rc.WARM_UP.is_warm((torch.float32, 32, False))
    cfg = FakeRTN(group_size=8)
    assert list(rc.primed_after(iter([3]), [torch.randn(8, 32).bfloat16()], cfg, CPU)) == [3]
    last = rc.WARM_UP.threads()[-1]
    assert len(rc.WARM_UP.threads()) == 4 and last not in (first, *others)
    last.join()
    assert rc.WARM_UP.is_warm((torch.bfloat16, 8, False))  # the dtypes the batches took
    assert not rc.WARM_UP.is_warm((torch.float32, 8, False))


@pytest.mark.usefixtures("fake_kernel")
def test_priming_starts_only_where_the_kernel_would_run(monkeypatch):
    assert rc.prime(object(), CPU) is None  # a method without a fused kernel
    monkeypatch.setattr(df, "FUSED_DEVICES", ("cuda",))
    assert rc.prime(FakeRTN(), CPU) is None
    monkeypatch.setattr(df, "FUSED_DEVICES", ("cpu", "cuda"))
    assert rc.prime(FakeRTN(kernel="torch"), CPU) is None
    monkeypatch.setattr(rc, "triton_installed", lambda: False)
    assert rc.prime(FakeRTN(), CPU) is None


CHILD = """
import sys, torch
sys.path[:0] = sys.argv[1:3]
torch.set_num_threads(1)
from weightsmith.compress import RTN, _datafree as df, _rtn_choice as rc
df.FUSED_DEVICES = df.BATCH_DEVICES = rc.COSTED_DEVICES = ("cpu",)
cfg = RTN(bits=4, group_size=32, symmetric=False)
torch.manual_seed(0)
state = torch.get_rng_state()
t = rc.prime(cfg, "cpu", (torch.float32, torch.bfloat16))
t.join()
print("rng untouched", torch.equal(state, torch.get_rng_state()))
real = torch.randn(64, 128)
w = rc.WARM_UP
print("warm", w.any_warm(), w.is_warm(rc.variant(real, 32, False, 4)),
      w.is_warm(rc.variant(real.bfloat16(), 32, False, 4)), w.is_warm(rc.variant(real, 64, False, 4)))
cpu = torch.device("cpu")
print("choice", rc.choose(cfg, cpu, [real]), rc.choose(RTN(group_size=64), cpu, [real]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real kernel primes: next test")
def test_real_kernel_primes_under_the_interpreter():
    """The real kernel, primed on its tiny probe (drawn without touching the caller's random state): the
    variant a real weight of that group size gets is then warm (so the next compress runs the kernel),
    another group size's is not."""
    pytest.importorskip("triton")
    src = Path(rc.__file__).parents[2]
    lines = run_under_triton_interpreter(CHILD, Path(__file__).parent, src)
    assert lines == ["rng untouched True", "warm True True True False", "choice True False"], lines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_kernel_primes_on_the_gpu():
    """Primed on the GPU in its side thread, the variants of a real weight's dtypes are warm and the cost
    model then picks the kernel at any size; a group size not primed stays cold."""
    pytest.importorskip("triton")
    cfg, dev = RTN(bits=4, group_size=32, symmetric=False), torch.device("cuda")
    thread = rc.prime(cfg, dev, (torch.float32, torch.bfloat16))
    if thread is not None:  # None: primed already in this process
        thread.join()
    real = torch.randn(64, 128, device=dev)
    assert rc.WARM_UP.any_warm()
    assert rc.WARM_UP.is_warm(rc.variant(real, 32, False, 4))
    assert rc.WARM_UP.is_warm(rc.variant(real.bfloat16(), 32, False, 4))
    assert not rc.WARM_UP.is_warm(rc.variant(real, 64, False, 4))
    assert rc.choose(cfg, dev, [real])


def test_cli_resident_option_is_checked_and_off_cuda_changes_nothing(tiny_dir, tmp_path, capsys):
    import weightsmith.cli.compress as cli

    args = ["compress", str(tiny_dir), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q")]
    assert _run([*args, "--resident", "gpu"]) == 2
    assert "--resident gpu: use auto, host, device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    cuda = torch.device("cuda")
    assert cli._resident_wanted(RTN(), cuda, 1, "auto") and cli._resident_wanted(RTN(), cuda, 1, "device")
    assert not cli._resident_wanted(RTN(), cuda, 1, "host") and not cli._resident_wanted(
        RTN(), cuda, 2, "auto"
    )
    assert not cli._resident_wanted(RTN(), CPU, 1, "device")
    from weightsmith.compress import HQQ

    assert not cli._resident_wanted(HQQ(), cuda, 1, "device")  # no batch path: streamed as before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_cli_on_cuda_writes_the_same_checkpoint_resident_or_streamed(tiny_dir, tmp_path, monkeypatch, kernel):
    """``--resident device`` (the kernel or the batches, forced) and ``--resident host`` (the streamed
    pipeline) write the same tensors, bit for bit."""
    from safetensors.torch import load_file

    monkeypatch.setenv(rc.ENV, kernel)
    if kernel == "triton":
        pytest.importorskip("triton")
    outs = {}
    for where in ("device", "host"):
        out = tmp_path / where
        args = ["compress", str(tiny_dir), "--method", "rtn", "--group-size", "32", "--device", "cuda"]
        assert _run([*args, "--resident", where, "--out", str(out)]) == 0
        outs[where] = load_file(out / "model.safetensors")
    assert outs["device"].keys() == outs["host"].keys()
    for k, v in outs["device"].items():
        assert torch.equal(v, outs["host"][k]), k
