"""RegMean (Jin et al., ICLR 2023): the closed form against least squares by hand, alpha, walker, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from weightsmith.errors import WeightsmithError
from weightsmith.merge import merge
from weightsmith.merge.recipe import run as run_recipe
from weightsmith.merge.regmean import RegMean, regmean_merge
from weightsmith.store import open_store


class Block(nn.Module):
    def __init__(self, d_in: int = 4, d_out: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h)


class Stack(nn.Module):
    """Blocks of one Linear each, walked by the layer walker."""

    def __init__(self, n: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = b(x)
        return x


def _states(n_blocks: int, n_models: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {f"layers.{j}.lin.weight": torch.randn(4, 4, generator=g) for j in range(n_blocks)}
        for _ in range(n_models)
    ]


def _lstsq(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W Σ_i ‖X_i W^T − X_i W_i^T‖² / n_i, solved by least squares on the stacked rows."""
    A = torch.cat([x.double() / len(x) ** 0.5 for x in xs])
    Y = torch.cat([x.double() @ w.double().T / len(x) ** 0.5 for x, w in zip(xs, ws, strict=True)])
    return torch.linalg.lstsq(A, Y).solution.T.float()


def test_closed_form_equals_the_least_squares_solution_in_every_block():
    g = torch.Generator().manual_seed(1)
    states = _states(2)
    xs = [torch.randn(12, 4, generator=g), torch.randn(9, 4, generator=g) @ torch.randn(4, 4, generator=g)]
    out = regmean_merge(Stack(2), states, [[x] for x in xs], RegMean(alpha=1.0, damp=0.0))
    torch.testing.assert_close(
        out["layers.0.lin.weight"],
        _lstsq(xs, [s["layers.0.lin.weight"] for s in states]),
        atol=1e-5,
        rtol=1e-5,
    )
    # block 1 reads each model's OWN block-0 outputs, X_i W0_i^T
    hidden = [x @ s["layers.0.lin.weight"].T for x, s in zip(xs, states, strict=True)]
    torch.testing.assert_close(
        out["layers.1.lin.weight"],
        _lstsq(hidden, [s["layers.1.lin.weight"] for s in states]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_alpha_zero_is_a_channel_weighted_average_and_the_plain_average_when_energies_agree():
    g = torch.Generator().manual_seed(2)
    states = _states(1)
    w = [s["layers.0.lin.weight"] for s in states]
    x1 = torch.randn(10, 4, generator=g)
    x2 = torch.randn(10, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0])
    out = regmean_merge(Stack(1), states, [[x1], [x2]], RegMean(alpha=0.0, damp=0.0))["layers.0.lin.weight"]
    d1, d2 = x1.square().mean(0), x2.square().mean(0)  # diag(X^T X / n)
    torch.testing.assert_close(out, (w[0] * d1 + w[1] * d2) / (d1 + d2))
    # same channel energies, different correlations (columns of x1 with flipped signs): alpha=0 averages ...
    x2 = x1 * torch.tensor([1.0, -1.0, 1.0, -1.0])
    avg = regmean_merge(Stack(1), states, [[x1], [x2]], RegMean(alpha=0.0, damp=0.0))["layers.0.lin.weight"]
    torch.testing.assert_close(avg, (w[0] + w[1]) / 2)
    # ... while alpha=1 does not (the off-diagonal entries matter)
    full = regmean_merge(Stack(1), states, [[x1], [x2]], RegMean(alpha=1.0, damp=0.0))["layers.0.lin.weight"]
    assert (full - avg).abs().max() > 1e-2


def test_alpha_scales_only_the_off_diagonal_entries():
    from weightsmith.merge.regmean import RegMeanStats

    G = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
    torch.testing.assert_close(
        RegMeanStats(RegMean(alpha=0.25)).reduced(G), torch.tensor([[4.0, 0.5], [0.5, 3.0]])
    )


def test_a_channel_no_model_sees_gets_the_average_weight():
    g = torch.Generator().manual_seed(3)
    states = _states(1)
    xs = [torch.randn(8, 4, generator=g) * torch.tensor([1.0, 1.0, 1.0, 0.0]) for _ in range(2)]
    out = regmean_merge(Stack(1), states, [[x] for x in xs], RegMean(alpha=1.0))["layers.0.lin.weight"]
    mean = (states[0]["layers.0.lin.weight"] + states[1]["layers.0.lin.weight"]) / 2
    torch.testing.assert_close(out[:, 3], mean[:, 3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("opts", "word"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"samples": 0}, "samples"),
        ({"split": "dev"}, "split"),
        ({"damp": -1.0}, "damp"),
    ],
)
def test_bad_options_name_the_option(opts, word):
    with pytest.raises(WeightsmithError, match=word):
        RegMean(**opts)


