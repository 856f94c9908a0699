"""Foundation: stores, writer, selector, assets, model resolution and their error messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from weightsmith import assets, models
from weightsmith.errors import WeightsmithError
from weightsmith.select import Selector
from weightsmith.store import INDEX_NAME, ShardWriter, WeightStore, open_store


def _state(n: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(16, 8 + i, generator=g) for i in range(n)}
    state["bias.bf16"] = torch.randn(7, generator=g).to(torch.bfloat16)
    state["count"] = torch.arange(3, dtype=torch.int64)
    return state


def test_single_file_roundtrip_bit_exact(tmp_path):
    state = _state()
    with ShardWriter(tmp_path / "out") as w:
        for k, v in state.items():
            w.add(k, v)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    store = open_store(tmp_path / "out")
    assert set(store) == set(state)
    for k, v in state.items():
        assert store.meta(k).shape == tuple(v.shape) and store.meta(k).dtype == v.dtype
        assert torch.equal(store[k], v)


def test_sharded_roundtrip_and_index(tmp_path):
    state = _state(8)
    with ShardWriter(tmp_path / "sharded", max_shard_bytes=1200) as w:
        for k, v in state.items():
            w.add(k, v)
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "sharded" / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    store = open_store(tmp_path / "sharded")
    assert all(torch.equal(store[k], v) for k, v in state.items())


def test_writer_is_atomic_on_error(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), ShardWriter(out) as w:
        w.add("a", torch.ones(3))
        raise RuntimeError("interrupted")
    assert not out.exists()
    assert not list(tmp_path.iterdir()), "no partial directory may be left behind"


def test_writer_refuses_existing_output(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WeightsmithError, match="already exists"):
        ShardWriter(out)
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_and_truncated_files_are_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(WeightsmithError, match="truncated.safetensors.*truncated"):
        open_store(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsmithError, match="garbage.safetensors.*corrupt"):
        open_store(garbage)
    with pytest.raises(WeightsmithError, match="no such file"):
        open_store(tmp_path / "missing")


def test_missing_tensor_suggests_close_names():
    store = WeightStore.from_state_dict({"encoder.layer.0.query.weight": torch.ones(1)})
    with pytest.raises(WeightsmithError, match="encoder.layer.0.query.weight"):
        store["encoder.layer.0.querry.weight"]


def test_module_store_matches_state_dict():
    m = torch.nn.Linear(4, 3)
    store = WeightStore.from_module(m)
    assert torch.equal(store["weight"], m.weight) and store.meta("bias").shape == (3,)


def test_selector_glob_regex_and_suffix():
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    assert Selector.of("q_proj.weight").filter(names) == names[:1]
    assert Selector.of("*.mlp.*").filter(names) == names[1:2]
    assert Selector.of("re:layers\\.\\d+\\.").filter(names) == names[:2]
    assert Selector(include=("*.weight",), exclude=("*norm*",)).filter(names) == names[:2]
    with pytest.raises(WeightsmithError, match="close names"):
        Selector.of("k_proj").require(names)


def test_streaming_peak_memory_is_bounded(tmp_path):
    """A checkpoint ~6x larger than the allowed growth in RSS streams through map_weights."""
    n_tensors, rows = 16, 2048
    with ShardWriter(tmp_path / "big", max_shard_bytes=16 * 2**20) as w:
        for i in range(n_tensors):
            w.add(f"t{i}", torch.full((rows, 2048), float(i)))  # 16 MiB each, 256 MiB in all
    script = textwrap.dedent(
        f"""
        import resource, torch
        from weightsmith.store import open_store
        from weightsmith.execute import map_weights
        torch.set_num_threads(1)
        store = open_store({str(tmp_path / "big")!r})
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sums = map_weights(lambda t: float(t.sum(dtype=torch.float64)), store)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert len(sums) == {n_tensors}
        assert abs(sums["t3"] - 3.0 * {rows} * 2048) < 1e-3
        print((peak - base) // 1024)
        """
    )
    env = {"WEIGHTSMITH_PROGRESS": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    growth_mib = int(out.stdout.strip().splitlines()[-1])
    total_mib = n_tensors * 16
    assert growth_mib < total_mib / 6, f"peak RSS grew {growth_mib} MiB while streaming {total_mib} MiB"


def test_packaged_assets_and_splits_are_fixed():
    d = assets.load_dataset("rotten_tomatoes")
    assert len(d.train.y) + len(d.val.y) + len(d.test.y) == 12808
    assert set(d.train.x[:50]).isdisjoint(d.test.x)
    again = assets.load_dataset.__wrapped__("rotten_tomatoes")
    assert again.test.x[:5] == d.test.x[:5]
    assert assets.load_dataset("debates").classes == ("Democratic", "Republican", "Moderator")
    assert assets.load_dataset("digits").train.x.shape[1] == 64
    assert assets.load_dataset("mnist1d").test.x.shape == (1000, 40)
    assert "To be, or not to be" in assets.load_text("hamlet")


def test_unknown_asset_lists_known_ones():
    with pytest.raises(WeightsmithError, match="known: rotten_tomatoes"):
        assets.load_dataset("imdb")
    with pytest.raises(WeightsmithError, match="minilm, smollm2"):
        models.resolve("no/such-model-anywhere")


def test_smollm2_cache_reloads_and_matches_layout(smollm2_dir):
    store = models.open_weights(smollm2_dir)
    assert store.meta("model.layers.0.self_attn.q_proj.weight").shape == (576, 576)
    assert len(store) == 272


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """Shards written by ShardWriter load with safetensors' own reader and with transformers' index rules."""
    from safetensors.torch import load_file

    state = _state(6)
    with ShardWriter(tmp_path / "m", max_shard_bytes=700) as w:
        for k, v in state.items():
            w.add(k, v)
            assert w._offset <= max(700, v.numel() * v.element_size())
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    loaded: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(str(tmp_path / "m" / f)))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_model_directory_ignores_other_safetensors(tmp_path):
    """A HF directory's weights are model.safetensors; a head or adapter file beside it is not the model."""
    save_file({"encoder.w": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    save_file({"weight": torch.ones(3, 2)}, str(tmp_path / "head.safetensors"))
    assert list(open_store(tmp_path)) == ["encoder.w"]


def test_smollm2_cache_is_built_through_staging(tmp_path, monkeypatch):
    """The GGUF conversion writes its cache through staging: a half-built cache is replaced whole, a
    failed conversion leaves nothing new behind, and a complete cache is reused without converting."""
    import transformers

    calls, fail = [], [True]

    class FakeTokenizer:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def save_pretrained(self, directory):
            if fail[0]:
                raise RuntimeError("conversion failed")
            (directory / "tokenizer.json").write_text("{}")

    class FakeModel(torch.nn.Linear):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            calls.append(kwargs.get("gguf_file"))
            model = cls(2, 2)
            model.config = transformers.LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
            model.generation_config = None
            return model

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTokenizer)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeModel)
    cache = tmp_path / "smollm2-135m-instruct"
    cache.mkdir()
    (cache / "config.json").write_text("{}")  # half-built by an older, killed conversion
    with pytest.raises(RuntimeError, match="conversion failed"):
        models.resolve("smollm2")
    assert sorted(p.name for p in cache.iterdir()) == ["config.json"]
    fail[0] = False
    calls.clear()
    assert models.resolve("smollm2") == cache
    assert sorted(p.name for p in cache.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((cache / "config.json").read_text())["architectures"] == ["FakeModel"]
    assert set(open_store(cache)) == {"weight", "bias"}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((cache / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    assert models.resolve("smollm2") == cache and calls == ["fake.gguf"], "a complete cache is reused"
    assert {p.name for p in tmp_path.iterdir()} <= {cache.name, f".{cache.name}.lock"}, "staging left behind"
