"""The layer walker: layer discovery, [out, in] views, input statistics, block-by-block calibration."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

from weightsmith.errors import WeightsmithError
from weightsmith.layers import (
    StatsSpec,
    collect_stats,
    decoder_blocks,
    find_layers,
    walk_blocks,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "compress"))
from compress_fixtures import calib, tiny_llama  # noqa: E402


def test_find_layers_names_kinds_and_heads():
    m = tiny_llama()
    names = [ly.name for ly in find_layers(m)]
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj.weight"
    assert "lm_head.weight" not in names
    assert "lm_head.weight" in [ly.name for ly in find_layers(m, heads=True)]
    assert [ly.name for ly in find_layers(m, select="down_proj")] == [
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]  # fmt: skip
    emb = find_layers(m, kinds=("embedding",))
    assert [ly.name for ly in emb] == ["model.embed_tokens.weight"]
    with pytest.raises(WeightsmithError, match="unknown layer kind"):
        find_layers(m, kinds=("conv2d",))


def test_conv1d_view_is_transposed_and_written_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    ly = next(ly for ly in find_layers(m) if ly.name.endswith("c_fc.weight"))
    assert ly.kind == "conv1d" and ly.shape == (128, 32)  # [out, in]; Conv1D stores [in, out]
    x = torch.randn(5, 32)
    assert torch.allclose(ly.module(x), x @ ly.weight().T + ly.module.bias, atol=1e-6)
    W = torch.randn(128, 32)
    ly.write(W)
    assert torch.equal(ly.module.weight, W.T)


def test_stats_match_captured_inputs():
    m = tiny_llama()
    layers = find_layers(m, select="q_proj,down_proj")
    stats = collect_stats(m, layers, calib(), StatsSpec(max_rows=10_000))
    for ly in layers:
        s = stats[ly.name]
        X = s.inputs()
        assert s.n == X.shape[0] == 4 * 16
        torch.testing.assert_close(s.hessian(), 2 * X.T @ X / s.n, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.mean_abs(), X.abs().mean(0))
        torch.testing.assert_close(s.norms(), X.norm(dim=0))


def test_attention_mask_drops_padding_rows():
    m = tiny_llama()
    ly = find_layers(m, select="layers.0.self_attn.q_proj")
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    s = collect_stats(m, ly, [{"input_ids": ids, "attention_mask": mask}])[ly[0].name]
    assert s.n == 13


def test_nan_activations_name_the_layer():
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight.fill_(float("nan"))
    with pytest.raises(
        WeightsmithError, match=r"non-finite .* 'model\.layers\.0\.self_attn\.q_proj\.weight'"
    ):
        collect_stats(m, find_layers(m), calib())


def test_feeders_are_the_norms():
    m = tiny_llama()
    stats = collect_stats(m, find_layers(m, select="layers.1"), calib(), StatsSpec(gram=False, feeders=True))
    feed = {k.split(".")[-2]: v.feeder for k, v in stats.items()}
    assert feed["q_proj"] == feed["v_proj"] == "model.layers.1.input_layernorm"
    assert feed["gate_proj"] == feed["up_proj"] == "model.layers.1.post_attention_layernorm"
    assert feed["o_proj"] is None and feed["down_proj"] is None


def test_walk_blocks_equals_whole_model_without_changes():
    m = tiny_llama()
    whole = collect_stats(m, find_layers(m), calib())
    seen: dict[str, torch.Tensor] = {}
    order: list[int] = []

    def on_block(i, prefix, block, stats):
        order.append(i)
        assert all(n.startswith(prefix) for n in stats)
        seen.update({n: s.hessian() for n, s in stats.items()})

    walk_blocks(m, calib(), on_block)
    assert order == [0, 1] and set(seen) == set(whole)
    for n, H in seen.items():
        torch.testing.assert_close(H, whole[n].hessian(), rtol=1e-4, atol=1e-5)
    assert decoder_blocks(m)[0] == "model.layers"


def test_walk_blocks_feeds_changed_block_outputs_forward():
    m = tiny_llama()
    ref = copy.deepcopy(m)

    def zero_mlp(i, prefix, block, stats):
        if i == 0:
            with torch.no_grad():
                block.mlp.down_proj.weight.zero_()

    got: dict[str, torch.Tensor] = {}

    def keep(i, prefix, block, stats):
        zero_mlp(i, prefix, block, stats)
        got.update({n: s.hessian() for n, s in stats.items()})

    walk_blocks(m, calib(), keep)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight.zero_()
    name = "model.layers.1.self_attn.q_proj.weight"
    expect = collect_stats(ref, find_layers(ref, select=name), calib())[name].hessian()
    torch.testing.assert_close(got[name], expect, rtol=1e-4, atol=1e-5)
    assert all(p.device.type == "cpu" for p in m.parameters())


def _fork_model() -> nn.Module:
    from test_layers_shared import _Fork

    torch.manual_seed(0)
    m = _Fork()
    m.twice = False
    return m


def _fork_batches() -> list[torch.Tensor]:
    """Two batches: b reads a's input in the first, not in the second (sharing differs between ranks)."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    x1[0, 0], x2[0, 0] = 1.0, -1.0
    return [x1, x2]


