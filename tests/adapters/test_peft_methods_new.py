"""(IA)³, LoHa, LoKr, OFT and BOFT: each equation worked by hand on a 2x3 matrix, and each method against
PEFT 0.21 on the same tensors (layer outputs, merged weights, PEFT's tensor names and shapes, the folder
reader and writer).

PEFT builds the adapter on a tiny MLP with random non-zero adapter values; the same values go into
ours through ``load_peft_state`` (and through ``from_peft`` from PEFT's saved folder) and the outputs
and merged weights must agree to 1e-5 (float32).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters import AdapterContext, SharedBases
from weightsmith.adapters.boft import BOFT, butterfly_perm
from weightsmith.adapters.ia3 import IA3
from weightsmith.adapters.loha import LoHa
from weightsmith.adapters.lokr import LoKr, factor_pair
from weightsmith.adapters.oft import OFT, adjust_divisor
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)
peft = pytest.importorskip("peft")
from peft.tuners.boft import layer as boft_layer  # noqa: E402

TOL = 1e-5
W23 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def ours(config: Any, W0: torch.Tensor, name: str = "lin.weight") -> Any:
    ctx = AdapterContext(name, 0, 0, "linear", SharedBases(0), shapes=(tuple(W0.shape),))
    return config.create(W0, ctx)


def set_params(adapter: nn.Module, **values: list[Any]) -> None:
    with torch.no_grad():
        for k, v in values.items():
            getattr(adapter, k).copy_(torch.tensor(v))


def check_equation(adapter: Any, W0: torch.Tensor, expected: list[list[float]]) -> None:
    """merge, delta, the fast forward and unmerge all agree with the hand-computed W'."""
    want = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(adapter.merge(W0), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(W0 + adapter.delta(W0), want, atol=1e-6, rtol=0)
    x = torch.linspace(-1.0, 2.0, 2 * W0.shape[1]).view(2, -1)
    torch.testing.assert_close(adapter(x, W0, x @ W0.T), x @ want.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.unmerge(want), W0, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ worked by hand


def test_ia3_by_hand():
    out = ours(IA3(), W23)  # output scaling: W' = diag(l) W0
    set_params(out, ia3_l=[[2.0], [3.0]])
    check_equation(out, W23, [[2, 4, 6], [12, 15, 18]])
    inp = ours(IA3(feedforward=("lin",)), W23)  # input scaling: W' = W0 diag(l)
    set_params(inp, ia3_l=[[1.0, 2.0, 3.0]])
    check_equation(inp, W23, [[1, 4, 9], [4, 10, 18]])
    regex = ours(IA3(feedforward=("re:l.n",)), W23)
    assert regex.ia3_l.shape == (1, 3) and ours(IA3(feedforward=("re:li",)), W23).ia3_l.shape == (2, 1)
    assert ours(IA3(feedforward=("in",)), W23).ia3_l.shape == (1, 3)  # a plain suffix ("lin"), as in PEFT


def test_loha_by_hand():
    a = ours(LoHa(rank=1, alpha=2.0), W23)  # s = alpha / r = 2
    set_params(a, hada_w1_a=[[1.0], [2.0]], hada_w1_b=[[1.0, 0.0, -1.0]])
    set_params(a, hada_w2_a=[[3.0], [1.0]], hada_w2_b=[[1.0, 2.0, 1.0]])
    # (w1a w1b) = [[1,0,-1],[2,0,-2]], (w2a w2b) = [[3,6,3],[1,2,1]]; ⊙ = [[3,0,-3],[2,0,-2]]; x2
    check_equation(a, W23, [[7, 2, -3], [8, 5, 2]])
    assert a.factored  # r²(out + in) = 5 < out · in = 6: the Khatri-Rao (rank r²) path
    a.factored = False
    check_equation(a, W23, [[7, 2, -3], [8, 5, 2]])  # the dense path
    B, A = a.low_rank()
    torch.testing.assert_close(B @ A, a.delta(W23))


def test_lokr_by_hand():
    # out 2 = 1 x 2, in 3 = 1 x 3: W1 [1, 1], W2 [2, 3] (full: r=2 is not < max(2, 3) / 2)
    a = ours(LoKr(rank=2, alpha=1.0), W23)
    assert a.lokr_w1.shape == (1, 1) and a.lokr_w2.shape == (2, 3)
    set_params(a, lokr_w1=[[4.0]], lokr_w2=[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    check_equation(a, W23, [[3, 2, 3], [4, 5, 8]])  # W0 + (1/2) · 4 · W2
    # a real Kronecker product: W [4, 6] = (2 x 2) ⊗ (2 x 3), s = 1
    W46 = torch.arange(24.0).view(4, 6) / 10
    k = ours(LoKr(rank=3, alpha=3.0), W46)
    w1, w2 = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    set_params(k, lokr_w1=w1.tolist(), lokr_w2=w2.tolist())
    kron = [[w1[i // 2, j // 3] * w2[i % 2, j % 3] for j in range(6)] for i in range(4)]
    check_equation(k, W46, (W46 + torch.tensor(kron)).tolist())


def test_oft_by_hand():
    # one block of 3; Q has upper entries (t, 0, 0): a rotation in the plane of inputs 1 and 2
    exact = ours(OFT(block_size=3, cayley_neumann=False), W23)
    set_params(exact, oft_R=[[0.5, 0.0, 0.0]])
    c, s = 0.6, 0.8  # (I - Q)(I + Q)⁻¹ for t = 1/2: [[1 - t², -2t], [2t, 1 - t²]] / (1 + t²)
    R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    check_equation(exact, W23, (W23 @ R.T).tolist())
    # Neumann, 5 terms: Q² = -t² I on the plane, so R = I + 2Q + 2Q² + 2Q³ + Q⁴ there
    t = 0.5
    neu = ours(OFT(block_size=3), W23)
    set_params(neu, oft_R=[[t, 0.0, 0.0]])
    diag, off = 1 - 2 * t**2 + t**4, 2 * t - 2 * t**3
    Rn = torch.tensor([[diag, off, 0.0], [-off, diag, 0.0], [0.0, 0.0, 1.0]])
    check_equation(neu, W23, (W23 @ Rn.T).tolist())


def test_boft_by_hand():
    a = ours(BOFT(block_size=3), W23)  # one butterfly factor, one block: Cayley of (S - Sᵀ)/2
    set_params(a, boft_R=[[[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]], boft_s=[[2.0], [1.0]])
    R = torch.tensor([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])  # t = 1/2 as for OFT
    check_equation(a, W23, (torch.diag(torch.tensor([2.0, 1.0])) @ W23 @ R.T).tolist())


def test_boft_butterfly_permutation_by_hand():
    # 8 inputs, 2 chunks of 4, half-blocks of 1: even positions then odd ones in each chunk
    assert butterfly_perm(8, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_perm(8, 1, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


# ------------------------------------------------------------------------------------ PEFT's helpers


def test_shapes_and_permutations_match_peft_helpers():
    from peft.tuners.lokr.layer import factorization

    for size in (1, 2, 7, 12, 36, 48, 64, 96, 127, 128, 384, 1536):
        for f in (-1, 0, 1, 3, 4, 5, 8, 16, 64):
            assert factor_pair(size, f) == factorization(size, f), (size, f)
    oft = peft.tuners.oft.layer.OFTLayer.adjust_oft_parameters
    for size in (12, 48, 64, 100, 384):
        for v in (1, 5, 7, 13, 32, 50, 400):
            assert adjust_divisor(size, v) == oft(None, size, v), (size, v)
    perm = boft_layer.BOFTLayer.block_butterfly_perm
    for n, k, b in ((16, 8, 2), (32, 8, 4), (48, 12, 4), (64, 8, 8)):
        for i in range(1, int(math.log2(k)) + 1):
            assert torch.equal(butterfly_perm(n, k >> i, b // 2), perm(None, n, k >> i, b // 2, 1)), (
                n,
                k,
                b,
                i,
            )


# ----------------------------------------------------------------------------------- against PEFT


class MLP(nn.Module):
    """l1 12->8 (bias), l2 8->16, l3 16->6 (biases on l2, l3 when ``bias``)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 8)
        self.l2 = nn.Linear(8, 16, bias=bias)
        self.l3 = nn.Linear(16, 6, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def mlp(bias: bool = True) -> MLP:
    torch.manual_seed(0)
    return MLP(bias).eval()


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(7))
TARGETS = ["l1", "l2", "l3"]

T: dict[str, Any] = {"target_modules": TARGETS}

# name: (PEFT config, our config for load_peft_state (None: per-module patterns, reader only), bias)
CASES: dict[str, tuple[Callable[[], Any], Any, bool]] = {
    # biases on every layer: PEFT scales an output-scaled layer's bias too, l ⊙ (W0 x + b); so do we
    "ia3": (lambda: peft.IA3Config(**T, feedforward_modules=["l1", "l3"]), IA3(("l1", "l3")), True),
    "ia3-regex": (lambda: peft.IA3Config(**T, feedforward_modules="l[12]"), IA3(("re:l[12]",)), True),
    "loha": (lambda: peft.LoHaConfig(**T, r=3, alpha=5), LoHa(rank=3, alpha=5), True),
    "loha-patterns": (
        lambda: peft.LoHaConfig(**T, r=2, alpha=3, rank_pattern={"l2": 4}, alpha_pattern={"l3": 7}),
        None,
        True,
    ),
    "lokr": (lambda: peft.LoKrConfig(**T, r=2, alpha=3), LoKr(rank=2, alpha=3), True),
    "lokr-both-factor": (
        lambda: peft.LoKrConfig(**T, r=1, alpha=2, decompose_both=True, decompose_factor=2),
        LoKr(rank=1, alpha=2, decompose_both=True, decompose_factor=2),
        True,
    ),
    "lokr-patterns": (
        lambda: peft.LoKrConfig(**T, r=1, alpha=2, rank_pattern={"l3": 3}, alpha_pattern={"l1": 5}),
        None,
        True,
    ),
    "oft": (lambda: peft.OFTConfig(**T, oft_block_size=4), OFT(block_size=4), True),
    "oft-r-exact": (
        lambda: peft.OFTConfig(**T, r=2, oft_block_size=0, use_cayley_neumann=False),
        OFT(block_size=0, rank=2, cayley_neumann=False),
        True,
    ),
    "oft-share-neumann3": (
        lambda: peft.OFTConfig(**T, oft_block_size=4, block_share=True, num_cayley_neumann_terms=3),
        OFT(block_size=4, block_share=True, neumann_terms=3),
        True,
    ),
    # 5 divides none of 12, 8, 16: PEFT moves it to 4 (and warns)
    "oft-adjusted": (lambda: peft.OFTConfig(**T, oft_block_size=5), OFT(block_size=5), True),
    "boft": (lambda: peft.BOFTConfig(**T, boft_block_size=4), BOFT(block_size=4), True),
    "boft-num": (
        lambda: peft.BOFTConfig(**T, boft_block_size=0, boft_block_num=2),
        BOFT(block_size=0, block_num=2),
        True,
    ),
}


@pytest.fixture(autouse=True)
def _no_cuda_build(monkeypatch):
    """PEFT's BOFT tries to compile a CUDA extension per layer; answer "not available" at once."""
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


def randomize(pm: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def peft_model(case: str, seed: int = 1) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    make, _, bias = CASES[case]
    pm = peft.get_peft_model(mlp(bias), make()).eval()
    randomize(pm, seed)
    return pm, peft.get_peft_model_state_dict(pm)


def by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        parts = key.removeprefix("base_model.model.").split(".")
        i = next(i for i, p in enumerate(parts) if p.startswith(("ia3_", "hada_", "lokr_", "oft_", "boft_")))
        out.setdefault(".".join(parts[:i]), {})[".".join(parts[i:])] = t
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).detach().abs().max()) <= TOL * (1 + float(b.detach().abs().max()))


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapters.base_state_dict(model).items() if k.endswith("weight")}


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[1] is not None])
def test_load_peft_state_matches_peft(case):
    pm, state = peft_model(case)
    _, config, bias = CASES[case]
    with torch.no_grad():
        y_peft = pm(X)
    model = mlp(bias)
    y_base = model(X)
    adapters.adapt(model, config, targets="l1,l2,l3")
    per_module = by_module(state)
    for path, layer in adapters.adapted_layers(model):
        a = layer.adapters["default"]
        a.load_peft_state(per_module[path])
        mine = a.peft_state()  # the same names, shapes and values as PEFT's file
        assert mine.keys() == per_module[path].keys()
        assert all(torch.equal(mine[k], per_module[path][k]) for k in mine)
    with torch.no_grad():
        y = model(X)
    assert not close(y_peft, y_base), "the PEFT adapter changes nothing"
    assert close(y, y_peft), f"{case}: outputs differ by {float((y - y_peft).abs().max()):.2e}"
    want = merged_weights(pm.merge_and_unload())
    adapters.merge_adapters(model)
    got = merged_weights(model)
    for k in want:
        assert close(got[k], want[k]), f"{case}: merged {k} differs"


@pytest.mark.parametrize("case", list(CASES))
def test_reader_and_writer_match_peft(case, tmp_path):
    pm, _ = peft_model(case, seed=2)
    pm.save_pretrained(tmp_path / "peft")
    bias = CASES[case][2]
    with torch.no_grad(), warnings.catch_warnings(record=True) as own:
        warnings.simplefilter("always")
        ref = peft.PeftModel.from_pretrained(mlp(bias), tmp_path / "peft").eval()(X)
    model = mlp(bias)
    assert adapters.from_peft(model, tmp_path / "peft") == ["l1.weight", "l2.weight", "l3.weight"]
    with torch.no_grad():
        assert close(model(X), ref), f"{case}: imported adapter computes differently"
    errors = adapters.to_peft(model, tmp_path / "ours")
    assert set(errors.values()) == {0.0}  # in the method's own form (alpha_pattern too), no SVD
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(written) <= set(theirs), f"{case}: fields PEFT does not have: {set(written) - set(theirs)}"
    for table in ("rank_pattern", "alpha_pattern"):
        assert written.get(table) == theirs.get(table), f"{case}: {table}"
    with warnings.catch_warnings():  # PEFT reads our folder without a word (unless it warns on its own)
        if not [w for w in own if issubclass(w.category, UserWarning) and "peft" in w.filename]:
            warnings.filterwarnings("error", category=UserWarning, module=r"peft(\.|$)")
        again = peft.PeftModel.from_pretrained(mlp(bias), tmp_path / "ours").eval()
    assert type(again.peft_config["default"]) is type(pm.peft_config["default"])
    with torch.no_grad():
        assert close(again(X), ref), f"{case}: PEFT reads our folder differently"


def test_boft_butterfly_factors_match_peft_math(monkeypatch):
    """PEFT runs m > 1 butterfly factors only with its CUDA block-diagonal kernel; a CPU stand-in for that
    kernel lets its own permutation and product code run, against which ours is compared."""

    class FakeKernel:
        @staticmethod
        def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
            return [torch.stack([torch.block_diag(*b) for b in blocks])]

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: FakeKernel)
    for size, m in ((2, 2), (2, 3), (4, 2)):  # l2, l3: 8 and 16 inputs
        config = peft.BOFTConfig(boft_block_size=size, boft_n_butterfly_factor=m, target_modules=["l2", "l3"])
        pm = peft.get_peft_model(mlp(), config).eval()
        randomize(pm, seed=m)
        model = mlp()
        adapters.adapt(model, BOFT(block_size=size, n_butterfly_factor=m), targets="l2,l3")
        per_module = by_module(peft.get_peft_model_state_dict(pm))
        for path, layer in adapters.adapted_layers(model):
            assert per_module[path]["boft_R"].shape[0] == m
            layer.adapters["default"].load_peft_state(per_module[path])
        with torch.no_grad():
            assert close(model(X), pm(X)), (size, m)
            want = merged_weights(pm.merge_and_unload())
        adapters.merge_adapters(model)
        got = merged_weights(model)
        assert all(close(got[k], want[k]) for k in want), (size, m)


def test_oft_coft_projects_like_peft():
    config = peft.OFTConfig(oft_block_size=4, coft=True, eps=1e-2, target_modules=TARGETS)
    pm = peft.get_peft_model(mlp(), config).eval()
    randomize(pm)  # far outside the eps-ball: both project before use
    state = by_module(peft.get_peft_model_state_dict(pm))
    model = mlp()
    adapters.adapt(model, OFT(block_size=4, coft=True, eps=1e-2), targets="l1,l2,l3")
    for path, layer in adapters.adapted_layers(model):
        layer.adapters["default"].load_peft_state(state[path])
    with torch.no_grad():
        assert close(model(X), pm(X))
    for path, layer in adapters.adapted_layers(model):  # the stored entries are projected alike
        ref = pm.base_model.model.get_submodule(path).oft_R["default"].weight
        assert close(layer.adapters["default"].oft_R, ref)


def test_loha_factored_fast_path_equals_dense():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    a = ours(LoHa(rank=2, alpha=3.0), W)
    with torch.no_grad():
        a.hada_w2_b.normal_(generator=torch.Generator().manual_seed(1))
    assert a.factored
    x = torch.randn(4, 30)
    torch.testing.assert_close(a(x, W, x @ W.T), x @ (W + a.delta(W)).T, atol=1e-5, rtol=1e-5)


def test_refusals_name_the_option():
    with pytest.raises(WeightsmithError, match="bias"):
        OFT.from_peft({"oft_block_size": 4, "r": 0, "bias": "all"}, "l1")
    with pytest.raises(WeightsmithError, match="oft_block_size"):
        OFT.from_peft({"r": 4}, "l1")
    with pytest.raises(WeightsmithError, match="bias"):
        BOFT.from_peft({"boft_block_size": 4, "bias": "boft_only"}, "l1")
    with pytest.raises(WeightsmithError, match="feedforward_modules"):
        IA3.from_peft({"feedforward_modules": None}, "l1")
    with pytest.raises(WeightsmithError, match="rank_dropout"):
        LoHa.from_peft({"r": 2, "alpha": 2, "rank_dropout": 1.5}, "l1")
    with pytest.raises(WeightsmithError, match="block_size"):
        OFT(block_size=4, rank=2)
    with pytest.raises(WeightsmithError, match="in_features 12"):
        adapters.adapt(mlp(), BOFT(block_size=4, n_butterfly_factor=3), targets="l1")
    a = ours(LoKr(rank=2), torch.zeros(8, 12))
    with pytest.raises(WeightsmithError, match="lokr_w2"):
        a.load_peft_state({"lokr_w1": torch.zeros(2, 3)})
    with pytest.raises(WeightsmithError, match="shape"):
        a.load_peft_state({"lokr_w1": torch.zeros(3, 3), "lokr_w2": torch.zeros(4, 4)})


def test_minilm_loha_matches_peft(minilm):
    """A real encoder (all-MiniLM-L6-v2): LoHa on query/value/intermediate.dense, PEFT's values."""
    encoder, tok = minilm
    batch = tok(["a quiet, moving film", "noisy and dull"], return_tensors="pt", padding=True)
    config = peft.LoHaConfig(r=4, alpha=8, target_modules=["query", "value", "intermediate.dense"])
    pm = peft.get_peft_model(copy.deepcopy(encoder), config).eval()
    randomize(pm, seed=3)
    ours_model = copy.deepcopy(encoder)
    adapters.adapt(ours_model, LoHa(rank=4, alpha=8), targets="query,value,intermediate.dense")
    per_module = by_module(peft.get_peft_model_state_dict(pm))
    layers = list(adapters.adapted_layers(ours_model))
    assert len(layers) == len(per_module) == 18
    for path, layer in layers:
        layer.adapters["default"].load_peft_state(per_module[path])
    with torch.no_grad():
        ref = pm(**batch).last_hidden_state
        got = ours_model(**batch).last_hidden_state
        base = encoder(**batch).last_hidden_state
    assert not close(ref, base)
    assert close(got, ref), float((got - ref).abs().max())


def test_gpt2_conv1d_ia3_through_the_reader(tmp_path):
    """GPT-2's transposed Conv1D weights (of these methods only PEFT's (IA)³ takes Conv1D): PEFT's
    file, imported, computes what PEFT computes. Input scaling, as GPT-2's layers all have biases."""
    import transformers

    def gpt2() -> nn.Module:
        cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32)
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    ids = torch.tensor([[1, 5, 7, 2, 9, 11], [4, 4, 8, 1, 0, 6]])
    config = peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_attn", "c_fc"])
    pm = peft.get_peft_model(gpt2(), config).eval()
    randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "peft").eval()(ids).logits
        model = gpt2()
        base = model(ids).logits
        adapters.from_peft(model, tmp_path / "peft")
        got = model(ids).logits
    assert not close(ref, base)
    assert close(got, ref), float((got - ref).abs().max())
