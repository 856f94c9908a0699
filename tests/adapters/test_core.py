"""The adapter core: targeting, errors, several named adapters, shared bases, I/O, PEFT and HF export."""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from weightsmith import adapters
from weightsmith.adapters import Adapter, AdapterConfig, AdapterContext, SharedBases
from weightsmith.adapters._attach import collect_inputs
from weightsmith.adapters._io import CONFIG_NAME, TENSORS_NAME
from weightsmith.adapters.dora import DoRA
from weightsmith.adapters.lora import LoRA
from weightsmith.config import register_config
from weightsmith.errors import WeightsmithError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.ModuleDict(
            {"q_proj": nn.Linear(16, 16), "v_proj": nn.Linear(16, 16), "up": nn.Linear(16, 24)}
        )
        self.classifier = nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block["q_proj"](x) + self.block["v_proj"](x)
        return self.classifier(torch.relu(self.block["up"](h)))


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def randomize(model: nn.Module, name: str | None = None, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in adapters.adapter_parameters(model, name):
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_default_targets_skip_heads_and_selector_errors():
    m = Net()
    assert adapters.adapt(m, LoRA(rank=2)) == [
        "block.q_proj.weight",
        "block.v_proj.weight",
        "block.up.weight",
    ]
    with pytest.raises(WeightsmithError, match=r"matches none.*close names:.*q_proj"):
        adapters.adapt(Net(), LoRA(rank=2), targets="q_prj")
    assert adapters.adapt(Net(), LoRA(rank=2), targets="re:block\\.(q|v)_proj") == [
        "block.q_proj.weight",
        "block.v_proj.weight",
    ]


def test_rank_too_large_names_the_tensor_and_shape():
    with pytest.raises(WeightsmithError, match=r"block\.q_proj\.weight.*\(16, 16\).*rank 17"):
        adapters.adapt(Net(), LoRA(rank=17), targets="q_proj")


def test_embedding_refused_for_methods_without_support():
    class E(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)

    with pytest.raises(WeightsmithError, match="cannot adapt embeddings.*emb.weight"):
        adapters.adapt(E(), DoRA(rank=2), targets="emb")


def test_only_adapters_train_and_parameter_count():
    m = Net()
    adapters.adapt(m, LoRA(rank=2), targets="q_proj,up")
    assert adapters.trainable_parameters(m) == 2 * (16 + 16) + 2 * (16 + 24)
    assert not m.classifier.weight.requires_grad and not m.block["q_proj"].base.weight.requires_grad


def test_several_named_adapters_enable_merge_unmerge():
    m = Net()
    y0 = m(X)
    adapters.adapt(m, LoRA(rank=2), targets="q_proj", name="a")
    adapters.adapt(m, adapters.registered_adapters()["pissa"](rank=2), targets="q_proj,v_proj", name="b")
    with pytest.raises(WeightsmithError, match="already attached"):
        adapters.adapt(m, LoRA(rank=2), targets="q_proj", name="a")
    randomize(m)
    assert adapters.adapter_names(m) == ["a", "b"]
    y_ab = m(X)
    adapters.set_adapters_enabled(m, False, "b")
    y_a = m(X)
    adapters.set_adapters_enabled(m, True, "b")
    with adapters.adapters_disabled(m, "a"):
        y_b = m(X)
    # the two updates add up on the shared layer
    assert not torch.allclose(y_a, y_ab) and not torch.allclose(y_b, y_ab)
    q = m.block["q_proj"]
    both = q(X)
    with adapters.adapters_disabled(m, "b"):
        only_a = q(X)
    with adapters.adapters_disabled(m, "a"):
        only_b = q(X)
    with adapters.adapters_disabled(m):
        none = q(X)
    assert torch.allclose(both, only_a + only_b - none, atol=1e-6)
    with adapters.adapters_disabled(m):
        assert torch.equal(m(X), y0)
    adapters.merge_adapters(m, "a")
    assert torch.allclose(m(X), y_ab, atol=1e-5)
    with pytest.raises(WeightsmithError, match="already merged"):
        adapters.merge_adapters(m, "a")
    with pytest.raises(WeightsmithError, match="merged"):
        adapters.set_adapters_enabled(m, False, "a")
    adapters.merge_adapters(m, "b")
    assert torch.allclose(m(X), y_ab, atol=1e-5)
    adapters.unmerge_adapters(m, "a")  # not the last merged: b is taken out and put back
    assert torch.allclose(m(X), y_ab, atol=1e-5)
    adapters.unmerge_adapters(m)
    with adapters.adapters_disabled(m):
        assert torch.allclose(m(X), y0, atol=1e-6)
    with pytest.raises(WeightsmithError, match="no adapter is merged"):
        adapters.unmerge_adapters(m)
    with pytest.raises(WeightsmithError, match="no adapter named 'zz'; adapters: a, b"):
        adapters.merge_adapters(m, "zz")
    adapters.remove_adapters(m, "b")
    assert isinstance(m.block["v_proj"], nn.Linear) and adapters.adapter_names(m) == ["a"]


# A method with a shared random basis, to test the SharedBases contract.
class _SharedAdapter(Adapter):
    def __init__(self, basis: Tensor, out_f: int) -> None:
        super().__init__()
        self.register_buffer("basis", basis, persistent=False)
        self.scale = nn.Parameter(torch.zeros(out_f))

    def delta(self, W0: Tensor) -> Tensor:
        return self.scale.unsqueeze(1) * self.basis[: W0.shape[0], : W0.shape[1]]


@register_config("_test_shared", kind="test-adapter")
@dataclass(frozen=True)
class _Shared(AdapterConfig):
    seed: int = 7

    def create(self, W0: Tensor, ctx: AdapterContext) -> Adapter:
        rows = max(s[0] for s in ctx.shapes)
        cols = max(s[1] for s in ctx.shapes)
        basis = ctx.shared.get("B", (rows, cols), lambda g: torch.randn(rows, cols, generator=g))
        return _SharedAdapter(basis, W0.shape[0])


def test_shared_bases_are_one_tensor_not_saved_and_regenerated(tmp_path):
    m = Net()
    adapters.adapt(m, _Shared(), targets="block.*")
    bases = [layer.adapters["default"].basis for _, layer in adapters.adapted_layers(m)]
    assert all(b is bases[0] for b in bases) and bases[0].shape == (24, 16)
    m.to(torch.float64)
    bases = [layer.adapters["default"].basis for _, layer in adapters.adapted_layers(m)]
    assert all(b is bases[0] for b in bases) and bases[0].dtype == torch.float64
    m.to(torch.float32)
    randomize(m)
    y = m(X)
    # the global RNG is never used
    state = torch.random.get_rng_state()
    sb = SharedBases(7)
    t = sb.get("B", (24, 16), lambda g: torch.randn(24, 16, generator=g))
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(t, bases[0])
    assert not torch.equal(t, SharedBases(8).get("B", (24, 16), lambda g: torch.randn(24, 16, generator=g)))
    with pytest.raises(ValueError, match="expected"):
        sb.get("C", (2, 2), lambda g: torch.zeros(3))

    from weightsmith.config import _REGISTRY

    _REGISTRY["adapter"]["_test_shared"] = _Shared  # visible to load_adapters for this test only
    try:
        adapters.save_adapters(m, tmp_path / "s")
        assert set(load_file(tmp_path / "s" / TENSORS_NAME)) == {
            f"default/block.{n}.weight/scale" for n in ("q_proj", "v_proj", "up")
        }
        fresh = Net()
        adapters.load_adapters(fresh, tmp_path / "s")
        assert torch.equal(fresh(X), y)
    finally:
        del _REGISTRY["adapter"]["_test_shared"]


def test_save_refuses_overwrite_and_load_reports_shape_mismatch(tmp_path):
    m = Net()
    adapters.adapt(m, LoRA(rank=2), targets="q_proj")
    out = adapters.save_adapters(m, tmp_path / "a")
    with pytest.raises(WeightsmithError, match="already exists"):
        adapters.save_adapters(m, out)
    adapters.save_adapters(m, out, force=True)
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["adapters"]["default"]["config"]["method"] == "lora"
    tensors = load_file(out / TENSORS_NAME)
    tensors["default/block.q_proj.weight/A"] = torch.zeros(3, 16)
    save_file(tensors, out / TENSORS_NAME)
    fresh = Net()
    with pytest.raises(WeightsmithError, match=r"block\.q_proj\.weight/A.*\(2, 16\).*\(3, 16\)"):
        adapters.load_adapters(fresh, out)
    assert adapters.adapter_names(fresh) == []  # a failed load leaves the model as it was
    with pytest.raises(WeightsmithError, match="not a weightsmith adapter directory"):
        adapters.load_adapters(fresh, tmp_path)


def test_calibration_inputs_skip_padding():
    m = nn.Sequential(nn.Linear(4, 4))

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = m

        def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
            return self.inner(x)

    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = collect_inputs(Wrap(), {"inner.0.weight": m[0]}, [{"x": x, "attention_mask": mask}])
    assert torch.equal(rows["inner.0.weight"], x[mask.bool()])


def test_regularization_and_step_default_to_nothing():
    m = Net()
    adapters.adapt(m, LoRA(rank=2))
    assert float(adapters.adapter_regularization(m)) == 0.0
    adapters.adapter_step(m, 0, 10)


def test_gpt2_export_merged_and_peft_roundtrip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    adapters.adapt(model, LoRA(rank=4, rslora=True), targets="c_attn,c_fc")
    randomize(model)
    y = model(ids).logits
    out = adapters.export_merged(model, tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    assert torch.allclose(reloaded(ids).logits, y, atol=1e-4)
    # weightsmith -> PEFT files -> weightsmith gives the same function
    errors = adapters.to_peft(model, tmp_path / "peft")
    assert set(errors.values()) == {0.0}
    fresh = GPT2LMHeadModel(cfg).eval()
    fresh.load_state_dict(adapters.base_state_dict(model))
    adapters.from_peft(fresh, tmp_path / "peft")
    assert torch.allclose(fresh(ids).logits, y, atol=1e-5)


def test_to_peft_svd_export_reports_error(tmp_path):
    m = Net()
    adapters.adapt(m, adapters.registered_adapters()["pissa"](rank=2), targets="q_proj")
    randomize(m)
    errs = adapters.to_peft(m, tmp_path / "p")
    assert errs == {"block.q_proj.weight": 0.0}  # PiSSA is exactly LoRA of rank 2r
    w = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert w["base_model.model.block.q_proj.lora_A.weight"].shape == (4, 16)
    fresh = Net()
    adapters.from_peft(fresh, tmp_path / "p")
    assert torch.allclose(fresh(X), m(X), atol=1e-5)
    m2 = Net()
    adapters.adapt(m2, DoRA(rank=2), targets="q_proj", name="d")
    adapters.adapt(m2, adapters.registered_adapters()["adalora"](init_rank=4, target_rank=2), targets="up")
    randomize(m2)
    # a dense, full-rank update exported at rank 2: truncation error reported, and it matches the SVD tail
    layer = m2.block["up"]
    layer.adapters["default"].P.data = torch.randn(24, 4)
    errs = adapters.to_peft(m2, tmp_path / "q", rank=1)
    delta = layer.adapters["default"].delta(layer.weight())
    s = torch.linalg.svdvals(delta)
    assert errs["block.up.weight"] == 0.0  # AdaLoRA is exactly low-rank: exported at its own rank
    # DoRA has its own PEFT form: written exactly at its own rank whatever rank= asks for
    assert adapters.to_peft(m2, tmp_path / "d", name="d", rank=1) == {"block.q_proj.weight": 0.0}
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["use_dora"]) == ("LORA", 2, True)
    assert load_file(tmp_path / "d" / "adapter_model.safetensors")[
        "base_model.model.block.q_proj.lora_A.weight"
    ].shape == (2, 16)
    assert float(s[4:].norm()) < 1e-4  # sanity: rank 4 update


def test_svd_export_error_matches_singular_value_tail(tmp_path):
    @dataclass(frozen=True)
    class _Dense(AdapterConfig):
        def create(self, W0: Tensor, ctx: AdapterContext) -> Adapter:
            return _DenseAdapter(torch.zeros_like(W0))

    class _DenseAdapter(Adapter):
        def __init__(self, D: Tensor) -> None:
            super().__init__()
            self.D = nn.Parameter(D)

        def delta(self, W0: Tensor) -> Tensor:
            return self.D

    register_config("_test_dense", kind="test-adapter")(_Dense)
    m = Net()
    adapters.adapt(m, _Dense(), targets="up")
    with torch.no_grad():
        m.block["up"].adapters["default"].D.normal_()
    errs = adapters.to_peft(m, tmp_path / "p", rank=3)
    s = torch.linalg.svdvals(m.block["up"].adapters["default"].D.detach())
    assert errs["block.up.weight"] == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)
    fresh = Net()
    adapters.from_peft(fresh, tmp_path / "p")
    U, S, Vh = torch.linalg.svd(m.block["up"].adapters["default"].D.detach())
    approx = (U[:, :3] * S[:3]) @ Vh[:3]
    got = fresh.block["up"].adapters["default"].delta(fresh.block["up"].weight())
    assert torch.allclose(got, approx, atol=1e-5)
    assert F.mse_loss(got, approx) < 1e-10


