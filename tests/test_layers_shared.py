"""Layers that read one input tensor share one InputStats (one Gram accumulation a batch, not one a layer);
the sharing is checked every batch and undone (the pass is run again) where the inputs stop being shared."""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

from weightsmith.layers import InputStats, StatsSpec, collect_stats, find_layers, walk_blocks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "compress"))
from compress_fixtures import calib, tiny_llama  # noqa: E402


def _inputs_by_hand(model: nn.Module, module: nn.Module, batches) -> torch.Tensor:  # type: ignore[no-untyped-def]
    rows: list[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda _m, a: rows.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    h.remove()
    return torch.cat(rows)


def test_q_k_v_and_gate_up_share_one_statistics_equal_to_their_own_inputs():
    torch.set_num_threads(1)
    m = tiny_llama()
    stats = collect_stats(m, find_layers(m, select="layers.0"), calib(), StatsSpec(max_rows=1000))
    s = {k.split(".")[-2]: v for k, v in stats.items()}
    assert s["q_proj"] is s["k_proj"] is s["v_proj"] and s["gate_proj"] is s["up_proj"]
    assert len({id(v) for v in s.values()}) == 4  # q/k/v, o, gate/up, down
    block = m.model.layers[0]
    own = {"k_proj": block.self_attn.k_proj, "up_proj": block.mlp.up_proj, "down_proj": block.mlp.down_proj}
    for name, module in own.items():  # each layer's own inputs, captured outside the walker
        X = _inputs_by_hand(m, module, calib())
        assert s[name].n == X.shape[0] == 4 * 16
        torch.testing.assert_close(s[name].hessian(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s[name].inputs(), X)


def test_one_gram_accumulation_per_distinct_input(monkeypatch):
    """A Llama block accumulates 4 Grams a batch (q/k/v, o, gate/up, down), not 7; each block runs once
    for its statistics and, except the last, once for its changed outputs."""
    torch.set_num_threads(1)
    m = tiny_llama()
    adds: list[str] = []
    real_add = InputStats.add
    monkeypatch.setattr(InputStats, "add", lambda self, x: (adds.append(self.name), real_add(self, x))[1])
    calls = [0, 0]
    for i, blk in enumerate(m.model.layers):
        blk.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    seen: list[int] = []
    walk_blocks(
        m, calib(), lambda i, _p, _b, st: seen.append(len(set(st.values()))), StatsSpec(channels=False)
    )
    assert seen == [4, 4]
    assert len(adds) == 2 * 2 * 4  # blocks x batches x distinct inputs
    # block 0: statistics (batch 2 stops at down_proj's input: the block's forward never ends) + outputs;
    # block 1 (the last): statistics only
    assert calls == [1 + 2, 1]


class _Fork(nn.Module):
    """``a`` reads x; ``b`` reads x where ``x[0, 0] > 0``, else 2x; ``c`` reads y twice (``twice``)."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = True
        self.a, self.b, self.c, self.d = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x if float(x[0, 0]) > 0 else 2 * x)
        return (self.c(y) if self.twice else 0) + self.c(y) + self.d(y)


def test_sharing_is_undone_when_inputs_diverge_and_repeats_count():
    torch.set_num_threads(1)
    m = _Fork()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    x1[0, 0], x2[0, 0] = 1.0, -1.0
    stats = collect_stats(m, find_layers(m), [x1, x2], StatsSpec(max_rows=100))
    assert stats["a.weight"] is not stats["b.weight"]  # shared in batch 1, not in batch 2: run again unshared
    X = torch.cat([x1, x2])
    torch.testing.assert_close(stats["a.weight"].gram, X.T @ X)
    Xb = torch.cat([x1, 2 * x2])
    torch.testing.assert_close(stats["b.weight"].gram, Xb.T @ Xb)
    with torch.no_grad():
        Y = torch.cat([m.a(v) + m.b(v if float(v[0, 0]) > 0 else 2 * v) for v in (x1, x2)])
    assert stats["c.weight"].n == 2 * Y.shape[0] and stats["d.weight"].n == Y.shape[0]  # c reads y twice
    torch.testing.assert_close(stats["c.weight"].gram, 2 * Y.T @ Y)
    torch.testing.assert_close(stats["d.weight"].gram, Y.T @ Y)

    # where b always reads x and c reads y once, a/b and c/d share
    m.twice = False
    stats = collect_stats(m, find_layers(m), [x1, x1.clone()])
    assert stats["a.weight"] is stats["b.weight"] and stats["c.weight"] is stats["d.weight"]
    torch.testing.assert_close(stats["b.weight"].gram, 2 * x1.T @ x1)


def test_block_moves_overlap_in_order_with_a_side_stream(monkeypatch):
    """The CUDA path of the block mover, with fake streams and events on the CPU: each block is fetched on
    the side stream before it runs, goes home on the side stream only after waiting for the event recorded
    after its last pass, while the next block's statistics pass is queued; never more than two blocks away
    from home; the statistics are those of the plain path."""
    from weightsmith import layers as L

    torch.set_num_threads(1)
    log: list[tuple[str, int]] = []
    current = ["main"]

    class Event:
        made = 0  # events are made one a block, in order: the serial number is the block's index

        def __init__(self) -> None:
            self.block, Event.made = Event.made, Event.made + 1

        def record(self, stream):  # type: ignore[no-untyped-def]
            log.append(("record", self.block))

    class Stream:
        def wait_event(self, event):  # type: ignore[no-untyped-def]
            log.append(("wait", event.block))

    class StreamCtx:
        def __init__(self, stream):  # type: ignore[no-untyped-def]
            pass

        def __enter__(self):  # type: ignore[no-untyped-def]
            current[0] = "side"

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            current[0] = "main"

    m = tiny_llama()
    extra = copy.deepcopy(m.model.layers[1])  # three blocks: at most two of them away from home at once
    extra.self_attn.layer_idx = 2
    m.model.layers.append(extra)
    m.config.num_hidden_layers = 3
    blocks = list(m.model.layers)
    away: set[int] = set()
    real_to = nn.Module.to

    def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self in blocks:
            i, where = blocks.index(self), "device" if args and args[0] == "cuda-ish" else "home"
            assert current[0] == "side", "block moves run on the side stream"
            if (where == "device") != (i in away):  # a real move (to a block already there is a no-op)
                log.append((f"to-{where}", i))
            (away.add if where == "device" else away.discard)(i)
            assert len(away) <= 2
            args = ("cpu",)
        return real_to(self, *args, **kwargs)

    def init(self, device, home):  # type: ignore[no-untyped-def]
        self.device, self.home, self.stream, self.pending = "cuda-ish", home, Stream(), []

    monkeypatch.setattr(L._Mover, "__init__", init)
    monkeypatch.setattr(nn.Module, "to", to)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", StreamCtx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "main")
    real_pass = L._stats_pass
    monkeypatch.setattr(
        L, "_stats_pass", lambda *a: (log.append(("stats", blocks.index(a[2]))), real_pass(*a))[1]
    )
    got: dict[str, torch.Tensor] = {}
    L.walk_blocks(m, calib(), lambda i, p, b, st: got.update({n: s.hessian() for n, s in st.items()}))
    assert log == [
        ("to-device", 0), ("stats", 0), ("to-device", 1), ("record", 0),
        ("stats", 1), ("wait", 0), ("to-home", 0), ("to-device", 2), ("record", 1),
        ("stats", 2), ("wait", 1), ("to-home", 1), ("record", 2), ("wait", 2), ("to-home", 2),
    ]  # fmt: skip
    assert not away
    monkeypatch.undo()
    plain = collect_stats(m, find_layers(m), calib())
    for n, H in got.items():
        torch.testing.assert_close(H, plain[n].hessian(), rtol=1e-4, atol=1e-5)


class _Reuse(nn.Module):
    """``a`` and ``b`` read h; h is freed and ``c`` reads a new tensor (which may take h's id)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.ids: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        y = self.a(h) + self.b(h)
        old = id(h)
        del h
        z = y * 3
        self.ids.append(id(z) == old)
        return self.c(z)


def test_a_freed_shared_input_whose_id_is_reused_stays_shared():
    m = _Reuse()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, generator=g) for _ in range(3)]
    stats = collect_stats(m, find_layers(m), xs)
    assert any(m.ids), "the id was never reused: the test shows nothing"
    assert stats["a.weight"] is stats["b.weight"] is not stats["c.weight"]
    X = 2 * torch.cat(xs)
    torch.testing.assert_close(stats["b.weight"].gram, X.T @ X)


def test_a_statistics_pass_stops_after_the_last_layers_input_and_loses_nothing():
    """From batch 2 on, the statistics pass stops once down_proj (the last layer the first batch called) has
    its input: its product and whatever follows are never computed; the statistics equal the inputs."""
    torch.set_num_threads(1)
    m = tiny_llama()
    down = m.model.layers[0].mlp.down_proj
    ran = [0]
    down.register_forward_hook(lambda *_a: ran.__setitem__(0, ran[0] + 1))
    batches = calib() + calib()  # 4 batches
    stats = collect_stats(m, find_layers(m, select="layers.0"), batches, StatsSpec(max_rows=1000))
    assert ran == [1]  # batch 1 only
    X = _inputs_by_hand(m, down, batches)
    gram = stats["model.layers.0.mlp.down_proj.weight"].gram
    torch.testing.assert_close(gram, X.T @ X, rtol=1e-5, atol=1e-5)


class _Experts(nn.Module):
    """A router-like block: which experts it calls, and in which order, depends on the batch (``x[0, 0]``)."""

    ORDERS = {1: [0, 1, 2], 2: [2, 0, 1], 3: [0, 2]}

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in self.ORDERS[int(x[0, 0])]:
            x = x + self.e[i](x)
        return x


def test_a_batch_whose_control_flow_differs_runs_to_the_end():
    """Batch 1 calls e.2 last; batch 2 calls e.2 first (no stop there: e.0 and e.1 are still to come); batch
    3 never calls e.1. Every expert's statistics hold every input it read."""
    torch.set_num_threads(1)
    m = _Experts()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 4, generator=g) for _ in range(3)]
    for k, x in enumerate(xs, start=1):
        x[0, 0] = float(k)
    stats = collect_stats(m, find_layers(m), xs, StatsSpec(channels=False))
    for j, e in enumerate(m.e):
        X = _inputs_by_hand(m, e, xs)
        assert stats[f"e.{j}.weight"].n == X.shape[0]
        torch.testing.assert_close(stats[f"e.{j}.weight"].gram, X.T @ X)
