"""Whole-step CUDA graphs (weightsmith.train.cuda_graph, issue 14).

On the CPU a stand-in backend checks the logic around the graph: "capture" records the step without
running it and "replay" runs it again reading the static input buffers, so a batch not copied into them
(or an output read from the wrong place) gives a step that differs from the eager one. The real
capture is checked against eager training on a GPU (skipped without CUDA): parameters after several
steps of LoRA, DoRA and the other methods of the speed benchmark on a tiny Llama.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import weightsmith.cli.adapt  # noqa: F401  (registers adapt on the app)
from weightsmith import adapters
from weightsmith.cli._app import app
from weightsmith.errors import WeightsmithError
from weightsmith.train import TrainArgs
from weightsmith.train.cuda_graph import (
    GraphedStep,
    TrainerGraph,
    check_trainer_option,
    prepare_optimizer,
    signature,
    unpacked_sequences,
)

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


class _Replay:
    def __init__(self, owner: FakeGraphs, fn: Callable[[], Any]) -> None:
        self.owner, self.fn = owner, fn

    def replay(self) -> None:
        self.owner.replays += 1
        self.fn()


class FakeGraphs:
    """CPU stand-in for CUDA graphs: capture runs nothing, replay re-runs the recorded step."""

    def __init__(self) -> None:
        self.eager_calls = self.captures = self.replays = 0

    def check(self, device: torch.device) -> None:
        pass

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def eager(
        self, fn: Callable[[], tuple[torch.Tensor, ...]], watch: bool = False
    ) -> tuple[torch.Tensor, ...]:
        self.eager_calls += 1
        return fn()

    def capture(self, fn: Callable[[], Any]) -> _Replay:
        self.captures += 1
        return _Replay(self, fn)


def tiny_llama(device: str = "cpu", layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return torch.nn.Module.to(LlamaForCausalLM(cfg), device)


def adapted(method: str, device: str = "cpu", layers: int = 2, **opts: Any) -> torch.nn.Module:
    model = tiny_llama(device, layers)
    adapters.adapt(model, adapters.registered_adapters()[method](**opts), targets=TARGETS)
    with torch.no_grad():  # LoRA-family B starts at zero: move it so every factor gets a gradient
        for n, p in model.named_parameters():
            # RandLoRA's λ starts at zero, which leaves γ's gradient a near-cancelling sum that Adam turns
            # into lr-sized steps of either sign: not a comparison of two paths
            if p.requires_grad and (n.endswith(".B") or n.endswith("randlora_lambda")):
                p.normal_(0, 0.02, generator=torch.Generator(device).manual_seed(1))
    return model.train()


def batches(n: int, rows: int = 2, seq: int = 8, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 64, (rows, seq), generator=g).to(device)} for _ in range(n)]


def lm_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    ids = batch["input_ids"]
    with unpacked_sequences():  # eager and graphed steps take the same attention path
        return model(input_ids=ids, labels=ids, use_cache=False).loss  # type: ignore[no-any-return]


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def eager_run(model: torch.nn.Module, data: list[dict[str, torch.Tensor]], hook: Any = None) -> list[float]:
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    losses = []
    for i, b in enumerate(data):
        loss = lm_loss(model, b)
        loss.backward()
        opt.step()
        if hook is not None:
            hook(i)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def graphed_run(
    model: torch.nn.Module,
    data: list[dict[str, torch.Tensor]],
    backend: Any = None,
    hook: Any = None,
    **kw: Any,
) -> tuple[list[float], GraphedStep]:
    opt = torch.optim.AdamW(trainable(model), lr=1e-2, capturable=backend is None)
    step = GraphedStep(model, opt, lm_loss, data[0], backend=backend, **kw)
    losses = []
    for i, b in enumerate(data):
        losses.append(float(step(b)))  # type: ignore[arg-type]
        if hook is not None:
            hook(i)
        opt.zero_grad(set_to_none=True)  # the step puts its gradients back
    return losses, step


# ------------------------------------------------------------------------------------ on the CPU


@pytest.mark.parametrize("method", ["lora", "dora", "hra", "hydra", "sltrain"])
def test_graphed_step_equals_eager_with_a_fake_graph(method):
    data = batches(6)
    ref = adapted(method, rank=4)
    model = copy.deepcopy(ref)
    fake = FakeGraphs()
    want = eager_run(ref, data)
    got, step = graphed_run(model, data, fake, warmup=2)
    assert (fake.eager_calls, fake.captures, fake.replays) == (2, 1, 4)
    assert step.captured == 1
    assert got == want  # every batch differs: a replay on stale inputs would not match
    for a, b in zip(trainable(ref), trainable(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # after a call the gradients (set to None by zero_grad above) are back and hold that step's
    assert all(p.grad is None for p in trainable(model))
    step(data[0])
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable(model))


def test_a_parameter_first_trained_inside_the_capture_is_refused():
    """An optimizer that creates a parameter's state inside the capture would reset it at every replay (PST's
    scores before they trained at level 0): refused, naming the parameter."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    calls = []

    def loss_of(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        h = m[0](b["x"])
        return (
            m[1](h) if len(calls) > 1 else h.detach() @ m[1].weight.detach().t() + m[0](b["x"]).sum()
        ).sum()

    class Recording(FakeGraphs):  # as torch.cuda.graph, capture runs the step once while recording it
        def capture(self, fn: Callable[[], Any]) -> _Replay:
            fn()
            return super().capture(fn)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = GraphedStep(model, opt, loss_of, {"x": torch.randn(2, 4)}, backend=Recording(), warmup=1)
    step({"x": torch.randn(2, 4)})
    with pytest.raises(WeightsmithError, match=r"parameter '1\.weight' got its first gradient inside"):
        step({"x": torch.randn(2, 4)})


def test_eager_hook_between_replays_sees_the_step_gradients():
    """AdaLoRA's budget hook reads every gradient after the step and masks Λ in place: allowed."""
    data = batches(5)
    ref = adapted("adalora", init_rank=4, target_rank=2, tinit=0, tfinal=1, delta_t=1)
    model = copy.deepcopy(ref)
    want = eager_run(ref, data, hook=lambda i: adapters.adapter_step(ref, i, 5))
    got, _ = graphed_run(
        model, data, FakeGraphs(), warmup=1, hook=lambda i: adapters.adapter_step(model, i, 5)
    )
    assert got == want
    for a, b in zip(trainable(ref), trainable(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_new_batch_shape_gets_its_own_graph_then_is_refused():
    model = adapted("lora", rank=2)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3)
    short, long_ = batches(1, seq=8)[0], batches(1, seq=12)[0]
    fake = FakeGraphs()
    step = GraphedStep(model, opt, lm_loss, short, warmup=1, max_graphs=2, backend=fake)
    for _ in range(2):
        step(short)
        step(long_)
    assert step.captured == 2 and fake.captures == 2
    with pytest.raises(WeightsmithError, match=r"new shape \(input_ids=\[2, 5\]\).*max_graphs"):
        for _ in range(2):
            step(batches(1, seq=5)[0])


def test_a_hook_that_replaces_a_parameter_is_refused():
    model = adapted("lora", rank=2)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3)
    b = batches(1)[0]
    step = GraphedStep(model, opt, lm_loss, b, warmup=1, backend=FakeGraphs())
    step(b)
    step(b)  # captured
    name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    p.data = torch.zeros(p.shape[0] + 1, *p.shape[1:])  # a rank change, as a re-allocation would do
    with pytest.raises(WeightsmithError, match=f"parameter '{name}' was replaced or reshaped"):
        step(b)


def test_a_changed_float_learning_rate_is_refused_a_tensor_one_in_place_is_not():
    b = batches(1)[0]
    for lr in (1e-3, torch.tensor(1e-3)):
        model = adapted("lora", rank=2)
        opt = torch.optim.AdamW(trainable(model), lr=lr)
        step = GraphedStep(model, opt, lm_loss, b, warmup=1, backend=FakeGraphs())
        step(b)
        step(b)
        if isinstance(lr, torch.Tensor):
            lr.fill_(5e-4)
            step(b)
        else:
            opt.param_groups[0]["lr"] = 5e-4
            with pytest.raises(WeightsmithError, match="learning rate changed from 0.001 to 0.0005"):
                step(b)


def test_refusals_name_the_problem():
    model = adapted("lora", rank=2)
    b = batches(1)[0]
    opt = torch.optim.AdamW(trainable(model), lr=1e-3)
    with pytest.raises(WeightsmithError, match="need a CUDA device; .* on cpu"):
        GraphedStep(model, opt, lm_loss, b)  # the real backend on the CPU
    with pytest.raises(WeightsmithError, match="batch entry 'n' is a int"):
        signature({"input_ids": b["input_ids"], "n": 3})  # type: ignore[dict-item]
    with pytest.raises(WeightsmithError, match="warmup must be an integer of at least 1"):
        GraphedStep(model, opt, lm_loss, b, warmup=0, backend=FakeGraphs())
    partial = torch.optim.AdamW(trainable(model)[:1], lr=1e-3)
    with pytest.raises(WeightsmithError, match=r"trainable parameter '.*' is not in the optimizer"):
        GraphedStep(model, partial, lm_loss, b, backend=FakeGraphs())


def test_prepare_optimizer_turns_on_capturable_before_any_state_and_refuses_after():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    assert opt.param_groups[0]["capturable"] is False
    prepare_optimizer(opt)
    assert opt.param_groups[0]["capturable"] is True
    sgd = torch.optim.SGD([p], lr=1e-3)  # no step count at all: nothing to change
    prepare_optimizer(sgd)
    stepped = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    stepped.step()
    with pytest.raises(WeightsmithError, match="capturable=False and has already stepped"):
        prepare_optimizer(stepped)


def test_trainer_graph_drops_an_all_ones_mask_and_matches_the_eager_backward():
    ref = adapted("lora", rank=2)
    model = copy.deepcopy(ref)
    seen: list[Any] = []

    def task_loss(m: torch.nn.Module, b: dict[str, Any]) -> torch.Tensor:
        seen.append(b["attention_mask"])
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits.mean()

    reg = lambda: torch.zeros(())  # noqa: E731
    fake = FakeGraphs()
    g = TrainerGraph(model, lambda b: task_loss(model, b), reg, "lm", False, 1, False, pytest.fail, fake)
    ids = batches(1)[0]["input_ids"]
    for _ in range(4):  # 3 eager warm-up calls, then capture and replay
        got = g.backward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert seen[-1] is None and g.step is not None and g.step.captured == 1
    with torch.no_grad():  # the first forward learns which adapted layers share an input (lora_group)
        task_loss(ref, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    want = task_loss(ref, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    want.backward()
    assert got == pytest.approx(float(want.detach()), abs=0)
    for a, b in zip(trainable(ref), trainable(model), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)  # zeroed in the graph, not summed


def test_trainer_graph_reports_a_nonfinite_loss_before_the_optimizer_step():
    model = adapted("lora", rank=2)
    bad: list[float] = []
    g = TrainerGraph(
        model, lambda b: torch.tensor(float("nan")) * trainable(model)[0].sum(), lambda: 0.0, "lm", False, 1,
        False, bad.append, FakeGraphs(),
    )  # fmt: skip
    g.backward(batches(1)[0])
    assert len(bad) == 1 and bad[0] != bad[0]


def _tiny_lm_task(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The hamlet task with a tiny random Llama and random 16-token blocks (no model download)."""
    from weightsmith import tasks
    from weightsmith.train import loop

    task = tasks.get_task("hamlet", max_len=16)
    blocks = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(task, "build", lambda: (tiny_llama(), None))
    monkeypatch.setattr(task, "prepare", lambda tok: setattr(task, "_blocks", blocks))
    monkeypatch.setattr(task, "evaluate", lambda *a, **k: 1.0)
    monkeypatch.setattr(loop, "_check_model", lambda spec: None)
    return task


def test_finetune_with_cuda_graphs_trains_as_without(monkeypatch):
    """The trainer's plumbing (graphed forward and backward, eager clip, AdamW step, schedule, zero_grad)
    gives the eager run's losses, with the stand-in backend on the CPU."""
    from weightsmith.train import cuda_graph, finetune, loop

    opts = dict(max_steps=6, batch_size=4, lr=1e-2, seed=0, device="cpu")
    want = finetune(task=_tiny_lm_task(monkeypatch), adapter="lora", **opts)  # type: ignore[arg-type]
    fakes: list[FakeGraphs] = []
    monkeypatch.setattr(cuda_graph, "CudaBackend", lambda device: fakes.append(FakeGraphs()) or fakes[-1])
    monkeypatch.setattr(loop, "check_trainer_option", lambda args: None)  # the CPU refusal
    got = finetune(task=_tiny_lm_task(monkeypatch), adapter="lora", cuda_graphs=True, **opts)  # type: ignore[arg-type]
    assert len(fakes) == 1 and (fakes[0].eager_calls, fakes[0].captures, fakes[0].replays) == (3, 1, 3)
    assert got.loss_history == want.loss_history and len(got.loss_history) == 6


@pytest.mark.parametrize(
    ("why", "kw", "expected"),
    [
        ("torchrun", dict(world_size=2), "runs in one process"),
        ("in-backward optimizer", dict(in_backward=True), "updates parameters inside backward"),
        ("padded classification batches", dict(task_kind="classification"), "batches of one shape"),
    ],
)
def test_trainer_graph_refusals(why, kw, expected):
    args = dict(task_kind="lm", bf16=False, world_size=1, in_backward=False, on_nonfinite=print)
    with pytest.raises(WeightsmithError, match=expected):
        TrainerGraph(torch.nn.Linear(2, 2), lambda b: torch.zeros(()), lambda: 0.0, **{**args, **kw})


def test_unpacked_sequences_skips_only_the_packing_check():
    """Inside it transformers never reads the position ids for packing; outputs are unchanged and the
    check is restored after."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    calls: list[int] = []

    def spy(position_ids: torch.Tensor) -> Any:
        calls.append(1)
        return original(position_ids)

    model = tiny_llama().eval()
    ids = batches(1)[0]["input_ids"]
    masking_utils.find_packed_sequence_indices = spy
    try:
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
            assert calls  # eager transformers does look (and reads the GPU value on the host)
            calls.clear()
            with unpacked_sequences():
                got = model(input_ids=ids, use_cache=False).logits
            assert not calls
            assert masking_utils.find_packed_sequence_indices is spy  # restored
    finally:
        masking_utils.find_packed_sequence_indices = original
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dora_compiles_to_one_graph_and_matches_eager():
    """DoRA's cached ||W0||² (keyed by the weight's data pointer) broke the compiled graph at every layer
    from the second call on, and the pieces recompiled per weight shape until dynamo's limit
    (benchmarks/RESULTS.md run 5): traced, it is one graph, with the eager result."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731  (biases: another break, _attach.py)
    ref = torch.nn.Sequential(lin(16, 32), torch.nn.GELU(), lin(32, 16))
    adapters.adapt(ref, adapters.registered_adapters()["dora"](rank=4, alpha=8), targets="0,2")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.1)
    model = copy.deepcopy(ref)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch._dynamo.reset()
    for x in torch.randn(3, 4, 16).unbind(0):  # the cache is first filled, then read (a break before)
        got, want = compiled(x), ref(x)
        torch.testing.assert_close(got, want)
        got.square().sum().backward()
        want.square().sum().backward()
    assert counter.frame_count == 1
    for a, b in zip(trainable(ref), trainable(model), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_trainer_option_is_refused_on_the_cpu_and_with_accumulation():
    base = dataclasses.replace(TrainArgs(), cuda_graphs=True)
    with pytest.raises(WeightsmithError, match="--cuda-graphs needs a CUDA GPU .*--device cpu"):
        check_trainer_option(dataclasses.replace(base, device="cpu"))
    if not CUDA:
        with pytest.raises(WeightsmithError, match="--device auto"):
            check_trainer_option(base)
    cuda = dataclasses.replace(base, device="cuda")
    if CUDA:
        with pytest.raises(WeightsmithError, match="--grad-accum 1"):
            check_trainer_option(dataclasses.replace(cuda, grad_accum=2))
    with pytest.raises(WeightsmithError, match="cuda_graphs must be True or False"):
        check_trainer_option(dataclasses.replace(base, cuda_graphs="yes"))
    check_trainer_option(TrainArgs())  # off: nothing to check


def test_adapt_cli_refuses_cuda_graphs_on_the_cpu(tmp_path):
    r = CliRunner().invoke(
        app, ["adapt", "smollm2", "--method", "lora", "--task", "hamlet", "--device", "cpu", "--cuda-graphs",
              "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert isinstance(r.exception, WeightsmithError), r.output
    assert "--cuda-graphs needs a CUDA GPU" in str(r.exception)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------- on a GPU

BENCH_METHODS = {
    "lora": dict(rank=4, alpha=8),
    "dora": dict(rank=4, alpha=8),
    "randlora": dict(rank=4, alpha=8.0),  # PEFT's alpha 640 scales each 1-ulp optimizer difference by 160
    "hra": dict(rank=4),
    "oft": {},
    "boft": {},  # the exact Cayley map (linalg.solve_ex)
    "adalora": dict(init_rank=4, target_rank=2, tinit=0, tfinal=1, delta_t=1),
    "lokr": {},
    "hydra": dict(rank=4),
    "sltrain": dict(rank=4, density=0.05),
    "vera": dict(rank=16),
    "svfit": {},  # full rank: the weight path
    "loldu": dict(rank=4),
}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", sorted(BENCH_METHODS))
def test_cuda_graph_step_equals_eager_on_a_gpu(method):
    data = batches(5, device="cuda")
    ref = adapted(method, "cuda", **BENCH_METHODS[method])
    model = copy.deepcopy(ref)
    hook = (lambda m: lambda i: adapters.adapter_step(m, i, 5)) if method == "adalora" else (lambda m: None)
    want = eager_run(ref, data, hook(ref))
    got, step = graphed_run(model, data, None, hook(model), warmup=1)
    assert step.captured == 1
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    for a, b in zip(trainable(ref), trainable(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_floor_and_bf16_autocast_trainer_path_on_a_gpu():
    """The frozen floor (no trainable parameter, no optimizer) captures; so does the trainer's path under
    bf16 autocast with an all-ones attention mask (dropped before the model sees it)."""
    model = tiny_llama("cuda").requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    data = batches(4, device="cuda")
    step = GraphedStep(model, None, lm_loss, data[0], warmup=1)
    losses = [float(step(b)) for b in data]  # type: ignore[arg-type]
    assert step.captured == 1
    torch.testing.assert_close(torch.tensor(losses[-1]), lm_loss(model, data[-1]).detach().cpu())

    ref = adapted("lora", "cuda", rank=4)
    net = copy.deepcopy(ref)

    def task_loss(m: torch.nn.Module, b: dict[str, Any]) -> torch.Tensor:
        ids = b["input_ids"]
        return m(input_ids=ids, attention_mask=b["attention_mask"], labels=ids, use_cache=False).loss

    reg = lambda: adapters.adapter_regularization(net)  # noqa: E731
    g = TrainerGraph(net, lambda b: task_loss(net, b), reg, "lm", True, 1, False, pytest.fail)
    ids = batches(1)[0]["input_ids"]  # host tensors, as the trainer gives them
    for _ in range(5):
        got = g.backward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert g.step is not None and g.step.captured == 1
    dev = {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = task_loss(ref, dev)
    want.backward()
    assert got == pytest.approx(float(want.detach()), rel=1e-3)
    for a, b in zip(trainable(ref), trainable(net), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=5e-4)  # bf16 kernels


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_zz_a_host_sync_in_the_step_is_refused_on_a_gpu():
    """A step that reads a GPU value on the host cannot be captured; the message names the line that
    synchronised in the last eager step (runs last in this file: failed captures)."""
    model = adapted("lora", "cuda", rank=2)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3, capturable=True)

    def syncing(m: torch.nn.Module, b: dict[str, Any]) -> torch.Tensor:
        loss = lm_loss(m, b)
        return loss * 2 if bool(loss > 0) else loss

    b = batches(1, device="cuda")[0]
    step = GraphedStep(model, opt, syncing, b, warmup=1)
    step(b)
    with pytest.raises(
        WeightsmithError, match=r"could not be captured.*synchronised at .*test_cuda_graph\.py"
    ):
        step(b)