def test_base_out_is_skipped_only_when_no_active_adapter_reads_it(monkeypatch):
    """``needs_base_out = False`` (OFT, BOFT, input-scaled (IA)³): the core does not compute ``x W0ᵀ`` for
    a lone adapter; with a second adapter it does, and both see it. The outputs do not change."""
    from weightsmith.adapters.boft import BOFT
    from weightsmith.adapters.ia3 import IA3
    from weightsmith.adapters.oft import OFT

    seen: list[Tensor | None] = []

    class _Spy(Adapter):
        needs_base_out = False

        def __init__(self, inner: Adapter) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
            seen.append(base_out)
            return self.inner(x, W0, base_out)  # type: ignore[no-any-return]

    for cfg in (OFT(block_size=4), BOFT(block_size=4), IA3(feedforward=("q_proj",))):
        m = Net()
        adapters.adapt(m, cfg, targets="block.q_proj")
        randomize(m)
        layer = m.block["q_proj"]
        inner = layer.adapters["default"]
        assert type(inner).needs_base_out is False
        with torch.no_grad():
            want = F.linear(X, layer.weight() + inner.delta(layer.weight()), layer.base.bias)
            layer.adapters["default"] = _Spy(inner)
            seen.clear()
            torch.testing.assert_close(layer(X), want, atol=1e-5, rtol=1e-5)
            assert seen == [None]
            adapters.adapt(m, LoRA(rank=2), targets="block.q_proj", name="lora")  # B = 0: no change
            seen.clear()
            torch.testing.assert_close(layer(X), want, atol=1e-5, rtol=1e-5)
            assert len(seen) == 1 and seen[0] is not None
            torch.testing.assert_close(seen[0], F.linear(X, layer.weight()))
    out_scaled = Net()
    adapters.adapt(out_scaled, IA3(), targets="block.q_proj")
    assert type(out_scaled.block["q_proj"].adapters["default"]).needs_base_out is True