def _dp_worker(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    m = tiny_llama()
    batches = calib(n=4)[rank::world]
    s = collect_stats(m, find_layers(m, select="layers.0"), batches)  # q/k/v and gate/up share statistics
    fork = _fork_model()
    fs = collect_stats(fork, find_layers(fork), _fork_batches()[rank::world])
    q.put(  # numpy: outlives the process
        (
            rank,
            {k: (st.n, st.hessian().numpy(), st.mean_abs().numpy()) for k, st in s.items()},
            {k: st.gram.numpy() for k, st in fs.items()},
            fs["a.weight"] is fs["b.weight"],
        )
    )
    dist.barrier()  # no rank tears down gloo while its peer still uses the connection
    dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_all_reduce_under_gloo():
    """Two gloo ranks with half the batches each hold the statistics of all of them (~35 s: spawns), with
    shared statistics (q/k/v, gate/up), and where the ranks' layers share differently (all run unshared)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    m = tiny_llama()
    full = collect_stats(m, find_layers(m, select="layers.0"), calib(n=4))
    fork = _fork_model()
    ffull = collect_stats(fork, find_layers(fork), _fork_batches())
    for _rank, stats, grams, shared in results:
        assert stats.keys() == full.keys() and len(stats) == 7
        for k, (n, H, a) in stats.items():
            assert n == full[k].n
            torch.testing.assert_close(torch.from_numpy(H), full[k].hessian(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(a), full[k].mean_abs(), rtol=1e-4, atol=1e-6)
        assert not shared
        for k, G in grams.items():
            torch.testing.assert_close(torch.from_numpy(G), ffull[k].gram, rtol=1e-5, atol=1e-6)


def test_no_blocks_is_an_error():
    with pytest.raises(WeightsmithError, match="no stack of repeated blocks"):
        decoder_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_eva_components_from_statistics_equal_those_from_rows():
    from weightsmith.adapters.eva import input_components

    m = tiny_llama()
    name = "model.layers.1.mlp.down_proj.weight"
    s = collect_stats(
        m, find_layers(m, select=name), calib(), StatsSpec(max_rows=10_000, dtype=torch.float64)
    )[name]
    torch.testing.assert_close(
        s.covariance(), torch.cov(s.inputs().double().T, correction=0), rtol=1e-6, atol=1e-9
    )
    Vr, Sr, rr = input_components(s.inputs(), 4)
    Vs, Ss, rs = input_components(s, 4)
    torch.testing.assert_close(Ss, Sr, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(rs, rr, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close((Vr * Vs).sum(1).abs(), torch.ones(4), rtol=0, atol=1e-3)  # same up to sign