# ------------------------------------------------------------------------------- checkpoints on disk


def tiny_llama_family(root: Path, minilm_dir: Path, n: int = 2, seed: int = 0) -> tuple[Path, list[Path]]:
    """A tiny random Llama (MiniLM's tokenizer, 2 blocks) and ``n`` perturbed copies, as model folders."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    dirs = []
    for j in range(n + 1):
        if j:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        d = root / ("base" if j == 0 else f"ft{j - 1}")
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return dirs[0], dirs[1:]


@pytest.fixture(scope="module")
def family(tmp_path_factory, minilm_dir) -> tuple[Path, list[Path]]:
    return tiny_llama_family(tmp_path_factory.mktemp("regmean"), minilm_dir)


def test_recipe_writes_the_in_memory_result(family, tmp_path):
    from weightsmith import models

    _, fts = family
    recipe = tmp_path / "r.yaml"
    lines = ["method: regmean", "data: [hamlet]", "samples: 2", "seq_len: 16", "models:"]
    recipe.write_text("\n".join(lines + [f"  - {p}" for p in fts]) + "\n")
    out = run_recipe(recipe, tmp_path / "out")
    merged = open_store(out)
    model, tok = models.load_model(fts[0])
    from weightsmith.merge._dataaware import load_batches

    cfg = RegMean(data=("hamlet",), samples=2, seq_len=16)
    batches = [load_batches(tok, "hamlet", cfg, single=True)] * 2
    ref = regmean_merge(model, [open_store(p) for p in fts], batches, cfg)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], ref[name])
    stores = [open_store(p) for p in fts]
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(merged[norm], (stores[0][norm] + stores[1][norm]) / 2)
    assert not torch.allclose(merged[name], (stores[0][name] + stores[1][name]) / 2)
    # Python API, same result
    again = merge(fts, cfg, tmp_path / "again")
    torch.testing.assert_close(open_store(again)[name], merged[name])


def test_recipe_errors_name_the_option(family, tmp_path):
    _, fts = family
    with pytest.raises(WeightsmithError, match="needs data"):
        merge(fts, RegMean(), tmp_path / "o1")
    with pytest.raises(WeightsmithError, match="2 sources for 2 models|3 sources"):
        merge(fts, RegMean(data=("hamlet", "hamlet", "hamlet")), tmp_path / "o2")
    with pytest.raises(WeightsmithError, match="not a packaged data set"):
        merge(fts, RegMean(data=("no-such-data",), samples=2, seq_len=8), tmp_path / "o3")


def test_mergekit_style_yaml_reads_the_data_options_from_parameters(family, tmp_path):
    """``merge_method: regmean`` with ``parameters:`` (what recipe.from_mergekit hands to
    ``recipe.data_aware_recipe``): the same model as our format."""
    import yaml

    from weightsmith.merge.recipe import data_aware_recipe as mergekit_recipe

    _, fts = family
    data = yaml.safe_load(
        f"merge_method: regmean\nmodels:\n  - model: {fts[0]}\n    parameters: {{data: hamlet}}\n"
        f"  - model: {fts[1]}\n    parameters: {{data: hamlet}}\nparameters:\n  alpha: 0.5\n  samples: 2\n"
        "  seq_len: 16\n"
    )
    r = mergekit_recipe(data)
    assert r.method == RegMean(alpha=0.5, data=("hamlet", "hamlet"), samples=2, seq_len=16)
    out = run_recipe(r, tmp_path / "mk")
    ours = merge(fts, RegMean(alpha=0.5, data=("hamlet",), samples=2, seq_len=16), tmp_path / "ours")
    name = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(open_store(out)[name], open_store(ours)[name])
    with pytest.raises(WeightsmithError, match="nope"):
        mergekit_recipe(
            {"merge_method": "regmean", "models": [str(p) for p in fts], "parameters": {"nope": 1}}
        )


def test_gpt2_conv1d_layers_keep_their_layout():
    """Conv1D stores [in, out]: a model merged with itself comes back (a transposed solve would not)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches = [
        {"input_ids": torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(i))}
        for i in range(3)
    ]
    out = regmean_merge(model, [state, state], [batches, batches[::-1]], RegMean(alpha=0.7))
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"):
        torch.testing.assert_close(out[name], state[name], atol=1e-4, rtol=1e-4)