def test_bias_scale_in_forward_merge_unmerge_and_merged_export():
    """An adapter's ``bias_scale`` s gives ``x W'ᵀ + s ⊙ b``; merging multiplies ``base.bias`` by s, unmerging
    restores it, and ``merged_state_dict`` (export --merged) holds the scaled bias without merging."""
    from weightsmith.adapters._peft import merged_state_dict
    from weightsmith.adapters.ia3 import IA3

    m = Net()
    adapters.adapt(m, IA3(), targets="block.q_proj")
    randomize(m, seed=7)
    layer = m.block["q_proj"]
    ell = layer.adapters["default"].ia3_l.detach().view(-1)
    W, b = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    with torch.no_grad():
        y = layer(X)
        torch.testing.assert_close(y, ell * (X @ W.T + b), atol=1e-6, rtol=1e-6)
        exported = merged_state_dict(m)
        torch.testing.assert_close(exported["block.q_proj.bias"], ell * b)
        adapters.merge_adapters(m)
        torch.testing.assert_close(layer.base.bias, ell * b)
        torch.testing.assert_close(layer(X), y, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(exported["block.q_proj.weight"], layer.base.weight)
        adapters.unmerge_adapters(m)
        torch.testing.assert_close(layer.base.bias, b, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(layer.base.weight, W, atol=1e-7, rtol=1e-6)


def test_read_peft_closes_the_weights_file(tmp_path):
    from weightsmith.adapters._peft import read_peft

    m = Net()
    adapters.adapt(m, LoRA(rank=2), targets="block.q_proj")
    adapters.to_peft(m, tmp_path / "p")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = read_peft(tmp_path / "p")
        gc.collect()  # a file left open is closed here, with a ResourceWarning
    assert folder.tensors
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


RANK_CHECKS = [
    ("hydra", "Hydra", 16),
    ("loha", "LoHa", 16),
    ("nola", "NOLA", 16),
    ("randlora", "RandLoRA", 16),
    ("sltrain", "SLTrain", 16),
    ("loldu", "LoLDU", 16),
    ("svfit", "SVFit", 16),
    ("compacter", "Compacter", 4),  # rank of the fast weights: at most min(out, in) / phm_dim
]


@pytest.mark.parametrize(("method", "label", "limit"), RANK_CHECKS)
def test_rank_checks_share_one_message(method, label, limit):
    cls = adapters.registered_adapters()[method]
    want = rf"block\.q_proj\.weight.*16, 16.*{label} rank 99 is not in 1\.\.{limit}"
    with pytest.raises(WeightsmithError, match=want):
        adapters.adapt(Net(), cls(rank=99), targets="block.q_proj")


def test_shared_cast_is_traced_whole_under_torch_compile():
    """A frozen shared basis cast once per dtype in eager mode (the same tensor on every call), and traced
    without a graph break under torch.compile (fullgraph raises on one)."""
    from weightsmith.adapters._core import shared_cast

    basis = torch.randn(4, 3)
    assert shared_cast(basis, torch.bfloat16) is shared_cast(basis, torch.bfloat16)
    basis.mul_(2.0)  # modified in place: cast again
    assert torch.equal(shared_cast(basis, torch.bfloat16), basis.bfloat16())
    f = torch.compile(lambda x: x @ shared_cast(basis, torch.bfloat16), backend="eager", fullgraph=True)
    x = torch.randn(2, 4).bfloat16()
    assert torch.equal(f(x), x @ basis.bfloat16())
